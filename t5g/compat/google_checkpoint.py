"""Google's Flax/Orbax checkpoint directories of Gemma 2 and T5Gemma, read tensor by tensor.

Layouts (facts file §3.3): FLAT, as the Gemma 2 checkpoints were released
(`'transformer/layer_0/attn/q_einsum' -> {'w': ...}`), NESTED (the Flax init tree, also the
T5Gemma `encoder`/`decoder` trees), and either under Kauldron's `params` item. The tree's
structure and shapes come from Orbax's metadata; each tensor is restored alone (partial
restore) when the conversion asks for it. Checkpoints hold no config: it is matched from the
shapes against the Gemma 2 presets, or given (a preset name or a config JSON file).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from t5g.checkpoints import model_dir
from t5g.compat.google_flax import GoogleTreeSource, TransposeGating, model_prefix
from t5g.errors import InputError
from t5g.model.config import EncoderDecoderConfig, ModelConfig, StackConfig
from t5g.model.presets import GEMMA2_STACKS

_KAULDRON_KEYS = {"collections", "opt_state", "params", "step"}
GOOGLE_VOCAB_ROWS = 256128  # Google's tables; the last 128 rows are padding.


def is_google_checkpoint(path: str) -> bool:
  """Whether `path` is an Orbax PyTree directory (Google's Flax checkpoints are)."""
  return os.path.isfile(os.path.join(path, "_METADATA")) or os.path.isfile(
      os.path.join(path, "checkpoint"))


@dataclasses.dataclass(frozen=True)
class StoredLeaf:
  """One array of an Orbax PyTree checkpoint, restored alone when np.asarray asks for it."""

  path: str
  keys: tuple[str, ...]  # The keys as stored (FLAT keys contain '/').
  shape: tuple[int, ...]
  dtype: np.dtype

  def __array__(self, dtype=None, copy=None) -> np.ndarray:
    stored = jax.ShapeDtypeStruct(self.shape, self.dtype)
    return np.asarray(model_dir.read_arrays(self.path, {self.keys: stored})[self.keys],
                      dtype=dtype)


def read_tree(path: str) -> dict:
  """The checkpoint's NESTED tree of StoredLeaf (FLAT keys split on '/', Kauldron unwrapped)."""
  try:
    metadata = ocp.PyTreeCheckpointer().metadata(path)
  except (ValueError, KeyError, FileNotFoundError, OSError) as e:
    raise InputError(f"{path}: not a readable Orbax checkpoint ({type(e).__name__})") from None
  metadata = getattr(metadata, "item_metadata", metadata)
  tree: dict = {}

  def add(node: Any, stored: tuple[str, ...]) -> None:
    if isinstance(node, dict) or hasattr(node, "items") and not hasattr(node, "shape"):
      for key, value in dict(node).items():
        add(value, (*stored, str(key)))
      return
    if not hasattr(node, "shape"):
      raise InputError(f"{path}: {'/'.join(stored)} is not an array")
    nested = tuple(part for key in stored for part in key.split("/"))
    target = tree
    for key in nested[:-1]:
      target = target.setdefault(key, {})
      if not isinstance(target, dict):
        raise InputError(f"{path}: {'/'.join(nested)} clashes with another key")
    target[nested[-1]] = StoredLeaf(path, stored, tuple(node.shape), np.dtype(node.dtype))

  add(metadata, ())
  if "params" in tree and set(tree) <= _KAULDRON_KEYS:
    tree = tree["params"]
  return tree


def _w(node: Any) -> Any:
  return node["w"] if isinstance(node, dict) and set(node) == {"w"} else node


def infer_stack(stack_tree: dict, where: str) -> StackConfig:
  """The Gemma 2 preset whose sizes match a Google stack's shapes (vocab from its table)."""
  try:
    layers = sum(1 for k in stack_tree if k.startswith("layer_"))
    rows, embed = stack_tree["embedder"]["input_embedding"].shape
    attn = stack_tree["layer_0"]["attn"]
    if "qkv_einsum" in attn:
      _, heads, _, head_dim = _w(attn["qkv_einsum"]).shape
      kv_heads = heads
    else:
      heads, _, head_dim = _w(attn["q_einsum"]).shape
      kv_heads = _w(attn["kv_einsum"]).shape[1]
    hidden = _w(stack_tree["layer_0"]["mlp"]["linear"]).shape[0]
  except (KeyError, TypeError, ValueError, AttributeError) as e:
    raise InputError(f"{where}: not a Gemma 2 parameter tree (missing {e})") from None
  sizes = dict(num_layers=layers, embed_dim=embed, hidden_dim=hidden, num_heads=heads,
               num_kv_heads=kv_heads, head_dim=head_dim)
  vocab = 256000 if rows == GOOGLE_VOCAB_ROWS else rows
  for preset in GEMMA2_STACKS.values():
    if all(getattr(preset, k) == v for k, v in sizes.items()) and preset.vocab_size == vocab:
      return preset
  raise InputError(f"{where}: no Gemma 2 preset has these sizes ({sizes}, {rows} embedding "
                   "rows); give the config (--config / --encoder_config / --decoder_config: a "
                   "preset name or a config JSON file)")


def infer_config(tree: dict, where: str) -> ModelConfig:
  """The config of a Google tree: T5Gemma when it has encoder and decoder, else Gemma 2."""
  if "encoder" in tree and "decoder" in tree:
    return EncoderDecoderConfig(infer_stack(tree["encoder"], f"{where}: encoder"),
                                infer_stack(tree["decoder"], f"{where}: decoder"))
  prefix = model_prefix(tree, t5=False)
  return infer_stack(tree[prefix[0]] if prefix else tree, where)


def open_google(path: str, config: ModelConfig | None = None,
                transpose_gating: TransposeGating = None) -> GoogleTreeSource:
  """A ParamSource over a Google Orbax checkpoint directory (config inferred when None)."""
  tree = read_tree(path)
  if config is None:
    config = infer_config(tree, path)
  return GoogleTreeSource(tree, config, transpose_gating, where=path)


def flatten_as_released(tree: dict) -> dict:
  """A NESTED Google tree in the FLAT layout the Gemma 2 checkpoints were released in.

  Each leaf's parent path becomes one '/'-joined key ('transformer/layer_0/attn/q_einsum' ->
  {'w': ...}); mlp/gating_einsum and mlp/linear, leaves in the NESTED tree, get a 'w' level.
  """
  flat: dict = {}

  def walk(node: dict, path: tuple[str, ...]) -> None:
    for key, value in node.items():
      if isinstance(value, dict):
        walk(value, (*path, key))
      elif path and path[-1] == "mlp":
        flat["/".join((*path, key))] = {"w": value}
      else:
        flat.setdefault("/".join(path), {})[key] = value

  walk(tree, ())
  return flat

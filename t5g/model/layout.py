"""Where each layer's parameters live in the scanned and unscanned layouts, and conversion.

A parameter is named logically by (part, layer, sub-path), e.g. ('decoder', 3, ('attn',
'q_proj')), where a part is a top-level subtree of the parameters: a transformer stack
('transformer', 'encoder', 'decoder') or a subtree that is no stack (the classifier's 'head').
Non-layer parameters (embedder, final_norm, every leaf of a non-stack part) have layer None.
Unscanned stacks keep layer i under `layer_{i}`; scanned stacks stack layer pairs along a
leading axis under `layers/local` (even layers) and `layers/global` (odd layers), plus
`final_local_layer` when the layer count is odd. Checkpoint converters read and write through
this module so that they never care which layout a run uses.
"""

from __future__ import annotations

from typing import Any, Iterator

import jax
import numpy as np

from t5g.model.config import ClassifierConfig, EncoderDecoderConfig, ModelConfig, StackConfig

Params = dict[str, Any]


def stacks(config: ModelConfig) -> dict[str, StackConfig]:
  """The transformer stacks of a model by their top-level parameter name."""
  if isinstance(config, EncoderDecoderConfig):
    return {"encoder": config.encoder, "decoder": config.decoder}
  if isinstance(config, ClassifierConfig):
    return {"encoder": config.encoder}
  return {"transformer": config}


def parts(config: ModelConfig) -> dict[str, StackConfig | None]:
  """Every top-level parameter subtree by name: a stack's config, or None for a subtree that is
  no stack (the classifier's `head`, whose parameters all have layer None)."""
  extra = {"head": None} if isinstance(config, ClassifierConfig) else {}
  return {**stacks(config), **extra}


def location(cfg: StackConfig | None, layer: int | None, scanned: bool
             ) -> tuple[tuple[str, ...], int | None]:
  """(path prefix inside the part, index along the stacked axis or None) of `layer`; cfg is
  the part's stack config (None: no stack, so only layer None exists)."""
  if layer is None:
    return (), None
  if cfg is None:
    raise IndexError(f"layer {layer} asked of a part that has no layers")
  if not 0 <= layer < cfg.num_layers:
    raise IndexError(f"layer {layer} out of range for a {cfg.num_layers}-layer stack")
  if not scanned:
    return (f"layer_{layer}",), None
  if cfg.num_layers % 2 and layer == cfg.num_layers - 1:
    return ("final_local_layer",), None
  return ("layers", "local" if cfg.is_local(layer) else "global"), layer // 2


def _get(tree: Params, path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def get(params: Params, config: ModelConfig, scanned: bool, stack: str, layer: int | None,
        sub: tuple[str, ...]) -> Any:
  """The array for one logical parameter (a view into a stacked array when scanned)."""
  prefix, index = location(parts(config)[stack], layer, scanned)
  leaf = _get(params, (stack, *prefix, *sub))
  if index is None:
    return leaf
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype)
  return leaf[index]


def put(params: Params, config: ModelConfig, scanned: bool, stack: str, layer: int | None,
        sub: tuple[str, ...], value: np.ndarray) -> None:
  """Writes one logical parameter into a tree of preallocated numpy arrays, in place."""
  prefix, index = location(parts(config)[stack], layer, scanned)
  path = (stack, *prefix, *sub)
  parent = _get(params, path[:-1])
  target = parent[path[-1]]
  expected = target.shape if index is None else target.shape[1:]
  if tuple(value.shape) != tuple(expected):
    raise ValueError(f"{'/'.join(path)}{'' if index is None else f'[{index}]'}: shape "
                     f"{tuple(value.shape)} != expected {tuple(expected)}")
  if index is None:
    target[...] = value
  else:
    target[index] = value


def entries(params: Params, config: ModelConfig, scanned: bool
            ) -> Iterator[tuple[str, int | None, tuple[str, ...], Any]]:
  """Yields (part, layer, sub-path, array) for every logical parameter of `params`."""
  for stack, cfg in parts(config).items():
    for key, value in params[stack].items():
      if cfg is not None and (key.startswith("layer_") or key == "final_local_layer"):
        layer = cfg.num_layers - 1 if key == "final_local_layer" else int(key[len("layer_"):])
        for sub, leaf in _leaves(value):
          yield stack, layer, sub, leaf
      elif cfg is not None and key == "layers":
        for kind, first in (("local", 0), ("global", 1)):
          for sub, leaf in _leaves(value[kind]):
            for i in range(leaf.shape[0]):
              yield stack, 2 * i + first, sub, leaf[i]
      else:
        for sub, leaf in _leaves(value):
          yield stack, None, (key, *sub), leaf


def _leaves(tree: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
  if isinstance(tree, dict):
    for key, value in tree.items():
      yield from _leaves(value, (*prefix, key))
  else:
    yield prefix, tree


def allocate(abstract: Params) -> Params:
  """Uninitialised numpy arrays shaped like an abstract (eval_shape) parameter tree."""
  if isinstance(abstract, dict):
    return {k: allocate(v) for k, v in abstract.items()}
  return np.empty(abstract.shape, dtype=abstract.dtype)


def convert(params: Params, config: ModelConfig, from_scanned: bool, to_abstract: Params,
            to_scanned: bool) -> Params:
  """Re-lays `params` out as `to_abstract` (an eval_shape tree of the target layout)."""
  out = allocate(to_abstract)
  for stack, layer, sub, value in entries(params, config, from_scanned):
    put(out, config, to_scanned, stack, layer, sub, np.asarray(value))
  return out

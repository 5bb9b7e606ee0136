"""Google's Flax parameter trees (google-deepmind/gemma, NESTED layout) <-> t5g parameters.

Facts file §1.2, §3.2-3.4. Per stack, Google has `embedder/input_embedding [Vg, D]` (Vg may
exceed the vocabulary: 256128 rows for 256000 tokens), `layer_{i}/attn/q_einsum/w [N, D, H]` +
`kv_einsum/w [2, K, D, H]`, or `qkv_einsum/w [3, N, D, H]` when K == N, `attn_vec_einsum/w
[N, H, D]`, the same under `cross_attn` (always q + kv, keys of the encoder's width),
`mlp/gating_einsum [2, D, F]` ([2, F, D] when transposed, as in 9B/27B; gate first, then the
linear branch), `mlp/linear [F, D]` (either may hold `{'w': ...}`), the norms' `scale`, and
`final_norm/scale`. T5Gemma trees are {'encoder': stack, 'decoder': stack}; a Gemma 2 tree is
one stack, optionally under 'transformer'. t5g kernels put heads after the input width
([D, N, H] for q/k/v) and split the gating into gate_proj/up_proj [D, F].
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping

import numpy as np

from t5g.checkpoints.sources import ParamSource, materialize
from t5g.errors import InputError
from t5g.model import layout
from t5g.model.config import ClassifierConfig, ComputeConfig, EncoderDecoderConfig, ModelConfig
from t5g.model.models import abstract_params

Tree = Mapping[str, Any]
# bool for every stack, {stack: bool} per stack (9B-2B: encoder only), None to detect by shape.
TransposeGating = bool | Mapping[str, bool] | None

_SELF_NORMS = ("pre_attention_norm", "post_attention_norm")
_CROSS_NORMS = ("pre_cross_attention_norm", "post_cross_attention_norm")


@dataclasses.dataclass(frozen=True)
class GoogleMap:
  """One Google tensor and the t5g parameters it holds.

  subs: the t5g sub-paths; a fused tensor (qkv_einsum, kv_einsum, gating_einsum) stacks them
  along a new leading axis in this order. kind, per part: 'copy', 'embed' (Google rows beyond
  vocab_size are dropped on reading, zeros on writing), 'heads' (Google [N, D, H] <-> t5g
  [D, N, H]) or 'transpose' (Google [F, D] <-> t5g [D, F]).
  """

  path: tuple[str, ...]
  stack: str
  layer: int | None
  subs: tuple[tuple[str, ...], ...]
  kind: str


def _refuse_classifier(config: ModelConfig, where: str) -> None:
  if isinstance(config, ClassifierConfig):
    raise InputError(f"{where}: Google Flax trees hold Gemma 2 and T5Gemma models; a classifier "
                     "(an encoder and a head) has no Google layout")


def _stack_root(config: ModelConfig, stack: str, prefix: tuple[str, ...]) -> tuple[str, ...]:
  """Path of one stack's subtree in a Google tree whose model sits under `prefix`."""
  return (*prefix, stack) if isinstance(config, EncoderDecoderConfig) else prefix


def _layer_maps(root: tuple[str, ...], stack: str, num_heads_equal: bool, layer: int,
                transposed: bool) -> Iterator[GoogleMap]:
  """The Google tensors of one layer, in block order (num_heads_equal: K == N)."""
  lp = (*root, f"layer_{layer}")

  def entry(path, subs, kind="copy"):
    return GoogleMap((*lp, *path), stack, layer, subs, kind)

  def norm(name):
    return entry((name, "scale"), ((name, "scale"),))

  blocks = [("attn", _SELF_NORMS)] + ([("cross_attn", _CROSS_NORMS)]
                                      if stack == "decoder" else [])
  for block, (pre, post) in blocks:
    q, k, v = ((block, name) for name in ("q_proj", "k_proj", "v_proj"))
    yield norm(pre)
    if block == "attn" and num_heads_equal:
      yield entry((block, "qkv_einsum", "w"), (q, k, v), "heads")
    else:
      yield entry((block, "q_einsum", "w"), (q,), "heads")
      yield entry((block, "kv_einsum", "w"), (k, v), "heads")
    yield entry((block, "attn_vec_einsum", "w"), ((block, "o_proj"),))
    yield norm(post)
  yield norm("pre_ffw_norm")
  yield entry(("mlp", "gating_einsum"), (("mlp", "gate_proj"), ("mlp", "up_proj")),
              "transpose" if transposed else "copy")
  yield entry(("mlp", "linear"), (("mlp", "down_proj"),))
  yield norm("post_ffw_norm")


def tensor_maps(config: ModelConfig, transposed: Mapping[str, bool],
                prefix: tuple[str, ...] = ()) -> Iterator[GoogleMap]:
  """Every Google tensor of a model with `config`; transposed[stack]: gating is [2, F, D]."""
  for stack, cfg in layout.stacks(config).items():
    root = _stack_root(config, stack, prefix)
    yield GoogleMap((*root, "embedder", "input_embedding"), stack, None,
                    (("embedder", "embedding"),), "embed")
    for i in range(cfg.num_layers):
      yield from _layer_maps(root, stack, cfg.num_kv_heads == cfg.num_heads, i,
                             transposed[stack])
    yield GoogleMap((*root, "final_norm", "scale"), stack, None, (("final_norm", "scale"),),
                    "copy")


def _convert_part(kind: str, x: np.ndarray) -> np.ndarray:
  """t5g array <-> one Google part ([D, N, H] <-> [N, D, H]; [D, F] <-> [F, D]); an involution."""
  if kind == "heads":
    return x.transpose(1, 0, 2)
  if kind == "transpose":
    return x.T
  return x


def _part_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The Google shape of one part of a t5g parameter of `shape`."""
  return tuple(_convert_part(kind, np.broadcast_to(np.int8(0), shape)).shape)


def _shape(leaf: Any) -> tuple[int, ...]:
  """Shape of an array or of a stored leaf that only describes one (`.shape`)."""
  return tuple(leaf.shape) if hasattr(leaf, "shape") else tuple(np.shape(leaf))


def _lookup(tree: Tree, path: tuple[str, ...]) -> tuple[Any, tuple[str, ...]]:
  """(the leaf at `path`, its full path): einsums stored as {'w': leaf} are looked into."""
  node = tree
  for key in path:
    if not isinstance(node, Mapping) or key not in node:
      raise InputError(f"Google tree: missing key {'/'.join(path)}")
    node = node[key]
  if isinstance(node, Mapping) and set(node) == {"w"}:
    return node["w"], (*path, "w")
  return node, path


def _leaf_paths(tree: Tree, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
  """Paths of every leaf of a nested dict."""
  for key, value in tree.items():
    if isinstance(value, Mapping):
      yield from _leaf_paths(value, (*prefix, key))
    else:
      yield (*prefix, key)


def _given(transpose_gating: TransposeGating, stack: str) -> bool | None:
  """The caller's gating layout for `stack`, or None."""
  if isinstance(transpose_gating, Mapping):
    return transpose_gating.get(stack)
  return transpose_gating


def model_prefix(tree: Tree, t5: bool) -> tuple[str, ...]:
  """Where the model sits in a Google tree: ('transformer',) for a wrapped Gemma 2, else ()."""
  return ("transformer",) if not t5 and list(tree) == ["transformer"] else ()


def _detect_transposed(tree: Tree, config: ModelConfig, prefix: tuple[str, ...],
                       transpose_gating: TransposeGating) -> dict[str, bool]:
  """Per stack, whether gating_einsum is [2, F, D]: as given, else from layer 0's shape."""
  out = {}
  for stack, cfg in layout.stacks(config).items():
    given = _given(transpose_gating, stack)
    if given is not None:
      out[stack] = bool(given)
      continue
    path = (*_stack_root(config, stack, prefix), "layer_0", "mlp", "gating_einsum")
    if cfg.hidden_dim == cfg.embed_dim:
      raise InputError(f"Google tree: {'/'.join(path)}: hidden_dim == embed_dim == "
                       f"{cfg.embed_dim}, so [2, D, F] and [2, F, D] look alike; pass "
                       "transpose_gating")
    gating, _ = _lookup(tree, path)
    out[stack] = _shape(gating)[1:] == (cfg.hidden_dim, cfg.embed_dim)
  return out


class GoogleTreeSource(ParamSource):
  """t5g parameters from a Google NESTED tree, converted one Google tensor at a time.

  The tree's leaves may be arrays or stored leaves (anything with `.shape` that np.asarray
  reads). Every key and shape is checked when the source is made, before any data is read:
  missing, misshapen and unexpected Google keys raise ValueError naming the key.
  transpose_gating: required where hidden_dim == embed_dim, else detected from the shapes.
  """

  def __init__(self, tree: Tree, config: ModelConfig, transpose_gating: TransposeGating = None,
               where: str = "Google tree"):
    _refuse_classifier(config, where)
    self.config, self.where = config, where
    t5 = isinstance(config, EncoderDecoderConfig)
    prefix = model_prefix(tree, t5)
    transposed = _detect_transposed(tree, config, prefix, transpose_gating)
    unscanned = abstract_params(config, ComputeConfig(scan_layers=False))
    self._parts: dict[tuple, tuple[GoogleMap, Any, int | None, tuple[int, ...]]] = {}
    seen = set()
    for m in tensor_maps(config, transposed, prefix):
      leaf, path = _lookup(tree, m.path)
      key = "/".join(path)
      targets = [layout.get(unscanned, config, False, m.stack, m.layer, sub) for sub in m.subs]
      part = _part_shape(m.kind, targets[0].shape)
      fused = len(m.subs) > 1
      shape, expected = _shape(leaf), ((len(m.subs), *part) if fused else part)
      if m.kind == "embed":
        if len(shape) != 2 or shape[0] < part[0] or shape[1] != part[1]:
          raise InputError(f"{where}: {key} has shape {shape}, the config implies "
                           f"(>= {part[0]}, {part[1]})")
      elif shape != expected:
        raise InputError(f"{where}: {key} has shape {shape}, the config implies {expected}")
      for j, (sub, target) in enumerate(zip(m.subs, targets)):
        self._parts[(m.stack, m.layer, sub)] = (m, leaf, j if fused else None,
                                                tuple(target.shape))
      seen.add(path)
    unexpected = ["/".join(p) for p in _leaf_paths(tree) if p not in seen]
    if unexpected:
      raise InputError(f"{where}: unexpected key(s) {unexpected[:5]}"
                       f"{' ...' if len(unexpected) > 5 else ''} for this config")
    self._cached: tuple[int, np.ndarray] | None = None

  def get(self, stack: str, layer: int | None, sub: tuple[str, ...]) -> np.ndarray:
    """See base class. A fused Google tensor is read once for its consecutive parts."""
    m, leaf, index, shape = self._parts[(stack, layer, sub)]
    if self._cached is None or self._cached[0] != id(leaf):
      self._cached = None  # Drop the previous tensor before reading the next.
      self._cached = (id(leaf), np.asarray(leaf))
    value = self._cached[1] if index is None else self._cached[1][index]
    if m.kind == "embed":
      value = value[:shape[0]]
    return _convert_part(m.kind, value)


def from_google(tree: Tree, config: ModelConfig, scanned: bool,
                transpose_gating: TransposeGating = None) -> dict:
  """t5g numpy params (scanned or unscanned layout) from a whole Google NESTED tree."""
  return materialize(GoogleTreeSource(tree, config, transpose_gating), scanned)


def to_google(params: dict, config: ModelConfig, scanned: bool,
              transpose_gating: bool | Mapping[str, bool] = False,
              num_embed: int | None = None) -> dict:
  """A Google NESTED tree of numpy arrays from t5g params (unwrapped for Gemma 2).

  Self-attention is written as qkv_einsum when K == N, as Google's modules expect.
  transpose_gating: write gating_einsum as [2, F, D] (all stacks, or {stack: bool}).
  num_embed: rows of each embedding table (the extra rows are zeros), e.g. 256128.
  """
  _refuse_classifier(config, "to_google")
  transposed = {stack: bool(_given(transpose_gating, stack))
                for stack in layout.stacks(config)}
  tree: dict = {}
  for m in tensor_maps(config, transposed):
    parts = [_convert_part(m.kind, np.asarray(
        layout.get(params, config, scanned, m.stack, m.layer, sub))) for sub in m.subs]
    value = parts[0] if len(parts) == 1 else np.stack(parts)
    if m.kind == "embed" and num_embed is not None:
      if num_embed < value.shape[0]:
        raise InputError(f"num_embed={num_embed} < vocab_size={value.shape[0]}")
      value = np.concatenate([value, np.zeros((num_embed - value.shape[0], value.shape[1]),
                                              value.dtype)])
    node = tree
    for key in m.path[:-1]:
      node = node.setdefault(key, {})
    node[m.path[-1]] = value
  return tree

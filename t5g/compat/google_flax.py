"""Google's Flax parameter trees (google-deepmind/gemma, NESTED layout) <-> t5g parameters.

Per stack: `embedder/input_embedding [Vg, D]` (Vg may exceed the vocabulary: 256128 rows for
256000 tokens), `layer_{i}/attn/{q_einsum [N,D,H], kv_einsum [2,K,D,H]}` or `qkv_einsum
[3,N,D,H]` (multi-head presets), `attn_vec_einsum [N,H,D]`, the same under `cross_attn` (always
q + kv), `mlp/gating_einsum [2,D,F]` ([2,F,D] when transposed, as in 9B/27B), `mlp/linear
[F,D]`, the norms' `scale`, `final_norm/scale`. T5Gemma trees are {'encoder', 'decoder'}; a
Gemma 2 tree is one stack. Facts file §3.2-3.4. Reading files (FLAT/NESTED Orbax) builds on
this with the checkpoint issue.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from t5g.model import layout
from t5g.model.config import ModelConfig

_NORMS = ("pre_attention_norm", "post_attention_norm", "pre_cross_attention_norm",
          "post_cross_attention_norm", "pre_ffw_norm", "post_ffw_norm")


def _leaf(tree: Any, path: tuple[str, ...]) -> np.ndarray:
  node = tree
  for key in path:
    if not isinstance(node, dict) or key not in node:
      raise KeyError("/".join(path))
    node = node[key]
  if isinstance(node, dict):  # FLAT-style {'w': ...} under mlp/gating_einsum and mlp/linear.
    node = node.get("w")
  return np.asarray(node)


def _google_stack(tree: Any, stack: str) -> Any:
  if stack == "transformer":
    return tree.get("transformer", tree)
  return tree[stack]


def _layer_values(g: Any, prefix: str, cfg, has_cross: bool, transpose_gating: bool | None):
  """Yields (t5g sub-path, value) for one Google layer dict."""
  for block in ("attn", "cross_attn") if has_cross else ("attn",):
    base = (prefix, block)
    if block == "attn" and "qkv_einsum" in g[prefix][block]:
      q, k, v = _leaf(g, (*base, "qkv_einsum", "w"))
    else:
      q = _leaf(g, (*base, "q_einsum", "w"))
      k, v = _leaf(g, (*base, "kv_einsum", "w"))
    for name, value in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
      yield (block, name), value.transpose(1, 0, 2)  # [N, D, H] -> [D, N, H]
    yield (block, "o_proj"), _leaf(g, (*base, "attn_vec_einsum", "w"))
  for norm in _NORMS:
    if norm in g[prefix]:
      yield (norm, "scale"), _leaf(g, (prefix, norm, "scale"))
  gating = _leaf(g, (prefix, "mlp", "gating_einsum"))
  transposed = transpose_gating
  if transposed is None:
    if cfg.hidden_dim == cfg.embed_dim:
      raise ValueError(f"{prefix}/mlp/gating_einsum: hidden_dim == embed_dim; pass "
                       "transpose_gating explicitly")
    transposed = gating.shape[1] == cfg.hidden_dim
  gate, up = (gating[0].T, gating[1].T) if transposed else (gating[0], gating[1])
  yield ("mlp", "gate_proj"), gate
  yield ("mlp", "up_proj"), up
  yield ("mlp", "down_proj"), _leaf(g, (prefix, "mlp", "linear"))


def from_google(tree: Any, config: ModelConfig, scanned: bool, abstract: dict,
                transpose_gating: bool | None = None) -> dict:
  """t5g numpy params (layout of `abstract`) from a Google NESTED tree; errors name the key."""
  params = layout.allocate(abstract)
  for stack in layout.stacks(config):
    try:
      _stack_from_google(params, _google_stack(tree, stack), config, scanned, stack,
                         transpose_gating)
    except KeyError as e:
      raise KeyError(f"Google tree: missing key {stack}/{e.args[0]}") from None
  return params


def _stack_from_google(params, g, config, scanned, stack, transpose_gating) -> None:
  """Fills `params[stack]` from one Google stack tree `g`."""
  cfg = layout.stacks(config)[stack]
  table = _leaf(g, ("embedder", "input_embedding"))
  if table.shape[0] < cfg.vocab_size or table.shape[1] != cfg.embed_dim:
    raise ValueError(f"Google tree: {stack}/embedder/input_embedding has shape {table.shape}, "
                     f"expected at least ({cfg.vocab_size}, {cfg.embed_dim})")
  layout.put(params, config, scanned, stack, None, ("embedder", "embedding"),
             table[:cfg.vocab_size])
  layout.put(params, config, scanned, stack, None, ("final_norm", "scale"),
             _leaf(g, ("final_norm", "scale")))
  for i in range(cfg.num_layers):
    for sub, value in _layer_values(g, f"layer_{i}", cfg, stack == "decoder",
                                    transpose_gating):
      try:
        layout.put(params, config, scanned, stack, i, sub, value)
      except ValueError as e:
        raise ValueError(f"Google tree: {stack}/layer_{i}/{'/'.join(sub)}: {e}") from None


def to_google(params: dict, config: ModelConfig, scanned: bool, num_embed: int | None = None,
              transpose_gating: bool = False) -> dict:
  """A Google NESTED tree (q/kv einsums; qkv_einsum is never written) from t5g params.

  num_embed: embedding rows to write (extra rows are zeros), e.g. 256128.
  """
  tree = {}
  for stack, cfg in layout.stacks(config).items():
    get = lambda layer, *sub: np.asarray(layout.get(params, config, scanned, stack, layer, sub))
    table = get(None, "embedder", "embedding")
    rows = num_embed or table.shape[0]
    padded = np.zeros((rows, table.shape[1]), table.dtype)
    padded[:table.shape[0]] = table
    out = {"embedder": {"input_embedding": padded},
           "final_norm": {"scale": get(None, "final_norm", "scale")}}
    for i in range(cfg.num_layers):
      layer = {}
      for block in ("attn", "cross_attn") if stack == "decoder" else ("attn",):
        q, k, v = (get(i, block, n).transpose(1, 0, 2) for n in ("q_proj", "k_proj", "v_proj"))
        layer[block] = {"q_einsum": {"w": q}, "kv_einsum": {"w": np.stack([k, v])},
                        "attn_vec_einsum": {"w": get(i, block, "o_proj")}}
      for norm in _NORMS:
        if "cross" not in norm or stack == "decoder":
          layer[norm] = {"scale": get(i, norm, "scale")}
      gate, up = get(i, "mlp", "gate_proj"), get(i, "mlp", "up_proj")
      gating = np.stack([gate.T, up.T] if transpose_gating else [gate, up])
      layer["mlp"] = {"gating_einsum": gating, "linear": get(i, "mlp", "down_proj")}
      out[f"layer_{i}"] = layer
    tree[stack] = out
  return tree

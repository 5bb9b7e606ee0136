"""Gemma 2 grouped-query attention: self-attention (RoPE) and cross-attention (no RoPE).

Queries are scaled by `query_pre_attn_scalar ** -0.5`; logits are soft-capped (tanh) before the
mask is applied; the softmax runs in float32. Cross-attention keys/values read the encoder's
width (`kv_dim`), which may differ from the decoder's.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from t5g.model.config import StackConfig
from t5g.model.layers import apply_rope, constrain, kernel_init, logical_param

Array = jax.Array

# Large finite negative (as in Google's reference) so fully masked rows stay finite.
MASK_VALUE = -2.3819763e38


def softcap(x: Array, cap: float | None) -> Array:
  """cap * tanh(x / cap); identity when cap is None."""
  return x if cap is None else cap * jnp.tanh(x / cap)


class Attention(nn.Module):
  """Multi-head attention with `num_kv_heads` shared key/value heads.

  use_rope: rotate queries and keys by their positions (self-attention only).
  kv_dim: width of the key/value input (None: same as the query input).
  """

  config: StackConfig
  use_rope: bool = True
  kv_dim: int | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, kv_input: Array, mask: Array, q_positions: Array | None = None,
               kv_positions: Array | None = None) -> Array:
    """x [B, T, D], kv_input [B, S, Dkv], mask bool [B, T, S] -> [B, T, D]."""
    cfg = self.config
    d, kv_d = x.shape[-1], kv_input.shape[-1]
    n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    if self.kv_dim is not None and kv_d != self.kv_dim:
      raise ValueError(f"key/value input width {kv_d} != expected kv_dim {self.kv_dim}")
    q_w = logical_param(self, "q_proj", kernel_init((0,), (1, 2)), (d, n, h),
                        ("embed", "heads", "head_dim"), self.param_dtype)
    k_w = logical_param(self, "k_proj", kernel_init((0,), (1, 2)), (kv_d, k, h),
                        ("embed", "kv_heads", "head_dim"), self.param_dtype)
    v_w = logical_param(self, "v_proj", kernel_init((0,), (1, 2)), (kv_d, k, h),
                        ("embed", "kv_heads", "head_dim"), self.param_dtype)
    o_w = logical_param(self, "o_proj", kernel_init((0, 1), (2,)), (n, h, d),
                        ("heads", "head_dim", "embed"), self.param_dtype)

    x, kv_input = x.astype(self.dtype), kv_input.astype(self.dtype)
    q = jnp.einsum("btd,dnh->btnh", x, q_w.astype(self.dtype))
    key = jnp.einsum("bsd,dkh->bskh", kv_input, k_w.astype(self.dtype))
    value = jnp.einsum("bsd,dkh->bskh", kv_input, v_w.astype(self.dtype))
    if self.use_rope:
      q = apply_rope(q, q_positions, cfg.rope_base)
      key = apply_rope(key, kv_positions, cfg.rope_base)
    q = constrain(q * jnp.asarray(cfg.query_scale, self.dtype),
                  ("batch", "length", "heads", "head_dim"))
    key = constrain(key, ("batch", "length", "kv_heads", "head_dim"))
    value = constrain(value, ("batch", "length", "kv_heads", "head_dim"))

    b, t = q.shape[:2]
    q = q.reshape(b, t, k, n // k, h)
    logits = jnp.einsum("btkgh,bskh->bkgts", q, key, preferred_element_type=jnp.float32)
    logits = softcap(logits, cfg.attn_logit_softcap)
    logits = jnp.where(mask[:, None, None, :, :], logits, MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    encoded = jnp.einsum("bkgts,bskh->btkgh", probs, value).reshape(b, t, n, h)
    # A query with no visible key (e.g. an all-padding encoder input) reads zeros, as in
    # Google's reference, rather than an average of padding.
    encoded = jnp.where(mask.any(axis=-1)[:, :, None, None], encoded, 0)
    encoded = constrain(encoded, ("batch", "length", "heads", "head_dim"))
    return jnp.einsum("btnh,nhd->btd", encoded, o_w.astype(self.dtype))

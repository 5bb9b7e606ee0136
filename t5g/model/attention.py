"""Gemma 2 grouped-query attention: self-attention (RoPE) and cross-attention (no RoPE).

Queries are scaled by `query_pre_attn_scalar ** -0.5`; logits are soft-capped (tanh) before the
mask is applied; the softmax runs in float32. Cross-attention keys/values read the encoder's
width (`kv_dim`), which may differ from the decoder's.

Decoding (`cache_length > 0`) keeps keys and values in the `cache` collection. Self-attention
appends each call's keys/values at slot `index` of a [B, K, cache_length, H] buffer and attends
over all slots; the caller's mask (t5g/model/masks.py `CacheSlots`) hides empty slots and,
in local layers, keys outside the window. The cache is full-length, not a ring buffer of W
slots: generated sequences are far shorter than the window (4096 in every preset), where a ring
would save nothing, and full slots keep the step's numbers those of the teacher-forced forward
(same keys, same mask). Cross-attention computes the encoder's keys/values once, on the call that
passes `kv_input`, and reads them back when `kv_input` is None.

With `block_length` Q > 0 a teacher-forced call with more than Q queries computes its scores Q
queries at a time (t5g/model/query_blocks.py; local layers read only their `band` of keys): the
same results, with attention temporaries O(Q·S) instead of O(T·S). Decoding and calls of at
most Q queries stay dense.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from t5g.model.config import StackConfig
from t5g.model.layers import apply_rope, constrain, kernel_init, logical_param
from t5g.model.query_blocks import blocked_attention

Array = jax.Array

# Large finite negative (as in Google's reference) so fully masked rows stay finite.
MASK_VALUE = -2.3819763e38


def softcap(x: Array, cap: float | None) -> Array:
  """cap * tanh(x / cap); identity when cap is None."""
  return x if cap is None else cap * jnp.tanh(x / cap)


def dot_product_attention(q: Array, key: Array, value: Array, mask: Array, *,
                          cap: float | None, dtype: Any, kv_spec: str = "bskh") -> Array:
  """Soft-capped, masked, float32-softmax attention of scaled queries q [B, T, N, H] over
  key, value [B, S, K, H] (kv_spec "bskh") or [B, K, S, H] ("bksh"), mask bool [B, T, S]
  -> [B, T, N, H] in `dtype`."""
  b, t, n, h = q.shape
  k = key.shape[kv_spec.index("k")]
  q = q.reshape(b, t, k, n // k, h)
  logits = jnp.einsum(f"btkgh,{kv_spec}->bkgts", q, key, preferred_element_type=jnp.float32)
  logits = softcap(logits, cap)
  logits = jnp.where(mask[:, None, None, :, :], logits, MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
  encoded = jnp.einsum(f"bkgts,{kv_spec}->btkgh", probs, value).reshape(b, t, n, h)
  # A query with no visible key (e.g. an all-padding encoder input) reads zeros, as in
  # Google's reference, rather than an average of padding.
  encoded = jnp.where(mask.any(axis=-1)[:, :, None, None], encoded, 0)
  return constrain(encoded, ("batch", "length", "heads", "head_dim"))


class Attention(nn.Module):
  """Multi-head attention with `num_kv_heads` shared key/value heads.

  use_rope: rotate queries and keys by their positions (self-attention only).
  kv_dim: width of the key/value input (None: same as the query input); set for cross-attention.
  cache_length: 0 for a teacher-forced forward; > 0 decodes with a cache (module docstring).
  block_length: 0 for dense scores; Q > 0 for Q queries at a time (module docstring).
  band: self-attention in a local layer: the key - query index offsets its mask fits in
  (t5g/model/masks.py `window_band`), read by the blocked path; None: keys anywhere.
  """

  config: StackConfig
  use_rope: bool = True
  kv_dim: int | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  cache_length: int = 0
  block_length: int = 0
  band: tuple[int, int] | None = None

  @nn.compact
  def __call__(self, x: Array, kv_input: Array | None, mask: Array,
               q_positions: Array | None = None, kv_positions: Array | None = None) -> Array:
    """x [B, T, D], kv_input [B, S, Dkv], mask bool [B, T, S] -> [B, T, D].

    Decoding: self-attention's mask is over the cache slots [B, T, cache_length]; cross-attention
    takes kv_input None once its keys/values are cached.
    """
    cfg = self.config
    d = x.shape[-1]
    kv_d = d if self.kv_dim is None else self.kv_dim
    n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    if kv_input is not None and kv_input.shape[-1] != kv_d:
      raise ValueError(f"key/value input width {kv_input.shape[-1]} != expected kv_dim {kv_d}")
    q_w = logical_param(self, "q_proj", kernel_init((0,), (1, 2)), (d, n, h),
                        ("embed", "heads", "head_dim"), self.param_dtype)
    k_w = logical_param(self, "k_proj", kernel_init((0,), (1, 2)), (kv_d, k, h),
                        ("embed", "kv_heads", "head_dim"), self.param_dtype)
    v_w = logical_param(self, "v_proj", kernel_init((0,), (1, 2)), (kv_d, k, h),
                        ("embed", "kv_heads", "head_dim"), self.param_dtype)
    o_w = logical_param(self, "o_proj", kernel_init((0, 1), (2,)), (n, h, d),
                        ("heads", "head_dim", "embed"), self.param_dtype)

    x = x.astype(self.dtype)
    q = jnp.einsum("btd,dnh->btnh", x, q_w.astype(self.dtype))
    key = value = None
    if kv_input is not None:
      kv_input = kv_input.astype(self.dtype)
      key = jnp.einsum("bsd,dkh->bskh", kv_input, k_w.astype(self.dtype))
      value = jnp.einsum("bsd,dkh->bskh", kv_input, v_w.astype(self.dtype))
    if self.use_rope:
      q = apply_rope(q, q_positions, cfg.rope_base)
      key = apply_rope(key, kv_positions, cfg.rope_base)
    q = constrain(q * jnp.asarray(cfg.query_scale, self.dtype),
                  ("batch", "length", "heads", "head_dim"))
    if self.cache_length:  # The cache holds [B, K, S, H] (see `_cached`).
      key, value = self._cached(key, value)
      kv_axes, kv_spec = ("batch", "kv_heads", "length", "head_dim"), "bksh"
    else:
      kv_axes, kv_spec = ("batch", "length", "kv_heads", "head_dim"), "bskh"
    key, value = constrain(key, kv_axes), constrain(value, kv_axes)

    attend = functools.partial(dot_product_attention, cap=cfg.attn_logit_softcap,
                               dtype=self.dtype, kv_spec=kv_spec)
    b, t = q.shape[:2]
    if self.block_length and not self.cache_length and t > self.block_length:
      encoded = blocked_attention(attend, q, key, value, mask, block_length=self.block_length,
                                  band=self.band)
    else:
      encoded = attend(q, key, value, mask)
    # o_proj as one [N·H, D] matrix (a free reshape): contracting (n, h) as two axes made
    # XLA:CPU copy the weight to [H, N, D] on every call.
    return jnp.einsum("btf,fd->btd", encoded.reshape(b, t, n * h),
                      o_w.astype(self.dtype).reshape(n * h, -1))

  def _cached(self, key: Array | None, value: Array | None) -> tuple[Array, Array]:
    """Decoding: (keys, values) to attend over, [B, K, S, H], from the `cache` collection.

    Self-attention writes this call's keys/values [B, T, K, H] at slot `index` of the
    cache_length slots and advances `index` by T. Cross-attention stores the encoder's
    keys/values when given (None: reads them back). The cache keeps [B, K, S, H], the layout the
    attention products read, so that no step re-lays it out (XLA:CPU copied every layer's cache,
    the unchanging cross-attention ones included, on every step in the [B, S, K, H] layout).
    """
    if key is not None:
      key, value = key.transpose(0, 2, 1, 3), value.transpose(0, 2, 1, 3)
    if self.kv_dim is not None:
      cached_key = self.variable("cache", "key", lambda: key)
      cached_value = self.variable("cache", "value", lambda: value)
      if key is not None:
        cached_key.value, cached_value.value = key, value
      return cached_key.value, cached_value.value
    b, k, t, h = key.shape
    shape = (b, k, self.cache_length, h)
    cached_key = self.variable("cache", "key", jnp.zeros, shape, key.dtype)
    cached_value = self.variable("cache", "value", jnp.zeros, shape, value.dtype)
    index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
    start = (0, 0, index.value, 0)
    cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, key, start)
    cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, value, start)
    index.value = index.value + t
    return cached_key.value, cached_value.value

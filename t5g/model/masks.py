"""Attention masks and positions built from segment ids, for padded and packed batches.

Segment id 0 marks padding; tokens attend only within their own segment. Positions restart at
0 at every segment start, so a packed row computes exactly what its examples compute alone.
Local windows follow Google's reference: causal `0 <= q - kv < W` in decoders, two-sided
`|q - kv| < W` in the bidirectional encoder; `window_band` gives the index band such a mask fits
in (the query-blocked attention reads only that band of keys). When decoding with a KV cache,
`CacheSlots` keeps the segment id and position of every cache slot, so the same
`attention_mask` gives the step's [B, T, cache_length] mask (empty slots have segment 0, like
padding).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from t5g.model.config import PAD_ID

Array = jax.Array


def segments_from_tokens(tokens: Array) -> Array:
  """Segment ids of an unpacked batch: 1 for tokens, 0 for padding. [B, T] -> [B, T] int32."""
  return (tokens != PAD_ID).astype(jnp.int32)


def positions_from_segments(segment_ids: Array) -> Array:
  """Index of each token within its segment (a run of equal ids). [B, T] -> [B, T] int32."""
  length = segment_ids.shape[-1]
  index = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), segment_ids.shape)
  starts = jnp.concatenate(
      [jnp.ones_like(segment_ids[:, :1], dtype=bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
      axis=1)
  start_index = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
  return index - start_index


def segment_mask(q_segments: Array, kv_segments: Array) -> Array:
  """Queries see keys of their own (non-padding) segment: [B, T], [B, S] -> bool [B, T, S]."""
  return ((q_segments[:, :, None] == kv_segments[:, None, :])
          & (q_segments[:, :, None] != 0) & (kv_segments[:, None, :] != 0))


def attention_mask(q_segments: Array, kv_segments: Array, q_positions: Array,
                   kv_positions: Array, *, causal: bool, window: int | None) -> Array:
  """Which keys each query sees. Segments/positions [B, T] and [B, S] -> bool [B, T, S].

  causal: keys at positions after the query are hidden. window: None for global attention,
  else the local window W (causal: q - kv < W; bidirectional: |q - kv| < W).
  """
  mask = segment_mask(q_segments, kv_segments)
  distance = q_positions[:, :, None] - kv_positions[:, None, :]
  if causal:
    mask &= distance >= 0
  if window is not None:
    mask &= (distance < window) if causal else (jnp.abs(distance) < window)
  return mask


def window_band(causal: bool, window: int | None) -> tuple[int, int] | None:
  """Offsets (key index - query index) outside which `attention_mask(..., causal, window)` is
  False: (1 - W, 0) causal, (1 - W, W - 1) bidirectional; None for global attention.

  Holds when every segment is one contiguous run whose positions count up by one per token (what
  `positions_from_segments` and the packing feature converters give): within a segment,
  position distance is then index distance, and other segments are masked anyway.
  """
  if window is None:
    return None
  return (1 - window, 0) if causal else (1 - window, window - 1)


class CacheSlots(nn.Module):
  """Decoding: segment ids and positions of the `length` cache slots, in the `cache` collection.

  Each call writes its tokens' [B, T] segment ids and positions at slot `index` (as the
  attention layers write their keys/values) and returns those of all slots, [B, length] each.
  """

  length: int

  @nn.compact
  def __call__(self, segment_ids: Array, positions: Array) -> tuple[Array, Array]:
    """segment_ids, positions [B, T] -> the slots' segment ids, positions [B, length]."""
    shape = (segment_ids.shape[0], self.length)
    slot_segments = self.variable("cache", "segment_ids", jnp.zeros, shape, jnp.int32)
    slot_positions = self.variable("cache", "positions", jnp.zeros, shape, jnp.int32)
    index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
    start = (0, index.value)
    slot_segments.value = jax.lax.dynamic_update_slice(
        slot_segments.value, segment_ids.astype(jnp.int32), start)
    slot_positions.value = jax.lax.dynamic_update_slice(
        slot_positions.value, positions.astype(jnp.int32), start)
    index.value = index.value + segment_ids.shape[1]
    return slot_segments.value, slot_positions.value

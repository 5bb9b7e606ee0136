"""Query-blocked attention: Q queries at a time, same results (`attention_block_length`).

The dense attention (t5g/model/attention.py) holds float32 scores [B, K, G, T, S] for all T
queries at once, and its backward several arrays of that size: at 8192 tokens these, not the
parameters, fill a TPU's memory. Here the queries run in blocks of Q under `lax.map`, each block
through the dense attention itself (scores, soft-cap, mask, float32 softmax, output): a query's
softmax sees all its keys within its block, so no online-softmax rescaling is needed. Each block
is a `jax.checkpoint`: the backward recomputes one block's probabilities at a time from its
queries instead of keeping all blocks', so a layer's attention temporaries are O(B·N·Q·S).

Local (sliding-window) self-attention reads only the keys its mask can see: queries
[q0, q0 + Q) with the band (lo, hi) of `masks.window_band` see keys [q0 + lo, q0 + Q - 1 + hi]
(Q + W - 1 keys causal, Q + 2W - 2 bidirectional), sliced from keys, values and mask padded at
both ends (the padding is masked). A band at least as long as the keys reads them all, like
global self-attention and cross-attention.

T not a multiple of Q: queries and mask rows are padded to one (padding rows see no key, so
read zeros) and cut off after.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from t5g.model.layers import constrain

Array = jax.Array
# The dense attention: q [B, T, N, H], key/value [B, S, K, H], mask bool [B, T, S] -> [B, T, N, H].
Attend = Callable[[Array, Array, Array, Array], Array]

_QUERY_AXES = ("batch", "length", "heads", "head_dim")


def blocked_attention(attend: Attend, q: Array, key: Array, value: Array, mask: Array, *,
                      block_length: int, band: tuple[int, int] | None) -> Array:
  """`attend(q, key, value, mask)` computed `block_length` queries at a time.

  q [B, T, N, H]; key, value [B, S, K, H]; mask bool [B, T, S] -> [B, T, N, H]. band: the
  offsets (key index - query index) outside which the mask is False (`masks.window_band`),
  None when keys anywhere may be visible.
  """
  b, t, n, h = q.shape
  s = key.shape[1]
  blocks = -(-t // block_length)
  padded = blocks * block_length
  q = jnp.pad(q, ((0, 0), (0, padded - t), (0, 0), (0, 0)))
  mask = jnp.pad(mask, ((0, 0), (0, padded - t), (0, 0)))
  banded = band is not None and block_length + band[1] - band[0] < s
  if banded:
    lo, hi = band
    width = block_length + hi - lo  # Keys a block reads; key q0 + lo is at q0 once padded.
    ends = ((-lo, max(0, padded + hi - s)),)
    key = jnp.pad(key, ((0, 0), *ends, (0, 0), (0, 0)))
    value = jnp.pad(value, ((0, 0), *ends, (0, 0), (0, 0)))
    mask = jnp.pad(mask, ((0, 0), (0, 0), *ends))

  @functools.partial(jax.checkpoint, prevent_cse=False)  # lax.map's loop already prevents CSE.
  def block(args: tuple[Array, Array]) -> Array:
    """(block index, its queries [B, Q, N, H]) -> its outputs [B, Q, N, H]."""
    index, q_block = args
    q0 = index * block_length
    if banded:
      rows = jax.lax.dynamic_slice(mask, (0, q0, q0), (b, block_length, width))
      k = jax.lax.dynamic_slice_in_dim(key, q0, width, axis=1)
      v = jax.lax.dynamic_slice_in_dim(value, q0, width, axis=1)
    else:
      rows = jax.lax.dynamic_slice_in_dim(mask, q0, block_length, axis=1)
      k, v = key, value
    encoded = attend(constrain(q_block, _QUERY_AXES), k, v, rows)
    return constrain(encoded, _QUERY_AXES)

  q_blocks = q.reshape(b, blocks, block_length, n, h).swapaxes(0, 1)
  q_blocks = constrain(q_blocks, (None, *_QUERY_AXES))
  encoded = jax.lax.map(block, (jnp.arange(blocks, dtype=jnp.int32), q_blocks))
  encoded = encoded.swapaxes(0, 1).reshape(b, padded, n, h)[:, :t]
  return constrain(encoded, _QUERY_AXES)

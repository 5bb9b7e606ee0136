"""The decoding cache: the `cache` collection of a model made with `cache_length > 0`.

The model creates it on its first `step` (t5g/model/models.py); its leaves, by name:

    <stack>/slots/{segment_ids,positions}     [B, C] int32   each cache slot's segment, position
    <stack>/slots/index, .../attn/index       []             next slot to write
    .../attn/{key,value}                      [B, K, C, H]   self-attention keys/values
    .../cross_attn/{key,value}                [B, K, S, H]   the encoder's keys/values (T5Gemma)

Under a scanned stack (`layers/{local,global}`), the layers' leaves have a leading layer axis.
This module names each leaf's logical axes (so the cache shards by the same rules table as the
activations: batch -> (data, fsdp), kv_heads -> tensor) and reorders rows for beam search.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Cache = Any  # Nested dict of arrays, as returned by `apply(..., mutable=["cache"])`.

_AXES = {
    "key": ("batch", "kv_heads", "length", "head_dim"),
    "value": ("batch", "kv_heads", "length", "head_dim"),
    "segment_ids": ("batch", "length"),
    "positions": ("batch", "length"),
    "index": (),
}


def _names(path) -> tuple[str, ...]:
  return tuple(getattr(entry, "key", str(entry)) for entry in path)


def _scanned(names: tuple[str, ...]) -> bool:
  return "layers" in names


def logical_axes(names: tuple[str, ...]) -> tuple[str, ...]:
  """Logical axis names of the cache leaf at path `names` (e.g. ('decoder', 'layer_0', 'attn',
  'key'))."""
  axes = _AXES[names[-1]]
  return ("layers", *axes) if _scanned(names) else axes


def constrain(cache: Cache) -> Cache:
  """The cache with a logical sharding constraint on every leaf (a no-op outside a mesh)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: nn.with_logical_constraint(x, logical_axes(_names(path))), cache)


def select_rows(cache: Cache, rows: Array) -> Cache:
  """Beam search: the cache whose row r is row `rows[r]` of `cache`; rows [B] int32.

  Beams only ever take rows of their own example, whose cross-attention keys/values are the
  same, so those are left as they are.
  """
  def take(path, x):
    names = _names(path)
    if "cross_attn" in names or names[-1] == "index":
      return x
    return jnp.take(x, rows, axis=1 if _scanned(names) else 0)
  return jax.tree_util.tree_map_with_path(take, cache)

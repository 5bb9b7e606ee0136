"""Parameter trees whose arrays are produced only when Orbax writes them, one at a time.

`lazy_params(source, scanned)` describes a whole parameter tree without reading it: each leaf
is a `LazyArray` that reads its logical parameters from a `ParamSource` (all local or all
global layers of a parameter, when scanned) at the moment it is written. The Orbax type handler
registered here writes lazy leaves one after the other, block by block (a layer of a stacked
parameter, or a whole unstacked one), so saving a converted model holds about one tensor in
memory. What lands on disk is an ordinary numpy-array PyTree: restoring it
needs nothing from this module.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from orbax.checkpoint import future
from orbax.checkpoint._src.serialization import type_handlers, types

from t5g.checkpoints.sources import ParamSource
from t5g.model import layout
from t5g.model.config import ComputeConfig
from t5g.model.models import abstract_params

# Stored chunks of lazily written arrays are at most CHUNK_BYTES, split along axis 0 first, and
# are written in slices of whole chunks of about SLICE_BYTES: encoding one slice at a time needs
# little memory beyond the block being written, and few writes keep the commits cheap.
CHUNK_BYTES = 4 << 20
SLICE_BYTES = 16 << 20


@dataclasses.dataclass(frozen=True)
class LazyArray:
  """An array (ndim >= 1) of `shape` and `dtype` made, when needed, as blocks along axis 0.

  blocks(): yields arrays whose leading sizes add up to shape[0] (one layer each for a
  parameter stacked over layers; the whole array otherwise).
  """

  shape: tuple[int, ...]
  dtype: np.dtype
  blocks: Callable[[], Iterator[np.ndarray]]

  def checked_blocks(self) -> Iterator[tuple[int, np.ndarray]]:
    """(offset along axis 0, block) pairs, checked against the promised shape."""
    offset = 0
    for block in self.blocks():
      block = np.asarray(block, dtype=self.dtype)
      if block.shape[1:] != tuple(self.shape[1:]) or offset + len(block) > self.shape[0]:
        raise ValueError(f"lazy array: block of shape {block.shape} at row {offset} does not "
                         f"fit the promised shape {self.shape}")
      yield offset, block
      offset += len(block)
    if offset != self.shape[0]:
      raise ValueError(f"lazy array: blocks cover {offset} of {self.shape[0]} rows")


class _SequentialLazyHandler(type_handlers.NumpyHandler):
  """Writes LazyArray leaves as numpy arrays: one leaf, one block, one chunk row at a time."""

  def __init__(self):
    super().__init__(deepcopy_host_arrays=False)

  async def _open_and_write(self, value: LazyArray, tspec: dict, ts_context) -> None:
    store = await ts.open(ts.Spec(tspec), create=True, open=True, context=ts_context)
    chunk_rows = max(1, store.chunk_layout.write_chunk.shape[0] or 1)
    row_bytes = max(1, int(np.prod(value.shape[1:], dtype=np.int64)) * value.dtype.itemsize)
    step = chunk_rows * max(1, SLICE_BYTES // (chunk_rows * row_bytes))
    for offset, block in value.checked_blocks():
      for start in range(0, len(block), step):
        rows = block[start:start + step]
        await store[offset + start:offset + start + len(rows)].write(rows)
      del block

  async def serialize(self, values, infos, args=None):
    args = [dataclasses.replace(a, chunk_byte_size=a.chunk_byte_size or CHUNK_BYTES,
                                shard_axes=(0,))
            for a in (args or [types.SaveArgs()] * len(values))]

    async def write_one_by_one():
      for value, info, arg in zip(values, infos, args):
        await self._background_serialize([value], [info], [arg])

    return [future.CommitFutureAwaitingContractedSignals(write_one_by_one(), name="t5g_lazy")]


ocp.type_handlers.register_type_handler(LazyArray, _SequentialLazyHandler(), override=True)


def _stacked(source: ParamSource, stack: str, layers: list[int], sub: tuple[str, ...],
             dtype: np.dtype) -> Callable[[], Iterator[np.ndarray]]:
  def blocks() -> Iterator[np.ndarray]:
    for layer in layers:
      yield np.asarray(source.get(stack, layer, sub), dtype)[None]
  return blocks


def _single(source: ParamSource, stack: str, layer: int | None, sub: tuple[str, ...],
            dtype: np.dtype) -> Callable[[], Iterator[np.ndarray]]:
  def blocks() -> Iterator[np.ndarray]:
    yield np.asarray(source.get(stack, layer, sub), dtype)
  return blocks


def lazy_params(source: ParamSource, scanned: bool, dtype=np.float32) -> dict:
  """The parameter tree of `source.config` in the chosen layout, with LazyArray leaves."""
  config = source.config
  abstract = abstract_params(config, ComputeConfig(scan_layers=scanned, param_dtype=dtype))
  dtype = np.dtype(dtype)

  def build(tree: dict, path: tuple[str, ...]) -> dict:
    out = {}
    for key, value in tree.items():
      if isinstance(value, dict):
        out[key] = build(value, (*path, key))
        continue
      out[key] = LazyArray(tuple(value.shape), dtype, _producer((*path, key)))
    return out

  def _producer(path: tuple[str, ...]) -> Callable[[], np.ndarray]:
    stack, rest = path[0], path[1:]
    cfg = layout.parts(config)[stack]
    if cfg is None:  # A part that is no stack (the classifier's head): no layers.
      return _single(source, stack, None, rest, dtype)
    if rest[0] == "layers":  # layers/{local,global}/sub...: every other layer, stacked.
      first = 0 if rest[1] == "local" else 1
      count = cfg.num_layers // 2
      return _stacked(source, stack, [first + 2 * i for i in range(count)], rest[2:], dtype)
    if rest[0] == "final_local_layer":
      return _single(source, stack, cfg.num_layers - 1, rest[1:], dtype)
    if rest[0].startswith("layer_"):
      return _single(source, stack, int(rest[0][len("layer_"):]), rest[1:], dtype)
    return _single(source, stack, None, rest, dtype)

  return build(abstract, ())

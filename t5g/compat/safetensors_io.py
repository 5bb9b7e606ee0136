"""Streaming safetensors I/O: tensor-by-tensor reads and sharded writes.

The format is an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
data_offsets}} and the raw little-endian bytes. Reading seeks to one tensor's bytes and reads
only those (no memory map, whose touched pages would stay resident), so a folder is never
loaded whole; writing takes a plan of (name, shape, dtype) first, writes each
shard's header, then one tensor at a time, and renames the finished folder contents into place.
bfloat16 uses ml_dtypes, which numpy alone lacks.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Callable, Iterable

import ml_dtypes
import numpy as np

from t5g.errors import InputError, MissingFileError, MissingKeyError

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class SafetensorsFolder:
  """Read access to the tensors of a folder (one file or a sharded index), by name."""

  def __init__(self, folder: str):
    self.folder = folder
    index_path = os.path.join(folder, INDEX_FILE)
    if os.path.exists(index_path):
      with open(index_path) as f:
        weight_map = json.load(f).get("weight_map")
      if not isinstance(weight_map, dict):
        raise InputError(f"{index_path}: no 'weight_map' object")
      files = sorted(set(weight_map.values()))
    elif os.path.exists(os.path.join(folder, SINGLE_FILE)):
      files = [SINGLE_FILE]
    else:
      raise MissingFileError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE}")
    self._entries: dict[str, tuple[str, dict]] = {}
    for name in files:
      path = os.path.join(folder, name)
      for key, info in _read_header(path)[0].items():
        self._entries[key] = (path, info)

  def keys(self) -> list[str]:
    return sorted(self._entries)

  def __contains__(self, key: str) -> bool:
    return key in self._entries

  def shape(self, key: str) -> tuple[int, ...]:
    """The shape of tensor `key`, from the file header (no data is read)."""
    return tuple(self._entries[key][1]["shape"])

  def get(self, key: str) -> np.ndarray:
    """The tensor `key`, read from its file (only this tensor's bytes are read)."""
    if key not in self._entries:
      raise MissingKeyError(f"{self.folder}: missing tensor {key!r}")
    path, info = self._entries[key]
    start, end = info["data_offsets"]
    base = _read_header(path)[1]
    dtype = DTYPES.get(info["dtype"])
    if dtype is None:
      raise InputError(f"{path}: tensor {key!r} has unsupported dtype {info['dtype']}")
    with open(path, "rb") as f:
      f.seek(base + start)
      raw = np.fromfile(f, dtype=np.uint8, count=end - start)
    if raw.size != end - start:
      raise InputError(f"{path}: tensor {key!r} is truncated ({raw.size} of {end - start} bytes)")
    return raw.view(dtype).reshape(info["shape"])


_HEADER_CACHE: dict[tuple[str, float], tuple[dict, int]] = {}


def _read_header(path: str) -> tuple[dict, int]:
  """(tensor entries, byte offset of the data section) of one safetensors file."""
  key = (path, os.path.getmtime(path))
  if key not in _HEADER_CACHE:
    with open(path, "rb") as f:
      head = f.read(8)
      if len(head) != 8:
        raise InputError(f"{path}: not a safetensors file (shorter than 8 bytes)")
      (size,) = struct.unpack("<Q", head)
      if size > os.path.getsize(path) - 8:
        raise InputError(f"{path}: header length {size} exceeds the file; truncated or corrupt")
      try:
        header = json.loads(f.read(size))
      except ValueError:
        raise InputError(f"{path}: header is not valid JSON; truncated or corrupt") from None
    header.pop("__metadata__", None)
    data_size = os.path.getsize(path) - 8 - size
    for name, info in header.items():
      if info["data_offsets"][1] > data_size:
        raise InputError(f"{path}: tensor {name!r} extends past the end of the file; truncated")
    _HEADER_CACHE[key] = (header, 8 + size)
  return _HEADER_CACHE[key]


def write_folder(folder: str, plan: Iterable[tuple[str, tuple[int, ...], np.dtype]],
                 produce: Callable[[str], np.ndarray], max_shard_bytes: int = 5 << 30) -> None:
  """Writes tensors named in `plan` into `folder`, calling `produce(name)` one at a time.

  Shards at `max_shard_bytes` and writes an index when there is more than one file. Files are
  written under temporary names and renamed when complete.
  """
  plan = [(name, tuple(shape), np.dtype(dtype)) for name, shape, dtype in plan]
  shards: list[list[tuple[str, tuple[int, ...], np.dtype]]] = [[]]
  size = 0
  for entry in plan:
    nbytes = int(np.prod(entry[1], dtype=np.int64)) * entry[2].itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(entry)
    size += nbytes
  names = ([SINGLE_FILE] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  written = []
  for file_name, shard in zip(names, shards):
    path = os.path.join(folder, file_name)
    _write_file(path + ".tmp", shard, produce)
    written.append((path + ".tmp", path))
  for tmp, path in written:
    os.replace(tmp, path)
  if len(shards) > 1:
    total = sum(int(np.prod(s, dtype=np.int64)) * d.itemsize for _, s, d in plan)
    index = {"metadata": {"total_size": total},
             "weight_map": {n: f for f, shard in zip(names, shards) for n, _, _ in shard}}
    with open(os.path.join(folder, INDEX_FILE), "w") as f:
      json.dump(index, f, indent=2, sort_keys=True)


def _write_file(path: str, shard, produce) -> None:
  header, offset = {"__metadata__": {"format": "pt"}}, 0
  for name, shape, dtype in shard:
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    header[name] = {"dtype": _NAMES[dtype], "shape": list(shape),
                    "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # Align the data section to 8 bytes.
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for name, shape, dtype in shard:
      tensor = np.ascontiguousarray(produce(name), dtype=dtype)
      if tensor.shape != shape:
        raise ValueError(f"{path}: tensor {name!r} has shape {tensor.shape}, planned {shape}")
      f.write(tensor.reshape(-1).view(np.uint8).data)
      del tensor

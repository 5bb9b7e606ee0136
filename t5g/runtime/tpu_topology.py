"""TPU topologies for ahead-of-time compilation: names, compile-only devices, HBM, memory report.

A topology is written as Cloud TPU names it: `v5p:4x4x4` (chips along each axis; 3 axes for v4
and v5p, 2 for v5e and v6e). `devices` asks libtpu (`pip install -e '.[tpu-aot]'`) for the
topology's compile-only devices on a machine without TPUs, so that `jax.jit(...).lower(...)
.compile()` produces the program a slice of that shape would run, with its memory analysis.
Several slices (`num_slices`) give devices with a `slice_index`, which `partitioning.make_mesh`
splits over the DCN axes.

HBM per chip (Google's figures: v4 32 GiB, v5e 16 GB, v5p 95 GB, v6e 32 GB) is the capacity the
memory report compares against, read as GiB; the runtime reserves a little of it, so a program
within a few percent of it may still not fit. libtpu itself refuses to compile a program whose
temporaries alone exceed what it has for them (`parse_out_of_memory` reads its message; that
program's report is then `rejected_report`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any

from t5g.errors import InputError, MissingDependencyError

GIB = 1024 ** 3
HBM_GIB_PER_CHIP = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
AXES = {"v4": 3, "v5e": 2, "v5p": 3, "v6e": 2}


@dataclasses.dataclass(frozen=True)
class Topology:
  """A TPU slice shape (`kind`, chips along each axis) and how many such slices."""

  kind: str
  shape: tuple[int, ...]
  num_slices: int = 1

  @property
  def name(self) -> str:
    """The Cloud TPU name, e.g. 'v5p:4x4x4'."""
    return f"{self.kind}:{'x'.join(map(str, self.shape))}"

  @property
  def chips(self) -> int:
    """Chips in all slices."""
    return math.prod(self.shape) * self.num_slices

  @property
  def hbm_bytes_per_chip(self) -> int:
    """The chip's HBM capacity in bytes."""
    return HBM_GIB_PER_CHIP[self.kind] * GIB


def parse(value: str, num_slices: int = 1) -> Topology:
  """`--topology=KIND:AxBxC` -> Topology; a ValueError names the flag when it is not one."""
  match = re.fullmatch(r"(v\w+):(\d+(?:x\d+)*)", value.strip())
  if match is None:
    raise InputError(f"--topology={value!r}: expected KIND:AxB[xC], e.g. v5p:4x4x4 or v5e:4x4")
  kind, dims = match.group(1), tuple(int(d) for d in match.group(2).split("x"))
  if kind not in HBM_GIB_PER_CHIP:
    raise InputError(f"--topology={value!r}: unknown TPU kind {kind!r}; known: "
                     f"{', '.join(sorted(HBM_GIB_PER_CHIP))}")
  if len(dims) != AXES[kind] or min(dims) < 1:
    raise InputError(f"--topology={value!r}: a {kind} slice has {AXES[kind]} positive sizes")
  if num_slices < 1:
    raise InputError(f"--num_slices={num_slices}: must be >= 1")
  return Topology(kind, dims, num_slices)


def devices(topology: Topology) -> list[Any]:
  """The topology's compile-only devices (from libtpu; no TPU needed).

  Compile-only devices never open a TPU, so libtpu's one-process-per-machine lock is lifted
  (ALLOW_MULTIPLE_LIBTPU_LOAD): several compiles, or a compile beside a training run, may share
  the machine.
  """
  os.environ["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
  from jax.experimental import topologies
  try:
    found = topologies.get_topology_desc(topology.name, "tpu",
                                         num_slices=topology.num_slices).devices
  except RuntimeError as e:
    if "not installed" in str(e):
      raise MissingDependencyError("TPU compilation needs libtpu: pip install -e '.[tpu-aot]' "
                                   f"(jax[tpu] for this jax): {e}") from None
    raise InputError(f"--topology={topology.name}: libtpu does not know it: "
                     f"{str(e).splitlines()[0]}") from None
  return list(found)


def shard_bytes(tree: Any) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs with shardings (the largest shard)."""
  import jax
  import numpy as np
  total = 0
  for leaf in jax.tree_util.tree_leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape)
    total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
  return total


@dataclasses.dataclass(frozen=True)
class OutOfMemory:
  """libtpu's refusal to compile a program: the HBM its temporaries need, and what it has for
  them, in bytes per device."""

  temporaries: int
  available: int


# libtpu 0.0.42's message; its sizes are binary (G = 2**30 bytes).
_OUT_OF_MEMORY = re.compile(
    r"RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
    r"temporaries \(([\d.]+)([KMGTP]?)B?\) exceeds available HBM \(([\d.]+)([KMGTP]?)B?\)")
_UNITS = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40, "P": 2 ** 50}


def parse_out_of_memory(message: str) -> OutOfMemory | None:
  """The needed and available HBM in libtpu's out-of-memory compile error `message`, or None when
  the message is not that error."""
  match = _OUT_OF_MEMORY.search(message)
  if match is None:
    return None
  needed, needed_unit, available, available_unit = match.groups()
  return OutOfMemory(round(float(needed) * _UNITS[needed_unit]),
                     round(float(available) * _UNITS[available_unit]))


@dataclasses.dataclass(frozen=True)
class MemoryReport:
  """Per-device bytes of a compiled train step, and whether they fit the chip's HBM.

  A program libtpu refused to compile (`rejected_report`) has its `out_of_memory`, the
  temporaries libtpu reported, and no outputs or code (unknown: never built); its total is then
  a lower bound, and it never fits.
  """

  parameters: int
  optimizer_state: int
  other_inputs: int       # the batch, step, teacher, and the compiler's padding of the shards
  temporaries: int
  unaliased_outputs: int  # outputs not written over donated inputs (the metrics)
  code: int
  hbm: int
  out_of_memory: OutOfMemory | None = None

  @property
  def total(self) -> int:
    """Everything a device holds while the step runs (at least, for a rejected program)."""
    return (self.parameters + self.optimizer_state + self.other_inputs + self.temporaries
            + self.unaliased_outputs + self.code)

  @property
  def fits(self) -> bool:
    """Whether libtpu compiled the program and its total is within the HBM of one device."""
    return self.out_of_memory is None and self.total <= self.hbm

  def lines(self) -> list[str]:
    """The report as aligned text lines, ending with FITS or DOES NOT FIT."""
    if self.out_of_memory is None:
      rows = [("parameters", self.parameters), ("optimizer state", self.optimizer_state),
              ("other inputs", self.other_inputs), ("temporaries", self.temporaries),
              ("outputs (not donated)", self.unaliased_outputs), ("generated code", self.code),
              ("total", self.total), ("HBM", self.hbm)]
      out = [f"  {name:<22} {_size(value)}" for name, value in rows]
      verdict = "FITS" if self.fits else "DOES NOT FIT"
      return out + [f"  {verdict}: needs {_size(self.total).strip()} of "
                    f"{_size(self.hbm).strip()} ({self.total / self.hbm:.0%} of HBM)"]
    rows = [("parameters", self.parameters), ("optimizer state", self.optimizer_state),
            ("other inputs", self.other_inputs), ("temporaries (libtpu)", self.temporaries),
            ("total, at least", self.total), ("HBM", self.hbm)]
    out = [f"  {name:<22} {_size(value)}" for name, value in rows]
    return out + [
        f"  DOES NOT FIT: libtpu refused to compile it, its temporaries needing "
        f"{_size(self.out_of_memory.temporaries).strip()} of the "
        f"{_size(self.out_of_memory.available).strip()} it has for them; the step needs at "
        f"least {_size(self.total).strip()} of {_size(self.hbm).strip()} "
        f"({self.total / self.hbm:.0%} of HBM)"]


def _size(size: int) -> str:
  """Bytes as GiB, or MiB below 1 GiB."""
  return f"{size / GIB:9.3f} GiB" if size >= GIB else f"{size / 2 ** 20:9.3f} MiB"


def memory_report(compiled: Any, params: Any, opt_state: Any, hbm: int) -> MemoryReport:
  """The per-device memory of `compiled` (a jax Compiled step), whose inputs hold `params` and
  `opt_state` (ShapeDtypeStructs with shardings), against `hbm` bytes."""
  stats = compiled.memory_analysis()
  if stats is None:
    raise RuntimeError("the compiler gave no memory analysis for this program")
  param_bytes, opt_bytes = shard_bytes(params), shard_bytes(opt_state)
  return MemoryReport(
      parameters=param_bytes, optimizer_state=opt_bytes,
      other_inputs=stats.argument_size_in_bytes - param_bytes - opt_bytes,
      temporaries=stats.temp_size_in_bytes,
      unaliased_outputs=stats.output_size_in_bytes - stats.alias_size_in_bytes,
      code=stats.generated_code_size_in_bytes, hbm=hbm)


def rejected_report(out_of_memory: OutOfMemory, inputs: Any, params: Any, opt_state: Any,
                    hbm: int) -> MemoryReport:
  """The per-device memory of a step libtpu refused to compile (`out_of_memory`), whose inputs
  `inputs` (ShapeDtypeStructs with shardings) hold `params` and `opt_state`, against `hbm`
  bytes: the inputs' shards and libtpu's temporaries; outputs and code are not known."""
  param_bytes, opt_bytes = shard_bytes(params), shard_bytes(opt_state)
  return MemoryReport(
      parameters=param_bytes, optimizer_state=opt_bytes,
      other_inputs=shard_bytes(inputs) - param_bytes - opt_bytes,
      temporaries=out_of_memory.temporaries, unaliased_outputs=0, code=0, hbm=hbm,
      out_of_memory=out_of_memory)

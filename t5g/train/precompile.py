"""`t5g precompile`: compile a gin run's train step for a TPU topology here, and print its memory.

    t5g precompile --gin_file=experiments/t5gemma_2b_2b_ul2.gin --topology=v5p:4x4x4 \
        [--num_slices=N] [--phase=I] [--teacher=PRESET] [--gin.NAME=VALUE ...]

The run is read from the same gin files as `t5g train`, and its step is built by the trainer's
own functions (`t5g.train.run_state`): the model, the mesh (over the topology's compile-only
devices, `t5g.runtime.tpu_topology`), the logical-axis rules, each phase's optimizer and the
jitted step with its shardings. Nothing is read from disk but the gin files: the parameters,
optimizer state and batch are abstract (shapes and shardings), the REQUIRED values the step
does not depend on (MODEL_DIR, INIT_CHECKPOINT, VOCABULARY, TEACHER_CHECKPOINT) may stay unset,
`model` must be bound (the experiments bind a preset), and a distilled run names its teacher's
preset with `--teacher`. A run with `warmup_new_parameters_steps` is taken to be an unbalanced
adaptation, whose new parameters are the decoder's cross-attention and its norms.

Every phase of the run is compiled (or only `--phase`), and for each the per-device memory is
printed: parameters, optimizer state, other inputs, temporaries, total, the chip's HBM, and
FITS or DOES NOT FIT. A phase does not fit when its total exceeds the HBM or when libtpu refuses
to compile it for want of memory (its message gives the temporaries needed and the HBM it has:
`tpu_topology.parse_out_of_memory`). For such a phase the step is compiled again at one row per
batch shard (and microbatch), and the largest batch that fits is estimated from the two
compiles, memory being a fixed part plus a part per row (docs/scaling.md).

Exit status: 0 when every phase compiled fits; 1 (`DOES_NOT_FIT_STATUS`) when one does not,
after printing every report: the run is valid and the answer is no, like a failed check; 2,
as every t5g command, for an error: a bad topology, a mesh that does not divide its devices or
a batch that does not split over the mesh (all before compiling), or any other compile error.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import time
from typing import Any

from t5g.errors import InputError
from t5g.runtime.tpu_topology import GIB, MemoryReport

HELP = ("compile the train step for a TPU topology on this machine; print per-device memory "
        "and FITS (exit 0) or DOES NOT FIT with the largest batch that fits (exit 1)")
# The exit status when a phase does not fit: not 2, which is every t5g command's error status.
DOES_NOT_FIT_STATUS = 1
# The new parameters of an unbalanced `t5g adapt` (t5g/checkpoints/adapt.py), layout-free.
UNBALANCED_NEW_PARAMETERS = ("decoder/*cross*",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """Adds this sub-command's flags (--gin.NAME=VALUE flags arrive as args.gin_flags)."""
  parser.add_argument("--gin_file", action="append", default=[], required=True)
  parser.add_argument("--gin_bindings", action="append", default=[],
                      help="a whole gin line, e.g. \"BATCH_SIZE = 64\"")
  parser.add_argument("--topology", required=True,
                      help="a TPU slice: v5p:4x4x4, v5e:4x4, v6e:8x8, v4:2x2x4")
  parser.add_argument("--num_slices", type=int, default=1,
                      help="slices joined over DCN (multi-slice; the mesh's dcn_* sizes)")
  parser.add_argument("--phase", type=int,
                      help="compile only this phase of the run (default: every phase)")
  parser.add_argument("--teacher", help="the teacher's preset for a distilled run "
                      "(e.g. gemma2-2b); its checkpoint is not read")
  parser.add_argument("--output_json", help="also write the reports to this JSON file")
  parser.description = HELP
  parser.epilog = (f"exit status: 0 when every phase fits; {DOES_NOT_FIT_STATUS} when one does "
                   "not (its report ends DOES NOT FIT, with the largest batch that fits); 2 on "
                   "an error (bad flags or gin, a mesh or batch that does not divide, a compile "
                   "error other than running out of HBM)")


def run_arguments(gin_files: list[str], bindings: list[str]) -> dict[str, Any]:
  """The arguments the gin files and bindings give `t5g.train`, its defaults filled in. Parsed
  as `t5g train` parses them, but values left %gin.REQUIRED are `gin.REQUIRED`, not errors."""
  import gin
  from t5g.runtime import gin_files as gin_lib
  from t5g.train import trainer
  gin_lib.parse(gin_files, bindings, check=False)
  defaults = {name: p.default for name, p in inspect.signature(trainer.train).parameters.items()}
  return {**defaults, **gin.get_bindings("t5g.train", resolve_references=True)}


def _required(values: dict[str, Any], name: str) -> Any:
  import gin
  if values[name] is gin.REQUIRED:
    raise InputError(f"precompile: t5g.train.{name} is %gin.REQUIRED; set it (a gin file or "
                     "--gin.NAME=VALUE)")
  return values[name]


def abstract_batch(data: Any, mesh: Any) -> dict[str, Any]:
  """The global batch of `data` (an InputConfig) as int32 ShapeDtypeStructs, rows over the mesh's
  (data, fsdp), as the feature converter makes it."""
  import jax
  import jax.numpy as jnp
  from t5g.data.pipeline import FEATURE_CONVERTERS
  from t5g.runtime import partitioning
  rows = partitioning.mesh_rows(mesh)
  if data.batch_size % rows:
    raise InputError(f"precompile: the global batch size {data.batch_size} (BATCH_SIZE) does "
                     f"not split over the mesh's {rows} batch shards (data × fsdp)")
  converter = FEATURE_CONVERTERS[data.feature_converter](pack=data.pack)
  sharding = partitioning.batch_sharding(mesh)
  return {name: jax.ShapeDtypeStruct((data.batch_size, length), jnp.int32, sharding=sharding)
          for name, length in converter.get_model_feature_lengths(
              dict(data.task_feature_lengths)).items()}


@dataclasses.dataclass(frozen=True)
class LargestBatch:
  """The largest global batch estimated to fit a phase that does not fit at the run's own.

  Per-device memory is taken to be a fixed part plus a part per row of each batch shard, a line
  through the compile at one row per batch shard and microbatch (`one_row`, at
  `one_row_batch_size`) and the run's; where libtpu refused the run's, its temporaries must also
  stay within what libtpu has for them.
  """

  batch_size: int  # 0: not even one row per batch shard fits
  rows: int        # per batch shard and microbatch
  total: int       # estimated bytes per device at batch_size (0 when none fits)
  num_microbatches: int
  one_row_batch_size: int
  one_row: MemoryReport | None  # None when the run's batch is already one row per batch shard

  def line(self) -> str:
    """The estimate as one report line."""
    if self.one_row is None:
      return ("  largest batch that fits: none; the run's batch has no more than one row per "
              "batch shard (and microbatch)")
    if self.one_row.out_of_memory is not None:
      measured = (f"batch {self.one_row_batch_size} refused by libtpu too: at least "
                  f"{self.one_row.total / GIB:.2f} GiB")
    else:
      measured = (f"batch {self.one_row_batch_size} compiled: {self.one_row.total / GIB:.2f} GiB"
                  + ("" if self.one_row.fits else ", DOES NOT FIT"))
    if not self.batch_size:
      return f"  largest batch that fits: none ({measured})"
    rows = (f"{self.rows} rows per batch shard" if self.num_microbatches == 1 else
            f"{self.rows} rows per batch shard in each of {self.num_microbatches} microbatches")
    return (f"  largest batch that fits: {self.batch_size} ({rows}): "
            f"≈ {self.total / GIB:.2f} GiB ({self.total / self.one_row.hbm:.0%} of HBM), "
            f"estimated per row from {measured} and this batch")


def largest_rows(one_row: MemoryReport, report: MemoryReport, rows: float) -> tuple[int, int]:
  """(rows per batch shard, estimated total bytes) of the largest batch that fits, linear in the
  rows between `one_row` (compiled at one row per batch shard) and `report` (at `rows` > 1 rows,
  not fitting); (0, 0) when one row does not fit."""
  if not one_row.fits:
    return 0, 0
  total_per_row = (report.total - one_row.total) / (rows - 1)
  limits = [(one_row.total, total_per_row, report.hbm)]
  if report.out_of_memory is not None:
    limits.append((one_row.temporaries, (report.temporaries - one_row.temporaries) / (rows - 1),
                   report.out_of_memory.available))
  best = math.ceil(rows) - 1
  for at_one_row, per_row, limit in limits:
    if per_row > 0:
      best = min(best, 1 + math.floor((limit - at_one_row) / per_row))
  return best, round(one_row.total + (best - 1) * total_per_row)


@dataclasses.dataclass(frozen=True)
class PhaseReport:
  """One phase compiled at the run's batch: its memory, and where it does not fit, the largest
  batch that does."""

  index: int
  mesh: dict[str, int]
  batch_size: int
  report: MemoryReport
  largest: LargestBatch | None  # None when it fits

  def lines(self) -> list[str]:
    """The phase's report as text lines."""
    return ([f"phase {self.index} on mesh {self.mesh}, batch {self.batch_size}:"]
            + self.report.lines() + ([] if self.largest is None else [self.largest.line()]))

  def as_json(self) -> dict[str, Any]:
    """The phase's report as JSON values (sizes in bytes)."""
    return {"phase": self.index, "batch_size": self.batch_size,
            **dataclasses.asdict(self.report), "total": self.report.total,
            "fits": self.report.fits,
            "largest_batch": None if self.largest is None else dataclasses.asdict(self.largest)}


def run(args: argparse.Namespace) -> None:
  """Compiles the run's train step for `args.topology` and prints each phase's memory; exits
  with DOES_NOT_FIT_STATUS when a phase does not fit."""
  from t5g.runtime import gin_files, tpu_topology
  topology = tpu_topology.parse(args.topology, args.num_slices)
  values = run_arguments(args.gin_file,
                         gin_files.flag_bindings(args.gin_flags, args.gin_bindings))
  devices = tpu_topology.devices(topology)
  print(f"{topology.name} × {topology.num_slices} slice(s): {len(devices)} devices "
        f"({devices[0].device_kind}), {topology.chips} chips")
  hbm = topology.hbm_bytes_per_chip * topology.chips // len(devices)
  phases = []
  for phase in compile_phases(values, devices, hbm, args.phase, args.teacher):
    print("\n".join(phase.lines()))
    phases.append(phase)
  if args.output_json:
    with open(args.output_json, "w") as f:
      json.dump({"topology": topology.name, "num_slices": topology.num_slices,
                 "devices": len(devices), "mesh": phases[-1].mesh,
                 "phases": [phase.as_json() for phase in phases]}, f, indent=1)
  if not all(phase.report.fits for phase in phases):
    raise SystemExit(DOES_NOT_FIT_STATUS)


def compile_phases(values: dict[str, Any], devices: list[Any], hbm: int, only: int | None,
                   teacher: str | None):
  """Yields a PhaseReport against `hbm` bytes per device for each phase compiled (see the module
  docstring); `values` are `run_arguments()`."""
  import flax.linen as nn
  import jax
  from t5g.model.config import StackConfig
  from t5g.model.presets import get_preset
  from t5g.runtime import partitioning
  from t5g.train import run_state
  from t5g.train.optimizers import learning_rate_schedule, phase_at

  data = _required(values, "train_input")
  optimizer = values["optimizer"]
  if optimizer.schedule == "cosine" and optimizer.decay_steps is None:
    optimizer = dataclasses.replace(optimizer, decay_steps=_required(values, "train_steps"))
  rules = tuple(tuple(rule) for rule in values["logical_axis_rules"])
  mesh_config = values["mesh"]
  try:
    mesh = partitioning.make_mesh(mesh_config, devices)
  except ValueError as e:
    raise InputError(f"precompile: {mesh_config} on {len(devices)} devices: {e}") from None
  batch = abstract_batch(data, mesh)
  # One row per batch shard and microbatch: the smallest batch the estimate compiles.
  one_row_batch_size = partitioning.mesh_rows(mesh) * values["num_microbatches"]
  model = _required(values, "model")
  if model is None:
    raise InputError("precompile: t5g.train.model must be bound (no checkpoint is read)")
  run = run_state.build_model(model, values["compute"], mesh, rules, None,
                              values["max_replicated_fraction"], values["num_classes"])
  if values["warmup_new_parameters_steps"]:
    run = dataclasses.replace(run, new_parameters=list(UNBALANCED_NEW_PARAMETERS))
  phases = (list(values["phases"]) if values["phases"]
            else run_state.default_phases(run, values["warmup_new_parameters_steps"]))
  phase_at(phases, 0)  # validates the phases
  if only is not None and not 0 <= only < len(phases):
    raise InputError(f"--phase={only}: the run has phases 0..{len(phases) - 1}")
  teacher_model = teacher_shapes = teacher_shardings = None
  if values["teacher_checkpoint"] is not None:
    if teacher is None:
      raise InputError("precompile: the run distils from a teacher_checkpoint; name its preset "
                       "with --teacher (e.g. --teacher=gemma2-2b)")
    config = get_preset(teacher)
    if not isinstance(config, StackConfig):
      raise InputError(f"--teacher={teacher}: the teacher must be a decoder-only Gemma 2")
    teacher_model, teacher_shapes = run_state.abstract_teacher(config, values["compute"], mesh,
                                                               rules)
    teacher_shardings = jax.tree_util.tree_map(lambda s: s.sharding, teacher_shapes)
  schedule = learning_rate_schedule(optimizer)
  opt_phases = run_state.phase_optimizers(optimizer, phases, run, mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    for index, phase in enumerate(opt_phases):
      if only is not None and index != only:
        continue
      step = run_state.jit_train_step(run, phase, mesh, values["loss"], schedule,
                                      values["num_microbatches"], teacher_model,
                                      teacher_shardings)
      inputs = (run_state.abstract_step_state(run, phase, mesh), batch, teacher_shapes)
      report = _compile(step, inputs, run.param_shapes, phase.state_shapes, hbm,
                        f"phase {index} at batch {data.batch_size}")
      largest = None
      if not report.fits:
        largest = LargestBatch(0, 0, 0, values["num_microbatches"], one_row_batch_size, None)
        if data.batch_size > one_row_batch_size:
          one_row_batch = abstract_batch(
              dataclasses.replace(data, batch_size=one_row_batch_size), mesh)
          one_row = _compile(step, (inputs[0], one_row_batch, teacher_shapes),
                             run.param_shapes, phase.state_shapes, hbm,
                             f"phase {index} at batch {one_row_batch_size}")
          rows, total = largest_rows(one_row, report, data.batch_size / one_row_batch_size)
          largest = LargestBatch(rows * one_row_batch_size, rows, total,
                                 values["num_microbatches"], one_row_batch_size, one_row)
      yield PhaseReport(index, dict(mesh.shape), data.batch_size, report, largest)


def _compile(step: Any, inputs: tuple[Any, ...], params: Any, opt_state: Any, hbm: int,
             what: str) -> MemoryReport:
  """The MemoryReport of `step` compiled for `inputs` (state, batch, teacher), or of libtpu's
  refusal to compile it for want of HBM; any other compile error is raised."""
  import jax
  from t5g.runtime import tpu_topology
  start = time.perf_counter()
  try:
    compiled = step.lower(*inputs).compile()
  except jax.errors.JaxRuntimeError as e:
    out_of_memory = tpu_topology.parse_out_of_memory(str(e))
    if out_of_memory is None:
      raise
    print(f"{what}: libtpu refused to compile it for want of HBM "
          f"({time.perf_counter() - start:.0f} s)")
    return tpu_topology.rejected_report(out_of_memory, inputs, params, opt_state, hbm)
  print(f"{what} compiled in {time.perf_counter() - start:.0f} s")
  return tpu_topology.memory_report(compiled, params, opt_state, hbm)

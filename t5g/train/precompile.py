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
FITS or DOES NOT FIT. The command exits with status 0 either way; a bad topology, a mesh that
does not divide its devices or a batch that does not split over the mesh fail before compiling.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import time
from typing import Any

from t5g.errors import InputError

HELP = "compile the train step for a TPU topology on this machine; print per-device memory"
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


def run(args: argparse.Namespace) -> None:
  """Compiles the run's train step for `args.topology` and prints each phase's memory."""
  from t5g.runtime import gin_files, tpu_topology
  topology = tpu_topology.parse(args.topology, args.num_slices)
  values = run_arguments(args.gin_file,
                         gin_files.flag_bindings(args.gin_flags, args.gin_bindings))
  devices = tpu_topology.devices(topology)
  print(f"{topology.name} × {topology.num_slices} slice(s): {len(devices)} devices "
        f"({devices[0].device_kind}), {topology.chips} chips")
  hbm = topology.hbm_bytes_per_chip * topology.chips // len(devices)
  reports, mesh_shape = [], None
  for index, mesh_shape, report in compile_phases(values, devices, hbm, args.phase,
                                                  args.teacher):
    print(f"phase {index} on mesh {mesh_shape}:")
    print("\n".join(report.lines()))
    reports.append({"phase": index, **dataclasses.asdict(report), "total": report.total,
                    "fits": report.fits})
  if args.output_json:
    with open(args.output_json, "w") as f:
      json.dump({"topology": topology.name, "num_slices": topology.num_slices,
                 "devices": len(devices), "mesh": mesh_shape, "phases": reports}, f, indent=1)


def compile_phases(values: dict[str, Any], devices: list[Any], hbm: int, only: int | None,
                   teacher: str | None):
  """Yields (phase index, mesh axis sizes, MemoryReport against `hbm` bytes per device) for each
  phase compiled (see the module docstring); `values` are `run_arguments()`."""
  import flax.linen as nn
  import jax
  from t5g.model.config import StackConfig
  from t5g.model.presets import get_preset
  from t5g.runtime import partitioning, tpu_topology
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
      start = time.perf_counter()
      compiled = step.lower(run_state.abstract_step_state(run, phase, mesh), batch,
                            teacher_shapes).compile()
      print(f"phase {index} compiled in {time.perf_counter() - start:.0f} s")
      yield index, dict(mesh.shape), tpu_topology.memory_report(
          compiled, run.param_shapes, phase.state_shapes, hbm)

"""`t5g.evaluate`: the gin-configured evaluation of one checkpoint step (`t5g eval`).

Reads step `checkpoint_step` (None: the newest) of `model_dir` (a t5g checkpoint directory or
a training run's directory: both hold `params` and the model's config in every step), places
the parameters on the mesh and runs `t5g.evaluation.evaluator.Evaluator` once. Results go to
`output_dir` (default `<model_dir>/inference_eval`, where the trainer's periodic evaluations go
too): TensorBoard events, JSON lines, and the resolved gin configuration as `config.gin`.
On several processes (`t5g eval` joins them as `t5g train` does) each reads only the parameter
blocks its devices hold, all compute the same results and process 0 writes these files.

A missing directory or step, an unknown task or mixture, and a task without the split or
metrics raise before any model work (FileNotFoundError / ValueError, naming the culprit).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax.linen as nn
import gin
import jax

from t5g.checkpoints import model_dir as model_dirs
from t5g.evaluation.evaluator import EvalConfig, Evaluator, feature_converter, output_directory
from t5g.model.config import ComputeConfig
from t5g.model.models import make_model
from t5g.runtime import gin_files, partitioning
from t5g.runtime.partitioning import DEFAULT_RULES, MeshConfig

@gin.configurable(module="t5g")
def evaluate(*, model_dir: str = gin.REQUIRED, evaluation: EvalConfig = gin.REQUIRED,
             checkpoint_step: int | None = None, output_dir: str | None = None,
             compute: ComputeConfig = ComputeConfig(), mesh: MeshConfig = MeshConfig(),
             logical_axis_rules: Sequence = DEFAULT_RULES,
             register_tasks: Sequence[Callable[[], Any]] = ()
             ) -> tuple[int, dict[str, dict[str, float]]]:
  """Evaluates one step of `model_dir` on `evaluation`; returns (the step evaluated,
  {task: {metric: value}} with a mixture's averages under its name).

  compute: dtypes and remat (the layout, scanned or not, is the checkpoint's). register_tasks:
  functions called first, e.g. `t5g.register_instruction_task` for the user's files.
  """
  for register in register_tasks:
    register()
  config, scanned, step = model_dirs.read_model(model_dir, checkpoint_step)
  feature_converter(config)  # a decoder-only model raises here
  compute = dataclasses.replace(compute, scan_layers=scanned)
  rules = tuple(tuple(rule) for rule in logical_axis_rules)
  device_mesh = partitioning.make_mesh(mesh)
  writer = jax.process_index() == 0
  out = output_directory(model_dir, output_dir)
  evaluator = Evaluator(evaluation, partitioning.PlacedModel(config, compute,
                                              make_model(config, compute),
                                              device_mesh, rules), out, writer)
  target, _ = partitioning.sharded_abstract_params(config, compute, device_mesh, rules)
  params = model_dirs.read_params(model_dir, step, target)
  if writer:
    gin_files.write_config(out)
  with jax.set_mesh(device_mesh), nn.logical_axis_rules(rules):
    return step, evaluator.evaluate(params, step)

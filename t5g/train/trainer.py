"""`t5g train`: the training loop, configured by gin (see gin/README.md).

Per step: this host's rows of the global batch are read (`t5g.data.pipeline`), assembled into
global arrays over the mesh (`partitioning.global_batch`) and passed with the donated state to
the jitted step (`t5g.train.train_step`) under explicit in/out shardings. Around the step: the
metrics of the previous step are fetched (one step behind, so the host never waits for the
device) and checked for NaN/inf; metrics are logged every `log_every` steps, the eval split is
scored every `eval_every` steps (teacher-forced loss and accuracy), the seqio evaluation
(`t5g.evaluation.evaluator`: the task's predict and score metrics, as `t5g eval` computes them)
runs every `evaluation_every` steps, and the checkpoint manager saves every `save_every` steps,
with the data iterator's position, so a restarted run continues exactly. SIGTERM or SIGINT saves the
current step and returns; a non-finite loss stops the run before anything from that step is
saved.

Order within a step: the loss is checked, then the step is saved (when due), then logged and
evaluated, so what fails there (writing logs, the eval split, the seqio evaluation) never costs the
step's training: a failure there saves the step if it was not due (with the data position, as
every save) and waits until it is written before the error propagates. A failed seqio evaluation
stops the run (`EvaluationFailed`, naming the task, the step and the cause; the cause's traceback
is logged), as in T5X, rather than training on without it: the failure is a bug or a
broken setup that recurs at every evaluation, the metrics are what the run is judged by (the last
step's evaluation is often the point of the run), and stopping loses nothing, since rerunning the
same command resumes from the saved step and `t5g eval` evaluates it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
from typing import Any, Callable, Protocol, Sequence

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from t5g.checkpoints.manager import CheckpointOptions, TrainCheckpointManager, TrainState
from t5g.data.classification_tasks import check_num_classes
from t5g.data.pipeline import InputConfig, InputIterator
from t5g.data.tasks import get_task_or_mixture
from t5g.data.vocabulary import task_vocabulary
from t5g.errors import InputError
from t5g.model.config import ClassifierConfig, ComputeConfig, ModelConfig
from t5g.runtime import gin_files, partitioning
from t5g.train import flops, run_state
from t5g.train.metrics import MetricsLogger
from t5g.train.optimizers import OptimizerConfig, Phase, learning_rate_schedule, phase_at
from t5g.runtime.partitioning import DEFAULT_RULES, MeshConfig, PlacedModel
from t5g.train.train_step import LossConfig, make_eval_step, normalise_sums


class PeriodicEvaluation(Protocol):
  """What `train(evaluation=...)` runs every `evaluation_every` steps; `t5g.EvalConfig`
  (`t5g.evaluation`, a seqio evaluation) is one. The trainer does not import evaluation."""

  mixture_or_task_name: str  # What it evaluates, named in the error when it fails.

  def build(self, model: PlacedModel, model_dir: str, write: bool
            ) -> Callable[[Any, int], list[str]]:
    """A function (params, step) -> the console lines of the results (written when `write`)."""


class NonFiniteLoss(FloatingPointError):
  """The loss became NaN or infinite; the run stopped without saving that step."""


class EvaluationFailed(Exception):
  """The periodic evaluation raised; the run stopped after saving (or keeping) its checkpoints.
  Not a ValueError: an evaluation that fails on a trained model is a bug, not bad input."""


def _evaluation_failed(evaluation: PeriodicEvaluation, model_dir: str, step: int,
                       cause: Exception) -> EvaluationFailed:
  """Logs `cause` (being handled) with its traceback; returns the error that stops the run."""
  task = evaluation.mixture_or_task_name
  logging.exception("%s: the evaluation of %s at step %d failed", model_dir, task, step)
  first_line = str(cause).splitlines()[0] if str(cause) else ""
  return EvaluationFailed(
      f"{model_dir}: the evaluation of {task} at step {step} failed: {type(cause).__name__}: "
      f"{first_line} (its traceback is logged above). The run stopped after saving step "
      f"{step}: rerun the same command to continue, `t5g eval` to evaluate a saved step.")


class _StopSignal:
  """Remembers SIGTERM/SIGINT while installed; every host agrees on it at each check."""

  def __init__(self):
    self.received = False
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):  # noqa: ARG002
    logging.warning("received signal %d: saving and stopping after this step", signum)
    self.received = True

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def anywhere(self) -> bool:
    """Whether any host received a signal."""
    if jax.process_count() == 1:
      return self.received
    return bool(np.max(multihost_utils.process_allgather(np.int32(self.received))))


def _per_host(config: InputConfig, shard: Any) -> InputConfig:
  """`config` with this host's rows: its batch_size is the global batch."""
  if config.batch_size % shard.num_shards:
    raise InputError(f"global batch_size {config.batch_size} does not split over "
                     f"{shard.num_shards} data shards")
  return dataclasses.replace(config, batch_size=config.batch_size // shard.num_shards)


def _step_flops(model: ModelConfig, data: InputConfig, teacher: Any) -> float:
  lengths = data.task_feature_lengths
  if isinstance(model, ClassifierConfig):  # The head's FLOPs are negligible.
    return 3 * flops.stack_forward_flops(model.encoder, data.batch_size, lengths["inputs"],
                                         causal=False, logits=False)
  if data.feature_converter == "encoder_decoder":
    return flops.train_step_flops(model, data.batch_size, lengths["targets"], lengths["inputs"],
                                  teacher=teacher)
  length = sum(lengths.values()) if data.feature_converter == "prefix_lm" else lengths["targets"]
  return flops.train_step_flops(model, data.batch_size, length)


def _evaluate(eval_step, params, data: InputConfig, shard, mesh, steps: int | None) -> dict:
  sums = None
  for i, local in enumerate(InputIterator(_per_host(data, shard), shard)):
    if steps is not None and i >= steps:
      break
    out = eval_step(params, partitioning.global_batch(local, mesh))
    sums = out if sums is None else jax.tree_util.tree_map(np.add, sums, out)
  if sums is None:
    raise InputError(f"eval split {data.mixture_or_task_name}:{data.split} gave no batch")
  return normalise_sums(jax.device_get(sums))


@gin.configurable(module="t5g")
def train(*, model_dir: str = gin.REQUIRED, train_input: InputConfig = gin.REQUIRED,
          train_steps: int = gin.REQUIRED, model: ModelConfig | None = None,
          init_checkpoint: str | None = None, compute: ComputeConfig = ComputeConfig(),
          mesh: MeshConfig = MeshConfig(), logical_axis_rules: Sequence = DEFAULT_RULES,
          optimizer: OptimizerConfig = OptimizerConfig(), phases: Sequence[Phase] | None = None,
          warmup_new_parameters_steps: int = 0, loss: LossConfig = LossConfig(),
          teacher_checkpoint: str | None = None, num_microbatches: int = 1,
          checkpoint: CheckpointOptions = CheckpointOptions(), log_every: int = 10,
          eval_input: InputConfig | None = None, eval_every: int = 0,
          eval_steps: int | None = None, evaluation: PeriodicEvaluation | None = None,
          evaluation_every: int = 0, num_classes: int | None = None, seed: int = 0,
          max_replicated_fraction: float = 0.01,
          peak_flops_per_device: float | None = None,
          register_tasks: Sequence[Callable[[], Any]] = ()) -> dict[str, float]:
  """Trains until step `train_steps` and returns the last logged train metrics (with `step`).

  model_dir: the run directory (checkpoints, config.gin, TensorBoard events); a run resumes from
  its newest readable step. train_input/eval_input: `batch_size` is the GLOBAL batch. model: the
  architecture (None: the init checkpoint's). phases: which parameters train from which step
  (default: all; or the new parameters alone for `warmup_new_parameters_steps`). teacher_checkpoint:
  a Gemma 2 t5g directory to distil from (with loss.kd_weight > 0). peak_flops_per_device: for
  MFU (None: a matmul measured at start). register_tasks: functions called first, e.g. to
  register the C4 tasks with the Gemma tokenizer (`t5g.register_c4_tasks`). evaluation: a seqio
  evaluation run every `evaluation_every` steps and after the last (results under
  `model_dir/inference_eval`). num_classes: train the encoder-only classifier over the model's
  (or init checkpoint's) T5Gemma encoder, its head fresh (`feature_converter="classification"`).
  """
  for register in register_tasks:
    register()
  if loss.kd_weight > 0 and teacher_checkpoint is None:
    raise InputError("loss.kd_weight > 0 needs a teacher_checkpoint")
  if num_classes is not None and teacher_checkpoint is not None:
    raise InputError("num_classes (a classifier) cannot be distilled from a teacher_checkpoint")
  if optimizer.schedule == "cosine" and optimizer.decay_steps is None:
    optimizer = dataclasses.replace(optimizer, decay_steps=train_steps)
  rules = tuple(tuple(rule) for rule in logical_axis_rules)
  device_mesh = partitioning.make_mesh(mesh)
  if (num_classes is not None) != (train_input.feature_converter == "classification"):
    raise InputError("num_classes (the encoder-only classifier) and "
                     "feature_converter='classification' go together; got num_classes="
                     f"{num_classes!r}, feature_converter={train_input.feature_converter!r}")
  if num_classes is not None:
    for data in (train_input, eval_input):
      if data is not None:
        check_num_classes(get_task_or_mixture(data.mixture_or_task_name), num_classes)
  run = run_state.build_model(model, compute, device_mesh, rules, init_checkpoint,
                              max_replicated_fraction, num_classes)
  phases = list(phases) if phases else run_state.default_phases(run, warmup_new_parameters_steps)
  phase_at(phases, 0)  # validates the phases
  opt_phases = run_state.phase_optimizers(optimizer, phases, run, device_mesh)
  teacher_model = teacher_params = teacher_config = teacher_shardings = None
  if teacher_checkpoint is not None:
    teacher_model, teacher_params, teacher_config = run_state.load_teacher(
        teacher_checkpoint, compute, device_mesh, rules)
    teacher_shardings = jax.tree_util.tree_map(lambda x: x.sharding, teacher_params)
  shard = partitioning.data_shard_info(device_mesh, train_input.batch_size)
  replicated = NamedSharding(device_mesh, PartitionSpec())
  schedule = learning_rate_schedule(optimizer)
  peak = (peak_flops_per_device or flops.measure_matmul_peak(np.dtype(compute.dtype).name)
          ) * device_mesh.size
  writer = jax.process_index() == 0
  evaluate = None
  if evaluation is not None and evaluation_every:
    evaluate = evaluation.build(PlacedModel(run.config, compute, run.module, device_mesh, rules),
                                model_dir, writer)
  if writer:
    gin_files.write_config(model_dir)
  logger = MetricsLogger(model_dir, "train", _step_flops(run.config, train_input, teacher_config),
                         peak, train_steps, writer)
  context = contextlib.ExitStack()
  context.enter_context(jax.set_mesh(device_mesh))
  context.enter_context(nn.logical_axis_rules(rules))
  manager = context.enter_context(TrainCheckpointManager(
      model_dir, run.config, run.scanned, checkpoint, run.new_parameters,
      vocabulary=task_vocabulary(get_task_or_mixture(train_input.mixture_or_task_name))))
  stop = context.enter_context(_StopSignal())
  with context:
    state, rng, data_state = run_state.first_state(run, opt_phases, manager, init_checkpoint,
                                                   seed)
    data = InputIterator(_per_host(train_input, shard), shard, data_state)
    eval_step = jax.jit(make_eval_step(run.module, loss), out_shardings=replicated)
    start = int(state.step)
    if start:
      logging.info("%s: resumed at step %d", model_dir, start)
    compiled, last_saved, last = {}, start if start else None, {}

    def step_fn(index: int):
      if index not in compiled:
        compiled[index] = run_state.jit_train_step(run, opt_phases[index], device_mesh, loss,
                                                   schedule, num_microbatches, teacher_model,
                                                   teacher_shardings)
      return compiled[index]

    def save(step: int, values: dict[str, float]) -> None:
      nonlocal last_saved
      manager.save(TrainState(step, state.params, state.opt_state, rng, data.state()),
                   metrics={"loss": values["loss"]}, force=True)
      last_saved = step

    def check(step: int, metrics: Any) -> dict[str, float]:
      values = {k: float(v) for k, v in jax.device_get(metrics).items()}
      if not math.isfinite(values["loss"]):
        raise NonFiniteLoss(f"{model_dir}: step {step}: loss is {values['loss']}; stopped. "
                            f"Newest saved step: {last_saved} (kept).")
      logger.add(values)
      return values

    current = phase_at(phases, start - 1) if start else 0  # the phase of the held opt_state
    pending = None  # (step, device metrics) of the newest step not yet checked
    for step in range(start, train_steps):
      index = phase_at(phases, step)
      if index != current:  # A new phase starts with a fresh state for its trainable params.
        state = state._replace(opt_state=run_state.init_opt_state(opt_phases[index],
                                                                  state.params))
        current = index
      batch = partitioning.global_batch(next(data), device_mesh)
      state, metrics = step_fn(index)(state, batch, teacher_params)
      if pending is not None:
        check(*pending)  # The previous step's, while this one runs.
      done = step + 1
      pending = (done, metrics)
      stopping = stop.anywhere()
      log_now = done % log_every == 0 or done == train_steps or stopping
      save_now = manager.should_save(done) or done == train_steps or stopping
      eval_now = eval_input is not None and eval_every and (done % eval_every == 0
                                                            or done == train_steps)
      evaluate_now = evaluate is not None and (done % evaluation_every == 0 or done == train_steps)
      if log_now or save_now or eval_now or evaluate_now:
        values, pending = check(*pending), None
      if save_now:  # First: whatever fails below (logging, evaluation), this step is kept.
        save(done, values)
      try:
        if log_now:
          last = {**logger.flush(done), "step": done}
        if eval_now:
          logger.write(done, _evaluate(eval_step, state.params, eval_input, shard, device_mesh,
                                       eval_steps), "eval")
          logger.restart_clock()
        if evaluate_now:
          try:
            lines = evaluate(state.params, done)
          except Exception as e:
            raise _evaluation_failed(evaluation, model_dir, done, e) from e
          for line in lines:
            if writer:
              print(line, flush=True)
          logger.restart_clock()
      except Exception:
        if last_saved != done:  # The step's training is kept whatever failed.
          save(done, values)
        manager.wait_until_finished()
        raise
      if stopping:
        logging.warning("%s: stopped by a signal after step %d (saved)", model_dir, done)
        break
  logger.close()
  return last

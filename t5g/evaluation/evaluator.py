"""seqio evaluation of a t5g model: predict metrics by decoding, score metrics by scoring.

`Evaluator(config, model, output_dir)` wraps a `seqio.Evaluator` over the task or mixture
`config.mixture_or_task_name` (its `config.split`, unshuffled, every example or the first
`num_examples` of each task) and runs the model for it:

- predict metrics (a metric function taking `predictions`): a T5Gemma decodes each example's
  `inputs` with `t5g.inference.decoding.generate` (`config.decode`), the tokens before the
  first EOS (or padding) are decoded to text by the task's vocabulary and postprocessed (the
  rows handed to seqio keep the decode length, `cut_at_eos`: seqio stacks them into one array,
  and a trained model stops at different positions); the encoder-only classifier predicts the
  arg-max class.
- score metrics (taking `scores`): a T5Gemma's teacher-forced log-likelihood of the targets
  (the sum over target tokens of log p); the classifier's log-probability of the label.

Examples go through the model in batches of `config.batch_size` rows (the last one padded with
empty rows whose outputs are dropped), so each function compiles once per run.

Several processes (jax.distributed, a mesh over several hosts): every process reads the whole
split and runs the same batches in the same order, so every host holds each whole batch and
`partitioning.from_every_host` gives each of its devices its block (no rows are exchanged;
`make_array_from_process_local_data`, which joins different rows from each host, fits training's
sharded input, not this). Scoring and the classifier replicate the batch over the mesh and their
outputs too (replicated out_shardings: each host reads the result from its own devices);
decoding splits the rows over (data, fsdp) (batch_size must divide by data × fsdp) and gathers
the outputs to every host (`partitioning.to_host`). Every process thus computes the same
metrics; only process 0 (`write`) has seqio's loggers and writes files.

Results are written, per task, by seqio's loggers under `output_dir`: TensorBoard scalars
(`<output_dir>/<task>/events.*`, tag `eval/<metric>`) and JSON lines
(`<output_dir>/<task>-metrics.jsonl`, one `{"step": ..., "<metric>": ...}` per evaluation; the
inferences of the first `write_n_results` examples in `<task>-<step, 6 digits>.jsonl`). For a mixture of
several tasks, every metric that all its tasks report is averaged over the tasks and logged the
same way under the mixture's name: for `t5g.superglue` / `t5g.superglue_cls` that
`accuracy` is the paper's SuperGLUE score (mean dev accuracy of the seven tasks).

Errors before any model work: an unknown task or mixture, a task without the split or without
metrics, a decoder-only Gemma 2 model (not supported: evaluate a T5Gemma or a classifier).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping
from typing import Any, Callable, Iterator

import gin
import jax
import jax.numpy as jnp
import numpy as np
import seqio
from jax.sharding import NamedSharding, PartitionSpec

from t5g.data import feature_converters
from t5g.data.classification_tasks import ClassificationFeatureConverter, check_num_classes
from t5g.data.tasks import get_task_or_mixture
from t5g.errors import InputError
from t5g.inference.decoding import DecodeConfig, generate
from t5g.model.config import EOS_ID, ClassifierConfig, EncoderDecoderConfig, ModelConfig
from t5g.runtime.partitioning import PlacedModel, from_every_host
from t5g.model.models import model_inputs

Batch = dict[str, np.ndarray]
OUTPUT_SUBDIR = "inference_eval"


def output_directory(model_dir: str, output_dir: str | None) -> str:
  """Where evaluation results go: `output_dir`, or `<model_dir>/inference_eval`."""
  return output_dir if output_dir is not None else os.path.join(model_dir, OUTPUT_SUBDIR)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """What to evaluate and how (see the module docstring).

  task_feature_lengths: e.g. {"inputs": 512, "targets": 16}; longer examples are truncated;
  None: the longest example of the split (measured by seqio). num_examples: the first N of each
  task (None: all). decode: how predict metrics decode (`t5g.inference.decoding`). write_n_results: inferences written to
  JSON per task and evaluation (None: all; 0: none). seed: the sampling key when decoding samples.
  """

  mixture_or_task_name: str
  task_feature_lengths: Mapping[str, int] | None = None
  batch_size: int = 32
  split: str = "validation"
  num_examples: int | None = None
  decode: DecodeConfig = DecodeConfig()
  write_n_results: int | None = None
  seed: int = 0

  def __post_init__(self):
    if self.batch_size < 1:
      raise InputError(f"EvalConfig.batch_size must be at least 1, got {self.batch_size}")
    if self.num_examples is not None and self.num_examples < 1:
      raise InputError(f"EvalConfig.num_examples must be None or positive, got "
                       f"{self.num_examples}")

  def build(self, model: PlacedModel, model_dir: str, write: bool
            ) -> Callable[[Any, int], list[str]]:
    """The trainer's periodic evaluation of `model`: a function (params, step) that evaluates,
    logs under `<model_dir>/inference_eval` (when `write`) and returns the console lines."""
    evaluator = Evaluator(self, model, output_directory(model_dir, None), write)
    return lambda params, step: result_lines(evaluator.evaluate(params, step), step)


gin.external_configurable(EvalConfig, module="t5g")


def feature_converter(config: ModelConfig) -> seqio.FeatureConverter:
  """The unpacked converter that feeds `config`'s model; a decoder-only model raises."""
  if isinstance(config, ClassifierConfig):
    return ClassificationFeatureConverter()
  if isinstance(config, EncoderDecoderConfig):
    return feature_converters.EncDecFeatureConverter(pack=False)
  raise InputError("evaluation supports a T5Gemma or an encoder-only classifier, not a "
                   "decoder-only Gemma 2")


def result_lines(results: Mapping[str, Mapping[str, float]], step: int) -> list[str]:
  """'eval TASK step N | metric value | ...' for every task of `results`."""
  return [" | ".join([f"eval {task} step {step}"]
                     + [f"{name} {value:.4f}" for name, value in sorted(metrics.items())])
          for task, metrics in results.items()]


def cut_at_eos(tokens: np.ndarray) -> np.ndarray:
  """Generated rows [B, N] cut at their first EOS or padding 0: that token becomes EOS and all
  after it padding, so every row keeps the width N.

  seqio's Evaluator stacks a task's predictions into one array (rows of different lengths do not
  stack) and its vocabulary decodes each row up through the first EOS, so a row decodes to the
  tokens before its first EOS or padding.
  """
  stops = (tokens == EOS_ID) | (tokens == 0)
  after = np.cumsum(stops, axis=1) > 0
  first = after & ~np.pad(after[:, :-1], [(0, 0), (1, 0)])
  return np.where(first, EOS_ID, np.where(after, 0, tokens)).astype(np.int32)


class Evaluator:
  """A seqio evaluation of one task or mixture, reused for every `evaluate(params, step)`."""

  def __init__(self, config: EvalConfig, model: PlacedModel, output_dir: str, write: bool = True):
    task = get_task_or_mixture(config.mixture_or_task_name)  # an unknown name raises
    if isinstance(model.config, ClassifierConfig):
      check_num_classes(task, model.config.num_classes)
    self.config, self.model = config, model
    loggers = ((seqio.TensorBoardLogger,
                functools.partial(seqio.JSONLogger, write_n_results=config.write_n_results))
               if write else ())
    self._seqio = seqio.Evaluator(
        config.mixture_or_task_name, feature_converter(model.config), eval_split=config.split,
        sequence_length=(None if config.task_feature_lengths is None
                         else dict(config.task_feature_lengths)),
        num_examples=config.num_examples, logger_cls=loggers, log_dir=output_dir,
        async_compute_metrics=False)
    if not self._seqio.eval_tasks:
      raise InputError(f"{config.mixture_or_task_name}: no task with a {config.split!r} split "
                       "and metrics to evaluate")
    self._mixture = (config.mixture_or_task_name
                     if isinstance(task, seqio.Mixture) and len(self._seqio.eval_tasks) > 1
                     else None)
    self._replicated = NamedSharding(model.mesh, PartitionSpec())
    self._score = jax.jit(self._score_batch, out_shardings=self._replicated)
    self._classify = jax.jit(self._classify_batch, out_shardings=self._replicated)

  def _score_batch(self, params: Any, batch: Batch) -> jax.Array:
    """Per-row log-likelihood [B] of the targets (T5Gemma) or of the label (classifier)."""
    logits = self.model.module.apply({"params": params}, **model_inputs(batch))
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    if isinstance(self.model.config, ClassifierConfig):
      return jnp.take_along_axis(log_probs, jnp.maximum(batch["label"], 0)[:, None], -1)[:, 0]
    picked = jnp.take_along_axis(log_probs, batch["decoder_target_tokens"][..., None], -1)[..., 0]
    return jnp.sum(picked * batch["decoder_loss_weights"], axis=-1)

  def _classify_batch(self, params: Any, batch: Batch) -> jax.Array:
    """Arg-max class [B] of the classifier."""
    return jnp.argmax(self.model.module.apply({"params": params}, **model_inputs(batch)), -1)

  def _batches(self, dataset: Any) -> Iterator[tuple[np.ndarray, Batch]]:
    """(example indices [b], model features padded with empty rows to batch_size rows)."""
    size = self.config.batch_size
    for indices, features in dataset.batch(size).as_numpy_iterator():
      yield indices, {name: np.pad(value, [(0, size - len(indices))] + [(0, 0)] * (value.ndim - 1))
                      for name, value in features.items()}

  def _placed(self, batch: Batch) -> dict[str, jax.Array]:
    """`batch`, which every host holds whole, replicated over the mesh."""
    return {name: from_every_host(value, self._replicated) for name, value in batch.items()}

  def _predict(self, params: Any) -> Callable[[Any], list[tuple[int, Any]]]:
    """seqio's predict_fn: (example index, token row) per example; the rows of one task have
    one width (seqio stacks them into one array), decoded by the task's vocabulary up through
    the first EOS: the classifier's [class], a T5Gemma's `cut_at_eos` generated tokens."""
    if isinstance(self.model.config, ClassifierConfig):
      def classify_fn(dataset) -> list[tuple[int, list[int]]]:
        out = []
        for indices, batch in self._batches(dataset):
          classes = np.asarray(self._classify(params, self._placed(batch)))
          out.extend((index, [int(c)]) for index, c in zip(indices.tolist(), classes))
        return out
      return classify_fn
    def predict_fn(dataset) -> list[tuple[int, np.ndarray]]:
      out = []
      for number, (indices, batch) in enumerate(self._batches(dataset)):
        rng = jax.random.fold_in(jax.random.PRNGKey(self.config.seed), number)
        generated = generate(self.model.config, params, batch["encoder_input_tokens"],
                             self.config.decode, rng=rng, compute=self.model.compute,
                             scanned=self.model.compute.scan_layers, mesh=self.model.mesh,
                             rules=self.model.rules)
        out.extend(zip(indices.tolist(), cut_at_eos(np.asarray(generated.tokens))))
      return out
    return predict_fn

  def _scores(self, params: Any) -> Callable[[Any], list[tuple[int, float]]]:
    """seqio's score_fn: (example index, log-likelihood) per example."""
    def score_fn(dataset) -> list[tuple[int, float]]:
      out = []
      for indices, batch in self._batches(dataset):
        scores = self._score(params, self._placed(batch))
        out.extend(zip(indices.tolist(), np.asarray(scores).tolist()))
      return out
    return score_fn

  def evaluate(self, params: Any, step: int) -> dict[str, dict[str, float]]:
    """Runs every task's metrics on `params` (placed as the model expects) and logs them at
    `step`; returns {task: {metric: value}}, plus {mixture: averages} for a mixture."""
    future, _ = self._seqio.evaluate(compute_metrics=True, step=step,
                                     predict_fn=self._predict(params),
                                     score_fn=self._scores(params))
    results = {task: {name: float(value) for name, value in metrics.items()}
               for task, metrics in future.result().items()}
    if self._mixture is not None:
      shared = set.intersection(*(set(metrics) for metrics in results.values()))
      averages = {name: float(np.mean([metrics[name] for metrics in results.values()]))
                  for name in sorted(shared)}
      for logger in self._seqio.loggers:
        logger(task_name=self._mixture, step=step,
               metrics={name: seqio.metrics.Scalar(value) for name, value in averages.items()},
               dataset=None, inferences={}, targets=[])
      results[self._mixture] = averages
    return results

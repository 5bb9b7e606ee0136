"""The jitted train and eval steps: loss, gradients accumulated over microbatches, optax update.

The loss of a step is Σ w·ℓ / Σ w over the whole global batch, with w the feature converter's
`decoder_loss_weights` and ℓ per token:

    ℓ = (1 − kd_weight) · CE(label smoothing) + kd_weight · KD(teacher) + z_loss · log_z²

Microbatches (`num_microbatches` > 1) run in a `lax.scan` inside the step: each adds the
gradient of its Σ w·ℓ, and the sum is divided by the global Σ w once, so accumulation gives the
full batch's gradient up to float rounding. Rows are dealt to microbatches round-robin (row r
goes to microbatch r mod M), so every device keeps working on its own rows.

The teacher (a decoder-only Gemma 2, frozen) runs in the same step on the un-split sequence of
each PrefixLM example (`t5g.train.distillation`).

The encoder-only classifier (`t5g.model.classifier`) has one loss term per example instead:
ℓ = CE(label smoothing) + z_loss · log_z² over its class logits, w = 1 for a labelled example
(label ≥ 0) and 0 otherwise; `accuracy` and `tokens` then count examples.

`LossConfig.logits_chunk_length` > 0 computes the output head of T5Gemma and Gemma 2 a chunk of
positions at a time, gradients included (`t5g.train.chunked_loss`): the [B, T, V] logits are
never materialised; same sums and gradients up to float rounding.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import optax

from t5g.errors import InputError
from t5g.model.classifier import EncoderClassifier
from t5g.model.models import T5Gemma, model_inputs
from t5g.train import chunked_loss, distillation, losses

Array = jax.Array
Batch = Mapping[str, Array]
_SUMS = ("loss", "cross_entropy", "z_loss", "kd_loss", "accuracy")


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """z_loss: weight of log_z²; label_smoothing: mass spread over the other tokens; kd_weight:
  share of the distillation loss (needs a teacher; 0 = ground truth only); kd_temperature: the
  softmax temperature of both distributions in the distillation loss; logits_chunk_length:
  decoder positions per chunk of the vocabulary-tiled output head (`t5g.train.chunked_loss`:
  only [B, chunk, V] logits alive at a time, for T5Gemma and Gemma 2; the encoder-only
  classifier ignores it), 0 = materialise the [B, T, V] logits."""

  z_loss: float = 0.0
  label_smoothing: float = 0.0
  kd_weight: float = 0.0
  kd_temperature: float = 1.0
  logits_chunk_length: int = 0

  def __post_init__(self):
    for name in ("z_loss", "label_smoothing", "kd_weight"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise InputError(f"LossConfig.{name}={getattr(self, name)!r}: must be in [0, 1]")
    if self.kd_temperature <= 0:
      raise InputError(f"LossConfig.kd_temperature={self.kd_temperature!r}: must be positive")
    if self.logits_chunk_length < 0:
      raise InputError(f"LossConfig.logits_chunk_length={self.logits_chunk_length!r}: must be "
                       "0 (materialised logits) or a positive number of positions")


gin.external_configurable(LossConfig, module="t5g")


class StepState(NamedTuple):
  """What the jitted step updates: the step counter, parameters and optimizer state."""

  step: Array  # int32 scalar
  params: Any
  opt_state: Any


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A frozen decoder-only teacher: its module and parameters."""

  model: nn.Module
  params: Any


def loss_sums(params: Any, batch: Batch, model: nn.Module, config: LossConfig,
              teacher: Teacher | None) -> tuple[Array, dict[str, Array]]:
  """(Σ w·ℓ, sums of each loss term, of correct predictions and of w) over `batch`."""
  if config.logits_chunk_length and not isinstance(model, EncoderClassifier):
    return _chunked_loss_sums(params, batch, model, config, teacher)
  logits = model.apply({"params": params}, **model_inputs(batch))
  if isinstance(model, EncoderClassifier):  # logits [B, C], one label per row
    targets = jnp.maximum(batch["label"], 0)
    weights = (batch["label"] >= 0).astype(jnp.float32)
  else:
    targets = batch["decoder_target_tokens"]
    weights = batch["decoder_loss_weights"].astype(jnp.float32)
  ce, log_z = losses.cross_entropy(logits, targets, config.label_smoothing)
  z = losses.z_loss(log_z, config.z_loss)
  kd = jnp.zeros_like(ce)
  if teacher is not None:
    kd = losses.distillation(logits, distillation.teacher_logits(teacher.model, teacher.params,
                                                                 batch), config.kd_temperature)
  per_token = (1.0 - config.kd_weight) * ce + config.kd_weight * kd + z
  sums = {"loss": per_token, "cross_entropy": ce, "z_loss": z, "kd_loss": kd,
          "accuracy": losses.correct(logits, targets)}
  sums = {name: jnp.sum(value * weights) for name, value in sums.items()}
  sums["weight"] = jnp.sum(weights)
  return sums["loss"], sums


def _chunked_loss_sums(params: Any, batch: Batch, model: nn.Module, config: LossConfig,
                       teacher: Teacher | None) -> tuple[Array, dict[str, Array]]:
  """`loss_sums` of a T5Gemma or Gemma 2 with the vocabulary-tiled output head."""
  hidden, table = model.apply({"params": params}, **model_inputs(batch),
                              method="hidden_and_table")
  teacher_head = None
  if teacher is not None:
    teacher_hidden, teacher_table = distillation.teacher_hidden(teacher.model, teacher.params,
                                                                batch)
    teacher_head = chunked_loss.TeacherHead(teacher_hidden, teacher_table,
                                            teacher.model.config.final_logit_softcap)
  decoder = model.config.decoder if isinstance(model, T5Gemma) else model.config
  return chunked_loss.chunked_loss_sums(
      hidden, table, batch["decoder_target_tokens"], batch["decoder_loss_weights"],
      chunk_length=config.logits_chunk_length, final_softcap=decoder.final_logit_softcap,
      label_smoothing=config.label_smoothing, z_loss=config.z_loss, kd_weight=config.kd_weight,
      kd_temperature=config.kd_temperature, teacher=teacher_head)


def _microbatches(batch: Batch, num: int) -> dict[str, Array]:
  """[B, ...] -> [num, B / num, ...], row r in microbatch r mod num."""
  def split(x):
    rows = x.shape[0]
    if rows % num:
      raise InputError(f"batch of {rows} rows does not split into {num} microbatches")
    return jnp.swapaxes(x.reshape(rows // num, num, *x.shape[1:]), 0, 1)
  return {name: split(value) for name, value in batch.items()}


def _normalised(sums: dict[str, Array]) -> dict[str, Array]:
  weight = jnp.maximum(sums["weight"], 1.0)
  metrics = {name: sums[name] / weight for name in _SUMS}
  metrics["tokens"] = sums["weight"]
  return metrics


def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation,
                    config: LossConfig, learning_rate: Callable[[Array], Array],
                    num_microbatches: int = 1, trainable: Any = None,
                    teacher_model: nn.Module | None = None
                    ) -> Callable[[StepState, Batch, Any], tuple[StepState, dict]]:
  """`step(state, batch, teacher_params) -> (state, metrics)`, to be jitted by the caller.

  teacher_model: a decoder-only Gemma 2 to distil from (its parameters are the step's third
  input), or None (the third input is then None). trainable: a tree of bools like params; the
  gradient-norm metric covers only those leaves (None: all). Metrics are float32 scalars:
  loss, cross_entropy, z_loss, kd_loss, accuracy (per weighted token), tokens, grad_norm,
  learning_rate.
  """
  grad_fn = jax.grad(loss_sums, has_aux=True)

  def gradients(params, batch, teacher):
    def of(microbatch):
      return grad_fn(params, microbatch, model, config, teacher)
    if num_microbatches == 1:
      return of(batch)
    microbatches = _microbatches(batch, num_microbatches)
    shapes = jax.eval_shape(of, jax.tree_util.tree_map(lambda x: x[0], microbatches))
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def accumulate(carry, microbatch):
      return jax.tree_util.tree_map(jnp.add, carry, of(microbatch)), None
    return jax.lax.scan(accumulate, zeros, microbatches)[0]

  def step(state: StepState, batch: Batch, teacher_params: Any = None
           ) -> tuple[StepState, dict]:
    teacher = None if teacher_model is None else Teacher(teacher_model, teacher_params)
    grads, sums = gradients(state.params, batch, teacher)
    grads = jax.tree_util.tree_map(lambda g: g / jnp.maximum(sums["weight"], 1.0), grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = _normalised(sums)
    counted = grads if trainable is None else jax.tree_util.tree_map(
        lambda g, t: g if t else jnp.zeros((), g.dtype), grads, trainable)
    metrics["grad_norm"] = optax.tree.norm(counted)
    metrics["learning_rate"] = jnp.asarray(learning_rate(state.step), jnp.float32)
    return StepState(state.step + 1, params, opt_state), metrics
  return step


def make_eval_step(model: nn.Module, config: LossConfig = LossConfig()
                   ) -> Callable[[Any, Batch], dict]:
  """`eval_step(params, batch) -> sums` (teacher-forced, ground-truth loss only); add the sums of
  several batches and pass them to `normalise_sums`."""
  ground_truth = dataclasses.replace(config, kd_weight=0.0)

  def eval_step(params: Any, batch: Batch) -> dict:
    return loss_sums(params, batch, model, ground_truth, None)[1]
  return eval_step


def normalise_sums(sums: Mapping[str, Any]) -> dict[str, float]:
  """Per-token metrics (and `tokens`) from summed `loss_sums` outputs."""
  return {name: float(value) for name, value in _normalised(dict(sums)).items()}

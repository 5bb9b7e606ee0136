"""Per-token training losses: cross-entropy with label smoothing and z-loss, distillation, accuracy.

Every function returns one value per token ([B, T]); the train step weights them with the feature
converter's `decoder_loss_weights` and normalises by the total weight of the global batch, so a
batch split into microbatches gives the same loss and gradients as the whole batch.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def cross_entropy(logits: Array, targets: Array, label_smoothing: float = 0.0
                  ) -> tuple[Array, Array]:
  """(loss [B, T], log_z [B, T]) for float32 logits [B, T, V] and int targets [B, T].

  With label smoothing s the target distribution puts 1 - s on the target and s / (V - 1) on
  every other token; its entropy is subtracted (as T5X does), so a perfect prediction of that
  distribution scores 0. log_z (the log-partition) feeds the z-loss.
  """
  vocab = logits.shape[-1]
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  target_log_prob = target_logit - log_z
  if not label_smoothing:
    return -target_log_prob, log_z
  confidence = 1.0 - label_smoothing
  low = label_smoothing / (vocab - 1)
  sum_log_prob = jnp.sum(logits, axis=-1) - vocab * log_z
  loss = -(confidence * target_log_prob + low * (sum_log_prob - target_log_prob))
  entropy = -(confidence * np.log(confidence) + (vocab - 1) * low * np.log(low))
  return loss - entropy, log_z


def z_loss(log_z: Array, weight: float) -> Array:
  """`weight · log_z²` per token: keeps the softmax normaliser near 1 (PaLM, T5X)."""
  return weight * jnp.square(log_z)


class Distillation(NamedTuple):
  """Per-token distillation loss [B, T] and the two tempered distributions [B, T, V] it came
  from (the chunked head's gradient, τ·(student − teacher), reuses them)."""

  loss: Array
  student: Array
  teacher: Array


def distillation_terms(student_logits: Array, teacher_logits: Array, temperature: float = 1.0
                       ) -> Distillation:
  """`distillation` with softmax(student / τ) and softmax(teacher / τ) [B, T, V] alongside."""
  teacher = jax.nn.softmax(jax.lax.stop_gradient(teacher_logits) / temperature, axis=-1)
  student_log = jax.nn.log_softmax(student_logits / temperature, axis=-1)
  loss = -jnp.sum(teacher * student_log, axis=-1) * temperature ** 2
  return Distillation(loss, jnp.exp(student_log), teacher)


def distillation(student_logits: Array, teacher_logits: Array, temperature: float = 1.0
                 ) -> Array:
  """Soft cross-entropy −Σ p_teacher · log p_student per token, at `temperature`, scaled by
  temperature² so that gradients keep their size. Logits [B, T, V] -> [B, T].

  No gradient flows into the teacher.
  """
  return distillation_terms(student_logits, teacher_logits, temperature).loss


def correct(logits: Array, targets: Array) -> Array:
  """1.0 where the arg-max token is the target, else 0.0: [B, T, V], [B, T] -> [B, T]."""
  return (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)

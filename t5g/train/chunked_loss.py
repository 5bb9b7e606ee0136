"""Vocabulary tiling: the tied output head and the token losses, a chunk of positions at a time.

The materialised head computes logits [B, T, V] for the whole batch, then the losses, and keeps
the logits (and builds their gradient) for the backward pass: at V = 256000 one 8192-token row
is 7.8 GiB in float32. Here the length axis is cut into chunks of C positions (the batch axis
stays whole, so its sharding over data/fsdp is kept) and a `lax.scan` computes, per chunk, the
logits [B, C, V], the per-token terms and their gradients, so only one chunk of logits is alive.

Per token, with h the final-normed decoder state [D], E the tied table [V, D], cap the final
soft-cap, u = E·h and z = cap·tanh(u / cap) (z = u without a cap):

    log_z = logsumexp(z),  p = softmax(z),  p_T = softmax(z / τ),  t = softmax(z_teacher / τ)
    ℓ = (1 − κ)·CE + κ·KD + ζ·log_z²
    CE = −Σ_j q_j log p_j − H(q),  q = 1 − s on the target, s / (V − 1) elsewhere
    KD = −τ² Σ_j t_j log p_T,j

(s label smoothing, ζ z-loss, κ kd_weight, τ kd_temperature; `t5g.train.losses` defines the
values). Since Σ_j q_j = 1:

    ∂ℓ/∂z = (1 − κ)·(p − q) + κ·τ·(p_T − t) + 2ζ·log_z·p
    ∂z/∂u = 1 − tanh²(u / cap) = 1 − (z / cap)²

and for L = Σ w·ℓ, with g = w·∂ℓ/∂z·∂z/∂u [B, C, V]: ∂L/∂h = g·E and ∂L/∂E = Σ gᵀ·h. L is a
scalar, so these are computed in the forward pass, in the same chunk as the logits: the head
costs three matmuls (forward, ∂h, ∂E) and no recomputation. The backward pass (`jax.custom_vjp`)
only scales them by the cotangent of L. The teacher, the weights and the other sums (metrics)
get no gradient.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from t5g.model.attention import softcap
from t5g.model.layers import constrain
from t5g.train import losses

Array = jax.Array


class TeacherHead(NamedTuple):
  """A frozen teacher's output head at the student's target positions: final-normed hidden
  states [B, T, Dt], its tied table [V, Dt] and its final soft-cap (None: no cap)."""

  hidden: Array
  table: Array
  final_softcap: float | None


class _Spec(NamedTuple):
  """The static part of the head: chunk length, soft-caps, the loss terms' weights and the
  dtypes of the differentiated inputs (of their cotangents)."""

  chunk_length: int
  hidden_dtype: jnp.dtype
  table_dtype: jnp.dtype
  final_softcap: float | None
  teacher_softcap: float | None
  label_smoothing: float
  z_loss: float
  kd_weight: float
  kd_temperature: float


def chunked_loss_sums(hidden: Array, table: Array, targets: Array, weights: Array, *,
                      chunk_length: int, final_softcap: float | None,
                      label_smoothing: float = 0.0, z_loss: float = 0.0, kd_weight: float = 0.0,
                      kd_temperature: float = 1.0, teacher: TeacherHead | None = None
                      ) -> tuple[Array, dict[str, Array]]:
  """(Σ w·ℓ, sums) without materialising the logits, as `train_step.loss_sums` returns them.

  hidden: final-normed decoder states [B, T, D] (the projection runs in their dtype, the compute
  dtype, with float32 results, as `Embedder.decode`); table: the tied embedding [V, D]; targets
  [B, T] int; weights [B, T] float32 (0: the token contributes nothing); teacher: for
  distillation (KD is then computed and summed whatever kd_weight is, as `loss_sums` does).
  chunk_length: positions per chunk; a length T that it does not divide is padded with weight-0
  positions, and a chunk_length ≥ T makes one chunk of T. sums: float32 scalars loss,
  cross_entropy, z_loss, kd_loss, accuracy (Σ w·term) and weight (Σ w). Only Σ w·ℓ (the first
  output, and sums["loss"]) carries a gradient, to hidden and table.
  """
  if chunk_length <= 0:
    raise ValueError(f"LossConfig.logits_chunk_length={chunk_length!r}: the chunked output head "
                     "needs a positive number of positions per chunk")
  length = hidden.shape[1]
  chunk_length = min(chunk_length, length)
  spec = _Spec(chunk_length, hidden.dtype, table.dtype, final_softcap,
               None if teacher is None else teacher.final_softcap, label_smoothing, z_loss,
               kd_weight, kd_temperature)
  pad = -length % chunk_length
  teacher_arrays = None
  if teacher is not None:
    teacher_hidden = jax.lax.stop_gradient(teacher.hidden)
    teacher_arrays = (_padded(teacher_hidden, pad),
                      jax.lax.stop_gradient(teacher.table).astype(teacher_hidden.dtype))
  sums = _head_sums(spec, _padded(hidden, pad), table, _padded(targets, pad),
                    _padded(weights.astype(jnp.float32), pad), teacher_arrays)
  return sums["loss"], sums


def _padded(x: Array, pad: int) -> Array:
  """x [B, T, ...] with `pad` zero positions appended along T."""
  return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) if pad else x


def _chunks(x: Array, chunk_length: int) -> Array:
  """[B, T, ...] -> [T / C, B, C, ...]: the scan's slices along the length axis."""
  rows, length = x.shape[:2]
  return jnp.swapaxes(x.reshape(rows, length // chunk_length, chunk_length, *x.shape[2:]), 0, 1)


def _head(spec: _Spec, hidden: Array, table: Array, targets: Array, weights: Array,
          teacher: tuple[Array, Array] | None, with_gradients: bool):
  """(sums, (∂L/∂hidden [B, T, D] float32, ∂L/∂table [V, D] float32) or None), chunk by chunk;
  T is a multiple of spec.chunk_length."""
  rows, length, _ = hidden.shape
  vocab = table.shape[0]
  table_c = table.astype(hidden.dtype)
  xs = [_chunks(x, spec.chunk_length) for x in (hidden, targets, weights)]
  if teacher is not None:
    xs.append(_chunks(teacher[0], spec.chunk_length))

  def project(h, embedding, cap):  # [B, C, D], [V, D] -> float32 [B, C, V]
    logits = jnp.einsum("bcd,vd->bcv", h, embedding, preferred_element_type=jnp.float32)
    return softcap(constrain(logits, ("batch", "length", "vocab")), cap)

  def chunk(table_grad, x):
    h, t, w = x[:3]
    logits = project(h, table_c, spec.final_softcap)
    ce, log_z = losses.cross_entropy(logits, t, spec.label_smoothing)
    z_term = losses.z_loss(log_z, spec.z_loss)
    kd = jnp.zeros_like(ce)
    if teacher is not None:
      distilled = losses.distillation_terms(
          logits, project(x[3], teacher[1], spec.teacher_softcap), spec.kd_temperature)
      kd = distilled.loss
    per_token = (1.0 - spec.kd_weight) * ce + spec.kd_weight * kd + z_term
    terms = {"loss": per_token, "cross_entropy": ce, "z_loss": z_term, "kd_loss": kd,
             "accuracy": losses.correct(logits, t)}
    sums = {name: jnp.sum(value * w) for name, value in terms.items()}
    if not with_gradients:
      return table_grad, (sums, None)
    p = jnp.exp(logits - log_z[..., None])
    target_distribution = jax.nn.one_hot(t, vocab, dtype=jnp.float32)  # q
    if spec.label_smoothing:
      low = spec.label_smoothing / (vocab - 1)
      target_distribution = low + (1.0 - spec.label_smoothing - low) * target_distribution
    dlogits = ((1.0 - spec.kd_weight) * (p - target_distribution)
               + 2.0 * spec.z_loss * log_z[..., None] * p)
    if teacher is not None and spec.kd_weight:
      dlogits += spec.kd_weight * spec.kd_temperature * (distilled.student - distilled.teacher)
    if spec.final_softcap is not None:
      dlogits *= 1.0 - jnp.square(logits / spec.final_softcap)
    dprojection = (dlogits * w[..., None]).astype(h.dtype)
    hidden_grad = jnp.einsum("bcv,vd->bcd", dprojection, table_c,
                             preferred_element_type=jnp.float32)
    table_grad += jnp.einsum("bcv,bcd->vd", dprojection, h, preferred_element_type=jnp.float32)
    return constrain(table_grad, ("vocab", "embed")), (sums, hidden_grad)

  table_grad = None
  if with_gradients:
    table_grad = constrain(jnp.zeros(table.shape, jnp.float32), ("vocab", "embed"))
  table_grad, (sums, hidden_grad) = jax.lax.scan(chunk, table_grad, xs)
  sums = {name: jnp.sum(value) for name, value in sums.items()}
  sums["weight"] = jnp.sum(weights)
  if not with_gradients:
    return sums, None
  hidden_grad = jnp.swapaxes(hidden_grad, 0, 1).reshape(rows, length, -1)
  return sums, (hidden_grad, table_grad)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _head_sums(spec: _Spec, hidden: Array, table: Array, targets: Array, weights: Array,
               teacher: tuple[Array, Array] | None) -> dict[str, Array]:
  return _head(spec, hidden, table, targets, weights, teacher, with_gradients=False)[0]


def _head_sums_forward(spec, hidden, table, targets, weights, teacher):
  return _head(spec, hidden, table, targets, weights, teacher, with_gradients=True)


def _head_sums_backward(spec, gradients, cotangents):
  hidden_grad, table_grad = gradients
  scale = cotangents["loss"]
  return ((scale * hidden_grad).astype(spec.hidden_dtype),
          (scale * table_grad).astype(spec.table_dtype), None, None, None)


_head_sums.defvjp(_head_sums_forward, _head_sums_backward)

"""The vocabulary-tiled output head (`t5g.train.chunked_loss`) against the materialised logits.

The head alone on random states (soft-cap, label smoothing, z-loss and KD gradients against
autodiff), then the jitted train step of the tiny T5Gemma with a Gemma 2 teacher and loss_sums of
the tiny Gemma 2: every sum, metric and parameter gradient agrees in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5g.model.config import FP32
from t5g.model.models import Gemma2, make_model
from t5g.model.presets import get_preset
from t5g.train import losses
from t5g.train.chunked_loss import TeacherHead, chunked_loss_sums
from t5g.train.train_step import LossConfig, StepState, loss_sums, make_train_step
from tests.test_train_step import (_assert_close, _examples, _grads_as_state, _packed_batch,
                                   _random_params)

ENC_LEN, DEC_LEN = 24, 18
KD = dict(label_smoothing=0.1, z_loss=1e-3, kd_weight=0.5, kd_temperature=2.0)


def _materialised_sums(hidden, table, targets, weights, cap, teacher=None, label_smoothing=0.0,
                       z_loss=0.0, kd_weight=0.0, kd_temperature=1.0):
  """Σ w·ℓ and its terms from the whole [B, T, V] logits, by `t5g.train.losses`."""
  def logits_of(h, e, c):
    logits = jnp.einsum("btd,vd->btv", h, e)
    return logits if c is None else c * jnp.tanh(logits / c)
  logits = logits_of(hidden, table, cap)
  ce, log_z = losses.cross_entropy(logits, targets, label_smoothing)
  z = losses.z_loss(log_z, z_loss)
  kd = jnp.zeros_like(ce)
  if teacher is not None:
    kd = losses.distillation(logits, logits_of(*teacher), kd_temperature)
  terms = {"loss": (1 - kd_weight) * ce + kd_weight * kd + z, "cross_entropy": ce,
           "z_loss": z, "kd_loss": kd, "accuracy": losses.correct(logits, targets)}
  sums = {name: jnp.sum(value * weights) for name, value in terms.items()}
  sums["weight"] = jnp.sum(weights)
  return sums["loss"], sums


@pytest.mark.parametrize("cap, terms, chunk_length", [
    (None, {}, 4),  # Plain CE, chunks divide T = 12.
    (2.0, dict(label_smoothing=0.2, z_loss=0.1), 5),  # A soft-cap that bites; 5 does not divide.
    (2.5, KD, 40),  # Longer than T: one chunk.
])
def test_head_matches_autodiff(cap, terms, chunk_length):
  """Sums and ∂(Σ w·ℓ)/∂(states, table) against autodiff through the materialised logits;
  zero-weight tokens (a whole row included) contribute nothing."""
  rng = np.random.RandomState(chunk_length)
  rows, length, dim, vocab = 3, 12, 8, 33
  hidden = jnp.asarray(rng.normal(size=(rows, length, dim)), jnp.float32)
  table = jnp.asarray(rng.normal(size=(vocab, dim)), jnp.float32)
  targets = jnp.asarray(rng.randint(0, vocab, size=(rows, length)))
  weights = rng.uniform(0.5, 2.0, size=(rows, length)).astype(np.float32)
  weights[0, -5:] = 0.0
  weights[2] = 0.0
  teacher = None
  if "kd_weight" in terms:
    teacher = (jnp.asarray(rng.normal(size=(rows, length, 6)), jnp.float32),
               jnp.asarray(rng.normal(size=(vocab, 6)), jnp.float32), 1.5)

  def chunked(h, e):
    return chunked_loss_sums(h, e, targets, weights, chunk_length=chunk_length,
                             final_softcap=cap, **terms,
                             teacher=None if teacher is None else TeacherHead(*teacher))

  def materialised(h, e):
    return _materialised_sums(h, e, targets, weights, cap, teacher, **terms)

  (grads, sums), (expected_grads, expected_sums) = (
      jax.grad(f, argnums=(0, 1), has_aux=True)(hidden, table) for f in (chunked, materialised))
  for name, value in expected_sums.items():
    np.testing.assert_allclose(sums[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
  assert float(sums["loss"]) == float(chunked(hidden, table)[0])
  _assert_close(grads, expected_grads, 1e-5)
  np.testing.assert_array_equal(grads[0][2], 0.0)  # The row of weight 0.


def test_bad_chunk_length():
  with pytest.raises(ValueError, match="LossConfig.logits_chunk_length=-1"):
    LossConfig(logits_chunk_length=-1)
  with pytest.raises(ValueError, match="LossConfig.logits_chunk_length=0"):
    chunked_loss_sums(jnp.zeros((1, 4, 2)), jnp.zeros((5, 2)), jnp.zeros((1, 4), jnp.int32),
                      jnp.ones((1, 4)), chunk_length=0, final_softcap=None)


@pytest.fixture(scope="module")
def packed_batch():
  """Packed rows of 2-3 examples, zero-weight padding at the end of each row (numpy)."""
  rng = np.random.RandomState(11)
  rows = [_examples(rng, [(5, 4), (7, 6), (3, 5)]), _examples(rng, [(11, 9), (0, 4)]),
          _examples(rng, [(4, 8), (13, 2)]), _examples(rng, [(6, 7)])]
  batch = _packed_batch(rows, ENC_LEN, DEC_LEN)
  batch["decoder_loss_weights"] = (batch["decoder_target_tokens"] != 0).astype(np.float32)
  return batch


def test_train_step_matches_materialised(packed_batch):
  """The tiny T5Gemma's step with label smoothing, z-loss and KD from the tiny Gemma 2, in
  chunks of 4 (T = 18: the last one padded) and 2 microbatches, against the logits in one."""
  student = make_model(get_preset("t5gemma-tiny-tiny"), FP32)
  params = _random_params(get_preset("t5gemma-tiny-tiny"), 3)
  teacher_config = get_preset("gemma2-tiny")
  teacher, teacher_params = Gemma2(teacher_config, FP32), _random_params(teacher_config, 7)
  tx = _grads_as_state()
  results = []
  for chunk_length, microbatches in ((0, 1), (4, 2)):
    config = LossConfig(**KD, logits_chunk_length=chunk_length)
    step = jax.jit(make_train_step(student, tx, config, lambda s: 0.0, microbatches,
                                   teacher_model=teacher))
    state = StepState(jnp.zeros((), jnp.int32), params, tx.init(params))
    state, metrics = step(state, packed_batch, teacher_params)
    results.append((state.opt_state, {k: float(v) for k, v in metrics.items()}))
  (expected_grads, expected), (grads, metrics) = results
  assert expected["kd_loss"] > 0 and expected["tokens"] == packed_batch[
      "decoder_loss_weights"].sum()
  assert metrics == pytest.approx(expected, rel=1e-5)
  _assert_close(grads, expected_grads, 1e-5)


def test_gemma2_loss_sums_match_materialised(packed_batch):
  """loss_sums of the decoder-only tiny Gemma 2 and its gradients, in chunks of 6 (T = 18)."""
  config = get_preset("gemma2-tiny")
  model, params = make_model(config, FP32), _random_params(config, 5)
  batch = {name: value for name, value in packed_batch.items() if name.startswith("decoder")}
  outputs = [jax.jit(jax.grad(lambda p, b, c=chunk_length: loss_sums(
      p, b, model, LossConfig(label_smoothing=0.1, z_loss=1e-3, logits_chunk_length=c), None),
      has_aux=True))(params, batch) for chunk_length in (0, 6)]
  (expected_grads, expected_sums), (grads, sums) = outputs
  for name, value in expected_sums.items():
    np.testing.assert_allclose(sums[name], value, rtol=1e-5, err_msg=name)
  _assert_close(grads, expected_grads, 1e-5)

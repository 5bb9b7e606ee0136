"""The train step's pieces: the PrefixLM teacher's view, the per-token losses, the jitted step.

Small and in-process: tiny presets in float32, short sequences, one jitted step per case.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from t5g.model.config import BOS_ID, FP32
from t5g.model.models import Gemma2, abstract_params, make_model
from t5g.model.presets import get_preset
from t5g.train import distillation, losses
from t5g.train.optimizers import OptimizerConfig, Phase, make_optimizer, trainable_mask
from t5g.model.models import model_inputs
from t5g.train.train_step import LossConfig, StepState, make_train_step

VOCAB = 512  # Of both tiny presets.
ENC_LEN, DEC_LEN = 24, 18  # Of the teacher tests' batches.
ALONE_SHAPE = (8, 32)  # Of the teacher's batch holding one example alone per row.
_teacher_logits = jax.jit(distillation.teacher_logits, static_argnums=0)
_apply = jax.jit(lambda module, params, tokens: module.apply({"params": params}, tokens),
                 static_argnums=0)
_apply_student = jax.jit(
    lambda module, params, batch: module.apply({"params": params}, **model_inputs(batch)),
    static_argnums=0)


def _tokens(rng: np.random.RandomState, n: int) -> np.ndarray:
  """n random non-special token ids."""
  return rng.randint(3, VOCAB, size=n).astype(np.int32)


def _examples(rng: np.random.RandomState, lengths) -> list[tuple[np.ndarray, np.ndarray]]:
  """(prefix p, continuation t) of each (n, m) in `lengths`."""
  return [(_tokens(rng, n), _tokens(rng, m)) for n, m in lengths]


def _packed_batch(rows, enc_len: int, dec_len: int) -> dict[str, np.ndarray]:
  """Encoder-decoder features of rows of examples, packed as seqio packs them.

  Example k of a row (1-based) has segment id k on both sides, positions restart at 0, an empty
  prefix leaves id k out of the encoder side; the decoder input is BOS t_1..t_{m-1}.
  """
  shape = {"encoder": (len(rows), enc_len), "decoder": (len(rows), dec_len)}
  batch = {f"{side}_{name}": np.zeros(shape[side], np.int32) for side in shape
           for name in ("input_tokens", "segment_ids", "positions")}
  batch["decoder_target_tokens"] = np.zeros(shape["decoder"], np.int32)
  for r, examples in enumerate(rows):
    at = {"encoder": 0, "decoder": 0}
    for k, (prefix, targets) in enumerate(examples, start=1):
      inputs = np.concatenate([[BOS_ID], targets[:-1]])
      for side, tokens in (("encoder", prefix), ("decoder", inputs)):
        span = slice(at[side], at[side] + len(tokens))
        batch[f"{side}_input_tokens"][r, span] = tokens
        batch[f"{side}_segment_ids"][r, span] = k
        batch[f"{side}_positions"][r, span] = np.arange(len(tokens))
        at[side] += len(tokens)
      batch["decoder_target_tokens"][r, at["decoder"] - len(targets):at["decoder"]] = targets
  return batch


def _random_params(config, seed: int) -> dict:
  """Random float32 parameters (unscanned), drawn without tracing the model: kernels with
  variance 1/(their first dimension), the embedding N(0, 1), norm scales N(0, 0.1²)."""
  rng = np.random.RandomState(seed)

  def draw(path, shape):
    std = (1.0 if "embedding" in jax.tree_util.keystr(path) else
           0.1 if len(shape.shape) == 1 else shape.shape[0] ** -0.5)
    return jnp.asarray(rng.normal(scale=std, size=shape.shape), jnp.float32)
  return jax.tree_util.tree_map_with_path(draw, abstract_params(config, FP32))


@pytest.fixture(scope="module")
def teacher():
  """(Gemma2 module, random params) of the tiny Gemma 2, float32."""
  config = get_preset("gemma2-tiny")
  return Gemma2(config, FP32), _random_params(config, 7)


def _alone(teacher, rows) -> list[list[np.ndarray]]:
  """The teacher's logits for t_1..t_m of every example, read from the example alone: one row
  [BOS p t_1..t_{m-1}], right-padded (padding after an example does not change its logits)."""
  module, params = teacher
  examples = [example for examples in rows for example in examples]
  sequences = np.zeros(ALONE_SHAPE, np.int32)
  for i, (prefix, targets) in enumerate(examples):
    sequences[i, :len(prefix) + len(targets)] = np.concatenate([[BOS_ID], prefix, targets[:-1]])
  logits = iter(np.asarray(_apply(module, params, sequences)))
  return [[next(logits)[len(p):len(p) + len(t)] for p, t in examples] for examples in rows]


def _check_aligned(teacher, batch, rows) -> None:
  """`teacher_logits` of the batch holding `rows` equals the teacher on each example alone."""
  module, params = teacher
  got = np.asarray(_teacher_logits(module, params, batch))
  assert got.shape == (*batch["decoder_input_tokens"].shape, VOCAB)
  for r, (examples, alone) in enumerate(zip(rows, _alone(teacher, rows))):
    at = 0
    for k, ((_, targets), expected) in enumerate(zip(examples, alone)):
      m = len(targets)
      np.testing.assert_allclose(got[r, at:at + m], expected, rtol=1e-5, atol=1e-4,
                                 err_msg=f"row {r}, example {k}")
      at += m


def test_teacher_logits_unpacked(teacher):
  """One example per row, right-padded, segment ids and positions left to their defaults."""
  rows = [[e] for e in _examples(np.random.RandomState(0), [(9, 7), (0, 10), (14, 3), (1, 1)])]
  batch = _packed_batch(rows, ENC_LEN, DEC_LEN)
  for side in ("encoder", "decoder"):
    del batch[f"{side}_segment_ids"], batch[f"{side}_positions"]
  _check_aligned(teacher, batch, rows)
  inputs = distillation.teacher_inputs(batch)
  prefix, targets = rows[0][0]
  np.testing.assert_array_equal(inputs["decoder_input_tokens"][0, :1 + 9 + 6],
                                np.concatenate([[BOS_ID], prefix, targets[:-1]]))
  np.testing.assert_array_equal(inputs["target_index"][0, :7], np.arange(9, 16))


def test_teacher_logits_packed(teacher):
  """2-3 examples per row with seqio's segment ids and positions; one with an empty prefix."""
  rng = np.random.RandomState(1)
  rows = [_examples(rng, [(5, 4), (7, 6), (3, 5)]),
          _examples(rng, [(11, 9), (0, 4), (6, 3)]),
          _examples(rng, [(4, 8), (13, 2)])]
  batch = _packed_batch(rows, ENC_LEN, DEC_LEN)
  np.testing.assert_array_equal(batch["encoder_segment_ids"][1, 10:12], [1, 3])  # No id 2.
  _check_aligned(teacher, batch, rows)
  inputs = distillation.teacher_inputs(batch)
  # Row 0 as the teacher reads it: the three sequences one after the other, then padding.
  expected = np.concatenate([np.concatenate([[BOS_ID], p, t[:-1]]) for p, t in rows[0]])
  np.testing.assert_array_equal(inputs["decoder_input_tokens"][0, :len(expected)], expected)
  np.testing.assert_array_equal(inputs["decoder_segment_ids"][0, :len(expected)],
                                np.repeat([1, 2, 3], [9, 13, 8]))
  np.testing.assert_array_equal(inputs["decoder_segment_ids"][0, len(expected):], 0)
  np.testing.assert_array_equal(inputs["decoder_positions"][0, 9:22], np.arange(13))


def _log_softmax(x: np.ndarray) -> np.ndarray:
  """log softmax over the last axis, in float64."""
  x = x.astype(np.float64)
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def test_cross_entropy_with_label_smoothing_and_z_loss():
  rng = np.random.RandomState(0)
  logits = rng.normal(scale=3.0, size=(2, 3, 7)).astype(np.float32)
  targets = rng.randint(0, 7, size=(2, 3))
  log_p = _log_softmax(logits)
  log_z = np.log(np.exp(logits.astype(np.float64)).sum(-1))
  plain, z = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(targets))
  np.testing.assert_allclose(plain, -np.take_along_axis(log_p, targets[..., None], -1)[..., 0],
                             rtol=1e-5)
  np.testing.assert_allclose(z, log_z, rtol=1e-6)
  smoothing = 0.1
  q = np.full(logits.shape, smoothing / 6)
  np.put_along_axis(q, targets[..., None], 1 - smoothing, -1)
  expected = -(q * log_p).sum(-1) + (q * np.log(q)).sum(-1)  # −Σ q log p − H(q)
  smoothed, _ = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(targets), smoothing)
  np.testing.assert_allclose(smoothed, expected, rtol=1e-5, atol=1e-6)
  perfect = np.log(q).astype(np.float32)  # Predicting q exactly scores 0.
  np.testing.assert_allclose(losses.cross_entropy(jnp.asarray(perfect), jnp.asarray(targets),
                                                  smoothing)[0], 0.0, atol=1e-5)
  np.testing.assert_allclose(losses.z_loss(z, 1e-4), 1e-4 * log_z ** 2, rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_distillation_loss(temperature):
  rng = np.random.RandomState(int(temperature))
  student = rng.normal(scale=2.0, size=(2, 5, 11)).astype(np.float32)
  teacher_logits = rng.normal(scale=2.0, size=(2, 5, 11)).astype(np.float32)
  p = np.exp(_log_softmax(teacher_logits / temperature))
  expected = -(p * _log_softmax(student / temperature)).sum(-1) * temperature ** 2
  np.testing.assert_allclose(losses.distillation(jnp.asarray(student), jnp.asarray(teacher_logits),
                                                 temperature), expected, rtol=1e-5)
  teacher_grad = jax.grad(lambda t: losses.distillation(jnp.asarray(student), t,
                                                        temperature).sum())(
                                                            jnp.asarray(teacher_logits))
  np.testing.assert_array_equal(teacher_grad, 0.0)


def test_correct():
  logits = jnp.asarray([[[0.0, 2.0, 1.0], [3.0, 0.0, 1.0]], [[0.0, 0.0, 5.0], [1.0, 2.0, 0.0]]])
  np.testing.assert_array_equal(losses.correct(logits, jnp.asarray([[1, 2], [2, 0]])),
                                [[1.0, 0.0], [1.0, 0.0]])


# The jitted step, on the tiny T5Gemma in float32.


def _grads_as_state() -> optax.GradientTransformation:
  """An 'optimizer' whose state is the last gradient and whose updates are zero."""
  zeros = lambda tree: jax.tree_util.tree_map(jnp.zeros_like, tree)  # noqa: E731
  return optax.GradientTransformation(zeros, lambda grads, state, params=None: (zeros(grads),
                                                                                 grads))


@pytest.fixture(scope="module")
def student():
  """(module, params) of the tiny T5Gemma, float32, unscanned."""
  config = get_preset("t5gemma-tiny-tiny")
  return make_model(config, FP32), _random_params(config, 3)


@pytest.fixture(scope="module")
def batch():
  """An unpacked batch of 4 rows with loss weights on the targets (numpy)."""
  rng = np.random.RandomState(5)
  rows = [[e] for e in _examples(rng, [(9, 7), (3, 10), (12, 5), (6, 8)])]
  out = _packed_batch(rows, enc_len=12, dec_len=10)
  out["decoder_loss_weights"] = (out["decoder_target_tokens"] != 0).astype(np.float32)
  return out


_STEPS = {}


def _gradients(student, batch, config=LossConfig(), teacher=None):
  """(gradients, metrics) of one step (each step function is compiled once)."""
  module, params = student
  tx = _grads_as_state()
  key = (config, teacher is not None)
  if key not in _STEPS:
    _STEPS[key] = jax.jit(make_train_step(module, tx, config, lambda s: 0.0,
                                          teacher_model=None if teacher is None else teacher[0]))
  state = StepState(jnp.zeros((), jnp.int32), params, tx.init(params))
  state, metrics = _STEPS[key](state, batch, None if teacher is None else teacher[1])
  return state.opt_state, {k: float(v) for k, v in metrics.items()}


def _assert_close(a, b, tolerance: float = 1e-4) -> None:
  """Two trees agree leaf by leaf, up to `tolerance` times each leaf's largest magnitude."""
  def check(path, x, y):
    x, y = np.asarray(x), np.asarray(y)
    np.testing.assert_allclose(x, y, rtol=0, atol=tolerance * np.abs(y).max(),
                               err_msg=jax.tree_util.keystr(path))
  jax.tree_util.tree_map_with_path(check, a, b)


def _assert_equal(a, b) -> None:
  """Two trees are bitwise equal leaf by leaf."""
  jax.tree_util.tree_map_with_path(
      lambda path, x, y: np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path)),
      a, b)


def test_loss_weights(student, batch):
  """Zero-weight tokens do not count, and the gradient is that of Σ w·ℓ / Σ w: the weighted sum
  of the gradients of two disjoint parts of the weights, each normalised by its own Σ w."""
  grads, metrics = _gradients(student, batch)
  changed = dict(batch)  # Other targets where the weight is 0: nothing changes.
  changed["decoder_target_tokens"] = np.where(batch["decoder_loss_weights"] > 0,
                                              batch["decoder_target_tokens"], 7)
  changed_grads, changed_metrics = _gradients(student, changed)
  _assert_equal(changed_grads, grads)
  assert changed_metrics == metrics
  assert metrics["tokens"] == batch["decoder_loss_weights"].sum() == 30

  weights = batch["decoder_loss_weights"] * np.random.RandomState(0).uniform(
      0.5, 2, batch["decoder_loss_weights"].shape).astype(np.float32)
  weights[1] = 0.0  # A whole row out.
  first = weights * (np.arange(weights.shape[1]) < 4)
  parts = [weights, first, weights - first]
  (whole, whole_metrics), *split = [_gradients(student, dict(batch, decoder_loss_weights=w))
                                    for w in parts]
  total, (a, b) = weights.sum(), [w.sum() for w in parts[1:]]
  assert whole_metrics["tokens"] == pytest.approx(total)
  expected = jax.tree_util.tree_map(lambda x, y: (a * x + b * y) / total, split[0][0],
                                    split[1][0])
  _assert_close(whole, expected)
  assert whole_metrics["loss"] == pytest.approx(
      (a * split[0][1]["loss"] + b * split[1][1]["loss"]) / total, rel=1e-5)
  assert whole_metrics["loss"] != pytest.approx(metrics["loss"], rel=1e-3)


def test_kd_weight_mixes_the_losses(student, batch, teacher):
  module, params = student
  weights = batch["decoder_loss_weights"]

  logits = _apply_student(module, params, batch)
  kd = losses.distillation(logits, _teacher_logits(teacher[0], teacher[1], batch), 2.0)
  expected_kd = float(jnp.sum(kd * weights) / weights.sum())
  ground_truth, ground_truth_metrics = _gradients(student, batch)
  results = {}
  for kd_weight in (0.0, 1.0):
    config = LossConfig(kd_weight=kd_weight, kd_temperature=2.0)
    results[kd_weight] = _gradients(student, batch, config, teacher)
    metrics = results[kd_weight][1]
    assert metrics["kd_loss"] == pytest.approx(expected_kd, rel=1e-5)
    assert metrics["cross_entropy"] == pytest.approx(ground_truth_metrics["cross_entropy"],
                                                     rel=1e-6)
  assert results[0.0][1]["loss"] == pytest.approx(results[0.0][1]["cross_entropy"], rel=1e-6)
  assert results[1.0][1]["loss"] == pytest.approx(results[1.0][1]["kd_loss"], rel=1e-6)
  _assert_close(results[0.0][0], ground_truth, 1e-5)
  kd_norm, ce_norm = results[1.0][1]["grad_norm"], ground_truth_metrics["grad_norm"]
  assert kd_norm > 0 and kd_norm != pytest.approx(ce_norm, rel=1e-2)


def test_frozen_phase_updates_only_its_parameters(student, batch):
  module, params = student
  config = OptimizerConfig(learning_rate=1e-2, schedule="constant")
  tx = make_optimizer(config, params, Phase(0, ("decoder/*cross_attn*",)))
  step = jax.jit(make_train_step(module, tx, LossConfig(), lambda s: 1e-2,
                                 trainable=trainable_mask(params, ("decoder/*cross_attn*",))))
  state = StepState(jnp.zeros((), jnp.int32), params, tx.init(params))
  state, metrics = step(state, batch, None)
  grads = _gradients(student, batch)[0]
  cross = {}
  for (path, before), after, grad in zip(jax.tree_util.tree_leaves_with_path(params),
                                         jax.tree_util.tree_leaves(state.params),
                                         jax.tree_util.tree_leaves(grads)):
    name = jax.tree_util.keystr(path)
    if "'decoder'" in name and "'cross_attn'" in name:
      cross[name] = grad
      assert not np.array_equal(after, before), name
    else:
      np.testing.assert_array_equal(after, before, err_msg=name)
  assert len(cross) == 4 * 4  # q/k/v/o of the 4 decoder layers.
  assert metrics["grad_norm"] == pytest.approx(float(optax.tree.norm(list(cross.values()))),
                                               rel=1e-5)

"""Tests for t5g.train.optimizers: schedules, AdamW/Adafactor updates, phases and freezing."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from t5g.checkpoints.adapt import AdaptedSource
from t5g.checkpoints.sources import TreeSource
from t5g.model.config import ComputeConfig
from t5g.model.models import abstract_params
from t5g.model.presets import TINY_STACKS
from t5g.train.optimizers import (OptimizerConfig, Phase, learning_rate_schedule, make_optimizer,
                                  optimizer_state_bytes, phase_at, trainable_mask)


def _lr(config: OptimizerConfig, step: int) -> float:
  return float(learning_rate_schedule(config)(step))


def test_cosine_schedule():
  config = OptimizerConfig(learning_rate=2.0, warmup_steps=10, decay_steps=110,
                           end_fraction=0.1)
  assert _lr(config, 0) == 0.0  # Warmup starts from 0 at step 0.
  assert _lr(config, 5) == pytest.approx(1.0)
  assert _lr(config, 10) == pytest.approx(2.0)
  assert _lr(config, 60) == pytest.approx(0.2 + 1.8 * 0.5 * (1 + math.cos(math.pi * 0.5)))
  assert _lr(config, 85) == pytest.approx(0.2 + 1.8 * 0.5 * (1 + math.cos(math.pi * 0.75)))
  assert _lr(config, 110) == pytest.approx(0.2)
  assert _lr(config, 10_000) == pytest.approx(0.2)


def test_rsqrt_and_constant_schedules():
  rsqrt = OptimizerConfig(learning_rate=1.0, schedule="rsqrt", warmup_steps=100)
  assert [_lr(rsqrt, s) for s in (0, 50, 100, 400, 10_000)] == pytest.approx(
      [0.0, 0.5, 1.0, 0.5, 0.1])
  constant = OptimizerConfig(learning_rate=3.0, schedule="constant", warmup_steps=4)
  assert [_lr(constant, s) for s in (0, 1, 4, 10**6)] == pytest.approx([0.0, 0.75, 3.0, 3.0])
  assert _lr(OptimizerConfig(learning_rate=3.0, schedule="constant"), 0) == pytest.approx(3.0)


@pytest.mark.parametrize("kwargs,field", [
    ({"decay_steps": 5, "warmup_steps": 5}, "decay_steps"),
    ({"schedule": "rsqrt"}, "warmup_steps"),
    ({"schedule": "constant", "name": "sgd"}, "name"),
    ({"schedule": "constant", "b2": 1.0}, "b2"),
    ({"schedule": "constant", "end_fraction": 2.0}, "end_fraction"),
    ({"schedule": "constant", "clip_global_norm": 0.0}, "clip_global_norm"),
])
def test_config_validation(kwargs, field):
  with pytest.raises(ValueError, match=f"OptimizerConfig.{field}="):
    OptimizerConfig(**kwargs)


def test_cosine_needs_decay_steps():
  with pytest.raises(ValueError, match="OptimizerConfig.decay_steps=None"):
    learning_rate_schedule(OptimizerConfig())


def test_phase_shifts_schedule_to_global_step():
  config = OptimizerConfig(learning_rate=1e-2, warmup_steps=10, decay_steps=100,
                           clip_global_norm=None)
  params = {"w": jnp.ones((3,))}
  grads = {"w": jnp.ones((3,))}
  for start in (0, 50):
    opt = make_optimizer(config, params, Phase(start))
    state = opt.init(params)
    for count in range(2):  # Adam's update is ~1 for constant unit grads: it shows the lr.
      updates, state = opt.update(grads, state, params)
      np.testing.assert_allclose(updates["w"], -_lr(config, start + count), rtol=1e-4)


def _adamw_reference(params, grads_seq, lr, b1, b2, eps, wd, clip):
  params = {k: np.array(v, np.float64) for k, v in params.items()}
  mu = {k: np.zeros_like(v) for k, v in params.items()}
  nu = {k: np.zeros_like(v) for k, v in params.items()}
  for t, grads in enumerate(grads_seq, 1):
    norm = math.sqrt(sum(float(np.sum(np.square(g))) for g in grads.values()))
    for k, g in grads.items():
      g = np.asarray(g, np.float64) * min(1.0, clip / norm)
      mu[k] = b1 * mu[k] + (1 - b1) * g
      nu[k] = b2 * nu[k] + (1 - b2) * g * g
      update = (mu[k] / (1 - b1**t)) / (np.sqrt(nu[k] / (1 - b2**t)) + eps)
      update = update + (wd * params[k] if params[k].ndim >= 2 else 0.0)
      params[k] = params[k] - lr * update
  return params


def test_adamw_matches_numpy_with_decay_and_clipping():
  config = OptimizerConfig(learning_rate=0.1, schedule="constant", b1=0.9, b2=0.99, eps=0.1,
                           weight_decay=0.5, clip_global_norm=1.0)
  rng = np.random.default_rng(0)
  params = {"w": rng.normal(size=(2, 3)).astype(np.float32),
            "scale": rng.normal(size=(3,)).astype(np.float32)}
  grads_seq = [{k: (3 * rng.normal(size=v.shape)).astype(np.float32) for k, v in params.items()}
               for _ in range(2)]
  opt = make_optimizer(config, params, Phase(0))
  state, new = opt.init(params), dict(params)
  for grads in grads_seq:
    updates, state = opt.update(grads, state, new)
    new = optax.apply_updates(new, updates)
  expected = _adamw_reference(params, grads_seq, 0.1, 0.9, 0.99, 0.1, 0.5, 1.0)
  for k in params:
    np.testing.assert_allclose(new[k], expected[k], rtol=1e-5, atol=1e-6)


def test_adafactor_factors_matrices():
  config = OptimizerConfig(name="adafactor", learning_rate=0.1, schedule="constant",
                           weight_decay=0.1)
  params = {"w": jnp.ones((4, 6)), "scale": jnp.ones((6,))}
  grads = {"w": jnp.arange(24.0).reshape(4, 6) / 24, "scale": jnp.full((6,), 0.5)}
  opt = make_optimizer(config, params, Phase(0))
  state = opt.init(params)
  v_row, v_col, v = (optax.tree_utils.tree_get(state, name) for name in ("v_row", "v_col", "v"))
  assert (v_row["w"].shape, v_col["w"].shape, v["w"].shape) == ((4,), (6,), (1,))
  assert v["scale"].shape == (6,)
  update = jax.jit(opt.update)
  new = params
  for _ in range(3):
    updates, state = update(grads, state, new)
    new = optax.apply_updates(new, updates)
  for k in params:
    assert np.all(np.isfinite(new[k])) and not np.allclose(new[k], params[k])


def test_frozen_params_get_no_update_no_state_and_no_clip_share():
  config = OptimizerConfig(learning_rate=0.1, schedule="constant", eps=1.0,
                           clip_global_norm=1.0)
  params = {"decoder": {
      "layers": {"local": {"cross_attn": {"k_proj": jnp.ones((2, 4, 3))},
                           "attn": {"k_proj": jnp.ones((2, 4, 3))}}},
      "final_norm": {"scale": jnp.ones((4,))}}}
  grads = jax.tree.map(lambda x: jnp.full(x.shape, 100.0), params)
  grads["decoder"]["layers"]["local"]["cross_attn"]["k_proj"] = jnp.full((2, 4, 3), 0.1)
  opt = make_optimizer(config, params, Phase(0, ("decoder/cross_attn/k_proj",)))
  state = opt.init(params)
  leaves = jax.tree.leaves(state)
  assert sum(x.size for x in leaves) == 2 * 24 + 2  # mu and nu, plus two counts.
  assert sum(x.ndim == 0 for x in leaves) == 2
  assert optimizer_state_bytes(state) == 4 * (2 * 24 + 2)
  new = params
  for _ in range(2):
    updates, state = jax.jit(opt.update)(grads, state, new)
    new = optax.apply_updates(new, updates)
  # The trainable grads' norm (~0.49) is under the clip: frozen grads did not count.
  np.testing.assert_allclose(new["decoder"]["layers"]["local"]["cross_attn"]["k_proj"],
                             1.0 - 2 * 0.1 * 0.1 / 1.1, rtol=1e-5)
  np.testing.assert_array_equal(new["decoder"]["layers"]["local"]["attn"]["k_proj"], 1.0)
  np.testing.assert_array_equal(new["decoder"]["final_norm"]["scale"], 1.0)


def _true_paths(mask) -> set[str]:
  flat = jax.tree_util.tree_leaves_with_path(mask)
  return {"/".join(k.key for k in path) for path, on in flat if on}


@pytest.mark.parametrize("scanned", [True, False])
def test_new_parameters_select_fresh_cross_attention_in_both_layouts(scanned):
  enc, dec = TINY_STACKS["tiny_wide"], TINY_STACKS["tiny"]
  adapted = AdaptedSource(TreeSource(None, enc, False), TreeSource(None, dec, False))
  new = adapted.new_parameters()
  params = abstract_params(adapted.config, ComputeConfig(scan_layers=scanned))
  all_paths = _true_paths(jax.tree.map(lambda _: True, params))
  expected = {p for p in all_paths if "cross" in p}
  assert len(expected) == (12 if scanned else 24)
  assert _true_paths(trainable_mask(params, tuple(new))) == expected
  assert _true_paths(trainable_mask(params, ())) == all_paths
  # Layout-free names cover scanned pairs and the odd final layer alike.
  queries = _true_paths(trainable_mask(params, ("encoder/attn/q_proj",)))
  assert len(queries) == 3 and all(p.startswith("encoder/") for p in queries)
  with pytest.raises(ValueError, match="'decoder/nope/\\*'"):
    trainable_mask(params, ("decoder/*", "decoder/nope/*"))


def test_phase_at_and_validation():
  phases = [Phase(0, ("decoder/cross_attn/*",)), Phase(1000)]
  assert [phase_at(phases, s) for s in (0, 999, 1000, 10**6)] == [0, 0, 1, 1]
  for bad, message in (([], "at least one"), ([Phase(1)], "step 0"),
                       ([Phase(0), Phase(5), Phase(5)], "strictly increasing")):
    with pytest.raises(ValueError, match=message):
      phase_at(bad, 0)
  with pytest.raises(ValueError, match="step -1"):
    phase_at(phases, -1)
  with pytest.raises(ValueError, match="Phase.start_step"):
    Phase(-1)
  with pytest.raises(ValueError, match="Phase.trainable"):
    Phase(0, "decoder/*")

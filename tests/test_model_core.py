"""Model structure: presets, parameter counts, layouts, remat, masks, dtypes."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5g.model import (ComputeConfig, abstract_params, get_preset, init_params, make_model)
from t5g.model import layout
from t5g.model.config import FP32, config_from_json, config_to_json
from t5g.model.masks import attention_mask, positions_from_segments

# Parameter counts of transformers' T5GemmaForConditionalGeneration (facts file, §1.5).
EXPECTED_COUNTS = {"t5gemma-s-s": 312_517_632, "t5gemma-2b-2b": 5_596_853_760,
                   "t5gemma-9b-2b": 12_292_375_296, "t5gemma-9b-9b": 20_333_401_088}


@pytest.mark.parametrize("preset", sorted(EXPECTED_COUNTS))
def test_parameter_counts(preset):
  for scanned in (True, False):
    shapes = abstract_params(get_preset(preset), ComputeConfig(scan_layers=scanned))
    assert sum(x.size for x in jax.tree_util.tree_leaves(shapes)) == EXPECTED_COUNTS[preset]


def test_unknown_preset_names_close_matches():
  with pytest.raises(ValueError, match="t5gemma-2b-2b"):
    get_preset("t5gemma-2b2b")


def test_config_json_round_trip():
  for name in ("t5gemma-9b-2b", "gemma2-27b"):
    config = get_preset(name)
    assert config_from_json(config_to_json(config)) == config
  with pytest.raises(ValueError, match="num_headz"):
    config_from_json({"model_type": "gemma2", **get_preset("gemma2-2b").to_dict(),
                      "num_headz": 3})


def test_every_parameter_has_logical_axes():
  boxed = abstract_params(get_preset("t5gemma-tiny_wide-tiny"), ComputeConfig(), boxed=True)
  leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: hasattr(x, "names"))
  assert leaves and all(len(x.names) == len(x.value.shape) for x in leaves)
  assert all(x.names[0] == "layers" for x in leaves if len(x.value.shape) and
             x.value.shape[0] == 1)  # Stacked pairs carry the scan axis name first.


def _inputs(batch=2, enc_len=19, dec_len=11, seed=0):
  rng = np.random.RandomState(seed)
  enc = rng.randint(3, 512, (batch, enc_len)).astype(np.int32)
  dec = rng.randint(3, 512, (batch, dec_len)).astype(np.int32)
  enc[1, 12:] = 0
  dec[:, 0] = 2
  dec[1, 7:] = 0
  return enc, dec


@pytest.fixture(scope="module")
def unscanned_model():
  """(config, numpy params, logits of `_inputs()`) of an unscanned float32 model; every model
  here runs jitted: one compile per function instead of one per operation."""
  config = get_preset("t5gemma-tiny_wide-tiny")  # Encoder with an odd layer count.
  params = jax.jit(lambda key: init_params(config, FP32, key))(jax.random.PRNGKey(0))
  logits = _apply(make_model(config, FP32), params, *_inputs())
  return config, jax.tree_util.tree_map(np.asarray, params), np.asarray(logits)


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, params, enc, dec):
  return model.apply({"params": params}, enc, dec)


# 'none' and one rematerialising policy: every other policy takes the same `nn.remat` path, and
# which one only matters to the gradients (test_remat_gradients_match).
@pytest.mark.parametrize("remat_policy", ["none", "save_sublayer_outputs"])
def test_scanned_equals_unscanned(unscanned_model, remat_policy):
  config, params, expected = unscanned_model
  compute = dataclasses.replace(FP32, scan_layers=True, remat_policy=remat_policy)
  scanned = layout.convert(params, config, False, abstract_params(config, compute), True)
  model = make_model(config, compute)
  np.testing.assert_allclose(_apply(model, scanned, *_inputs()), expected, atol=1e-5)
  back = layout.convert(scanned, config, True, abstract_params(config, FP32), False)
  jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)


def test_remat_gradients_match(unscanned_model):
  """The jitted gradients of a rematerialising model (policy 'dots') are the plain model's."""
  config, params, _ = unscanned_model
  enc, dec = _inputs()

  def grads(policy):
    model = make_model(config, dataclasses.replace(FP32, remat_policy=policy))
    loss = lambda p: jnp.mean(model.apply({"params": p}, enc, dec) ** 2)  # noqa: E731
    return jax.jit(jax.grad(loss))(params)

  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
                         grads("none"), grads("dots"))


def test_bfloat16_compute_is_close(unscanned_model):
  config, params, expected = unscanned_model
  compute = dataclasses.replace(FP32, dtype=jnp.bfloat16)
  enc, dec = _inputs()
  logits = _apply(make_model(config, compute), params, enc, dec)
  assert logits.dtype == jnp.float32
  valid = dec != 0
  assert np.abs(np.asarray(logits) - expected)[valid].max() < 0.25 * np.abs(expected).max()


def test_positions_restart_per_segment():
  segments = jnp.array([[1, 1, 1, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
  np.testing.assert_array_equal(positions_from_segments(segments),
                                [[0, 1, 2, 0, 1, 0, 1], [0, 1, 2, 3, 4, 5, 6]])


def test_window_masks_follow_google():
  length, window = 10, 3
  seg = jnp.ones((1, length), jnp.int32)
  pos = jnp.arange(length)[None]
  q, kv = np.meshgrid(np.arange(length), np.arange(length), indexing="ij")
  encoder = attention_mask(seg, seg, pos, pos, causal=False, window=window)[0]
  decoder = attention_mask(seg, seg, pos, pos, causal=True, window=window)[0]
  np.testing.assert_array_equal(encoder, np.abs(q - kv) < window)
  np.testing.assert_array_equal(decoder, (q - kv >= 0) & (q - kv < window))


def test_segments_isolate_examples_and_padding():
  seg = jnp.array([[1, 1, 2, 2, 0]])
  pos = positions_from_segments(seg)
  mask = np.asarray(attention_mask(seg, seg, pos, pos, causal=False, window=None)[0])
  assert mask[0, 1] and not mask[1, 2] and not mask[4].any() and not mask[:, 4].any()

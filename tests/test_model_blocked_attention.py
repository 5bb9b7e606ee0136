"""Query-blocked attention (`ComputeConfig.attention_block_length`) equals the dense one."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5g.model import abstract_params, get_preset, make_model
from t5g.model.attention import Attention
from t5g.model.config import FP32, ComputeConfig, StackConfig
from t5g.model.masks import (attention_mask, positions_from_segments, segment_mask,
                             window_band)

CONFIG = StackConfig(num_layers=2, embed_dim=32, hidden_dim=64, num_heads=4, num_kv_heads=2,
                     head_dim=8, vocab_size=64, sliding_window=4)
BLOCK = 8


def _segments(length: int) -> np.ndarray:
  """[3, length]: a packed row (three segments, then padding), an all-padding row, one full
  segment."""
  packed = np.zeros(length, np.int32)
  cuts = [0, length // 5, length // 2, length - 4]
  for i, (start, end) in enumerate(zip(cuts, cuts[1:])):
    packed[start:end] = i + 1
  return np.stack([packed, np.zeros(length, np.int32), np.ones(length, np.int32)])


def _random_like(shapes, scale=0.3):
  """Random normal arrays shaped like the tree `shapes` (numpy: no initialiser to compile)."""
  rng = np.random.RandomState(1)
  return jax.tree_util.tree_map(
      lambda x: (scale * rng.standard_normal(x.shape)).astype(np.float32), shapes)


def _outputs_and_grads(config, causal, window, q_segments, kv_segments, kv_dim=None):
  """Dense and blocked (outputs, gradients of a random projection of them w.r.t. (params,
  inputs)) of one attention layer, in one compile. Self-attention when kv_dim is None (masked
  `causal`, `window`), else cross-attention over kv_dim-wide inputs (segments only)."""
  self_attention = kv_dim is None
  rng = np.random.RandomState(0)
  x, weights = rng.standard_normal((2, *q_segments.shape, config.embed_dim)).astype(np.float32)
  kv = x if self_attention else rng.standard_normal((*kv_segments.shape, kv_dim)).astype(np.float32)
  layer = dict(use_rope=self_attention, kv_dim=kv_dim)
  mask_shape = jax.ShapeDtypeStruct((*q_segments.shape, kv.shape[1]), bool)
  params = _random_like(jax.eval_shape(Attention(config, **layer).init, jax.random.PRNGKey(0),
                                       x, kv, mask_shape, q_segments, q_segments)["params"])

  @jax.jit
  def run(params, x, kv, q_segments, kv_segments):
    if self_attention:
      positions = positions_from_segments(q_segments)
      mask = attention_mask(q_segments, q_segments, positions, positions, causal=causal,
                            window=window)
    else:
      positions, mask = None, segment_mask(q_segments, kv_segments)
    results = []
    for block_length in (0, BLOCK):
      module = Attention(config, block_length=block_length, band=window_band(causal, window),
                         **layer)

      def apply(p, x, kv):
        return module.apply({"params": p}, x, kv, mask, positions, positions)  # noqa: B023

      loss = lambda p, x, kv: jnp.sum(apply(p, x, kv) * weights)  # noqa: B023,E731
      results.append((apply(params, x, kv), jax.grad(loss, (0, 1, 2))(params, x, kv)))
    return results

  return run(params, x, kv, q_segments, kv_segments)


def _assert_close(got, expected, tolerance):
  """Every leaf within `tolerance` times the largest magnitude of its expected value."""
  for e, g in zip(jax.tree_util.tree_leaves(expected), jax.tree_util.tree_leaves(got)):
    np.testing.assert_allclose(g, e, rtol=0, atol=tolerance * float(np.abs(e).max()))


def _assert_same(dense, blocked):
  """(outputs, gradients) of the blocked path within 1e-6 and 1e-5 of the dense path's."""
  _assert_close(blocked[0], dense[0], 1e-6)
  _assert_close(blocked[1], dense[1], 1e-5)


# (causal, window, length) with blocks of 8 queries: windows below and above the block (every
# local case is banded: 8 + band width < length), global layers (window None), lengths that are
# and are not multiples of the block.
SELF_CASES = [(True, 3, 37), (True, 11, 37), (True, None, 37),
              (False, 3, 37), (False, 11, 40), (False, None, 37)]


@pytest.mark.parametrize("causal,window,length", SELF_CASES)
def test_self_attention_blocked_equals_dense(causal, window, length):
  config = dataclasses.replace(CONFIG, sliding_window=window or CONFIG.sliding_window)
  _assert_same(*_outputs_and_grads(config, causal, window, _segments(length), _segments(length)))


def test_cross_attention_blocked_equals_dense():
  _assert_same(*_outputs_and_grads(CONFIG, False, None, _segments(29), _segments(19), kv_dim=24))


def test_window_band_covers_the_mask():
  """Every visible key of a packed row lies in the band `window_band` gives."""
  segments = _segments(40)
  positions = positions_from_segments(segments)
  for causal in (True, False):
    lo, hi = window_band(causal, 5)
    mask = np.asarray(attention_mask(segments, segments, positions, positions, causal=causal,
                                     window=5))
    offsets = np.arange(40)[None, :] - np.arange(40)[:, None]
    assert mask.any() and not (mask & ((offsets < lo) | (offsets > hi))[None]).any()
  assert window_band(True, None) is None


def test_t5gemma_blocked_equals_dense():
  """A whole tiny T5Gemma (scanned, full remat; windows 8, blocks of 16): logits and the
  gradients of a packed batch's loss."""
  config = get_preset("t5gemma-tiny-tiny")
  compute = dataclasses.replace(FP32, scan_layers=True, remat_policy="full")
  rng = np.random.RandomState(0)
  enc_segments, dec_segments = _segments(45), _segments(37)
  inputs = dict(
      encoder_input_tokens=np.where(enc_segments > 0, rng.randint(3, 512, enc_segments.shape), 0),
      decoder_input_tokens=np.where(dec_segments > 0, rng.randint(3, 512, dec_segments.shape), 0),
      encoder_segment_ids=enc_segments, decoder_segment_ids=dec_segments)
  targets, weights = rng.randint(3, 512, dec_segments.shape), dec_segments > 0
  params = _random_like(abstract_params(config, compute))

  @jax.jit
  def run(params, inputs):
    results = []
    for block_length in (0, 16):
      model = make_model(config, dataclasses.replace(compute, attention_block_length=block_length))

      def loss(p):
        logits = model.apply({"params": p}, **inputs)  # noqa: B023
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1)
        return jnp.sum(nll[..., 0] * weights) / weights.sum(), logits

      results.append(jax.grad(loss, has_aux=True)(params)[::-1])
    return results

  _assert_same(*run(params, inputs))


@pytest.mark.parametrize("value", [-1, 1.5, True])
def test_bad_block_length_names_the_binding(value):
  with pytest.raises(ValueError, match="t5g.ComputeConfig.attention_block_length"):
    ComputeConfig(attention_block_length=value)

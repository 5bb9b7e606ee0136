"""t5g logits against transformers' Gemma2ForCausalLM and T5GemmaForConditionalGeneration.

fp32, eager attention, tiny random models whose inputs are longer than the local window.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from t5g.compat import hf_checkpoints
from t5g.model import BOS_ID, make_model
from t5g.model.config import FP32
from tests import hf_models

TOLERANCE = 1e-4


def _load(folder, scanned):
  compute = dataclasses.replace(FP32, scan_layers=scanned)
  config, params = hf_checkpoints.load(folder, scanned)
  return make_model(config, compute), params


def _pack(rows, lengths, width):
  """Concatenates the unpadded rows into one: (tokens, segment ids, positions), each [1, W]."""
  tokens, segments, positions = (np.zeros((1, width), np.int32) for _ in range(3))
  start = 0
  for i, (row, n) in enumerate(zip(rows, lengths)):
    tokens[0, start:start + n] = row[:n]
    segments[0, start:start + n] = i + 1
    positions[0, start:start + n] = np.arange(n)
    start += n
  return tokens, segments, positions


@pytest.fixture(scope="module")
def t5_reference(hf_t5gemma_dir):
  rng = np.random.RandomState(0)
  enc_lengths, dec_lengths = [20, 15, 9], [13, 9, 5]
  enc = hf_models.random_batch(rng, enc_lengths, 20)
  dec = hf_models.random_batch(rng, dec_lengths, 13, first=BOS_ID)
  logits = hf_models.t5gemma_logits(hf_models.load_t5gemma(hf_t5gemma_dir), enc, dec)
  return enc, dec, enc_lengths, dec_lengths, logits


@pytest.mark.parametrize("scanned", [False, True])
def test_t5gemma_padded_matches_transformers(hf_t5gemma_dir, t5_reference, scanned):
  enc, dec, _, _, expected = t5_reference
  model, params = _load(hf_t5gemma_dir, scanned)
  ours = np.asarray(model.apply({"params": params}, jnp.asarray(enc), jnp.asarray(dec)))
  valid = dec != 0
  assert np.abs(expected[valid]).max() > 20  # The final soft-cap (30) is in play.
  assert np.abs(ours - expected)[valid].max() <= TOLERANCE


def test_t5gemma_packed_matches_transformers(hf_t5gemma_dir, t5_reference):
  enc, dec, enc_lengths, dec_lengths, expected = t5_reference
  model, params = _load(hf_t5gemma_dir, scanned=True)
  e_tok, e_seg, e_pos = _pack(enc, enc_lengths, 48)
  d_tok, d_seg, d_pos = _pack(dec, dec_lengths, 32)
  ours = np.asarray(model.apply({"params": params}, e_tok, d_tok, e_seg, d_seg, e_pos, d_pos))
  start = 0
  for i, n in enumerate(dec_lengths):
    assert np.abs(ours[0, start:start + n] - expected[i, :n]).max() <= TOLERANCE
    start += n


def test_transformers_encoder_window_differs_by_one(hf_t5gemma_dir, t5_reference):
  """The W vs W-1 adjustment is real: unadjusted transformers disagrees on long inputs."""
  enc, dec, _, _, adjusted = t5_reference
  unadjusted = hf_models.t5gemma_logits(
      hf_models.load_t5gemma(hf_t5gemma_dir, encoder_window=hf_models.WINDOW), enc, dec)
  assert np.abs(unadjusted - adjusted)[dec != 0].max() > 1e-2


@pytest.fixture(scope="module")
def gemma2_reference(hf_gemma2_dir):
  import transformers
  rng = np.random.RandomState(1)
  lengths = [21, 12, 6]
  tokens = hf_models.random_batch(rng, lengths, 21, first=BOS_ID)
  model = transformers.Gemma2ForCausalLM.from_pretrained(hf_gemma2_dir,
                                                         attn_implementation="eager")
  return tokens, lengths, hf_models.gemma2_logits(model.eval(), tokens)


@pytest.mark.parametrize("scanned", [False, True])
def test_gemma2_padded_matches_transformers(hf_gemma2_dir, gemma2_reference, scanned):
  tokens, _, expected = gemma2_reference
  model, params = _load(hf_gemma2_dir, scanned)
  ours = np.asarray(model.apply({"params": params}, jnp.asarray(tokens)))
  valid = tokens != 0
  assert np.abs(expected[valid]).max() > 20
  assert np.abs(ours - expected)[valid].max() <= TOLERANCE


def test_gemma2_packed_matches_transformers(hf_gemma2_dir, gemma2_reference):
  tokens, lengths, expected = gemma2_reference
  model, params = _load(hf_gemma2_dir, scanned=True)
  p_tok, p_seg, p_pos = _pack(tokens, lengths, 48)
  ours = np.asarray(model.apply({"params": params}, p_tok, p_seg, p_pos))
  start = 0
  for i, n in enumerate(lengths):
    assert np.abs(ours[0, start:start + n] - expected[i, :n]).max() <= TOLERANCE
    start += n

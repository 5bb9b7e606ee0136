"""t5g logits against Google's Flax T5Gemma reference (gemma/research/t5gemma) on its params."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5g.compat import google_flax
from t5g.model import BOS_ID, EncoderDecoderConfig, StackConfig, abstract_params, make_model
from t5g.model.config import FP32

t5gemma = pytest.importorskip("gemma.research.t5gemma.t5gemma")
modules = pytest.importorskip("gemma.research.t5gemma.modules")

VOCAB, NUM_EMBED, WINDOW = 512, 576, 8


def _google_stack(layers, d, f, n, k, h, **kw):
  types = [modules.AttentionType.LOCAL_SLIDING if i % 2 == 0 else modules.AttentionType.GLOBAL
           for i in range(layers)]
  return modules.TransformerConfig(
      num_layers=layers, num_embed=NUM_EMBED, embed_dim=d, hidden_dim=f, num_heads=n,
      head_dim=h, num_kv_heads=k, final_logit_softcap=30.0, use_post_attn_norm=True,
      use_post_ffw_norm=True, attention_types=types, attn_logits_soft_cap=50.0,
      sliding_window_size=WINDOW, **kw)


def _t5g_stack(layers, d, f, n, k, h):
  return StackConfig(num_layers=layers, embed_dim=d, hidden_dim=f, num_heads=n, num_kv_heads=k,
                     head_dim=h, vocab_size=VOCAB, sliding_window=WINDOW)


SIZES = {"gqa_unbalanced": ((3, 96, 160, 4, 1, 24), (4, 64, 128, 4, 2, 16)),
         "mha": ((2, 64, 96, 4, 4, 16), (2, 64, 96, 4, 4, 16))}


@pytest.fixture(scope="module", params=sorted(SIZES))
def reference(request):
  enc, dec = SIZES[request.param]
  config = t5gemma.T5GemmaConfig(
      encoder_config=_google_stack(*enc, bidirectional=True),
      decoder_config=_google_stack(*dec, enable_cross_attention=True, kv_embed_dim=enc[1]))
  model = config.make(dtype=jnp.float32)
  rng = np.random.RandomState(0)
  enc_tokens = rng.randint(3, VOCAB, (3, 20)).astype(np.int32)
  dec_tokens = rng.randint(3, VOCAB, (3, 13)).astype(np.int32)
  dec_tokens[:, 0] = BOS_ID
  enc_tokens[1, 14:] = 0
  dec_tokens[1, 9:] = 0
  params = model.init(jax.random.PRNGKey(0), target_tokens=dec_tokens, input_tokens=enc_tokens)
  # Random norm scales and larger weights so that norms and soft-caps matter.
  keys = iter(jax.random.split(jax.random.PRNGKey(1), 1000))
  def spice(path, x):
    name = jax.tree_util.keystr(path)
    scale = 0.5 if "scale" in name else (60.0 if "input_embedding" in name else 2.0)
    noise = jax.random.normal(next(keys), x.shape) * 0.5 if "scale" in name else x * scale
    return noise
  params = jax.tree_util.tree_map_with_path(spice, params)
  logits = model.apply(params, target_tokens=dec_tokens, input_tokens=enc_tokens).logits
  ours = EncoderDecoderConfig(_t5g_stack(*enc), _t5g_stack(*dec))
  return ours, jax.tree_util.tree_map(np.asarray, params["params"]), enc_tokens, dec_tokens, \
      np.asarray(logits)


@pytest.mark.parametrize("scanned", [False, True])
def test_logits_match_google(reference, scanned):
  config, google, enc, dec, expected = reference
  compute = dataclasses.replace(FP32, scan_layers=scanned)
  params = google_flax.from_google(google, config, scanned, abstract_params(config, compute))
  ours = np.asarray(make_model(config, compute).apply({"params": params}, enc, dec))
  valid = dec != 0
  assert np.abs(expected[..., :VOCAB][valid]).max() > 20  # The final soft-cap is in play.
  assert np.abs(ours - expected[..., :VOCAB])[valid].max() <= 1e-4


def test_round_trip_to_google(reference):
  config, google, *_ = reference
  params = google_flax.from_google(google, config, False, abstract_params(config, FP32))
  back = google_flax.to_google(params, config, False, num_embed=NUM_EMBED)
  again = google_flax.from_google(back, config, False, abstract_params(config, FP32))
  jax.tree_util.tree_map(np.testing.assert_array_equal, again, params)


def test_missing_key_is_named(reference):
  config, google, *_ = reference
  broken = jax.tree_util.tree_map(lambda x: x, google)
  del broken["decoder"]["layer_1"]["cross_attn"]["kv_einsum"]
  with pytest.raises(KeyError, match="decoder/layer_1/cross_attn/kv_einsum"):
    google_flax.from_google(broken, config, False, abstract_params(config, FP32))

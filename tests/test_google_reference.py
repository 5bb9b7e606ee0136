"""t5g logits against Google's Flax references on Google-layout parameters (fp32, CPU).

T5Gemma: `gemma/research/t5gemma`; Gemma 2: `gemma/gm/nn` (gemma==3.3.0). Parameters are drawn
in Google's NESTED layout and converted with `t5g.compat.google_flax`. The tiny models are sized
so that every detail matters: inputs longer than the local window, MQA/GQA (q + kv einsums) and
MHA (qkv einsum), an unbalanced encoder with 9B-style transposed gating, rows padded at the end,
random norm scales, a Google table with more rows than the vocabulary, and weights large enough
that both soft-caps bite.
"""

import copy
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5g.compat import google_flax
from t5g.model import BOS_ID, EncoderDecoderConfig, StackConfig, make_model
from t5g.model.config import FP32

t5gemma = pytest.importorskip("gemma.research.t5gemma.t5gemma")
modules = pytest.importorskip("gemma.research.t5gemma.modules")
gm_nn = pytest.importorskip("gemma.gm.nn")

VOCAB, NUM_EMBED, WINDOW, TOLERANCE = 512, 640, 8, 1e-4
# Encoder and decoder sizes: (layers, D, F, N, K, H, transposed gating).
PRESETS = {"gqa_unbalanced": ((3, 96, 160, 4, 1, 24, True), (4, 64, 128, 4, 2, 16, False)),
           "mha": ((2, 64, 96, 4, 4, 16, False), (3, 64, 96, 4, 4, 16, False))}
ENC_LENGTHS, DEC_LENGTHS = (20, 14, 6), (13, 9, 4)


def _google_stack(size: tuple, **kw):
  """A Google TransformerConfig for one stack; layer 0 local, then alternating."""
  layers, d, f, n, k, h, transposed = size
  types = [modules.AttentionType.LOCAL_SLIDING, modules.AttentionType.GLOBAL] * layers
  return modules.TransformerConfig(
      num_layers=layers, num_embed=NUM_EMBED, embed_dim=d, hidden_dim=f, num_heads=n,
      head_dim=h, num_kv_heads=k, final_logit_softcap=30.0, use_post_attn_norm=True,
      use_post_ffw_norm=True, attention_types=types[:layers], attn_logits_soft_cap=50.0,
      sliding_window_size=WINDOW, transpose_gating_einsum=transposed, **kw)


def _t5g_stack(size: tuple) -> StackConfig:
  """The t5g StackConfig matching `_google_stack(size)` (caps 50/30, query scale H**-0.5)."""
  layers, d, f, n, k, h, _ = size
  return StackConfig(num_layers=layers, embed_dim=d, hidden_dim=f, num_heads=n,
                     num_kv_heads=k, head_dim=h, vocab_size=VOCAB, sliding_window=WINDOW)


def _random_params(shapes, seed: int) -> dict:
  """Random Google params shaped like `shapes` (an eval_shape tree).

  Norm scales ~ N(0, 0.5²), embeddings ~ N(0, 1) with zero rows beyond VOCAB (as `to_google`
  writes them), other kernels ~ N(0, 0.3²): large enough that both soft-caps bite.
  """
  rng = np.random.RandomState(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    std = 0.5 if "scale" in name else 1.0 if "input_embedding" in name else 0.3
    x = rng.normal(0.0, std, leaf.shape).astype(np.float32)
    if "input_embedding" in name:
      x[VOCAB:] = 0
    return x

  return jax.tree_util.tree_map_with_path(draw, shapes)


def _padded(rng, lengths: tuple[int, ...], first: int | None = None) -> np.ndarray:
  """Random tokens [B, max(lengths)], row i padded with 0 after lengths[i]."""
  tokens = np.zeros((len(lengths), max(lengths)), np.int32)
  for i, n in enumerate(lengths):
    tokens[i, :n] = rng.randint(3, VOCAB, n)
    if first is not None:
      tokens[i, 0] = first
  return tokens


def _t5g_logits(config, params, scanned: bool, *tokens) -> np.ndarray:
  """t5g fp32 logits [B, T, V]."""
  compute = dataclasses.replace(FP32, scan_layers=scanned)
  return np.asarray(jax.jit(make_model(config, compute).apply)({"params": params}, *tokens))


def _from_google(google, config, scanned: bool = False, **kw) -> dict:
  """t5g params converted from a Google tree."""
  return google_flax.from_google(google, config, scanned, **kw)


@pytest.fixture(scope="module", params=sorted(PRESETS))
def reference(request):
  """(t5g config, Google params, per-stack gating layout, enc, dec, Google logits [B, T, Vg])."""
  enc_size, dec_size = PRESETS[request.param]
  model = t5gemma.T5GemmaConfig(
      encoder_config=_google_stack(enc_size, bidirectional=True),
      decoder_config=_google_stack(dec_size, enable_cross_attention=True,
                                   kv_embed_dim=enc_size[1])).make(dtype=jnp.float32)
  rng = np.random.RandomState(0)
  enc, dec = _padded(rng, ENC_LENGTHS), _padded(rng, DEC_LENGTHS, first=BOS_ID)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), target_tokens=dec,
                                             input_tokens=enc))["params"]
  google = _random_params(shapes, seed=1)
  logits = jax.jit(lambda p, d, e: model.apply({"params": p}, target_tokens=d,
                                               input_tokens=e).logits)(google, dec, enc)
  config = EncoderDecoderConfig(_t5g_stack(enc_size), _t5g_stack(dec_size))
  transposed = {"encoder": enc_size[-1], "decoder": dec_size[-1]}
  return config, google, transposed, enc, dec, np.asarray(logits)


@pytest.mark.parametrize("scanned", [False, True])
def test_t5gemma_matches_google(reference, scanned):
  config, google, _, enc, dec, expected = reference
  assert expected.shape[-1] == NUM_EMBED
  ours = _t5g_logits(config, _from_google(google, config, scanned), scanned, enc, dec)
  valid = dec != 0
  assert np.abs(ours - expected[..., :VOCAB])[valid].max() <= TOLERANCE


def test_soft_caps_bite(reference):
  config, google, _, enc, dec, expected = reference
  valid = dec != 0
  assert np.abs(expected[valid]).max() > 20  # Near the final cap (30).
  uncapped = EncoderDecoderConfig(
      *(dataclasses.replace(c, attn_logit_softcap=None) for c in (config.encoder,
                                                                  config.decoder)))
  ours = _t5g_logits(uncapped, _from_google(google, config), False, enc, dec)
  assert np.abs(ours - expected[..., :VOCAB])[valid].max() > 0.1  # The attention cap (50).


def test_round_trip(reference):
  config, google, transposed, *_ = reference
  back = google_flax.to_google(_from_google(google, config, scanned=True), config, True,
                               transpose_gating=transposed, num_embed=NUM_EMBED)
  jax.tree_util.tree_map(np.testing.assert_array_equal, back, google)


def test_wrong_gating_layout_is_named(reference):
  config, google, transposed, *_ = reference
  flipped = {stack: not flag for stack, flag in transposed.items()}
  with pytest.raises(ValueError, match="encoder/layer_0/mlp/gating_einsum has shape"):
    _from_google(google, config, transpose_gating=flipped)


def _drop(tree: dict, *path: str) -> None:
  """Deletes the entry at `path`."""
  for key in path[:-1]:
    tree = tree[key]
  del tree[path[-1]]


def _set(tree: dict, value, *path: str) -> None:
  """Sets the entry at `path` to `value`."""
  for key in path[:-1]:
    tree = tree[key]
  tree[path[-1]] = value


BAD_TREES = {
    "missing key decoder/layer_1/cross_attn/kv_einsum/w":
        lambda g: _drop(g, "decoder", "layer_1", "cross_attn", "kv_einsum"),
    "decoder/layer_2/attn/attn_vec_einsum/w has shape \\(4, 16, 65\\)":
        lambda g: _set(g, np.zeros((4, 16, 65), np.float32), "decoder", "layer_2", "attn",
                       "attn_vec_einsum", "w"),
    "encoder/embedder/input_embedding has shape \\(500,":
        lambda g: _set(g, g["encoder"]["embedder"]["input_embedding"][:500], "encoder",
                       "embedder", "input_embedding"),
    "unexpected key\\(s\\) \\['encoder/layer_0/attn/_query_norm/scale'\\]":
        lambda g: _set(g, {"scale": np.zeros(4)}, "encoder", "layer_0", "attn", "_query_norm"),
}


@pytest.mark.parametrize("message", sorted(BAD_TREES))
def test_bad_tree_names_the_key(reference, message):
  config, google, *_ = reference
  broken = copy.deepcopy(google)
  BAD_TREES[message](broken)
  with pytest.raises(ValueError, match=message):
    _from_google(broken, config)


def test_gemma2_matches_gm_nn():
  size = (3, 64, 64, 4, 2, 16, True)  # F == D: the gating layout must be given.
  layers, d, f, n, k, h, transposed = size
  types = [gm_nn.AttentionType.LOCAL_SLIDING, gm_nn.AttentionType.GLOBAL] * layers
  model = gm_nn.Transformer(config=gm_nn.config.TransformerConfig(
      num_embed=NUM_EMBED, embed_dim=d, hidden_dim=f, num_heads=n, head_dim=h,
      num_kv_heads=k, final_logit_softcap=30.0, use_post_attn_norm=True,
      use_post_ffw_norm=True, attention_types=tuple(types[:layers]),
      attn_logits_soft_cap=50.0, sliding_window_size=WINDOW,
      transpose_gating_einsum=transposed), dtype=jnp.float32)
  tokens = _padded(np.random.RandomState(2), DEC_LENGTHS, first=BOS_ID)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens))["params"]
  google = _random_params(shapes, seed=3)
  expected = np.asarray(jax.jit(lambda p, t: model.apply({"params": p}, t).logits)(google,
                                                                                    tokens))
  config = _t5g_stack(size)
  with pytest.raises(ValueError, match="layer_0/mlp/gating_einsum: hidden_dim == embed_dim"):
    _from_google(google, config)
  params = _from_google({"transformer": google}, config, scanned=True,
                        transpose_gating=transposed)
  ours = _t5g_logits(config, params, True, tokens)
  valid = tokens != 0
  assert np.abs(expected[valid]).max() > 20
  assert np.abs(ours - expected[..., :VOCAB])[valid].max() <= TOLERANCE
  back = google_flax.to_google(params, config, True, transpose_gating=transposed,
                               num_embed=NUM_EMBED)
  jax.tree_util.tree_map(np.testing.assert_array_equal, back, google)

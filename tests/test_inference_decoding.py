"""KV-cached decoding against transformers' `generate` and against uncached decoding.

The session's tiny random models always predict their input token again (their large tied
embeddings dominate the residual stream), so this module decodes copies whose embeddings are
scaled down 10 times: their greedy outputs vary from step to step. EOS handling is tested with
`eos_id` set, on both sides, to a token that the model does emit.
"""

import jax
import numpy as np
import pytest
import torch
import transformers

from t5g.checkpoints import model_dir
from t5g.compat.convert import import_checkpoint
from t5g.inference.decoding import DecodeConfig, generate
from t5g.model import ComputeConfig, make_model
from tests import hf_models

N = 10  # max_new_tokens
LENGTHS = [20, 13, 5]  # 20 > the window (8), as is the decoder's 10 + 1.
FP32 = ComputeConfig("float32", "float32")
UNSCANNED = ComputeConfig("float32", "float32", scan_layers=False)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
  """transformers' tiny steps take 100x longer with 2 threads on a loaded shared CPU."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


def _scaled_copy(model, folder):
  with torch.no_grad():
    for name, param in model.named_parameters():
      if "embed_tokens" in name:
        param.mul_(0.1)
  model.save_pretrained(folder)
  return folder


@pytest.fixture(scope="module")
def t5(hf_t5gemma_dir, tmp_path_factory):
  """(t5g checkpoint loaded scanned, transformers model, the checkpoint loaded unscanned) of
  the scaled T5Gemma."""
  root = tmp_path_factory.mktemp("decode_t5")
  hf_dir = _scaled_copy(transformers.T5GemmaForConditionalGeneration.from_pretrained(
      hf_t5gemma_dir), str(root / "hf"))
  import_checkpoint(hf_dir, str(root / "t5g"), scan_layers=True)
  return (model_dir.load(str(root / "t5g")), hf_models.load_t5gemma(hf_dir),
          model_dir.load(str(root / "t5g"), scanned=False))


@pytest.fixture(scope="module")
def gemma2(hf_gemma2_dir, tmp_path_factory):
  """(t5g checkpoint loaded unscanned, transformers model) of the scaled Gemma 2."""
  root = tmp_path_factory.mktemp("decode_g2")
  hf_dir = _scaled_copy(transformers.Gemma2ForCausalLM.from_pretrained(hf_gemma2_dir),
                        str(root / "hf"))
  import_checkpoint(hf_dir, str(root / "t5g"), scan_layers=False)
  hf = transformers.Gemma2ForCausalLM.from_pretrained(hf_dir, attn_implementation="eager")
  return model_dir.load(str(root / "t5g")), hf.eval()


@pytest.fixture(scope="module")
def inputs():
  return hf_models.random_batch(np.random.RandomState(0), LENGTHS, max(LENGTHS)).astype(np.int32)


def _run(loaded, inputs, **decode):
  return generate(loaded.config, loaded.params, inputs, DecodeConfig(max_new_tokens=N, **decode),
                  compute=FP32, scanned=loaded.scanned)


def _hf_t5(model, inputs, eos_id, **kw):
  with torch.no_grad():
    out = model.generate(input_ids=torch.tensor(inputs).long(),
                         attention_mask=torch.tensor(inputs != 0).long(), max_new_tokens=N,
                         eos_token_id=eos_id, pad_token_id=0, do_sample=False,
                         return_dict_in_generate=True, output_scores=True, **kw)
  return out.sequences.numpy()[:, 1:], out  # Without the decoder's BOS.


def _same_tokens(ours, theirs, eos=1):
  """Equal up to transformers' width (it crops after the longest row); 0 beyond it.

  transformers' beam search fills the rest of a row with EOS where the pad id is 0 (its
  `pad_token_id or eos_token_id`); t5g writes 0 after the first EOS.
  """
  theirs = np.where(np.cumsum(np.cumsum(theirs == eos, axis=1), axis=1) > 1, 0, theirs)
  width = theirs.shape[1]
  np.testing.assert_array_equal(ours.tokens[:, :width], theirs)
  assert not ours.tokens[:, width:].any()


@pytest.fixture(scope="module")
def t5_greedy(t5, inputs):
  return _run(t5[0], inputs)


def test_t5gemma_greedy_matches_transformers(t5, inputs, t5_greedy):
  theirs, _ = _hf_t5(t5[1], inputs, eos_id=1)
  _same_tokens(t5_greedy, theirs)
  assert len(set(t5_greedy.tokens[1].tolist())) > 2  # The outputs vary.
  np.testing.assert_array_equal(t5_greedy.lengths, [N] * 3)


def test_t5gemma_greedy_stops_at_eos(t5, inputs, t5_greedy):
  eos = int(t5_greedy.tokens[1, 3])
  first = [list(row).index(eos) if eos in row else N for row in t5_greedy.tokens.tolist()]
  ours = _run(t5[0], inputs, eos_id=eos)
  theirs, _ = _hf_t5(t5[1], inputs, eos_id=eos)
  _same_tokens(ours, theirs, eos)
  np.testing.assert_array_equal(ours.lengths, [min(f + 1, N) for f in first])
  for row, greedy, length in zip(ours.tokens, t5_greedy.tokens, ours.lengths):
    np.testing.assert_array_equal(row[:length], greedy[:length])
    assert not row[length:].any()
  # The greedy score is the sum of the log-probs of the kept tokens.
  _, out = _hf_t5(t5[1], inputs, eos_id=eos)
  for b, length in enumerate(ours.lengths):
    log_probs = [torch.log_softmax(out.scores[j][b], -1)[ours.tokens[b, j]] for j in range(length)]
    assert ours.scores[b] == pytest.approx(float(sum(log_probs)), abs=1e-3)


@pytest.mark.parametrize("length_penalty", [1.0, -2.0])
def test_t5gemma_beam_search_matches_transformers(t5, inputs, t5_greedy, length_penalty):
  eos = int(t5_greedy.tokens[1, 3])
  ours = _run(t5[0], inputs, eos_id=eos, beam_size=3, length_penalty=length_penalty)
  theirs, out = _hf_t5(t5[1], inputs, eos_id=eos, num_beams=3, length_penalty=length_penalty,
                       early_stopping=False)
  _same_tokens(ours, theirs, eos)
  np.testing.assert_allclose(ours.scores, out.sequences_scores.numpy(), rtol=1e-5, atol=1e-4)
  if length_penalty < 0:  # Short hypotheses win: some end with EOS.
    assert (ours.tokens == eos).any() and min(ours.lengths) < N


def test_cached_equals_uncached_and_layouts_agree(t5, inputs, t5_greedy):
  """Uncached: the teacher-forced forward of the whole sequence at every step (one shape: the
  decoder input is padded to N, which causal attention never reads ahead of a position)."""
  loaded = t5[0]
  np.testing.assert_array_equal(_run(t5[2], inputs).tokens, t5_greedy.tokens)
  model = make_model(loaded.config, ComputeConfig("float32", "float32", scan_layers=True))
  forward = jax.jit(lambda decoder: model.apply({"params": loaded.params}, inputs, decoder))
  decoder = np.zeros((len(inputs), N), np.int32)
  decoder[:, 0] = 2
  for t in range(N):
    token = np.asarray(forward(decoder))[:, t].argmax(-1)
    if t + 1 < N:
      decoder[:, t + 1] = token
  np.testing.assert_array_equal(t5_greedy.tokens, np.concatenate([decoder[:, 1:], token[:, None]],
                                                                  axis=1))


def _hf_gemma2(model, inputs, eos_id, **kw):
  """transformers on [BOS] + prompt, left-padded, with its attention mask."""
  lengths = (inputs != 0).sum(1) + 1
  width = lengths.max()
  prompts = np.zeros((len(inputs), width), np.int64)
  for row, (prompt, length) in enumerate(zip(inputs, lengths)):
    prompts[row, width - length:] = [2, *prompt[:length - 1]]
  with torch.no_grad():
    out = model.generate(input_ids=torch.tensor(prompts), max_new_tokens=N,
                         attention_mask=torch.tensor(prompts != 0).long(), eos_token_id=eos_id,
                         pad_token_id=0, do_sample=False, **kw)
  return out.numpy()[:, width:]


def test_gemma2_greedy_and_beam_match_transformers(gemma2, inputs):
  loaded, model = gemma2
  ours = _run(loaded, inputs)
  _same_tokens(ours, _hf_gemma2(model, inputs, eos_id=1))
  eos = int(ours.tokens[0, 2])
  _same_tokens(_run(loaded, inputs, eos_id=eos), _hf_gemma2(model, inputs, eos_id=eos), eos)
  beams = _run(loaded, inputs, eos_id=eos, beam_size=2, length_penalty=0.5)
  _same_tokens(beams, _hf_gemma2(model, inputs, eos_id=eos, num_beams=2, length_penalty=0.5,
                                 early_stopping=False), eos)


def test_top_k_1_is_greedy(gemma2, inputs):
  loaded = gemma2[0]
  top_1 = generate(loaded.config, loaded.params, inputs,
                   DecodeConfig(max_new_tokens=N, temperature=0.7, top_k=1),
                   rng=jax.random.PRNGKey(3), compute=FP32, scanned=False)
  np.testing.assert_array_equal(top_1.tokens, _run(loaded, inputs).tokens)


def test_top_p_samples_only_from_the_nucleus_and_by_seed(gemma2):
  """64 samples of one token from one prompt all lie in the nucleus (here: the 3 most probable
  tokens at temperature 0.2), and they are not all the same token; a seed gives the same
  samples again, another seed other ones."""
  loaded = gemma2[0]
  prompt = np.array([[7, 8, 9, 10]], np.int32)
  logits = np.asarray(make_model(loaded.config, UNSCANNED).apply(
      {"params": loaded.params}, np.array([[2, 7, 8, 9, 10]], np.int32)))[0, -1]
  probs = np.exp((logits - logits.max()) / 0.2)
  probs /= probs.sum()
  order = np.argsort(-probs)
  top_p = float(probs[order[:3]].sum()) - 1e-4  # Needs the 3rd token, not a 4th.
  assert probs[order[2]] > 0.05 and probs[order[:3]].sum() < 0.6  # Half the mass is cut.
  decode = DecodeConfig(max_new_tokens=1, temperature=0.2, top_p=top_p)
  sample = lambda seed: generate(loaded.config, loaded.params, np.repeat(prompt, 16, 0), decode,
                                 rng=jax.random.PRNGKey(seed), compute=FP32,
                                 scanned=False).tokens[:, 0]
  drawn = np.concatenate([sample(seed) for seed in range(4)])
  assert set(drawn.tolist()) <= set(order[:3].tolist())
  assert len(set(drawn.tolist())) > 1
  np.testing.assert_array_equal(sample(0), drawn[:16])
  assert (sample(4) != drawn[:16]).any()

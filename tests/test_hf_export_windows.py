"""`t5g export` and the local-window convention: transformers 5.x keeps |q - kv| <= W in the
encoder's local layers where t5g (and Google's reference) keeps |q - kv| < W.

The model is the session's tiny T5Gemma (windows 8) with its embeddings scaled down 10 times,
as in test_inference_decoding, so that greedy outputs vary; every input row but one is longer
than the encoder's window, and 10 new tokens take the decoder past its window too. The exported
folders are loaded by plain `from_pretrained`, as a user would.
"""

import glob
import json
import os

import numpy as np
import pytest
import torch
import transformers

from t5g import cli
from t5g.checkpoints import model_dir
from t5g.compat import convert, hf_verify
from t5g.inference.decoding import DecodeConfig, generate
from t5g.model import BOS_ID, ComputeConfig, make_model, presets
from tests import hf_models

LENGTHS = [20, 17, 13, 11, 9, 5]  # Encoder rows; the window is 8.
N = 10  # New tokens: BOS + 10 > the decoder's window.
FP32 = ComputeConfig("float32", "float32")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
  """transformers' tiny steps take 100x longer with 2 threads on a loaded shared CPU."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(hf_t5gemma_dir, tmp_path_factory):
  """A t5g checkpoint of the tiny T5Gemma with embeddings scaled by 0.1 (varied greedy output)."""
  root = tmp_path_factory.mktemp("export_windows")
  model = transformers.T5GemmaForConditionalGeneration.from_pretrained(hf_t5gemma_dir)
  with torch.no_grad():
    for name, param in model.named_parameters():
      if "embed_tokens" in name:
        param.mul_(0.1)
  model.save_pretrained(str(root / "hf"))
  convert.import_checkpoint(str(root / "hf"), str(root / "t5g"))
  return str(root / "t5g")


@pytest.fixture(scope="module")
def inputs():
  return hf_models.random_batch(np.random.RandomState(0), LENGTHS, max(LENGTHS)).astype(np.int32)


@pytest.fixture(scope="module")
def ours(checkpoint, inputs):
  """t5g's (greedy, beam-3) tokens and its logits on teacher-forced greedy targets."""
  loaded = model_dir.load(checkpoint)
  greedy = generate(loaded.config, loaded.params, inputs, DecodeConfig(max_new_tokens=N),
                    compute=FP32, scanned=loaded.scanned).tokens
  beam = generate(loaded.config, loaded.params, inputs,
                  DecodeConfig(max_new_tokens=N, beam_size=3), compute=FP32,
                  scanned=loaded.scanned).tokens
  targets = np.concatenate([np.full((len(inputs), 1), BOS_ID, np.int32), greedy[:, :-1]], 1)
  logits = make_model(loaded.config, FP32).apply({"params": loaded.params}, inputs, targets)
  assert not (greedy == 1).any()  # No EOS: every row decodes N tokens, past the window.
  return greedy, beam, targets, np.asarray(logits)


def _export(capsys, checkpoint, out, *flags):
  rc = cli.main(["export", f"--checkpoint={checkpoint}", f"--output={out}", *flags])
  return rc, capsys.readouterr().out


def _theirs(folder, inputs, targets):
  """transformers' (greedy, beam-3) tokens without the decoder's BOS, and logits."""
  hf = transformers.T5GemmaForConditionalGeneration.from_pretrained(
      folder, attn_implementation="eager", dtype=torch.float32).eval()
  ids, mask = torch.tensor(inputs).long(), torch.tensor(inputs != 0).long()
  kw = dict(max_new_tokens=N, eos_token_id=1, pad_token_id=0, do_sample=False)
  with torch.no_grad():
    greedy = hf.generate(input_ids=ids, attention_mask=mask, **kw).numpy()[:, 1:]
    beam = hf.generate(input_ids=ids, attention_mask=mask, num_beams=3, early_stopping=False,
                       **kw).numpy()[:, 1:]
    logits = hf(input_ids=ids, attention_mask=mask,
                decoder_input_ids=torch.tensor(targets).long()).logits.numpy()
  return greedy, beam, logits


def _window(folder, stack):
  with open(os.path.join(folder, "config.json")) as f:
    return json.load(f)[stack]


def test_installed_transformers_window_offsets():
  """transformers 5.x: one more key per side in the encoder; causal layers agree with t5g."""
  assert hf_verify.window_offsets(presets.get_preset("t5gemma-tiny-tiny")) == {
      "encoder": 1, "decoder": 0}
  assert hf_verify.window_offsets(presets.get_preset("gemma2-tiny")) == {"transformer": 0}


def test_match_reproduces_t5g_past_the_windows(checkpoint, inputs, ours, tmp_path, capsys):
  out = str(tmp_path / "match")
  rc, printed = _export(capsys, checkpoint, out, "--hf_sliding_window=match")
  assert rc == 0
  assert "verified with transformers" in printed and "past the local windows" in printed
  assert "NOT verified" not in printed and "(W - 1, --hf_sliding_window=match)" in printed
  encoder, decoder = _window(out, "encoder"), _window(out, "decoder")
  assert (encoder["sliding_window"], encoder["t5g_sliding_window"]) == (7, 8)
  assert decoder["sliding_window"] == 8 and "t5g_sliding_window" not in decoder
  greedy, beam, targets, logits = ours
  their_greedy, their_beam, their_logits = _theirs(out, inputs, targets)
  np.testing.assert_array_equal(their_greedy, greedy)
  np.testing.assert_array_equal(their_beam, beam)
  assert len(np.unique(greedy)) > 10  # The outputs vary.
  assert np.abs(their_logits - logits).max() <= 1e-4
  # Imported back, the folder is the model it came from: W = 8 again.
  back = str(tmp_path / "back")
  convert.import_checkpoint(out, back)
  assert model_dir.load(back).config == model_dir.load(checkpoint).config


def test_released_reports_the_divergence(checkpoint, inputs, ours, tmp_path, capsys):
  out = str(tmp_path / "released")
  rc, printed = _export(capsys, checkpoint, out)  # The default.
  assert rc == 0 and _window(out, "encoder")["sliding_window"] == 8
  assert "t5g_sliding_window" not in _window(out, "encoder")
  assert "as Google's released folders (--hf_sliding_window=released)" in printed
  assert "verified with transformers 5" in printed and "only on rows of up to 8 encoder" in printed
  assert "NOT verified on longer inputs: on rows of 10 encoder / 10 decoder tokens" in printed
  beyond = float(printed.split("transformers differs from t5g by ")[1].split()[0])
  assert beyond > convert.VERIFY_TOLERANCE
  greedy, beam, targets, logits = ours
  their_greedy, their_beam, their_logits = _theirs(out, inputs, targets)
  longer = np.array(LENGTHS) > 8
  assert np.abs(their_logits - logits)[longer].max() > 1e-2
  assert np.abs(their_logits - logits)[~longer].max() <= 1e-4  # 5 tokens: within the window.
  assert (their_greedy != greedy).any(axis=1).sum() >= 2  # The symptom, on this model.


def test_a_mismatch_is_never_written_as_verified(checkpoint, tmp_path, capsys, monkeypatch):
  """A transformers misjudged as agreeing (offsets 0) fails the check past the window: the
  export exits non-zero with the difference and leaves no folder, under any name."""
  monkeypatch.setattr(hf_verify, "window_offsets",
                      lambda config: {"encoder": 0, "decoder": 0})
  out = str(tmp_path / "bad")
  rc = cli.main(["export", f"--checkpoint={checkpoint}", f"--output={out}",
                 "--hf_sliding_window=match"])
  err = capsys.readouterr().err
  assert rc != 0 and "not written: transformers' logits differ from t5g's by" in err
  assert "on rows of up to 10 encoder / 10 decoder tokens" in err
  assert not os.path.exists(out) and not glob.glob(out + "*")


def test_verify_max_length_says_what_was_covered(checkpoint, tmp_path, capsys):
  rc, printed = _export(capsys, checkpoint, str(tmp_path / "short"),
                        "--hf_sliding_window=match", "--verify_max_length=6")
  assert rc == 0 and "up to 6 encoder / 6 decoder tokens (not longer than the local windows" \
      in printed
  rc, printed = _export(capsys, checkpoint, str(tmp_path / "short_released"),
                        "--verify_max_length=6")
  assert rc == 0 and "only on rows of up to 6 encoder / 6 decoder tokens" in printed
  assert "NOT verified on longer inputs, where this transformers differs from t5g" in printed

"""`t5g adapt`: Gemma 2 -> T5Gemma as the paper prescribes, checked against transformers."""

import dataclasses

import jax
import numpy as np
import pytest
import torch
import transformers

from t5g import cli
from t5g.checkpoints import model_dir
from t5g.checkpoints.sources import TreeSource
from t5g.compat import hf_checkpoints
from t5g.model import BOS_ID, layout, make_model
from t5g.model.config import FP32
from tests import hf_models

CROSS = ("q_proj", "k_proj", "v_proj", "o_proj")
CROSS_NORMS = {"pre_cross_attention_norm": "pre_attention_norm",
               "post_cross_attention_norm": "post_attention_norm"}


def _adapt(tmp_path, capsys, encoder, decoder, *flags, name="adapted"):
  out = str(tmp_path / name)
  code = cli.main(["adapt", f"--encoder={encoder}", f"--decoder={decoder}", f"--output={out}",
                   *flags])
  printed = capsys.readouterr()
  assert code == 0, printed.err
  return out


@pytest.fixture(scope="module")
def balanced(hf_gemma2_dir, tmp_path_factory):
  """(source params, adapted step) of a balanced adaptation of the tiny Gemma 2."""
  out = str(tmp_path_factory.mktemp("balanced") / "t5g")
  assert cli.main(["adapt", f"--encoder={hf_gemma2_dir}", f"--decoder={hf_gemma2_dir}",
                   f"--output={out}", "--scan_layers=true"]) == 0
  return hf_checkpoints.load(hf_gemma2_dir, scanned=False), model_dir.load(out, scanned=False), out


def test_balanced_copies_every_weight(balanced):
  (source_config, source), adapted, out = balanced
  src = TreeSource(source, source_config, scanned=False)
  config, params = adapted.config, adapted.params
  assert config.encoder == config.decoder == source_config
  for stack, layer, sub, value in layout.entries(params, config, False):
    if sub[0] == "cross_attn":
      expected = src.get("transformer", layer, ("attn", sub[1]))
    elif sub[0] in CROSS_NORMS:
      expected = src.get("transformer", layer, (CROSS_NORMS[sub[0]], "scale"))
    else:
      expected = src.get("transformer", layer, sub)
    np.testing.assert_array_equal(value, expected, err_msg=f"{stack}/{layer}/{sub}")
  meta, _ = model_dir.read_metadata(out)
  assert "new_parameters" not in meta


def test_decoder_without_cross_attention_is_the_decoder_only_model(balanced, hf_gemma2_dir):
  """With no visible encoder token, cross-attention adds 0: the decoder is Gemma 2 again."""
  _, adapted, _ = balanced
  config = adapted.config
  model = make_model(config, dataclasses.replace(FP32, scan_layers=False))
  rng = np.random.RandomState(0)
  tokens = hf_models.random_batch(rng, [13, 9], 13, first=BOS_ID).astype(np.int32)
  encoded = np.zeros((2, 5, config.encoder.embed_dim), np.float32)
  no_encoder = np.zeros((2, 5), np.int32)
  ours = np.asarray(model.apply({"params": adapted.params}, encoded, no_encoder, tokens,
                                method=model.decode))
  reference = hf_models.gemma2_logits(
      transformers.Gemma2ForCausalLM.from_pretrained(hf_gemma2_dir, attn_implementation="eager",
                                                     dtype=torch.float32).eval(), tokens)
  valid = tokens != 0
  assert np.abs(reference[valid]).max() > 20  # The final soft-cap matters.
  assert np.abs(ours - reference)[valid].max() < 1e-4


def test_adapted_export_loads_in_transformers_with_the_prescribed_weights(
    balanced, hf_gemma2_dir, tmp_path, capsys):
  _, _, out = balanced
  hf_dir = str(tmp_path / "hf")
  assert cli.main(["export", f"--checkpoint={out}", f"--output={hf_dir}"]) == 0, \
      capsys.readouterr().err
  t5 = transformers.T5GemmaForConditionalGeneration.from_pretrained(hf_dir).state_dict()
  g2 = transformers.Gemma2ForCausalLM.from_pretrained(hf_gemma2_dir).state_dict()
  pairs = {"model.encoder.embed_tokens.weight": "model.embed_tokens.weight",
           "model.decoder.embed_tokens.weight": "model.embed_tokens.weight",
           "model.encoder.norm.weight": "model.norm.weight",
           "model.decoder.norm.weight": "model.norm.weight"}
  for i in range(hf_models.tiny_gemma2().config.num_hidden_layers):
    for stack in ("encoder", "decoder"):
      blocks = [("self_attn", "self_attn")] + ([("cross_attn", "self_attn")]
                                               if stack == "decoder" else [])
      for t5_block, g2_block in blocks:
        for proj in CROSS:
          pairs[f"model.{stack}.layers.{i}.{t5_block}.{proj}.weight"] = \
              f"model.layers.{i}.{g2_block}.{proj}.weight"
      norms = {"pre_self_attn_layernorm": "input_layernorm",
               "post_self_attn_layernorm": "post_attention_layernorm",
               "pre_feedforward_layernorm": "pre_feedforward_layernorm",
               "post_feedforward_layernorm": "post_feedforward_layernorm"}
      if stack == "decoder":
        norms.update({"pre_cross_attn_layernorm": "input_layernorm",
                      "post_cross_attn_layernorm": "post_attention_layernorm"})
      for t5_norm, g2_norm in norms.items():
        pairs[f"model.{stack}.layers.{i}.{t5_norm}.weight"] = f"model.layers.{i}.{g2_norm}.weight"
      for proj in ("gate_proj", "up_proj", "down_proj"):
        pairs[f"model.{stack}.layers.{i}.mlp.{proj}.weight"] = f"model.layers.{i}.mlp.{proj}.weight"
  for t5_key, g2_key in pairs.items():
    np.testing.assert_array_equal(t5[t5_key].numpy(), g2[g2_key].numpy(), err_msg=t5_key)
  expected = {k for k in t5 if not k.startswith("lm_head")}
  assert set(pairs) == expected


def test_unbalanced_starts_cross_attention_fresh(hf_gemma2_wide_dir, hf_gemma2_dir, tmp_path,
                                                 capsys):
  out = _adapt(tmp_path, capsys, hf_gemma2_wide_dir, hf_gemma2_dir, "--seed=3")
  adapted = model_dir.load(out, scanned=False)
  meta, _ = model_dir.read_metadata(out)
  assert meta["new_parameters"] == [f"decoder/cross_attn/{p}" for p in CROSS] + [
      "decoder/pre_cross_attention_norm/scale", "decoder/post_cross_attention_norm/scale"]
  enc_config, enc = hf_checkpoints.load(hf_gemma2_wide_dir, scanned=False)
  dec_config, dec = hf_checkpoints.load(hf_gemma2_dir, scanned=False)
  assert adapted.config.encoder == enc_config and adapted.config.decoder == dec_config
  jax.tree_util.tree_map(np.testing.assert_array_equal, adapted.params["encoder"],
                         enc["transformer"])
  for i in range(dec_config.num_layers):
    layer = adapted.params["decoder"][f"layer_{i}"]
    for key, value in dec["transformer"][f"layer_{i}"].items():
      jax.tree_util.tree_map(np.testing.assert_array_equal, layer[key], value)
    cross = layer["cross_attn"]
    assert cross["k_proj"].shape == (enc_config.embed_dim, dec_config.num_kv_heads,
                                     dec_config.head_dim)
    for name, fan_in in (("q_proj", dec_config.embed_dim), ("k_proj", enc_config.embed_dim)):
      assert abs(cross[name].std() * np.sqrt(fan_in) - 1) < 0.15, (i, name)
    assert not np.allclose(cross["q_proj"], dec["transformer"][f"layer_{i}"]["attn"]["q_proj"])
    for norm in CROSS_NORMS:
      np.testing.assert_array_equal(layer[norm]["scale"], 0)
  again = model_dir.load(_adapt(tmp_path, capsys, hf_gemma2_wide_dir, hf_gemma2_dir, "--seed=3",
                                name="again"), scanned=False)
  np.testing.assert_array_equal(again.params["decoder"]["layer_1"]["cross_attn"]["v_proj"],
                                adapted.params["decoder"]["layer_1"]["cross_attn"]["v_proj"])


def test_bad_adaptations_fail_naming_the_cause(hf_gemma2_wide_dir, hf_gemma2_dir,
                                               hf_t5gemma_dir, tmp_path, capsys):
  def fail(*flags):
    out = tmp_path / "out"
    code = cli.main(["adapt", *flags, f"--output={out}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert not out.exists()
    return err

  err = fail(f"--encoder={hf_gemma2_wide_dir}", f"--decoder={hf_gemma2_dir}",
             "--cross_attention=copy")
  assert "equal widths" in err and "96" in err
  err = fail(f"--encoder={hf_t5gemma_dir}", f"--decoder={hf_gemma2_dir}")
  assert hf_t5gemma_dir in err and "decoder-only" in err
  err = fail(f"--encoder={tmp_path / 'missing'}", f"--decoder={hf_gemma2_dir}")
  assert "missing" in err and "does not exist" in err
  small_vocab = str(tmp_path / "small_vocab")
  torch.manual_seed(0)
  transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
      **{**hf_models._module_fields(2, 64, 128, 4, 2, 16), "vocab_size": 300})
  ).save_pretrained(small_vocab)
  capsys.readouterr()
  err = fail(f"--encoder={small_vocab}", f"--decoder={hf_gemma2_dir}")
  assert "vocab_size 300" in err and "512" in err
  (tmp_path / "junk").mkdir()
  err = fail(f"--encoder={tmp_path / 'junk'}", f"--decoder={hf_gemma2_dir}")
  assert "junk" in err and "neither" in err

"""The encoder-only classifier through layout conversion, `t5g export` (an encoder-only
T5GemmaForSequenceClassification, checked against transformers on rows of different lengths)
and `t5g import` (bit-exact round trips)."""

import json
import os

import jax
import numpy as np
import pytest

from t5g import cli
from t5g.checkpoints import model_dir
from t5g.compat import convert, google_flax, hf_config
from t5g.model import layout
from t5g.model.config import ComputeConfig
from t5g.model.models import abstract_params, make_model
from tests import hf_models

FP32 = ComputeConfig("float32", "float32", scan_layers=True)


def _rows(lengths, width, seed=0):
  """Right-padded random text tokens + EOS (1), one row per length."""
  rng = np.random.RandomState(seed)
  tokens = np.zeros((len(lengths), width), np.int32)
  for i, n in enumerate(lengths):
    tokens[i, :n - 1] = rng.randint(3, hf_models.VOCAB, n - 1)
    tokens[i, n - 1] = 1
  return tokens


def _assert_equal_trees(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def _t5g_logits(ckpt, tokens):
  loaded = model_dir.load(ckpt, scanned=True)
  apply = jax.jit(make_model(loaded.config, FP32).apply)
  return np.asarray(apply({"params": loaded.params}, tokens))


def test_layout_conversion_round_trips_bitwise(tiny_classifier_checkpoint, tmp_path):
  scanned = model_dir.load(tiny_classifier_checkpoint)
  config = scanned.config
  assert scanned.scanned and set(scanned.params) == {"encoder", "head"}
  names = {(part, layer) for part, layer, _, _ in layout.entries(scanned.params, config, True)}
  assert ("head", None) in names and ("encoder", 2) in names  # 2: the final_local_layer.
  unscanned = model_dir.load(tiny_classifier_checkpoint, scanned=False).params
  assert set(unscanned["encoder"]) >= {"layer_0", "layer_1", "layer_2"}
  _assert_equal_trees(unscanned["head"], scanned.params["head"])
  back = layout.convert(unscanned, config, False, abstract_params(config, FP32), True)
  _assert_equal_trees(back, scanned.params)
  # Restored onto the other layout's target, and re-laid out lazily by `t5g import`.
  target = abstract_params(config, ComputeConfig(scan_layers=False))
  restored, _ = model_dir.restore_params(tiny_classifier_checkpoint, target, config, False)
  _assert_equal_trees(jax.tree_util.tree_map(np.asarray, restored), unscanned)
  relaid = str(tmp_path / "unscanned")
  assert convert.import_checkpoint(tiny_classifier_checkpoint, relaid, scan_layers=False) == "t5g"
  _assert_equal_trees(model_dir.load(relaid).params, unscanned)


def test_export_matches_transformers_and_imports_back_bitwise(tiny_classifier_checkpoint,
                                                              tmp_path, capsys):
  out, back = str(tmp_path / "hf"), str(tmp_path / "back")
  check = convert.export_checkpoint(tiny_classifier_checkpoint, out).verification
  assert check is not None and check.difference <= convert.VERIFY_TOLERANCE  # Up to W.
  with open(os.path.join(out, "config.json")) as f:
    hf = json.load(f)
  assert hf["architectures"] == ["T5GemmaForSequenceClassification"]
  assert hf["model_type"] == "t5gemma" and hf["is_encoder_decoder"] is False
  assert hf["id2label"] == {"0": "LABEL_0", "1": "LABEL_1", "2": "LABEL_2"}
  assert not os.path.exists(os.path.join(out, "generation_config.json"))
  # Rows of different lengths: the pooled token is each row's last non-padding one.
  tokens = _rows([8, 5, 2], 8)
  ours = _t5g_logits(tiny_classifier_checkpoint, tokens)
  np.testing.assert_allclose(hf_models.classifier_logits(out, tokens), ours, atol=1e-4)
  # ... so the 2-token row scores as it does unpadded (where the pooled token is the last one).
  np.testing.assert_allclose(hf_models.classifier_logits(out, tokens[2:, :2]), ours[2:],
                             atol=1e-4)
  assert np.ptp(ours, axis=0).min() > 1e-2  # Rows of different tokens get different logits.
  assert cli.main(["import", f"--input={out}", f"--output={back}", "--scan_layers=false"]) == 0
  original, imported = model_dir.load(tiny_classifier_checkpoint), model_dir.load(back,
                                                                                 scanned=True)
  assert imported.config == original.config
  _assert_equal_trees(imported.params, original.params)
  # The same folder without its classification head: refused, naming config.json.
  hf["architectures"] = ["T5GemmaEncoderModel"]
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(hf, f)
  capsys.readouterr()
  assert cli.main(["import", f"--input={out}", f"--output={tmp_path / 'no'}"]) == 2
  err = capsys.readouterr().err
  assert f"{out}/config.json: is_encoder_decoder=false" in err and len(err.splitlines()) == 1


def test_transformers_classifier_imports(tmp_path):
  folder, ckpt = str(tmp_path / "hf"), str(tmp_path / "t5g")
  hf_models.tiny_classifier().save_pretrained(folder)
  assert cli.main(["import", f"--input={folder}", f"--output={ckpt}"]) == 0
  assert model_dir.read_model(ckpt)[0].num_classes == 3
  tokens = _rows([8, 3, 6], 8, seed=1)
  np.testing.assert_allclose(_t5g_logits(ckpt, tokens), hf_models.classifier_logits(
      folder, tokens), atol=1e-4)


@pytest.mark.parametrize("edit, message", [
    ({"architectures": ["T5GemmaEncoderModel"]}, "is_encoder_decoder=false with architectures"),
    ({"architectures": None}, "is_encoder_decoder=false with architectures=\\[\\]"),
    ({"is_encoder_decoder": True}, "t5g's classifier is encoder-only"),
    ({"problem_type": "multi_label_classification"}, "problem_type="),
    ({"id2label": {"0": "only"}}, "num_classes must be an int >= 2"),
    ({"pad_token_id": 5}, "pad_token_id=5"),
    ({"id2label": None}, "missing key 'id2label'"),
])
def test_unrepresentable_classifier_configs_are_refused(tiny_classifier_checkpoint, edit,
                                                        message):
  config = model_dir.read_model(tiny_classifier_checkpoint)[0]
  d = hf_config.config_to_hf(config, "float32")
  del d["num_labels"]  # As transformers writes it: id2label only.
  assert hf_config.config_from_hf(dict(d), "x/config.json") == config
  with pytest.raises(ValueError, match=f"^x/config.json: .*{message}"):
    hf_config.config_from_hf({**d, **edit}, "x/config.json")


def test_google_layout_refuses_a_classifier(tiny_classifier_checkpoint):
  loaded = model_dir.load(tiny_classifier_checkpoint)
  with pytest.raises(ValueError, match="a classifier .* has no Google layout"):
    google_flax.to_google(loaded.params, loaded.config, loaded.scanned)
  with pytest.raises(ValueError, match="^ckpt: Google Flax trees hold Gemma 2 and T5Gemma"):
    google_flax.GoogleTreeSource({}, loaded.config, where="ckpt")

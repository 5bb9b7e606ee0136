"""`t5g score` against transformers' teacher-forced log-probabilities."""

import json

import numpy as np
import pytest
import torch

from t5g import cli
from tests import hf_models


@pytest.fixture
def t5_checkpoint(hf_t5gemma_imported):
  return hf_t5gemma_imported


def _score(tmp_path, ckpt, records, *extra):
  src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  src.write_text("".join(json.dumps(r) + "\n" for r in records))
  assert cli.main(["score", f"--checkpoint={ckpt}", f"--input={src}", f"--output={dst}",
                   "--batch_size=2", *extra]) == 0
  return [json.loads(line) for line in dst.read_text().splitlines()]


def test_t5gemma_scores_match_transformers(hf_t5gemma_dir, t5_checkpoint, tmp_path):
  rng = np.random.RandomState(3)
  records = [{"inputs": rng.randint(3, 512, n).tolist(), "targets": rng.randint(3, 512, m).tolist(),
              "id": i} for i, (n, m) in enumerate([(20, 6), (5, 11), (13, 1)])]
  results = _score(tmp_path, t5_checkpoint, records)
  model = hf_models.load_t5gemma(hf_t5gemma_dir)
  for record, result in zip(records, results):
    assert result["id"] == record["id"] and len(result["token_log_probs"]) == len(
        record["targets"])
    targets = torch.tensor([record["targets"]])
    decoder_inputs = torch.cat([torch.tensor([[2]]), targets[:, :-1]], dim=1)
    with torch.no_grad():
      logits = model(input_ids=torch.tensor([record["inputs"]]),
                     decoder_input_ids=decoder_inputs).logits
    expected = torch.log_softmax(logits, -1)[0, torch.arange(targets.shape[1]), targets[0]]
    np.testing.assert_allclose(result["token_log_probs"], expected.numpy(), atol=1e-4)
    assert result["log_likelihood"] == pytest.approx(float(expected.sum()), abs=1e-3)


def test_gemma2_scores_targets_only(hf_gemma2_dir, tmp_path):
  import transformers
  ckpt = str(tmp_path / "g2")
  assert cli.main(["import", f"--input={hf_gemma2_dir}", f"--output={ckpt}"]) == 0
  records = [{"inputs": [5, 6, 7], "targets": [8, 9]}, {"inputs": [], "targets": [10, 11, 12]}]
  results = _score(tmp_path, ckpt, records)
  model = transformers.Gemma2ForCausalLM.from_pretrained(hf_gemma2_dir).eval()
  for record, result in zip(records, results):
    sequence = torch.tensor([[2] + record["inputs"] + record["targets"]])
    with torch.no_grad():
      log_probs = torch.log_softmax(model(input_ids=sequence).logits, -1)[0]
    start = 1 + len(record["inputs"])
    expected = [float(log_probs[start - 1 + j, t]) for j, t in enumerate(record["targets"])]
    np.testing.assert_allclose(result["token_log_probs"], expected, atol=1e-4)


def test_text_needs_a_vocabulary(t5_checkpoint, tmp_path, capsys):
  src = tmp_path / "in.jsonl"
  src.write_text(json.dumps({"inputs": "hello", "targets": "world"}) + "\n")
  code = cli.main(["score", f"--checkpoint={t5_checkpoint}", f"--input={src}",
                   f"--output={tmp_path / 'o.jsonl'}"])
  assert code == 2 and "in.jsonl:1" in capsys.readouterr().err
  assert not (tmp_path / "o.jsonl").exists()


def test_text_with_a_trained_vocabulary(t5_checkpoint, tmp_path):
  import sentencepiece as spm
  from pydoc_data import topics
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n".join(list(topics.topics.values())[:80]))
  spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"),
                                 vocab_size=512, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
                                 minloglevel=2)  # The model's 512 ids (a size check).
  results = _score(tmp_path, t5_checkpoint, [{"inputs": "the for statement",
                                              "targets": "is used to iterate"}],
                   f"--vocabulary={tmp_path / 'sp.model'}")
  assert results[0]["inputs"] == "the for statement"
  assert len(results[0]["token_log_probs"]) > 1 and results[0]["log_likelihood"] < 0


def test_classifier_scores_are_its_log_softmax(tiny_classifier_checkpoint, tmp_path):
  import jax
  from t5g.checkpoints import model_dir
  from t5g.model.classifier import EncoderClassifier
  from t5g.model.config import ComputeConfig
  records = [{"inputs": [5, 6, 7, 8], "label": 2, "id": 0}, {"inputs": [9], "id": 1},
             {"inputs": list(range(3, 40)), "label": 0, "id": 2}]  # 2 batches, 2 lengths.
  results = _score(tmp_path, tiny_classifier_checkpoint, records)
  loaded = model_dir.load(tiny_classifier_checkpoint)
  model = EncoderClassifier(loaded.config, ComputeConfig("float32", "float32",
                                                         scan_layers=loaded.scanned))
  apply = jax.jit(lambda tokens: jax.nn.log_softmax(model.apply({"params": loaded.params},
                                                                tokens)))
  tokens = np.zeros((len(records), 40), np.int32)  # Right-padded, EOS appended.
  for i, record in enumerate(records):
    tokens[i, :len(record["inputs"]) + 1] = record["inputs"] + [1]
  for record, result, expected in zip(records, results, np.asarray(apply(tokens))):
    assert result["id"] == record["id"] and result["inputs"] == record["inputs"]
    np.testing.assert_allclose(result["class_log_probs"], expected, atol=1e-5)
    assert result["prediction"] == int(np.argmax(expected))
    if "label" in record:
      assert result["log_likelihood"] == pytest.approx(float(expected[record["label"]]),
                                                       abs=1e-5)
    else:
      assert "log_likelihood" not in result


@pytest.mark.parametrize("line, message", [
    ({"inputs": [5], "label": 3}, "'label' must be an int in [0, 3), got 3"),
    ({"inputs": [5], "label": "1"}, "'label' must be an int in [0, 3), got '1'"),
    ({"inputs": [5], "label": True}, "'label' must be an int"),
    ({"inputs": [], "label": 0}, "'inputs' is empty"),
    ({"inputs": [5, 1]}, "'inputs' ends with EOS (id 1)"),
    ({"inputs": [5, 0, 6]}, "'inputs' has token id 0 outside [1, 512)"),
    ({"inputs": "text"}, "'inputs' is text; pass --vocabulary"),
])
def test_classifier_bad_lines_name_file_and_line(tiny_classifier_checkpoint, tmp_path, capsys,
                                                line, message):
  src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  src.write_text(json.dumps({"inputs": [5, 6], "label": 1}) + "\n" + json.dumps(line) + "\n")
  code = cli.main(["score", f"--checkpoint={tiny_classifier_checkpoint}", f"--input={src}",
                   f"--output={dst}"])
  err = capsys.readouterr().err.strip()
  assert code == 2 and len(err.splitlines()) == 1 and f"{src}:2: {message}" in err, err
  assert not dst.exists()

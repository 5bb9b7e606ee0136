"""`t5g generate`: ids and text in and out, and its answers to bad input."""

import json
import logging
import os

import numpy as np
import pytest

from t5g import cli
from t5g.checkpoints import model_dir
from t5g.inference.decoding import DecodeConfig, generate

SPM = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "t5g", "data",
                   "assets", "embedded_spm.model")


@pytest.fixture
def checkpoint(hf_t5gemma_imported):
  return hf_t5gemma_imported


def _generate(tmp_path, ckpt, lines, *extra):
  src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  src.write_text("".join(line + "\n" for line in lines))
  code = cli.main(["generate", f"--checkpoint={ckpt}", f"--input={src}", f"--output={dst}",
                   "--batch_size=2", "--max_new_tokens=4", *extra])
  return code, ([json.loads(line) for line in dst.read_text().splitlines()]
                if dst.exists() else None)


def test_ids_in_ids_out(checkpoint, tmp_path):
  records = [{"inputs": [5, 6, 7, 8], "id": "a"}, {"inputs": list(range(3, 40)), "id": "b"},
             {"inputs": [9], "id": "c"}]
  code, results = _generate(tmp_path, checkpoint, [json.dumps(r) for r in records] + [""])
  assert code == 0 and [r["id"] for r in results] == ["a", "b", "c"]
  loaded = model_dir.load(checkpoint, scanned=False)  # As the command loads it.
  inputs = np.zeros((4, 64), np.int32)  # The command's batches: 2 rows, 64 columns.
  for row, record in enumerate(records):
    inputs[row, :len(record["inputs"])] = record["inputs"]
  tokens, lengths = [], []
  for rows in (inputs[:2], inputs[2:]):
    out = generate(loaded.config, loaded.params, rows, DecodeConfig(max_new_tokens=4),
                   scanned=loaded.scanned)
    tokens += out.tokens.tolist()
    lengths += out.lengths.tolist()
  for result, row, length in zip(results, tokens, lengths):
    assert result["generated_ids"] == row[:length]


def test_text_with_the_embedded_vocabulary(checkpoint, tmp_path):
  import sentencepiece as spm
  code, results = _generate(tmp_path, checkpoint, [json.dumps({"inputs": "the for statement"})],
                            f"--vocabulary={SPM}")
  assert code == 0
  ids = results[0]["generated_ids"]
  assert len(ids) == 4 and results[0]["generated_text"] == spm.SentencePieceProcessor(
      model_file=SPM).decode([t for t in ids if t != 1])


@pytest.mark.parametrize("line, message", [
    ('{"inputs": [5, 6]', "not valid JSON"),
    ('{"inputs": []}', "'inputs' is empty"),
    ('{"inputs": [5, 0, 6]}', "token id 0"),
    ('{"inputs": [5, 512]}', "token id 512"),
    ('{"inputs": "some text"}', "pass --vocabulary"),
    ('{"targets": [5]}', "'inputs' must be"),
    ('[5, 6]', "'inputs' must be"),
    ('{"inputs": [5, 6, 7, 8, 9]}', "5 input tokens > --max_input_length=4"),
])
def test_bad_input_names_file_and_line(checkpoint, tmp_path, capsys, line, message):
  code, results = _generate(tmp_path, checkpoint, ['{"inputs": [5]}', line],
                            "--max_input_length=4")
  err = capsys.readouterr().err
  assert code == 2 and "in.jsonl:2" in err and message in err and results is None
  assert not [p for p in os.listdir(tmp_path) if p.startswith("out.jsonl")]


def test_long_input_truncated_with_a_warning(checkpoint, tmp_path, caplog):
  with caplog.at_level(logging.WARNING):
    code, results = _generate(tmp_path, checkpoint, [json.dumps({"inputs": [5, 6, 7, 8, 9]})],
                              "--max_input_length=4", "--on_long_input=truncate")
  assert code == 0 and len(results) == 1
  assert "in.jsonl:1: 5 input tokens truncated to 4" in caplog.text
  _, short = _generate(tmp_path, checkpoint, [json.dumps({"inputs": [5, 6, 7, 8]})])
  assert results[0]["generated_ids"] == short[0]["generated_ids"]

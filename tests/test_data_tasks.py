"""Registered tasks and mixtures: the embedded corpus, C4 and SuperGLUE on TFDS mock data, user
files (text, jsonl, TFRecord), instruction tuning, metrics, and the errors for bad input."""

import importlib
import json
import re

import gin
import pytest
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from t5g.data import finetune_tasks, metrics, tasks
from t5g.data.vocabulary import SpecialTokens, get_vocabulary
from t5g.model.config import EOS_ID

LENGTHS = {"inputs": 512, "targets": 512}  # UL2_PAPER's μ=64 spans need about this much
BUILT_IN = ["t5g.c4.prefix_lm", "t5g.c4.ul2", "t5g.c4.ul2_prefix_lm", "t5g.embedded.prefix_lm",
            "t5g.embedded.ul2", "t5g.embedded.ul2_prefix_lm", "t5g.superglue",
            "t5g.superglue.boolq", "t5g.superglue.cb", "t5g.superglue.copa",
            "t5g.superglue.multirc", "t5g.superglue.rte", "t5g.superglue.wic",
            "t5g.superglue.wsc", "t5g.superglue_cls", "t5g.superglue_cls.boolq",
            "t5g.superglue_cls.cb", "t5g.superglue_cls.copa", "t5g.superglue_cls.multirc",
            "t5g.superglue_cls.rte", "t5g.superglue_cls.wic", "t5g.superglue_cls.wsc"]
# Classification tasks (t5g.data.classification_tasks) are checked in tests/test_eval_classifier.py.
CLASSIFICATION = "t5g.superglue_cls"


def _examples(name, lengths=LENGTHS, split="validation", count=4):
  # No in-memory caching: it asks TFDS for split sizes, which mock data lacks.
  dataset = tasks.get_task_or_mixture(name).get_dataset(
      lengths, split=split, shuffle=False, seed=0, num_epochs=1, try_in_mem_cache=False)
  examples = list(dataset.take(count).as_numpy_iterator())
  assert examples, f"{name} yielded nothing"
  for example in examples:
    for key, length in lengths.items():
      tokens = example[key]
      assert tokens.dtype == "int32" and tokens.ndim == 1 and 0 < len(tokens) <= length
      assert (tokens[-1] == EOS_ID) == (key == "targets") and (tokens[:-1] != EOS_ID).all()
  return examples


def test_every_registered_task_yields_examples():
  registered = sorted(name for name in [*seqio.TaskRegistry.names(),
                                        *seqio.MixtureRegistry.names()]
                      if name.startswith(tasks.PREFIX))
  assert registered == BUILT_IN
  with tfds.testing.mock_data(num_examples=6):
    for name in registered:
      if not name.startswith(CLASSIFICATION):
        _examples(name)


def test_superglue_text_to_text():
  with tfds.testing.mock_data(num_examples=4):
    for name, (fields, labels, _) in finetune_tasks.SUPERGLUE.items():
      assert tfds.builder(f"super_glue/{name}").info.features["label"].names == list(labels)
      for example in _examples(f"t5g.superglue.{name}", count=2):
        text = example["inputs_pretokenized"].decode()
        assert text.startswith(f"{name} {fields[0]}: ") and f" {fields[-1]}: " in text
        assert example["targets_pretokenized"].decode() in labels


def test_superglue_metrics():
  assert metrics.accuracy([0, 1, 1, 0], [0, 1, 0, 0]) == {"accuracy": 75.0}
  # Class 0: F1 2/3; class 1: F1 1/2; class 2: never predicted nor present, F1 0.
  f1 = metrics.macro_f1([0, 0, 1], [0, 1, 1], num_classes=3)["mean_3class_f1"]
  assert f1 == pytest.approx(100 * (2 / 3 + 2 / 3 + 0) / 3)
  postprocess = finetune_tasks.label_postprocessor(("False", "True"), group_by_question=True)
  example = {"idx": {"paragraph": 3, "question": 7, "answer": 1}}
  assert postprocess("True", example=example, is_target=True) == {"group": (3, 7), "value": 1}
  assert postprocess(" True ", example=example) == 1 and postprocess("yes", example=example) == -1
  targets = [{"group": (0, 0), "value": 1}, {"group": (0, 0), "value": 0},
             {"group": (0, 1), "value": 1}]
  multirc = metrics.multirc_metrics(targets, [1, 0, 0])
  assert multirc == {"accuracy": pytest.approx(100 * 2 / 3), "f1a": pytest.approx(100 * 2 / 3),
                     "exact_match": 50.0}


def test_mixture_draws_both_objectives():
  mode_ids = {SpecialTokens().mode_id(get_vocabulary(), name) for name in ("R", "X", "S")}
  starts = [example["inputs"][0] in mode_ids
            for example in _examples("t5g.embedded.ul2_prefix_lm", split="train", count=24)]
  assert any(starts) and not all(starts)


def _documents():
  return [" ".join(document.split()) for document in tasks.embedded_documents("validation")[:3]]


def _write_user_files(folder, file_format):
  documents = _documents()
  path = folder / f"corpus.{file_format}"
  if file_format == "text":
    path.write_text("\n\n".join(documents[:2]) + "\n" + documents[2])  # a blank line between
  elif file_format == "jsonl":
    path.write_text("".join(json.dumps({"id": i, "body": d}) + "\n"
                            for i, d in enumerate(documents)))
  else:
    with tf.io.TFRecordWriter(str(path)) as writer:
      for document in documents:
        feature = tf.train.Feature(bytes_list=tf.train.BytesList(value=[document.encode()]))
        writer.write(tf.train.Example(features=tf.train.Features(
            feature={"body": feature})).SerializeToString())
  return str(path)


@pytest.mark.parametrize("file_format", ["text", "jsonl", "tfrecord"])
def test_user_files(file_format, tmp_path):
  path = _write_user_files(tmp_path, file_format)
  text_key = "text" if file_format == "text" else "body"
  names = tasks.register_text_tasks(f"user_{file_format}", path, format=file_format,
                                    text_key=text_key)
  assert names == [f"user_{file_format}.ul2", f"user_{file_format}.prefix_lm",
                   f"user_{file_format}.ul2_prefix_lm"]
  _examples(names[0], split="train")
  _examples(names[2], split="train")
  lengths = {"inputs": 64, "targets": 64}
  chunk = 126  # PrefixLM "half" chunks: min(2 * 64 + 1, 2 * (64 - 1)) tokens
  # The three documents are joined into one stream (DOCUMENTS_PER_EXAMPLE > 3), then cut.
  expected = [token for document in _documents() for token in get_vocabulary().encode(document)]
  if len(expected) % chunk == 1:
    expected.pop()  # a lone last token has no input and drops
  found = []
  for example in _examples(names[1], lengths, split="train", count=1000):
    found += example["inputs"].tolist() + example["targets"].tolist()[:-1]
  assert found == expected


def test_instruction_task(tmp_path):
  path = tmp_path / "chat.jsonl"
  path.write_text(json.dumps({"prompt": "What is 2+2?", "response": "4"}) + "\n\n" +
                  json.dumps({"prompt": "Name a colour.", "response": "Blue."}) + "\n")
  finetune_tasks.register_instruction_task("my_chat", str(path))
  vocabulary = get_vocabulary()
  examples = _examples("my_chat", {"inputs": 64, "targets": 16}, split="train")
  assert len(examples) == 2
  assert vocabulary.decode(examples[0]["inputs"].tolist()) == (
      "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n")
  assert vocabulary.decode(examples[1]["targets"].tolist()[:-1]) == "Blue.<end_of_turn>"


def test_registration_is_idempotent():
  with gin.config.interactive_mode():  # a reloaded module registers its gin configurables anew
    importlib.reload(tasks)
    importlib.reload(finetune_tasks)
  assert tasks.register_embedded_tasks() == ["t5g.embedded.ul2", "t5g.embedded.prefix_lm",
                                             "t5g.embedded.ul2_prefix_lm"]
  _examples("t5g.embedded.ul2_prefix_lm", count=1)


def test_unknown_name_lists_close_names():
  with pytest.raises(ValueError, match="close names: t5g.embedded.ul2"):
    tasks.get_task_or_mixture("t5g.embeded.ul2")
  with pytest.raises(ValueError, match="t5g's tasks: .*t5g.c4.ul2"):
    tasks.get_task_or_mixture("nothing_like_it")


def test_bad_files_and_vocabulary(tmp_path):
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  with pytest.raises(ValueError, match=re.escape(f"data file '{empty}' is empty")):
    tasks.register_text_tasks("bad", str(empty))
  with pytest.raises(FileNotFoundError, match="no file matches"):
    tasks.register_text_tasks("bad", str(tmp_path / "missing-*.txt"))
  corpus = tmp_path / "corpus.jsonl"
  corpus.write_text(json.dumps({"content": "some text"}) + "\n")
  missing_text = re.escape(f"{corpus}: jsonl record has no string field 'text'")
  with pytest.raises(ValueError, match=missing_text):
    tasks.register_text_tasks("bad", str(corpus), format="jsonl")
  with pytest.raises(ValueError, match="no string field 'response'"):
    finetune_tasks.register_instruction_task("bad", str(corpus), prompt_key="content")
  with pytest.raises(FileNotFoundError, match="vocabulary not found: /nowhere/spm.model"):
    tasks.register_text_tasks("bad", str(corpus), format="jsonl", text_key="content",
                              vocabulary_path="/nowhere/spm.model")
  with pytest.raises(ValueError, match="unknown format 'csv'"):
    tasks.register_text_tasks("bad", str(corpus), format="csv")
  with pytest.raises(ValueError, match="reserved"):
    tasks.register_text_tasks("t5g.mine", str(corpus), format="jsonl", text_key="content")
  assert "bad.ul2" not in seqio.TaskRegistry.names()


def test_lengths_too_short_for_a_denoiser():
  with pytest.raises(ValueError, match="too short"):
    _examples("t5g.embedded.ul2", {"inputs": 64, "targets": 64})

"""Fine-tuning tasks: SuperGLUE as text-to-text, and instruction tuning from prompt/response jsonl.

SuperGLUE tasks are `t5g.superglue.<name>` for boolq, cb, copa, multirc, rte, wic and wsc, read
from TFDS `super_glue/<name>:1.0.2` (prepare with `tfds build super_glue/<name>`; nothing is
downloaded at run time). An example becomes `"<name> <field>: <text> <field>: <text> ..."` →
the label's name (e.g. `True`, `entailment`, `choice2`; `<unk>` for unlabelled test examples).
Metrics, in percent: accuracy for every task, plus the macro F1 over the three classes for cb,
and for multirc F1 over all answers (`f1a`) and exact match per question instead of accuracy.

`register_instruction_task(name, files)` reads jsonl records with `prompt` and `response`
fields in Gemma's chat turn format: the encoder reads
`<start_of_turn>user\\n{prompt}<end_of_turn>\\n<start_of_turn>model\\n` and the decoder is
trained on `{response}<end_of_turn>` + EOS only. Encoder inputs carry no BOS or EOS, as in
Google's T5Gemma sampler; with the decoder-only `PrefixLMFeatureConverter` the loss is also on
the response only.

Importing this module registers the SuperGLUE tasks with the embedded vocabulary;
`register_superglue_tasks(vocabulary_path=...)` replaces them (e.g. with the Gemma tokenizer).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import seqio
import tensorflow as tf

from t5g.data.tasks import (PREFIX, check_files, check_jsonl_files, parse_jsonl, register_task,
                            text_features)

SUPERGLUE_TFDS_VERSION = "1.0.2"
USER_TURN = "<start_of_turn>user\n"
MODEL_TURN = "<start_of_turn>model\n"
END_OF_TURN = "<end_of_turn>"
UNLABELLED = "<unk>"


def accuracy(targets: Sequence[int], predictions: Sequence[int]) -> dict[str, float]:
  """Percentage of predictions equal to their target."""
  return {"accuracy": 100.0 * float(np.mean(np.equal(targets, predictions)))}


def _f1(targets: np.ndarray, predictions: np.ndarray, positive: int) -> float:
  true_positives = np.sum((predictions == positive) & (targets == positive))
  denominator = np.sum(predictions == positive) + np.sum(targets == positive)
  return 0.0 if denominator == 0 else 2.0 * true_positives / denominator


def macro_f1(targets: Sequence[int], predictions: Sequence[int],
             num_classes: int) -> dict[str, float]:
  """Unweighted mean over classes 0..num_classes-1 of each class's F1, in percent."""
  targets, predictions = np.asarray(targets), np.asarray(predictions)
  scores = [_f1(targets, predictions, label) for label in range(num_classes)]
  return {f"mean_{num_classes}class_f1": 100.0 * float(np.mean(scores))}


def multirc_metrics(targets: Sequence[dict], predictions: Sequence[int]) -> dict[str, float]:
  """MultiRC: F1 of the `True` class over all answers, and exact match per question."""
  labels = np.array([target["value"] for target in targets])
  predictions = np.asarray(predictions)
  correct_by_question: dict[tuple[int, int], bool] = {}
  for target, label, prediction in zip(targets, labels, predictions):
    question = target["group"]
    correct_by_question[question] = correct_by_question.get(question, True) and (
        label == prediction)
  return {"f1a": 100.0 * _f1(labels, predictions, positive=1),
          "exact_match": 100.0 * float(np.mean(list(correct_by_question.values())))}


def label_postprocessor(labels: Sequence[str], group_by_question: bool = False) -> Callable:
  """seqio postprocess_fn: decoded text -> label index (-1 when it is no label's name).

  group_by_question: targets become {"group": (paragraph, question), "value": index}, for
  MultiRC's exact match.
  """
  def postprocess(output, example=None, is_target=False):
    text = tf.compat.as_text(output).strip()
    value = labels.index(text) if text in labels else -1
    if group_by_question and is_target:
      return {"group": (int(example["idx"]["paragraph"]), int(example["idx"]["question"])),
              "value": value}
    return value
  return postprocess


SUPERGLUE = {  # name: (text fields in input order, label names, metric_fns)
    "boolq": (("question", "passage"), ("False", "True"), (accuracy,)),
    "cb": (("premise", "hypothesis"), ("entailment", "contradiction", "neutral"),
           (accuracy, functools.partial(macro_f1, num_classes=3))),
    "copa": (("premise", "choice1", "choice2", "question"), ("choice1", "choice2"),
             (accuracy,)),
    "multirc": (("question", "answer", "paragraph"), ("False", "True"), (multirc_metrics,)),
    "rte": (("premise", "hypothesis"), ("entailment", "not_entailment"), (accuracy,)),
    "wic": (("word", "sentence1", "sentence2"), ("False", "True"), (accuracy,)),
    "wsc": (("text", "span1_text", "span2_text"), ("False", "True"), (accuracy,)),
}


def superglue_to_text(name: str, fields: Sequence[str],
                      labels: Sequence[str]) -> Callable[[tf.data.Dataset], tf.data.Dataset]:
  """A preprocessor: SuperGLUE examples -> `inputs`/`targets` text, keeping `idx`."""
  @seqio.map_over_dataset
  def convert(example):
    parts = [name]
    for field in fields:
      parts += [f" {field}: ", example[field]]
    label = tf.cast(example["label"], tf.int32)
    target = tf.where(label >= 0, tf.gather(tf.constant(list(labels)), tf.maximum(label, 0)),
                      UNLABELLED)
    return {"inputs": tf.strings.join(parts), "targets": target, "idx": example["idx"]}
  return convert


def register_superglue_tasks(vocabulary_path: str | None = None) -> list[str]:
  """Registers `t5g.superglue.<name>` for every SuperGLUE task; returns the names."""
  features = text_features(vocabulary_path)
  names = []
  for name, (fields, labels, metric_fns) in SUPERGLUE.items():
    task_name = f"{PREFIX}superglue.{name}"
    register_task(
        task_name,
        source=seqio.TfdsDataSource(tfds_name=f"super_glue/{name}:{SUPERGLUE_TFDS_VERSION}",
                                    splits=("train", "validation", "test")),
        output_features=features,
        preprocessors=[superglue_to_text(name, fields, labels), seqio.preprocessors.tokenize,
                       seqio.preprocessors.append_eos_after_trim],
        postprocess_fn=label_postprocessor(labels, group_by_question=name == "multirc"),
        metric_fns=list(metric_fns))
    names.append(task_name)
  return names


@seqio.map_over_dataset
def chat_turns(example: dict) -> dict:
  """prompt/response -> Gemma chat turns: `inputs` ends with the model turn's opening."""
  return {"inputs": tf.strings.join([USER_TURN, example["prompt"], END_OF_TURN, "\n",
                                     MODEL_TURN]),
          "targets": tf.strings.join([example["response"], END_OF_TURN])}


def register_instruction_task(name: str,
                              files: str | Sequence[str] | Mapping[str, str | Sequence[str]],
                              prompt_key: str = "prompt", response_key: str = "response",
                              vocabulary_path: str | None = None) -> seqio.Task:
  """Registers task `name`: instruction tuning on jsonl prompt/response records.

  files: glob pattern(s) for the `train` split, or a mapping split -> pattern(s). Missing or
  empty files, and a first record without the two string fields, raise here.
  """
  if name.startswith(PREFIX):
    raise ValueError(f"task names starting with {PREFIX!r} are reserved for t5g's own tasks")
  split_patterns = files if isinstance(files, Mapping) else {"train": files}
  split_files = {split: check_files(patterns) for split, patterns in split_patterns.items()}
  check_jsonl_files([path for paths in split_files.values() for path in paths],
                    [prompt_key, response_key])
  rename = functools.partial(seqio.preprocessors.rekey,
                             key_map={"prompt": prompt_key, "response": response_key})
  return register_task(
      name, source=seqio.TextLineDataSource(split_files),
      output_features=text_features(vocabulary_path),
      preprocessors=[parse_jsonl([prompt_key, response_key]), rename, chat_turns,
                     seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim])


register_superglue_tasks()

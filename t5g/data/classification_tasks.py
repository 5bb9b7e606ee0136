"""Classification tasks for the encoder-only classifier (`t5g.model.classifier`).

A classification task has two features: `inputs`, the text's tokens followed by EOS (the head
reads the encoder state of that last token, the same token in every example), and `targets`,
ONE id, the label's index, over a `PassThroughVocabulary` whose size is the class count: so
that seqio's Evaluator, which decodes targets and predictions through the targets vocabulary,
hands the postprocessor the class index. A classifier needs at least that many classes
(`check_num_classes`; the SuperGLUE tasks all declare 3, cb's count, so that one classifier
serves any of them or their mixture). Unlabelled examples (SuperGLUE's test split) have label -1 and
get no loss.

`ClassificationFeatureConverter` (`feature_converter="classification"`) turns them into the
model features `encoder_input_tokens` [S] (right-padded with 0) and `label` [] (int32); it does
not pack.

Registered here: `t5g.superglue_cls.<name>` for the seven SuperGLUE tasks of
`t5g.data.finetune_tasks` (same input text, same metrics, label index instead of label name)
and their mixture `t5g.superglue_cls`; `register_classification_task(name, files, labels)` for
the user's jsonl records with a text and a label name.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence

import gin
import seqio
import tensorflow as tf

from t5g.data import metrics
from t5g.data.finetune_tasks import SUPERGLUE, superglue_input_text, superglue_tfds_source
from t5g.data.tasks import (PREFIX, parse_jsonl, register_mixture, register_task,
                            user_split_files)
from t5g.data.vocabulary import get_vocabulary
from t5g.errors import InputError

SUPERGLUE_CLS_PREFIX = f"{PREFIX}superglue_cls"
SUPERGLUE_NUM_CLASSES = max(len(labels) for _, labels, _ in SUPERGLUE.values())
CLASSIFICATION_METRICS = ("accuracy",)


def classification_features(num_classes: int,
                            vocabulary_path: str | None = None) -> dict[str, seqio.Feature]:
  """`inputs` (text tokens + EOS) and `targets` (one class index) for `num_classes` labels."""
  return {"inputs": seqio.Feature(get_vocabulary(vocabulary_path), add_eos=True),
          "targets": seqio.Feature(seqio.PassThroughVocabulary(num_classes), add_eos=False,
                                   dtype=tf.int32)}


def check_num_classes(mixture_or_task: seqio.Task | seqio.Mixture, num_classes: int) -> None:
  """Raises unless every task is a classification task with at most `num_classes` labels."""
  for task in seqio.get_subtasks(mixture_or_task):
    vocabulary = task.output_features["targets"].vocabulary
    if not isinstance(vocabulary, seqio.PassThroughVocabulary):
      raise InputError(f"task {task.name!r} is not a classification task (its targets are text)")
    if vocabulary.vocab_size > num_classes:
      raise InputError(f"task {task.name!r} has {vocabulary.vocab_size} labels; the classifier "
                       f"has num_classes={num_classes}")


def class_postprocessor(group_by_question: bool = False) -> Callable:
  """seqio postprocess_fn: the decoded one-id sequence -> the class index.

  group_by_question: targets become {"group": (paragraph, question), "value": index}, for
  MultiRC's exact match.
  """
  def postprocess(output, example=None, is_target=False):
    value = int(output[0])
    if group_by_question and is_target:
      return {"group": (int(example["idx"]["paragraph"]), int(example["idx"]["question"])),
              "value": value}
    return value
  return postprocess


class ClassificationFeatureConverter(seqio.FeatureConverter):
  """`inputs` [<= S] and `targets` [1] -> `encoder_input_tokens` [S] and `label` [] (unpacked)."""

  TASK_FEATURES = {"inputs": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
                   "targets": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32)}
  MODEL_FEATURES = {"encoder_input_tokens": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
                    "label": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32, rank=0)}
  PACKING_FEATURE_DTYPES = {}

  def __init__(self, pack: bool = False):
    if pack:
      raise InputError("the classification feature converter does not pack (pack=False)")
    super().__init__(pack=False)

  def _convert_features(self, ds: tf.data.Dataset,
                        task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
    """Pads `inputs` to its length and takes the label from `targets`."""
    length = task_feature_lengths["inputs"]

    def convert(features):
      tokens = features["inputs"][:length]
      return {"encoder_input_tokens": tf.pad(tokens, [[0, length - tf.size(tokens)]]),
              "label": features["targets"][0]}
    return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE)

  def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]
                                ) -> dict[str, int]:
    """`encoder_input_tokens` has the `inputs` length; `label` is a scalar."""
    return {"encoder_input_tokens": task_feature_lengths["inputs"], "label": 1}


def _superglue_to_class(name: str, fields: Sequence[str]
                        ) -> Callable[[tf.data.Dataset], tf.data.Dataset]:
  @seqio.map_over_dataset
  def convert(example):
    return {"inputs": superglue_input_text(name, fields, example),
            "targets": tf.reshape(tf.cast(example["label"], tf.int32), [1]),
            "idx": example["idx"]}
  return convert


def register_superglue_classification_tasks(vocabulary_path: str | None = None) -> list[str]:
  """Registers `t5g.superglue_cls.<name>` for the seven SuperGLUE tasks and the mixture
  `t5g.superglue_cls`; returns the task names."""
  names = []
  tokenize = functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False)
  for name, (fields, _, metric_fns) in SUPERGLUE.items():
    task_name = f"{SUPERGLUE_CLS_PREFIX}.{name}"
    register_task(task_name, source=superglue_tfds_source(name),
                  output_features=classification_features(SUPERGLUE_NUM_CLASSES,
                                                          vocabulary_path),
                  preprocessors=[_superglue_to_class(name, fields), tokenize,
                                 seqio.preprocessors.append_eos_after_trim],
                  postprocess_fn=class_postprocessor(group_by_question=name == "multirc"),
                  metric_fns=list(metric_fns))
    names.append(task_name)
  register_mixture(SUPERGLUE_CLS_PREFIX, names)
  return names


gin.external_configurable(register_superglue_classification_tasks, module="t5g")


def _label_index(labels: Sequence[str], label_key: str
                 ) -> Callable[[tf.data.Dataset], tf.data.Dataset]:
  table = tf.lookup.StaticHashTable(
      tf.lookup.KeyValueTensorInitializer(tf.constant(list(labels)),
                                          tf.range(len(labels), dtype=tf.int32)), -1)

  @seqio.map_over_dataset
  def convert(example):
    index = table.lookup(example[label_key])
    check = tf.debugging.assert_non_negative(
        index, message=f"a record's {label_key!r} is none of the labels {list(labels)}")
    with tf.control_dependencies([check]):
      return {"inputs": example["inputs"], "targets": tf.reshape(index, [1])}
  return convert


def register_classification_task(name: str,
                                 files: str | Sequence[str] | Mapping[str, str | Sequence[str]],
                                 labels: Sequence[str], text_key: str = "text",
                                 label_key: str = "label", vocabulary_path: str | None = None,
                                 metric_names: Sequence[str] = CLASSIFICATION_METRICS
                                 ) -> seqio.Task:
  """Registers task `name` over jsonl records with a text (`text_key`) and a label name
  (`label_key`, one of `labels`; the class index is its position).

  files: glob pattern(s) for the `train` split, or a mapping split -> pattern(s). Missing or
  empty files, a first record without the two string fields, and an unknown metric name raise
  here; a later record with another label stops the pipeline naming the labels.
  """
  if len(set(labels)) != len(labels) or len(labels) < 2:
    raise InputError(f"labels must be at least two distinct names, got {list(labels)}")
  metric_fns = metrics.by_name(metric_names)
  split_files = user_split_files(name, files, [text_key, label_key])
  rename = functools.partial(seqio.preprocessors.rekey, key_map={"inputs": text_key,
                                                                  label_key: label_key})
  return register_task(
      name, source=seqio.TextLineDataSource(split_files),
      output_features=classification_features(len(labels), vocabulary_path),
      preprocessors=[parse_jsonl([text_key, label_key]), rename,
                     _label_index(labels, label_key),
                     functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
                     seqio.preprocessors.append_eos_after_trim],
      postprocess_fn=class_postprocessor(), metric_fns=metric_fns)


gin.external_configurable(register_classification_task, module="t5g")


register_superglue_classification_tasks()

"""Fine-tuning tasks: SuperGLUE as text-to-text, and instruction tuning from prompt/response jsonl.

SuperGLUE tasks are `t5g.superglue.<name>` for boolq, cb, copa, multirc, rte, wic and wsc, read
from TFDS `super_glue/<name>:1.0.2` (prepare with `tfds build super_glue/<name>`; nothing is
downloaded at run time). An example becomes `"<name> <field>: <text> <field>: <text> ..."` →
the label's name (e.g. `True`, `entailment`, `choice2`; `<unk>` for unlabelled test examples).
Metrics, in percent (`t5g.data.metrics`): accuracy for every task (for multirc over all
answers), plus the macro F1 over the three classes for cb, and for multirc F1 over all answers
(`f1a`) and exact match per question. The mixture `t5g.superglue` holds the seven tasks; the
paper's SuperGLUE score is their mean dev accuracy, which `t5g eval` reports for a mixture as
`<mixture>/accuracy` (see `t5g.evaluation.evaluator`).

`register_instruction_task(name, files)` reads jsonl records with `prompt` and `response`
fields in Gemma's chat turn format: the encoder reads
`<start_of_turn>user\\n{prompt}<end_of_turn>\\n<start_of_turn>model\\n` and the decoder is
trained on `{response}<end_of_turn>` + EOS only. Encoder inputs carry no BOS or EOS, as in
Google's T5Gemma sampler; with the decoder-only `PrefixLMFeatureConverter` the loss is also on
the response only. Its evaluation metrics are chosen by name from `t5g.data.metrics.NAMED`
(default: `exact_match` of the decoded response, `log_likelihood` of the reference one).

Importing this module registers the SuperGLUE tasks with the embedded vocabulary;
`register_superglue_tasks(vocabulary_path=...)` replaces them (e.g. with the Gemma tokenizer).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence

import gin
import seqio
import tensorflow as tf

from t5g.data import metrics
from t5g.data.tasks import (PREFIX, parse_jsonl, register_mixture, register_task, text_features,
                            user_split_files)

SUPERGLUE_TFDS_VERSION = "1.0.2"
USER_TURN = "<start_of_turn>user\n"
MODEL_TURN = "<start_of_turn>model\n"
END_OF_TURN = "<end_of_turn>"
UNLABELLED = "<unk>"
SUPERGLUE_MIXTURE = f"{PREFIX}superglue"
INSTRUCTION_METRICS = ("exact_match", "log_likelihood")


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


_ACCURACY = (metrics.accuracy,)
SUPERGLUE = {  # name: (text fields in input order, label names, metric_fns)
    "boolq": (("question", "passage"), ("False", "True"), _ACCURACY),
    "cb": (("premise", "hypothesis"), ("entailment", "contradiction", "neutral"),
           (metrics.accuracy, functools.partial(metrics.macro_f1, num_classes=3))),
    "copa": (("premise", "choice1", "choice2", "question"), ("choice1", "choice2"), _ACCURACY),
    "multirc": (("question", "answer", "paragraph"), ("False", "True"),
                (metrics.multirc_metrics,)),
    "rte": (("premise", "hypothesis"), ("entailment", "not_entailment"), _ACCURACY),
    "wic": (("word", "sentence1", "sentence2"), ("False", "True"), _ACCURACY),
    "wsc": (("text", "span1_text", "span2_text"), ("False", "True"), _ACCURACY),
}


def superglue_tfds_source(name: str) -> seqio.TfdsDataSource:
  """TFDS `super_glue/<name>` with its train, validation and test splits."""
  return seqio.TfdsDataSource(tfds_name=f"super_glue/{name}:{SUPERGLUE_TFDS_VERSION}",
                              splits=("train", "validation", "test"))


def superglue_input_text(name: str, fields: Sequence[str], example: dict) -> tf.Tensor:
  """`"<name> <field>: <text> <field>: <text> ..."` for one SuperGLUE example."""
  parts = [name]
  for field in fields:
    parts += [f" {field}: ", example[field]]
  return tf.strings.join(parts)


def superglue_to_text(name: str, fields: Sequence[str],
                      labels: Sequence[str]) -> Callable[[tf.data.Dataset], tf.data.Dataset]:
  """A preprocessor: SuperGLUE examples -> `inputs`/`targets` text, keeping `idx`."""
  @seqio.map_over_dataset
  def convert(example):
    label = tf.cast(example["label"], tf.int32)
    target = tf.where(label >= 0, tf.gather(tf.constant(list(labels)), tf.maximum(label, 0)),
                      UNLABELLED)
    return {"inputs": superglue_input_text(name, fields, example), "targets": target,
            "idx": example["idx"]}
  return convert


def register_superglue_tasks(vocabulary_path: str | None = None) -> list[str]:
  """Registers `t5g.superglue.<name>` for every SuperGLUE task and the mixture `t5g.superglue`
  of all seven; returns the task names."""
  features = text_features(vocabulary_path)
  names = []
  for name, (fields, labels, metric_fns) in SUPERGLUE.items():
    task_name = f"{PREFIX}superglue.{name}"
    register_task(
        task_name,
        source=superglue_tfds_source(name),
        output_features=features,
        preprocessors=[superglue_to_text(name, fields, labels), seqio.preprocessors.tokenize,
                       seqio.preprocessors.append_eos_after_trim],
        postprocess_fn=label_postprocessor(labels, group_by_question=name == "multirc"),
        metric_fns=list(metric_fns))
    names.append(task_name)
  register_mixture(SUPERGLUE_MIXTURE, names)
  return names


gin.external_configurable(register_superglue_tasks, module="t5g")


@seqio.map_over_dataset
def chat_turns(example: dict) -> dict:
  """prompt/response -> Gemma chat turns: `inputs` ends with the model turn's opening."""
  return {"inputs": tf.strings.join([USER_TURN, example["prompt"], END_OF_TURN, "\n",
                                     MODEL_TURN]),
          "targets": tf.strings.join([example["response"], END_OF_TURN])}


def response_text(output: str, example: dict | None = None, is_target: bool = False) -> str:
  """seqio postprocess_fn: decoded text up to `<end_of_turn>`, stripped."""
  del example, is_target
  return tf.compat.as_text(output).split(END_OF_TURN)[0].strip()


def register_instruction_task(name: str,
                              files: str | Sequence[str] | Mapping[str, str | Sequence[str]],
                              prompt_key: str = "prompt", response_key: str = "response",
                              vocabulary_path: str | None = None,
                              metric_names: Sequence[str] = INSTRUCTION_METRICS) -> seqio.Task:
  """Registers task `name`: instruction tuning on jsonl prompt/response records.

  files: glob pattern(s) for the `train` split, or a mapping split -> pattern(s). Missing or
  empty files, and a first record without the two string fields, raise here. metric_names:
  evaluation metrics from `t5g.data.metrics.NAMED` (an unknown name raises here), computed on
  the response text up to `<end_of_turn>`.
  """
  metric_fns = metrics.by_name(metric_names)
  split_files = user_split_files(name, files, [prompt_key, response_key])
  rename = functools.partial(seqio.preprocessors.rekey,
                             key_map={"prompt": prompt_key, "response": response_key})
  return register_task(
      name, source=seqio.TextLineDataSource(split_files),
      output_features=text_features(vocabulary_path),
      preprocessors=[parse_jsonl([prompt_key, response_key]), rename, chat_turns,
                     seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
      postprocess_fn=response_text, metric_fns=metric_fns)


gin.external_configurable(register_instruction_task, module="t5g")


register_superglue_tasks()

"""Registered seqio pretraining tasks and mixtures (UL2 and PrefixLM), and user-file tasks.

Every built-in name starts with `t5g.`:

- `t5g.c4.ul2`, `t5g.c4.prefix_lm` and the mixture `t5g.c4.ul2_prefix_lm`: TFDS `c4/en:3.1.0`
  (field `text`; splits `train`, `validation`);
- `t5g.embedded.ul2`, `t5g.embedded.prefix_lm` and the mixture `t5g.embedded.ul2_prefix_lm`: the
  embedded corpus (`t5g.data.embedded_corpus`), offline; every 10th document is `validation`,
  the rest `train`;
- `t5g.superglue.*`: the fine-tuning tasks of `t5g.data.finetune_tasks`.

`register_text_tasks(name, files, ...)` registers `<name>.ul2`, `<name>.prefix_lm` and the mixture
`<name>.ul2_prefix_lm` over the user's text, jsonl or TFRecord files. Mixtures sample the two
objectives 1:1. Lengths are chosen when the dataset is built (`task_feature_lengths`); the
papers' defaults are `UL2_FEATURE_LENGTHS` and `PREFIX_LM_FEATURE_LENGTHS`. UL2 uses the
`t5g.data.denoisers` mixture given (default `UL2_PAPER`); PrefixLM splits chunks in halves.

Documents: C4 and user files join each run of `DOCUMENTS_PER_EXAMPLE` (128, T5's
`reduce_concat_tokens` default) consecutive tokenised documents into one stream before the
objective cuts it into chunks, so that the long denoisers (μ = 32, 64 at 8192 tokens) see
sequences as long as they need instead of one short web page each. The embedded corpus's
documents are whole pydoc topics and are not joined.

Format: targets end with EOS; inputs get neither BOS nor EOS, as in Google's T5Gemma sampler,
so a PrefixLM example's `inputs + targets` is contiguous text (what a Gemma 2 teacher reads for
distillation). A PrefixLM chunk of one token (a document's last) has no input and is dropped.

C4 is read from a prepared TFDS directory (`tfds build c4/en` or a copy of the GCS data, with
`TFDS_DATA_DIR` or `seqio.set_tfds_data_dir_override`); nothing is downloaded at run time.
Importing this module registers the built-in tasks with the embedded vocabulary; calling a
`register_*` function again replaces its tasks, e.g. with the Gemma tokenizer:
`register_c4_tasks(vocabulary_path="/path/to/tokenizer.model")`.
"""

from __future__ import annotations

import difflib
import functools
import json
from collections.abc import Callable, Mapping, Sequence

import gin
import seqio
import tensorflow as tf

from t5g.data import embedded_corpus
from t5g.data.denoisers import UL2_PAPER, Denoiser, ul2_objective
from t5g.data.prefix_lm import concatenate_documents, prefix_lm
from t5g.data.vocabulary import get_vocabulary
from t5g.errors import InputError, MissingFileError

PREFIX = "t5g."
C4_TFDS_NAME = "c4/en:3.1.0"
OBJECTIVES = ("ul2", "prefix_lm")
MIXTURE_SUFFIX = "ul2_prefix_lm"
UL2_FEATURE_LENGTHS = {"inputs": 8192, "targets": 8192}
PREFIX_LM_FEATURE_LENGTHS = {"inputs": 4096, "targets": 4096}
FILE_FORMATS = ("text", "jsonl", "tfrecord")
EMBEDDED_VALIDATION_EVERY = 10  # every 10th embedded document is in the validation split
DOCUMENTS_PER_EXAMPLE = 128  # C4 and user files: documents joined before the objective
SHUFFLE_BUFFER_SIZE = 1000  # seqio's default: examples shuffled after preprocessing
# The embedded corpus makes a few hundred examples per epoch at UL2 lengths of 512: a buffer of
# 1000 would read it three times before the first example. Its documents are shuffled first.
EMBEDDED_SHUFFLE_BUFFER_SIZE = 128


def text_features(vocabulary_path: str | None) -> dict[str, seqio.Feature]:
  """`inputs` (no EOS) and `targets` (EOS) over one vocabulary (None: the embedded model)."""
  vocabulary = get_vocabulary(vocabulary_path)
  return {"inputs": seqio.Feature(vocabulary, add_eos=False),
          "targets": seqio.Feature(vocabulary, add_eos=True)}


def register_task(name: str, **task_kwargs) -> seqio.Task:
  """Registers a seqio task under `name`, replacing any task of that name."""
  seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(name, **task_kwargs)


def register_mixture(name: str, task_names: Sequence[str]) -> seqio.Mixture:
  """Registers an equal-rate mixture under `name`, replacing any mixture of that name."""
  seqio.MixtureRegistry.remove(name)
  return seqio.MixtureRegistry.add(name, list(task_names), default_rate=1.0)


def check_files(patterns: str | Sequence[str]) -> list[str]:
  """Expands glob patterns; raises if a pattern matches nothing or a file is empty."""
  files = []
  for pattern in [patterns] if isinstance(patterns, str) else patterns:
    matched = sorted(tf.io.gfile.glob(pattern))
    if not matched:
      raise MissingFileError(f"no file matches {pattern!r}")
    for path in matched:
      if tf.io.gfile.stat(path).length == 0:
        raise InputError(f"data file {path!r} is empty")
    files.extend(matched)
  return files


def _drop_empty_inputs(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """Drops examples with no input token: a one-token PrefixLM chunk (a document's last token)."""
  return dataset.filter(lambda example: tf.size(example["inputs"]) > 0)


def _objective_preprocessors(objective: str, denoisers: Sequence[tuple[Denoiser, float]],
                             documents_per_example: int) -> list[Callable]:
  """Document text under `targets` -> the objective's `inputs`/`targets`, targets EOS-terminated.

  The text is tokenised and, with `documents_per_example` > 1, runs of documents are joined.
  """
  steps = [functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False)]
  if documents_per_example > 1:
    steps.append(functools.partial(concatenate_documents,
                                   documents_per_example=documents_per_example))
  if objective == "ul2":  # UL2 inputs always hold the mode token: nothing to drop.
    return [*steps, functools.partial(ul2_objective, denoisers=denoisers),
            seqio.preprocessors.append_eos_after_trim]
  return [*steps, functools.partial(prefix_lm, split="half"), _drop_empty_inputs,
          seqio.preprocessors.append_eos_after_trim]


def register_pretraining_tasks(prefix: str, source: seqio.DataSource, text_key: str,
                               vocabulary_path: str | None = None,
                               denoisers: Sequence[tuple[Denoiser, float]] = UL2_PAPER,
                               source_preprocessors: Sequence[Callable] = (),
                               shuffle_buffer_size: int = SHUFFLE_BUFFER_SIZE,
                               documents_per_example: int = DOCUMENTS_PER_EXAMPLE) -> list[str]:
  """Registers `<prefix>.ul2`, `<prefix>.prefix_lm` and the mixture `<prefix>.ul2_prefix_lm`.

  source yields examples with the document text under `text_key` (after
  `source_preprocessors`); runs of `documents_per_example` documents are joined before the
  objective (1: each document alone). Returns the registered names.
  """
  if documents_per_example < 1:
    raise InputError(f"documents_per_example must be >= 1, got {documents_per_example}")
  features = text_features(vocabulary_path)
  rename = functools.partial(seqio.preprocessors.rekey, key_map={"targets": text_key})
  task_names = []
  for objective in OBJECTIVES:
    task_name = f"{prefix}.{objective}"
    register_task(task_name, source=source, output_features=features,
                  preprocessors=[*source_preprocessors, rename,
                                 *_objective_preprocessors(objective, denoisers,
                                                           documents_per_example)],
                  shuffle_buffer_size=shuffle_buffer_size)
    task_names.append(task_name)
  register_mixture(f"{prefix}.{MIXTURE_SUFFIX}", task_names)
  return [*task_names, f"{prefix}.{MIXTURE_SUFFIX}"]


def register_c4_tasks(vocabulary_path: str | None = None,
                      denoisers: Sequence[tuple[Denoiser, float]] = UL2_PAPER,
                      documents_per_example: int = DOCUMENTS_PER_EXAMPLE) -> list[str]:
  """UL2 / PrefixLM over TFDS C4 (`train` and `validation`); needs prepared TFDS data."""
  source = seqio.TfdsDataSource(tfds_name=C4_TFDS_NAME, splits=("train", "validation"))
  return register_pretraining_tasks(f"{PREFIX}c4", source, "text", vocabulary_path, denoisers,
                                    documents_per_example=documents_per_example)


gin.external_configurable(register_c4_tasks, module="t5g")


def embedded_documents(split: str) -> list[str]:
  """The embedded corpus's documents of `split` ("train" or "validation")."""
  if split not in ("train", "validation"):
    raise ValueError(f"the embedded corpus has splits 'train' and 'validation', not {split!r}")
  return [document for index, document in enumerate(embedded_corpus.documents())
          if (index % EMBEDDED_VALIDATION_EVERY == EMBEDDED_VALIDATION_EVERY - 1)
          == (split == "validation")]


def _embedded_dataset(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
  documents = embedded_documents(split)
  dataset = tf.data.Dataset.from_tensor_slices({"text": documents})
  return dataset.shuffle(len(documents), seed=seed) if shuffle_files else dataset


def register_embedded_tasks(vocabulary_path: str | None = None,
                            denoisers: Sequence[tuple[Denoiser, float]] = UL2_PAPER) -> list[str]:
  """UL2 / PrefixLM over the embedded corpus (offline; `train` and `validation` splits)."""
  source = seqio.FunctionDataSource(
      _embedded_dataset, splits=("train", "validation"),
      num_input_examples={split: len(embedded_documents(split))
                          for split in ("train", "validation")})
  return register_pretraining_tasks(f"{PREFIX}embedded", source, "text", vocabulary_path,
                                    denoisers, shuffle_buffer_size=EMBEDDED_SHUFFLE_BUFFER_SIZE,
                                    documents_per_example=1)


def _first_line(path: str) -> str:
  with tf.io.gfile.GFile(path) as file:
    for line in file:
      if line.strip():
        return line
  raise InputError(f"data file {path!r} has no non-blank line")


def _jsonl_fields(line: bytes | str, keys: Sequence[str]) -> list[bytes]:
  record = json.loads(line)
  missing = [key for key in keys
             if not isinstance(record, dict) or not isinstance(record.get(key), str)]
  if missing:
    raise InputError(f"jsonl record has no string field {missing[0]!r}: {line[:200]!r}")
  return [record[key].encode("utf-8") for key in keys]


def check_jsonl_files(paths: Sequence[str], keys: Sequence[str]) -> None:
  """Raises, naming the file, if a file's first record lacks one of the string fields `keys`."""
  for path in paths:
    try:
      _jsonl_fields(_first_line(path), keys)
    except ValueError as error:
      raise InputError(f"{path}: {error}") from None


def parse_jsonl(keys: Sequence[str]) -> Callable[[tf.data.Dataset], tf.data.Dataset]:
  """A preprocessor: lines of JSON objects -> examples of their string fields `keys`.

  Blank lines are skipped; a record without one of the fields stops the pipeline with an error.
  """
  def parse(line: tf.Tensor) -> dict[str, tf.Tensor]:
    values = tf.numpy_function(lambda value: _jsonl_fields(value, keys), [line],
                               [tf.string] * len(keys), stateful=False)
    return {key: tf.ensure_shape(value, []) for key, value in zip(keys, values)}

  def preprocess(dataset: tf.data.Dataset) -> tf.data.Dataset:
    dataset = dataset.filter(lambda line: tf.strings.length(tf.strings.strip(line)) > 0)
    return dataset.map(parse, num_parallel_calls=tf.data.AUTOTUNE)
  return preprocess


def user_split_files(name: str, files: str | Sequence[str] | Mapping[str, str | Sequence[str]],
                     jsonl_keys: Sequence[str] = ()) -> dict[str, list[str]]:
  """split -> files of the user's task `name`, checked before anything is registered.

  files: glob pattern(s) for the `train` split, or a mapping split -> pattern(s). Raises on a
  name under t5g's reserved prefix, a pattern matching nothing, an empty file, and (with
  `jsonl_keys`) a first jsonl record without one of those string fields.
  """
  if name.startswith(PREFIX):
    raise InputError(f"task names starting with {PREFIX!r} are reserved for t5g's own tasks")
  split_patterns = files if isinstance(files, Mapping) else {"train": files}
  split_files = {split: check_files(patterns) for split, patterns in split_patterns.items()}
  if jsonl_keys:
    check_jsonl_files([path for paths in split_files.values() for path in paths], jsonl_keys)
  return split_files


def _line_to_text(key: str) -> Callable[[tf.data.Dataset], tf.data.Dataset]:
  return lambda dataset: dataset.map(lambda line: {key: line})


def register_text_tasks(name: str, files: str | Sequence[str] | Mapping[str, str | Sequence[str]],
                        format: str = "text", text_key: str = "text",  # noqa: A002
                        vocabulary_path: str | None = None,
                        denoisers: Sequence[tuple[Denoiser, float]] = UL2_PAPER,
                        documents_per_example: int = DOCUMENTS_PER_EXAMPLE) -> list[str]:
  """Registers UL2 and PrefixLM tasks (and their mixture) over the user's own files.

  files: glob pattern(s) for the `train` split, or a mapping split -> pattern(s).
  format: "text" (one document per line), "jsonl" (one JSON object per line, text under
  `text_key`) or "tfrecord" (tf.train.Example with a bytes feature `text_key`).
  documents_per_example: consecutive documents joined into one stream before the objective.
  Registers `<name>.ul2`, `<name>.prefix_lm`, `<name>.ul2_prefix_lm`; returns these names.
  Missing or empty files, and a first jsonl record without `text_key`, raise here.
  """
  if format not in FILE_FORMATS:
    raise InputError(f"unknown format {format!r}; choose one of {FILE_FORMATS}")
  split_files = user_split_files(name, files, [text_key] if format == "jsonl" else ())
  if format == "tfrecord":
    source = seqio.TFExampleDataSource(
        split_files, feature_description={text_key: tf.io.FixedLenFeature([], tf.string)})
    return register_pretraining_tasks(name, source, text_key, vocabulary_path, denoisers,
                                      documents_per_example=documents_per_example)
  parse = parse_jsonl([text_key]) if format == "jsonl" else _line_to_text(text_key)
  return register_pretraining_tasks(name, seqio.TextLineDataSource(split_files), text_key,
                                    vocabulary_path, denoisers, source_preprocessors=[parse],
                                    documents_per_example=documents_per_example)


gin.external_configurable(register_text_tasks, module="t5g")


def get_task_or_mixture(name: str) -> seqio.Task | seqio.Mixture:
  """The registered task or mixture `name`; an unknown name raises listing close names."""
  known = sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))
  if name in known:
    return seqio.get_mixture_or_task(name)
  close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
  hint = (f"close names: {', '.join(close)}" if close else
          "t5g's tasks: " + ", ".join(n for n in known if n.startswith(PREFIX)))
  raise InputError(f"no seqio task or mixture named {name!r}; {hint}")


register_c4_tasks()
register_embedded_tasks()

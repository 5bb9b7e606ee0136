"""`t5g score`: teacher-forced log-likelihood of targets given inputs, or a classifier's class
log-probabilities, from a jsonl file.

T5Gemma and Gemma 2: each input line holds `inputs` and `targets`, as lists of token ids or as
text (encoded without BOS/EOS by the SentencePiece vocabulary of `text_vocabulary`: the
--vocabulary flag, else the one the checkpoint records). T5Gemma: the encoder reads `inputs`,
the decoder starts from BOS and predicts every target token. Gemma 2: the sequence
[BOS] + inputs + targets is scored on the target tokens only.

Encoder-only classifier: each line holds `inputs` (token ids or text, as above, WITHOUT EOS)
and optionally `label`, an int class index. EOS is appended to every input, as the
classification tasks do in training (`t5g.data.classification_tasks`: text tokens + EOS, the
head reading that EOS's encoder state), so token ids must not already end with EOS.
"""

from __future__ import annotations

import functools
import json
from typing import Any, Callable, Iterable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from t5g.checkpoints import model_dir
from t5g.data import vocabulary as vocabularies
from t5g.errors import InputError
from t5g.model.config import (BOS_ID, EOS_ID, PAD_ID, ClassifierConfig, ComputeConfig,
                              EncoderDecoderConfig, ModelConfig)
from t5g.model.models import make_model

BUCKET = 32  # Lengths are padded up to a multiple of this, to bound recompilation.


class Example(NamedTuple):
  """One line of the input file and its token ids (a classifier's: inputs + EOS, no targets,
  the label or None)."""

  record: dict[str, Any]
  inputs: list[int]
  targets: list[int]
  label: int | None = None


def model_vocab_size(config: ModelConfig) -> int:
  """The number of token ids the model reads (a classifier's: its encoder's)."""
  return config.encoder.vocab_size if isinstance(config, ClassifierConfig) else config.vocab_size


def text_vocabulary(checkpoint: str, step: int, flag: str | None, config: ModelConfig) -> Any:
  """The SentencePiece vocabulary (seqio's, `t5g.data.vocabulary.get_vocabulary`) that encodes
  and decodes text for step `step` of `checkpoint`: the file `flag` (--vocabulary) names when
  given, else the one the step records, else None (text then fails as a bad line).

  Raises:
    FileNotFoundError: the vocabulary file is missing.
    ValueError: its size is not the model's vocab_size (naming the file and both sizes), or it
      is not a Gemma-style SentencePiece model.
  """
  if flag:
    path, named = flag, f"--vocabulary={flag}"
  else:
    recorded = model_dir.read_vocabulary(checkpoint, step)
    if recorded is None:
      return None
    path = vocabularies.vocabulary_file(recorded)
    named = f"{path} (the vocabulary {checkpoint} records)"
  vocabulary = vocabularies.get_vocabulary(path)
  expected = model_vocab_size(config)
  if vocabulary.vocab_size != expected:
    raise InputError(f"{named}: {vocabulary.vocab_size} pieces, but the model of {checkpoint} "
                     f"has vocab_size {expected}; pass the vocabulary it was trained with")
  return vocabulary


def read_examples(path: str, encode: Callable[[str], list[int]] | None = None,
                  config: ModelConfig | None = None) -> list[Example]:
  """Parses the jsonl file; errors name the file, line and field at fault.

  encode: text -> token ids (e.g. `text_vocabulary(...).tokenizer.encode`); None: text fails.
  config: the model scored; a ClassifierConfig reads classifier lines (`inputs`, optional
  `label`), anything else (or None) lines with `inputs` and `targets`.
  """
  examples = []
  with open(path) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{number}"
      try:
        record = json.loads(line)
      except ValueError:
        raise InputError(f"{where}: not valid JSON") from None
      if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object")
      if isinstance(config, ClassifierConfig):
        examples.append(_classifier_example(record, encode, config, where))
        continue
      inputs, targets = (_token_ids(record, field, encode, where)
                         for field in ("inputs", "targets"))
      if not targets:
        raise InputError(f"{where}: 'targets' is empty")
      examples.append(Example(record, inputs, targets))
  if not examples:
    raise InputError(f"{path}: no examples")
  return examples


def _token_ids(record: dict[str, Any], field: str, encode: Callable | None,
               where: str) -> list[int]:
  value = record.get(field)
  if isinstance(value, str):
    if encode is None:
      raise InputError(f"{where}: {field!r} is text; pass --vocabulary (the checkpoint records "
                       "no vocabulary)")
    return encode(value)
  if isinstance(value, list) and all(isinstance(t, int) for t in value):
    return value
  raise InputError(f"{where}: {field!r} must be a list of token ids or text")


def _classifier_example(record: dict[str, Any], encode: Callable | None,
                        config: ClassifierConfig, where: str) -> Example:
  """A classifier line: its input ids + EOS and its label (None when the line has none)."""
  inputs = _token_ids(record, "inputs", encode, where)
  if not inputs:
    raise InputError(f"{where}: 'inputs' is empty")
  vocab = config.encoder.vocab_size
  bad = [t for t in inputs if not 0 < t < vocab]
  if bad:
    raise InputError(f"{where}: 'inputs' has token id {bad[0]} outside [1, {vocab}) (0 is "
                     "padding)")
  if inputs[-1] == EOS_ID:
    raise InputError(f"{where}: 'inputs' ends with EOS (id {EOS_ID}); give the text's tokens "
                     "only: t5g score appends EOS, as the classification tasks do")
  label = record.get("label")
  if "label" in record and (isinstance(label, bool) or not isinstance(label, int)
                            or not 0 <= label < config.num_classes):
    raise InputError(f"{where}: 'label' must be an int in [0, {config.num_classes}), got "
                     f"{label!r}")
  return Example(record, inputs + [EOS_ID], [], label)


def _pad(rows: list[list[int]], length: int) -> np.ndarray:
  out = np.full((len(rows), length), PAD_ID, np.int32)
  for i, row in enumerate(rows):
    out[i, :len(row)] = row
  return out


def _bucket(n: int) -> int:
  return max(BUCKET, -(-n // BUCKET) * BUCKET)


@functools.partial(jax.jit, static_argnums=0)
def _token_log_probs(model, params, inputs, targets, weights):
  if isinstance(model.config, EncoderDecoderConfig):
    decoder_inputs = jnp.concatenate(
        [jnp.full_like(targets[:, :1], BOS_ID), targets[:, :-1]], axis=1)
    decoder_inputs = jnp.where(weights > 0, decoder_inputs, PAD_ID)
    logits = model.apply({"params": params}, inputs, decoder_inputs)
  else:
    logits = model.apply({"params": params}, inputs)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  return picked * weights


@functools.partial(jax.jit, static_argnums=0)
def _class_log_probs(model, params, inputs):
  """Right-padded inputs [B, S] -> float32 class log-probabilities [B, C]."""
  return jax.nn.log_softmax(model.apply({"params": params}, inputs), axis=-1)


def _classify(model, params, batch: list[Example]) -> Iterator[dict[str, Any]]:
  inputs = _pad([e.inputs for e in batch], _bucket(max(len(e.inputs) for e in batch)))
  for row, example in zip(np.asarray(_class_log_probs(model, params, inputs)), batch):
    out = {**example.record, "class_log_probs": row.tolist(), "prediction": int(np.argmax(row))}
    if example.label is not None:
      out["log_likelihood"] = float(row[example.label])
    yield out


def score(params, config: ModelConfig, examples: Iterable[Example], batch_size: int = 8,
          scanned: bool = False) -> Iterator[dict[str, Any]]:
  """Yields each record with, for T5Gemma and Gemma 2, `token_log_probs` (one per target token)
  and `log_likelihood` (their sum); for a classifier, `class_log_probs` [C], `prediction` (the
  argmax class) and, when the record has a `label`, `log_likelihood` = log p(label)."""
  model = make_model(config, ComputeConfig(jnp.float32, jnp.float32, scan_layers=scanned))
  examples = list(examples)
  for start in range(0, len(examples), batch_size):
    batch = examples[start:start + batch_size]
    if isinstance(config, ClassifierConfig):
      yield from _classify(model, params, batch)
      continue
    if isinstance(config, EncoderDecoderConfig):
      inputs = _pad([e.inputs for e in batch], _bucket(max(len(e.inputs) for e in batch)))
      length = _bucket(max(len(e.targets) for e in batch))
      targets = _pad([e.targets for e in batch], length)
      weights = _pad([[1] * len(e.targets) for e in batch], length)
      offsets = [0] * len(batch)
    else:
      sequences = [[BOS_ID] + e.inputs + e.targets for e in batch]
      length = _bucket(max(len(s) for s in sequences))
      inputs = _pad([s[:-1] for s in sequences], length)
      targets = _pad([s[1:] for s in sequences], length)
      offsets = [len(e.inputs) for e in batch]
      weights = _pad([[0] * o + [1] * len(e.targets) for o, e in zip(offsets, batch)], length)
    scores = np.asarray(_token_log_probs(model, params, inputs, targets,
                                         weights.astype(np.float32)))
    for row, offset, example in zip(scores, offsets, batch):
      token_log_probs = row[offset:offset + len(example.targets)].tolist()
      yield {**example.record, "token_log_probs": token_log_probs,
             "log_likelihood": float(np.sum(token_log_probs))}

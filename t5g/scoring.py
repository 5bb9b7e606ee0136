"""`t5g score`: teacher-forced log-likelihood of targets given inputs, from a jsonl file.

Each input line holds `inputs` and `targets`, as lists of token ids or as text (text needs a
SentencePiece vocabulary; it is encoded without BOS/EOS). T5Gemma: the encoder reads `inputs`,
the decoder starts from BOS and predicts every target token. Gemma 2: the sequence
[BOS] + inputs + targets is scored on the target tokens only.
"""

from __future__ import annotations

import functools
import json
from typing import Any, Iterable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from t5g.model.config import BOS_ID, PAD_ID, ComputeConfig, EncoderDecoderConfig, ModelConfig
from t5g.model.models import make_model

BUCKET = 32  # Lengths are padded up to a multiple of this, to bound recompilation.


class Example(NamedTuple):
  """One line of the input file and its token ids."""

  record: dict[str, Any]
  inputs: list[int]
  targets: list[int]


def read_examples(path: str, vocabulary_path: str | None = None) -> list[Example]:
  """Parses the jsonl file; errors name the file, line and field at fault."""
  encode = None
  if vocabulary_path:
    import sentencepiece as spm
    processor = spm.SentencePieceProcessor(model_file=vocabulary_path)
    encode = processor.encode
  examples = []
  with open(path) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except ValueError:
        raise ValueError(f"{path}:{number}: not valid JSON") from None
      ids = {}
      for field in ("inputs", "targets"):
        value = record.get(field)
        if isinstance(value, str):
          if encode is None:
            raise ValueError(f"{path}:{number}: {field!r} is text; pass --vocabulary")
          ids[field] = encode(value)
        elif isinstance(value, list) and all(isinstance(t, int) for t in value):
          ids[field] = value
        else:
          raise ValueError(f"{path}:{number}: {field!r} must be a list of token ids or text")
      if not ids["targets"]:
        raise ValueError(f"{path}:{number}: 'targets' is empty")
      examples.append(Example(record, ids["inputs"], ids["targets"]))
  if not examples:
    raise ValueError(f"{path}: no examples")
  return examples


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


def score(params, config: ModelConfig, examples: Iterable[Example], batch_size: int = 8,
          scanned: bool = False) -> Iterator[dict[str, Any]]:
  """Yields each record with `token_log_probs` (one per target token) and `log_likelihood`."""
  model = make_model(config, ComputeConfig(jnp.float32, jnp.float32, scan_layers=scanned))
  examples = list(examples)
  for start in range(0, len(examples), batch_size):
    batch = examples[start:start + batch_size]
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

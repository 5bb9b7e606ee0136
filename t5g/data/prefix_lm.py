"""The PrefixLM objective of T5Gemma as a seqio preprocessor: a sequence's first part is the input.

T5Gemma (§3.3) splits each sequence into two equal halves, the first half the encoder input and
the second the decoder target (default lengths 4096/4096). `split="random"` instead picks the
split point uniformly. The preprocessor takes examples with a tokenized `targets` feature (int32
ids, no EOS yet) and returns examples with `inputs` and `targets` only.

Cutting: a sequence longer than a chunk is cut into consecutive chunks, each split on its own,
so no token is dropped (only the last chunk is shorter). A chunk holds at most
min(2·I + 1, 2·T) tokens for "half" (the inputs get floor(n/2), the targets the rest) and I + T
for "random", where I and T are the feature lengths less one for each feature that gets an EOS
(`usable_lengths`). Place it before `seqio.preprocessors.append_eos_after_trim`, which then
appends the EOS without trimming anything.
"""

from __future__ import annotations

from typing import Mapping

import seqio
import tensorflow as tf

from t5g.errors import InputError

SPLITS = ("half", "random")


def usable_lengths(sequence_length: Mapping[str, int],
                   output_features: Mapping[str, seqio.Feature]) -> tuple[int, int]:
  """The (inputs, targets) token budgets: the feature lengths, less one where EOS will be added.

  Raises:
    ValueError: a length is missing or leaves no room for a token.
  """
  budgets = []
  for key in ("inputs", "targets"):
    if key not in sequence_length or key not in output_features:
      raise InputError(f"the objective needs an {key!r} feature and length; got lengths "
                       f"{dict(sequence_length)} and features {sorted(output_features)}")
    budget = sequence_length[key] - int(output_features[key].add_eos)
    if budget < 1:
      raise InputError(f"sequence length {key}={sequence_length[key]} leaves no room for a token"
                       f"{' before the EOS' if output_features[key].add_eos else ''}")
    budgets.append(budget)
  return budgets[0], budgets[1]


def concatenate_documents(dataset: tf.data.Dataset, documents_per_example: int) -> tf.data.Dataset:
  """Joins the `targets` of each run of `documents_per_example` consecutive examples into one.

  The tokens are joined with no separator (as T5's `reduce_concat_tokens` does), so that the
  objectives cut long sequences instead of many short ones; other features are dropped.

  Raises:
    ValueError: `documents_per_example` < 1.
  """
  if documents_per_example < 1:
    raise InputError(f"documents_per_example must be >= 1, got {documents_per_example}")
  targets = dataset.map(lambda example: tf.cast(example["targets"], tf.int32))
  return targets.ragged_batch(documents_per_example).map(
      lambda batch: {"targets": batch.flat_values})


def cut_into_chunks(dataset: tf.data.Dataset, chunk_length: int) -> tf.data.Dataset:
  """Each example's `targets` cut into consecutive chunks of `chunk_length` tokens (last shorter).

  Returns a dataset of int32 token vectors; empty examples give none.
  """
  @tf.autograph.experimental.do_not_convert  # Plain TF ops: skip autograph's slow tracing.
  def cut(example):
    tokens = tf.cast(example["targets"], tf.int32)
    length = tf.size(tokens)
    full, rest = length // chunk_length, length % chunk_length
    lengths = tf.concat([tf.fill([full], chunk_length), tf.fill([tf.minimum(rest, 1)], rest)], 0)
    return tf.RaggedTensor.from_row_lengths(tokens, lengths)

  return dataset.map(cut, num_parallel_calls=tf.data.AUTOTUNE).unbatch()


def prefix_lm(dataset: tf.data.Dataset, sequence_length: Mapping[str, int],
              output_features: Mapping[str, seqio.Feature],
              split: str = "half") -> tf.data.Dataset:
  """PrefixLM: each chunk's first part → `inputs`, the rest → `targets` (module docstring).

  With `split="random"` the number of input tokens is uniform over the values for which both
  parts fit and are non-empty (a 1-token chunk goes to the targets); its randomness comes from
  seqio's seed (`seqio.map_seed_manager`, set by `Task.get_dataset(seed=...)`).

  Raises:
    ValueError: an unknown `split`, or lengths with no room for a token.
  """
  if split not in SPLITS:
    raise InputError(f"unknown PrefixLM split {split!r}; choose one of {SPLITS}")
  max_inputs, max_targets = usable_lengths(sequence_length, output_features)
  if split == "half":
    chunks = cut_into_chunks(dataset, min(2 * max_inputs + 1, 2 * max_targets))
    return chunks.map(
        tf.autograph.experimental.do_not_convert(
            lambda tokens: _split_at(tokens, tf.size(tokens) // 2)),
        num_parallel_calls=tf.data.AUTOTUNE)

  @seqio.map_over_dataset(num_seeds=1)
  @tf.autograph.experimental.do_not_convert
  def split_randomly(tokens, seed):
    length = tf.size(tokens)
    lowest = tf.maximum(tf.minimum(1, length - 1), length - max_targets)
    highest = tf.minimum(max_inputs, tf.maximum(length - 1, 0))
    split_point = tf.random.stateless_uniform(
        [], seed, minval=lowest, maxval=highest + 1, dtype=tf.int32)
    return _split_at(tokens, split_point)

  return split_randomly(cut_into_chunks(dataset, max_inputs + max_targets))


def _split_at(tokens: tf.Tensor, split_point: tf.Tensor) -> dict[str, tf.Tensor]:
  """The tokens before `split_point` as inputs, the rest as targets."""
  return {"inputs": tokens[:split_point], "targets": tokens[split_point:]}

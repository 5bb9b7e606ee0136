"""Per-host training input: sharded, seeded, deterministic, batched, and resumable.

Each host calls `InputIterator(config, seqio.ShardInfo(jax.process_index(), jax.process_count()))`
with the same `InputConfig` and receives its own `batch_size` rows of every global batch, as
numpy arrays keyed by model feature name (see `t5g.data.feature_converters`).

Determinism. With a fixed `seed`, the order of examples, the preprocessors' random draws
(seqio derives them from the seed) and the mixture sampling are fixed, and tf.data is told to
keep its parallel maps in order. The seed is shared by all hosts, as in T5X: where a source has
fewer files than hosts, seqio shards after reading, and the hosts must read in the same order for
their shards to be disjoint. A consequence (T5X's too): the k-th example of every host gets the
same random draws, e.g. the same denoiser and noise pattern when the lengths agree.

Resumption. The state is a small JSON dict, the same on every host: the configuration it belongs
to and the number of batches this host has consumed. Restoring rebuilds the pipeline and skips
that many batches inside tf.data, so a resumed run sees exactly the batches it would have seen.
The skip recomputes the skipped batches (no model work), so restoring costs the pipeline's time
for them; `benchmarks/data_pipeline.py` prints that rate.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import gin
import numpy as np
import seqio
import tensorflow as tf

from t5g.data import classification_tasks, feature_converters, finetune_tasks  # noqa: F401
from t5g.data.tasks import get_task_or_mixture
from t5g.errors import InputError

FEATURE_CONVERTERS = {
    "encoder_decoder": feature_converters.EncDecFeatureConverter,
    "lm": feature_converters.LMFeatureConverter,
    "prefix_lm": feature_converters.PrefixLMFeatureConverter,
    "classification": classification_tasks.ClassificationFeatureConverter,  # never packs
}
STATE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class InputConfig:
  """What every host reads; identical on all hosts.

  mixture_or_task_name: a registered seqio task or mixture (see `t5g.data.tasks`).
  task_feature_lengths: e.g. {"inputs": 8192, "targets": 8192}.
  batch_size: rows per host per step (the global batch divided by the number of hosts).
  feature_converter: "encoder_decoder" (T5Gemma), "lm" or "prefix_lm" (decoder-only Gemma 2),
    "classification" (the encoder-only classifier; `pack` must be False).
  num_epochs: None repeats forever (training); 1 reads the split once.
  """

  mixture_or_task_name: str
  task_feature_lengths: Mapping[str, int]
  batch_size: int
  split: str = "train"
  seed: int = 0
  shuffle: bool = True
  pack: bool = True
  feature_converter: str = "encoder_decoder"
  num_epochs: int | None = None

  def __post_init__(self):
    if self.batch_size < 1:
      raise InputError(f"batch_size must be at least 1, got {self.batch_size}")
    if self.feature_converter not in FEATURE_CONVERTERS:
      raise InputError(f"unknown feature_converter {self.feature_converter!r}; "
                       f"choose one of {sorted(FEATURE_CONVERTERS)}")
    if not isinstance(self.seed, int):
      raise InputError(f"seed must be an int (a fixed seed), got {self.seed!r}")

  def describe(self) -> dict[str, Any]:
    """The configuration as JSON-serialisable values (what a saved state must agree with)."""
    described = dataclasses.asdict(self)
    described["task_feature_lengths"] = dict(sorted(self.task_feature_lengths.items()))
    return described


gin.external_configurable(InputConfig, module="t5g")


def _check_shard(shard_info: seqio.ShardInfo) -> None:
  if shard_info.num_shards < 1 or not 0 <= shard_info.index < shard_info.num_shards:
    raise ValueError(f"invalid shard {shard_info.index} of {shard_info.num_shards}")


def make_dataset(config: InputConfig, shard_info: seqio.ShardInfo,
                 batches_to_skip: int = 0) -> tf.data.Dataset:
  """This host's batched model-feature dataset, starting after `batches_to_skip` batches.

  Batches have exactly `config.batch_size` rows (a last partial batch is dropped).
  """
  _check_shard(shard_info)
  converter = FEATURE_CONVERTERS[config.feature_converter](pack=config.pack)
  lengths = dict(config.task_feature_lengths)
  # What seqio.get_dataset does, without its in-memory cache of small sources: that cache needs
  # the source's size, which TFDS mock data does not know, and training sources are large.
  # One host reads everything: no shard, so seqio need not list the source's files either.
  dataset = get_task_or_mixture(config.mixture_or_task_name).get_dataset(
      lengths, split=config.split, shuffle=config.shuffle, num_epochs=config.num_epochs,
      shard_info=shard_info if shard_info.num_shards > 1 else None, seed=config.seed,
      try_in_mem_cache=False)
  dataset = converter(dataset, task_feature_lengths=lengths).batch(config.batch_size,
                                                                   drop_remainder=True)
  if batches_to_skip:
    dataset = dataset.skip(batches_to_skip)
  options = tf.data.Options()
  options.deterministic = True
  return dataset.with_options(options).prefetch(tf.data.AUTOTUNE)


class InputIterator(Iterator[dict[str, np.ndarray]]):
  """This host's batches (dicts of numpy arrays) with a saveable, restorable position.

  state: a dict from `state()` of an earlier run with the same configuration and number of
  hosts; iteration then continues with the batch that run would have read next.
  """

  def __init__(self, config: InputConfig, shard_info: seqio.ShardInfo,
               state: Mapping[str, Any] | None = None):
    self._config = config
    self._num_shards = shard_info.num_shards
    self._consumed = 0 if state is None else self._checked_position(state)
    self._batches = make_dataset(config, shard_info, self._consumed).as_numpy_iterator()

  def _expected_state(self, batches_consumed: int) -> dict[str, Any]:
    return {"version": STATE_VERSION, **self._config.describe(), "num_shards": self._num_shards,
            "batches_consumed": batches_consumed}

  def _checked_position(self, state: Mapping[str, Any]) -> int:
    consumed = state.get("batches_consumed")
    if not isinstance(consumed, int) or consumed < 0:
      raise InputError(f"input state has no valid batches_consumed: {dict(state)!r}")
    expected = self._expected_state(consumed)
    differing = sorted(key for key in set(expected) | set(state)
                       if expected.get(key) != state.get(key))
    if differing:
      details = "; ".join(f"{key}: saved {state.get(key)!r}, now {expected.get(key)!r}"
                          for key in differing)
      raise InputError("input state was saved for a different input pipeline, so resuming "
                       f"would not reproduce its batches ({details})")
    return consumed

  def state(self) -> dict[str, Any]:
    """JSON-serialisable position: the configuration and the number of batches consumed."""
    return self._expected_state(self._consumed)

  @property
  def batches_consumed(self) -> int:
    """Number of batches returned so far, counting those skipped on restore."""
    return self._consumed

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._batches)
    self._consumed += 1
    return batch

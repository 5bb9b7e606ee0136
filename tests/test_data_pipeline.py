"""Feature conversion and the training input: packing, BOS-started decoders, sharding, resuming."""

import collections
import json

import jax.numpy as jnp
import numpy as np
import pytest
import seqio
import tensorflow as tf

from t5g.data import feature_converters, pipeline, tasks
from t5g.model.config import BOS_ID, EOS_ID
from t5g.model.masks import positions_from_segments

UL2_LENGTHS = {"inputs": 512, "targets": 512}  # UL2_PAPER's μ=64 spans need about this much
SHORT_LENGTHS = {"inputs": 64, "targets": 64}


def _task_dataset(name, lengths, split="validation"):
  return seqio.get_mixture_or_task(name).get_dataset(lengths, split=split, shuffle=False,
                                                     seed=0, num_epochs=1)


def _task_examples(name, lengths):
  return [(ex["inputs"].tolist(), ex["targets"].tolist())
          for ex in _task_dataset(name, lengths).as_numpy_iterator()]


def _segments(tokens, segment_ids):
  """Token lists of the segments (ids > 0) of one packed row, in order."""
  return [tokens[segment_ids == segment].tolist()
          for segment in np.unique(segment_ids[segment_ids > 0])]


def _check_positions(positions, segment_ids):
  real = segment_ids > 0
  expected = np.asarray(positions_from_segments(jnp.asarray(segment_ids[None])))[0]
  np.testing.assert_array_equal(positions[real], expected[real])
  assert not positions[~real].any()


@pytest.mark.parametrize("task_name, lengths, packed_lengths", [
    ("t5g.embedded.ul2", UL2_LENGTHS, UL2_LENGTHS),
    ("t5g.embedded.prefix_lm", SHORT_LENGTHS, {"inputs": 160, "targets": 160})])
def test_encoder_decoder_packing_loses_no_token(task_name, lengths, packed_lengths):
  examples = _task_examples(task_name, lengths)
  converter = feature_converters.EncDecFeatureConverter(pack=True)
  rows = list(converter(_task_dataset(task_name, lengths), packed_lengths).as_numpy_iterator())
  assert len(rows) < len(examples), "nothing was packed"
  packed = []
  for row in rows:
    encoder_segments = _segments(row["encoder_input_tokens"], row["encoder_segment_ids"])
    targets = _segments(row["decoder_target_tokens"], row["decoder_segment_ids"])
    decoder_inputs = _segments(row["decoder_input_tokens"], row["decoder_segment_ids"])
    packed += list(zip(encoder_segments, targets))
    for segment_targets, segment_inputs in zip(targets, decoder_inputs):
      assert segment_inputs == [BOS_ID] + segment_targets[:-1]
    real = row["decoder_segment_ids"] > 0
    np.testing.assert_array_equal(row["decoder_loss_weights"], real)
    assert not row["decoder_input_tokens"][~real].any()
    assert not row["encoder_input_tokens"][row["encoder_segment_ids"] == 0].any()
    _check_positions(row["encoder_positions"], row["encoder_segment_ids"])
    _check_positions(row["decoder_positions"], row["decoder_segment_ids"])
  assert packed == examples


def test_unpacked_decoder_inputs_start_with_bos():
  examples = _task_examples("t5g.embedded.prefix_lm", SHORT_LENGTHS)
  converter = feature_converters.EncDecFeatureConverter(pack=False)
  rows = list(converter(_task_dataset("t5g.embedded.prefix_lm", SHORT_LENGTHS),
                        SHORT_LENGTHS).as_numpy_iterator())
  assert len(rows) == len(examples)
  assert set(rows[0]) == {"encoder_input_tokens", "decoder_input_tokens",
                          "decoder_target_tokens", "decoder_loss_weights"}
  for row, (inputs, targets) in zip(rows, examples):
    assert row["encoder_input_tokens"].tolist() == inputs + [0] * (64 - len(inputs))
    assert row["decoder_target_tokens"].tolist() == targets + [0] * (64 - len(targets))
    expected_inputs = [BOS_ID] + targets[:-1]
    assert row["decoder_input_tokens"].tolist() == expected_inputs + [0] * (64 - len(targets))
    assert row["decoder_loss_weights"].tolist() == [1] * len(targets) + [0] * (64 - len(targets))


@pytest.mark.parametrize("pack", [True, False])
def test_decoder_only_converters(pack):
  examples = _task_examples("t5g.embedded.prefix_lm", SHORT_LENGTHS)
  prefix_rows = list(feature_converters.PrefixLMFeatureConverter(pack=pack)(
      _task_dataset("t5g.embedded.prefix_lm", SHORT_LENGTHS), SHORT_LENGTHS).as_numpy_iterator())
  joined = _task_dataset("t5g.embedded.prefix_lm", SHORT_LENGTHS).map(
      lambda ex: {"targets": tf.concat([ex["inputs"], ex["targets"]], 0)})
  lm_rows = list(feature_converters.LMFeatureConverter(pack=pack)(
      joined, {"targets": 128}).as_numpy_iterator())
  for rows, loss_on_inputs in ((prefix_rows, False), (lm_rows, True)):
    sequences, weights = [], []
    for row in rows:
      assert "decoder_causal_attention" not in row
      segment_ids = row.get("decoder_segment_ids", (row["decoder_target_tokens"] != 0) * 1)
      targets = _segments(row["decoder_target_tokens"], segment_ids)
      inputs = _segments(row["decoder_input_tokens"], segment_ids)
      sequences += targets
      weights += _segments(row["decoder_loss_weights"], segment_ids)
      assert all(i == [BOS_ID] + t[:-1] for i, t in zip(inputs, targets))
      assert not row["decoder_input_tokens"][segment_ids == 0].any()
      if pack:
        _check_positions(row["decoder_positions"], segment_ids)
    assert sequences == [inputs + targets for inputs, targets in examples]
    assert weights == [[int(loss_on_inputs)] * len(inputs) + [1] * len(targets)
                       for inputs, targets in examples]


def test_packing_rejects_an_empty_feature():
  dataset = tf.data.Dataset.from_generator(
      lambda: iter([{"inputs": [5, 6], "targets": [7, EOS_ID]},
                    {"inputs": [], "targets": [8, EOS_ID]}]),
      output_signature={"inputs": tf.TensorSpec([None], tf.int32),
                        "targets": tf.TensorSpec([None], tf.int32)})
  converted = feature_converters.EncDecFeatureConverter(pack=True)(dataset, SHORT_LENGTHS)
  with pytest.raises(tf.errors.InvalidArgumentError, match="no inputs token cannot be packed"):
    list(converted.as_numpy_iterator())


def _example_counts(config, shard):
  counts = collections.Counter()
  for batch in pipeline.InputIterator(config, shard):
    counts[(tuple(batch["encoder_input_tokens"][0]), tuple(batch["decoder_target_tokens"][0]))] += 1
  return counts


@pytest.fixture(scope="module")
def four_text_files(tmp_path_factory):
  folder = tmp_path_factory.mktemp("shards")
  documents = [" ".join(document.split()) for document in tasks.embedded_documents("validation")]
  for index in range(4):
    (folder / f"part-{index}.txt").write_text("\n".join(documents[index::4]) + "\n")
  # Documents alone: joined runs depend on which documents a shard holds, so sharded and
  # unsharded examples would differ even though the documents split exactly.
  tasks.register_text_tasks("sharding_test", str(folder / "part-*.txt"), documents_per_example=1)
  return "sharding_test.prefix_lm"


@pytest.mark.parametrize("source", ["examples", "files"])
def test_shards_are_disjoint_and_cover_the_split(source, four_text_files):
  name, split = (("t5g.embedded.prefix_lm", "validation") if source == "examples"
                 else (four_text_files, "train"))
  config = pipeline.InputConfig(name, SHORT_LENGTHS, batch_size=1, split=split, seed=3,
                                pack=False, num_epochs=1)
  everything = _example_counts(config, seqio.ShardInfo(0, 1))
  first, second = (_example_counts(config, seqio.ShardInfo(index, 2)) for index in (0, 1))
  assert first and second and not set(first) & set(second)
  assert first + second == everything


def _take(iterator, count):
  return [next(iterator) for _ in range(count)]


def test_resumed_iterator_sees_the_same_batches():
  config = pipeline.InputConfig("t5g.embedded.ul2_prefix_lm", UL2_LENGTHS, batch_size=2, seed=5)
  shard = seqio.ShardInfo(1, 2)
  uninterrupted = pipeline.InputIterator(config, shard)
  _take(uninterrupted, 2)
  state = json.loads(json.dumps(uninterrupted.state()))
  after = _take(uninterrupted, 3)
  resumed = pipeline.InputIterator(config, shard, state=state)
  for expected, batch in zip(after, _take(resumed, 3)):
    assert expected.keys() == batch.keys()
    for key in expected:
      np.testing.assert_array_equal(batch[key], expected[key])
  assert resumed.state() == uninterrupted.state() and resumed.batches_consumed == 5
  with pytest.raises(ValueError, match="batch_size: saved 2, now 4"):
    pipeline.InputIterator(pipeline.InputConfig("t5g.embedded.ul2_prefix_lm", UL2_LENGTHS,
                                                 batch_size=4, seed=5), shard, state=state)
  with pytest.raises(ValueError, match="num_shards"):
    pipeline.InputIterator(config, seqio.ShardInfo(0, 4), state=state)


def test_input_config_rejects_bad_values():
  with pytest.raises(ValueError, match="feature_converter"):
    pipeline.InputConfig("t5g.embedded.ul2", UL2_LENGTHS, batch_size=2, feature_converter="x")
  with pytest.raises(ValueError, match="batch_size"):
    pipeline.InputConfig("t5g.embedded.ul2", UL2_LENGTHS, batch_size=0)
  with pytest.raises(ValueError, match="invalid shard 2 of 2"):
    pipeline.make_dataset(pipeline.InputConfig("t5g.embedded.ul2", UL2_LENGTHS, batch_size=2),
                          seqio.ShardInfo(2, 2))


def test_documents_are_joined_before_the_objective(tmp_path):
  lines = [" ".join(document.split()[:12]) for document in tasks.embedded_documents("train")[:6]]
  path = tmp_path / "short.txt"
  path.write_text("\n".join(lines) + "\n")
  vocabulary = seqio.get_mixture_or_task("t5g.embedded.ul2").output_features["targets"].vocabulary
  tokens = [vocabulary.encode(line) for line in lines]
  lengths = {"inputs": 256, "targets": 256}  # every joined run fits one chunk
  for per_example in (1, 3):
    tasks.register_text_tasks(f"joined_{per_example}", str(path),
                              documents_per_example=per_example)
    examples = [ex["inputs"].tolist() + ex["targets"].tolist()[:-1] for ex in
                _task_dataset(f"joined_{per_example}.prefix_lm", lengths, split="train")
                .as_numpy_iterator()]
    expected = [sum(tokens[i:i + per_example], []) for i in range(0, len(tokens), per_example)]
    assert examples == expected
  with pytest.raises(ValueError, match="documents_per_example"):
    tasks.register_text_tasks("joined_0", str(path), documents_per_example=0)


def test_c4_pipeline_on_tfds_mock_data():
  """The C4 tasks (TFDS source, its `text` feature, both objectives and converters) give real
  batches on TFDS mock data. Registered again with one document per example for the test: the
  default 128 joined documents per example would make the first batches take several times
  longer (joining itself: test_documents_are_joined_before_the_objective)."""
  import tensorflow_datasets as tfds
  tasks.register_c4_tasks(documents_per_example=1)
  try:
    with tfds.testing.mock_data(num_examples=8):
      for converter, name in [("encoder_decoder", "t5g.c4.ul2_prefix_lm"),
                              ("prefix_lm", "t5g.c4.prefix_lm")]:
        config = pipeline.InputConfig(name, UL2_LENGTHS, batch_size=2, split="validation",
                                      shuffle=False, feature_converter=converter)
        batch = next(pipeline.InputIterator(config, seqio.ShardInfo(0, 1)))
        tokens = batch["decoder_target_tokens"]
        assert tokens.shape[0] == 2 and (tokens[:, 0] > 0).all()
  finally:
    tasks.register_c4_tasks()  # The defaults again, for the tests after this one.

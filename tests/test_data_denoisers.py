"""UL2 denoisers and PrefixLM on real text: the embedded corpus with the embedded vocabulary.

The statistics runs tag each denoiser of a preset with a mode token of its own (reserved pieces
`<unused64>`…), so that every example says which denoiser made it; the denoisers are otherwise
the presets' own.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import seqio
import tensorflow as tf

from t5g.data import denoisers, embedded_corpus, prefix_lm
from t5g.data.vocabulary import SpecialTokens, get_vocabulary

LENGTH = 1024  # Both features; each gets an EOS, so the budgets are 1023.
NUM_EXAMPLES = 10_000
VOCABULARY_SIZE = 512
SEED = 17


@pytest.fixture(scope="module")
def vocabulary():
  return get_vocabulary()


@pytest.fixture(scope="module")
def documents(vocabulary):
  """The corpus as token arrays, one per document."""
  return [np.array(vocabulary.encode(text), np.int32) for text in embedded_corpus.documents()]


def features(vocabulary, add_eos=True):
  return {key: seqio.Feature(vocabulary, add_eos=add_eos) for key in ("inputs", "targets")}


def as_dataset(token_arrays):
  tokens = tf.RaggedTensor.from_row_lengths(
      np.concatenate(token_arrays), [len(array) for array in token_arrays])
  return tf.data.Dataset.from_tensor_slices({"targets": tokens})


def run_objective(objective, dataset, seed=SEED, take=None, **kwargs):
  """The objective's examples as (inputs, targets) numpy pairs, with seqio's seeds fixed."""
  with seqio.map_seed_manager(seed):
    output = objective(dataset, **kwargs)
  if take:
    output = output.take(take)
  examples = []
  for batch in output.ragged_batch(1000).as_numpy_iterator():  # Fewer, bigger fetches.
    examples += zip(batch["inputs"], batch["targets"])
  return examples


def tagged(preset):
  """The preset with denoiser i renamed to mode "D{i}", and special tokens that know the tags."""
  tags = tuple((f"D{index}", f"<unused{64 + index}>") for index in range(len(preset)))
  mixture = tuple((dataclasses.replace(denoiser, mode=name), rate)
                  for (denoiser, rate), (name, _) in zip(preset, tags))
  return mixture, SpecialTokens(modes=SpecialTokens().modes + tags)


def reconstruct(inputs, targets, sentinel_ids):
  """The chunk's tokens and span count from (inputs without the mode token, targets).

  Checks the layout on the way: the j-th sentinel of both is sentinel j mod n, spans and the
  text between them are non-empty, and the chunk ends in a span.
  """
  is_sentinel = np.zeros(VOCABULARY_SIZE, bool)  # A lookup table: faster than np.isin.
  is_sentinel[sentinel_ids] = True
  input_marks = np.flatnonzero(is_sentinel[inputs])
  is_target_mark = is_sentinel[targets]
  target_marks = np.flatnonzero(is_target_mark)
  if not target_marks.size:  # The S-denoiser: a plain split.
    assert not input_marks.size
    return np.concatenate([inputs, targets]), 0
  spans = len(target_marks)
  assert target_marks[0] == 0 and len(input_marks) == spans
  assert input_marks[-1] == len(inputs) - 1
  expected = sentinel_ids[np.arange(spans) % len(sentinel_ids)]
  np.testing.assert_array_equal(inputs[input_marks], expected)
  np.testing.assert_array_equal(targets[target_marks], expected)
  assert (np.diff(np.append(target_marks, len(targets))) >= 2).all()
  assert (np.diff(input_marks) >= 2).all()
  # A stable sort puts each span's tokens where its sentinel stands in the inputs.
  keys = np.concatenate([np.arange(len(inputs)), input_marks[np.cumsum(is_target_mark) - 1]])
  merged = np.concatenate([inputs, targets])[np.argsort(keys, kind="stable")]
  return merged[~is_sentinel[merged]], spans


@pytest.fixture(scope="module", params=["UL2_PAPER", "T5GEMMA2"])
def preset_run(request, vocabulary, documents):
  """≥ 10,000 examples of a tagged preset over the corpus joined into one repeated stream."""
  preset = getattr(denoisers, request.param)
  mixture, special_tokens = tagged(preset)
  stream = prefix_lm.concatenate_documents(as_dataset(documents), len(documents))
  examples = run_objective(
      denoisers.ul2_objective, stream.repeat(), take=NUM_EXAMPLES,
      sequence_length={"inputs": LENGTH, "targets": LENGTH},
      output_features=features(vocabulary), denoisers=mixture, special_tokens=special_tokens)
  return preset, special_tokens, examples


def test_concatenate_documents_joins_every_token(documents):
  joined = prefix_lm.concatenate_documents(as_dataset(documents), 30)
  parts = [example["targets"] for example in joined.as_numpy_iterator()]
  assert len(parts) == 3
  np.testing.assert_array_equal(np.concatenate(parts), np.concatenate(documents))


def test_ul2_is_lossless_and_measures_as_specified(preset_run, vocabulary, documents):
  preset, special_tokens, examples = preset_run
  sentinel_ids = np.array(
      special_tokens.sentinel_ids(vocabulary, len(special_tokens.sentinels)))
  tag_ids = [special_tokens.mode_id(vocabulary, f"D{index}") for index in range(len(preset))]
  mode_ids = [special_tokens.mode_id(vocabulary, name) for name, _ in special_tokens.modes]
  stream = np.concatenate(documents)
  assert not np.isin(stream, np.append(sentinel_ids, mode_ids)).any()
  is_mode = np.zeros(VOCABULARY_SIZE, bool)
  is_mode[mode_ids] = True
  totals = np.zeros((len(preset), 4))  # examples, tokens, noise tokens, spans · μ
  rebuilt = []
  for inputs, targets in examples:
    assert len(inputs) <= LENGTH - 1 and len(targets) <= LENGTH - 1
    index = tag_ids.index(inputs[0])
    assert not is_mode[inputs[1:]].any() and not is_mode[targets].any()
    denoiser = preset[index][0]
    tokens, spans = reconstruct(inputs[1:], targets, sentinel_ids)
    rebuilt.append(tokens)
    length = len(tokens)
    noise = len(targets) - spans
    if denoiser.prefix_lm:
      assert spans == 0 and 1 <= noise <= denoiser.noise_tokens(length)
    else:
      assert noise == denoiser.noise_tokens(length) and 1 <= spans <= denoiser.most_spans(length)
    mean = denoiser.span_fraction * length if denoiser.span_fraction else denoiser.mean_span_length
    totals[index] += (1, length, noise, spans * mean)
  rebuilt = np.concatenate(rebuilt)
  passes = -(-len(rebuilt) // len(stream))
  np.testing.assert_array_equal(rebuilt, np.tile(stream, passes)[:len(rebuilt)])
  rates = np.array([rate for _, rate in preset])
  shares = totals[:, 0] / totals[:, 0].sum()
  np.testing.assert_allclose(shares, rates / rates.sum(), atol=0.02)
  for (denoiser, _), (_, tokens, noise, expected_noise) in zip(preset, totals):
    if denoiser.prefix_lm:
      continue  # Its target fraction is random per example; measured in its own test below.
    assert abs(noise / tokens - denoiser.noise_density) <= 0.01, denoiser
    assert abs(noise / expected_noise - 1) <= 0.05, denoiser  # Mean span length vs μ.


def test_s_denoiser_target_fraction(vocabulary, documents):
  s_denoiser = denoisers.UL2_PAPER[-1][0]
  mode_s = SpecialTokens().mode_id(vocabulary, "S")
  stream = prefix_lm.concatenate_documents(as_dataset(documents), len(documents))
  with seqio.map_seed_manager(SEED):
    examples = denoisers.ul2_objective(
        stream.repeat(), {"inputs": 64, "targets": 64}, features(vocabulary),
        denoisers=((s_denoiser, 1.0),)).take(NUM_EXAMPLES)
  # Per example: (text tokens in the inputs, target tokens, whether the inputs start with S).
  sizes = np.concatenate(list(examples.map(lambda example: tf.stack([
      tf.size(example["inputs"]) - 1, tf.size(example["targets"]),
      tf.cast(example["inputs"][0] == mode_s, tf.int32)])).batch(NUM_EXAMPLES).as_numpy_iterator()))
  assert len(sizes) == NUM_EXAMPLES and sizes[:, 2].all() and (sizes[:, 1] >= 1).all()
  fraction = sizes[:, 1].sum() / sizes[:, :2].sum()
  assert abs(fraction - s_denoiser.noise_density) <= 0.01


@pytest.mark.parametrize("preset_name", ["UL2_PAPER", "T5GEMMA2"])
def test_default_mode_tokens_match_the_denoiser(preset_name, vocabulary, documents):
  preset = getattr(denoisers, preset_name)
  special_tokens = SpecialTokens()
  mode_ids = {name: special_tokens.mode_id(vocabulary, name) for name, _ in special_tokens.modes}
  sentinel_ids = np.array(special_tokens.sentinel_ids(vocabulary, len(special_tokens.sentinels)))
  examples = run_objective(
      denoisers.ul2_objective, as_dataset(documents),
      sequence_length={"inputs": LENGTH, "targets": LENGTH},
      output_features=features(vocabulary), denoisers=preset)
  for inputs, targets in examples:
    assert not np.isin(np.concatenate([inputs[1:], targets]), list(mode_ids.values())).any()
    tokens, spans = reconstruct(inputs[1:], targets, sentinel_ids)
    noise = len(targets) - spans
    candidates = [d for d, _ in preset if mode_ids[d.mode] == inputs[0]
                  and d.prefix_lm == (spans == 0)
                  and (d.prefix_lm or noise == d.noise_tokens(len(tokens)))]
    assert candidates, (inputs[0], len(tokens), noise, spans)


def test_ul2_is_deterministic_given_the_seed(vocabulary, documents):
  kwargs = dict(sequence_length={"inputs": 256, "targets": 256}, take=300,
                output_features=features(vocabulary), denoisers=denoisers.T5GEMMA2)
  first = run_objective(denoisers.ul2_objective, as_dataset(documents), seed=3, **kwargs)
  again = run_objective(denoisers.ul2_objective, as_dataset(documents), seed=3, **kwargs)
  other = run_objective(denoisers.ul2_objective, as_dataset(documents), seed=4, **kwargs)
  assert len(first) == len(again)
  for (inputs, targets), (inputs_again, targets_again) in zip(first, again):
    np.testing.assert_array_equal(inputs, inputs_again)
    np.testing.assert_array_equal(targets, targets_again)
  assert any(len(a[1]) != len(b[1]) or (a[1] != b[1]).any() for a, b in zip(first, other))


def test_lengths_too_short_for_a_denoiser(vocabulary, documents):
  with pytest.raises(ValueError, match=r"too short for Denoiser\(mean_span_length=64") as error:
    denoisers.ul2_objective(as_dataset(documents), {"inputs": 512, "targets": 40},
                            features(vocabulary))
  assert "'inputs': 512, 'targets': 40" in str(error.value)


def test_bad_denoisers_are_refused():
  with pytest.raises(ValueError, match="noise_density"):
    denoisers.Denoiser(3, 1.5, "R")
  with pytest.raises(ValueError, match="span_fraction · num_spans"):
    denoisers.Denoiser(0, 0.5, "X", num_spans=2, span_fraction=0.75)
  with pytest.raises(ValueError, match="prefix LM"):
    denoisers.Denoiser(3, 0.5, "S", prefix_lm=True)


@pytest.mark.parametrize("split", ["half", "random"])
@pytest.mark.parametrize("lengths", [(512, 512), (300, 100)])
def test_prefix_lm_splits_without_losing_tokens(split, lengths, vocabulary, documents):
  add_eos = split == "half"  # Both budgets: with and without room for the EOS.
  budgets = [length - int(add_eos) for length in lengths]
  examples = run_objective(
      prefix_lm.prefix_lm, as_dataset(documents), split=split,
      sequence_length=dict(zip(("inputs", "targets"), lengths)),
      output_features=features(vocabulary, add_eos))
  for inputs, targets in examples:
    assert len(inputs) <= budgets[0] and 1 <= len(targets) <= budgets[1]
    if split == "half":
      assert len(inputs) == (len(inputs) + len(targets)) // 2
  rebuilt = np.concatenate([np.concatenate(example) for example in examples])
  np.testing.assert_array_equal(rebuilt, np.concatenate(documents))
  if split == "random":
    splits = {len(inputs) for inputs, targets in examples if len(inputs) + len(targets) > 100}
    assert len(splits) > 10


def test_prefix_lm_random_split_is_deterministic_given_the_seed(vocabulary, documents):
  kwargs = dict(split="random", sequence_length={"inputs": 256, "targets": 256},
                output_features=features(vocabulary))
  first = run_objective(prefix_lm.prefix_lm, as_dataset(documents), seed=5, **kwargs)
  again = run_objective(prefix_lm.prefix_lm, as_dataset(documents), seed=5, **kwargs)
  assert [len(inputs) for inputs, _ in first] == [len(inputs) for inputs, _ in again]


def test_prefix_lm_refuses_an_unknown_split(vocabulary, documents):
  with pytest.raises(ValueError, match="unknown PrefixLM split 'thirds'"):
    prefix_lm.prefix_lm(as_dataset(documents), {"inputs": 64, "targets": 64},
                        features(vocabulary), split="thirds")

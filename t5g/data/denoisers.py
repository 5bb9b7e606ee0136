"""UL2's mixture of denoisers (Tay et al., 2022) as a seqio preprocessor made of TF ops.

`ul2_objective` takes examples with a tokenized `targets` feature (int32 ids, no EOS yet) and
returns examples with `inputs` and `targets` only (one example can become several, so other
features are dropped). Place it after tokenization and before
`seqio.preprocessors.append_eos_after_trim`: it leaves one position free in each feature whose
`add_eos` is set, so that step appends the EOS and never trims.

Cutting: each example is cut into consecutive chunks, each of which draws its own denoiser by
the rates and is as long as that denoiser allows (the longest length whose corrupted inputs and
targets fit), except the example's last chunk, which takes what is left. No token is dropped,
and as every draw is independent of the ones before it, each denoiser's share of examples
follows the rates.

A span denoiser over a chunk of L tokens makes round(r·L) noise tokens (at least 1, at most
L - 1) in k spans: k = num_spans when set, else noise/μ rounded up or down at random so that its
mean is noise/μ (μ = span_fraction·L when set). T5 rounds to nearest, which biases the mean span
length (by 6% for μ=64, r=0.15 at 2048 tokens); random rounding keeps it at μ at any length.
Span lengths are a uniformly random composition of the noise tokens into k positive parts, the
non-noise runs likewise with the first allowed to be empty; runs alternate non-noise, noise, as
in T5. Inputs: the mode token, then the chunk with each noise span replaced by one sentinel.
Targets: each noise span after its sentinel. Span j uses sentinel j mod (number of sentinels) of
`SpecialTokens`. The S-denoiser (`prefix_lm=True`) puts t ~ Uniform{1, …, round(2·r·L) - 1}
(at most L - 1) last tokens in the targets and the rest, after its mode token, in the inputs.

Short documents give short examples, whose few spans cannot follow μ; as T5 and UL2 do, join
short documents first (`prefix_lm.concatenate_documents`, as the C4 and file tasks do).

Randomness comes only from seqio's seed (`seqio.map_seed_manager`, which
`Task.get_dataset(seed=...)` sets), so a seeded pipeline gives the same examples every time.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import seqio
import tensorflow as tf

from t5g.data.prefix_lm import usable_lengths
from t5g.data.vocabulary import SpecialTokens
from t5g.errors import InputError


@dataclasses.dataclass(frozen=True)
class Denoiser:
  """One denoiser of the mixture (the rules are in the module docstring).

  Attributes:
    mean_span_length: μ, the mean noise span length in tokens; 0 when `span_fraction` gives it
      and for the S-denoiser.
    noise_density: r, the fraction of a chunk's tokens that are noise; for the S-denoiser, the
      mean fraction that goes to the targets (at most 0.5).
    mode: the name of its mode token in `SpecialTokens.modes` ("R", "X" or "S" by default).
    num_spans: a fixed number of noise spans per chunk (None: noise/μ, randomly rounded).
    prefix_lm: the S-denoiser: a random prefix as inputs, the rest as targets.
    span_fraction: μ as a fraction of the chunk length L (0.75 for "one span of 3/4·L").
  """

  mean_span_length: float
  noise_density: float
  mode: str
  num_spans: int | None = None
  prefix_lm: bool = False
  span_fraction: float | None = None

  def __post_init__(self):
    problem = None
    if not self.mode:
      problem = "needs a mode name"
    elif self.prefix_lm and (self.num_spans or self.span_fraction or self.mean_span_length):
      problem = "is a prefix LM: it takes no spans (mean_span_length 0, no num_spans/span_fraction)"
    elif self.prefix_lm and not 0 < self.noise_density <= 0.5:
      problem = "is a prefix LM: its noise_density (mean target fraction) must be in (0, 0.5]"
    elif not self.prefix_lm and not 0 < self.noise_density < 1:
      problem = "needs 0 < noise_density < 1"
    elif self.num_spans is not None and self.num_spans < 1:
      problem = "needs num_spans >= 1"
    elif self.span_fraction is not None and not (
        0 < self.span_fraction <= 1 and self.mean_span_length == 0):
      problem = "with span_fraction needs 0 < span_fraction <= 1 and mean_span_length 0"
    elif self.span_fraction and self.num_spans and not math.isclose(
        self.span_fraction * self.num_spans, self.noise_density):
      problem = "has span_fraction · num_spans != noise_density"
    elif not self.prefix_lm and self.span_fraction is None and self.mean_span_length < 1:
      problem = "needs mean_span_length >= 1 (or span_fraction)"
    if problem:
      raise InputError(f"{self} {problem}")

  def noise_tokens(self, length: int) -> int:
    """Noise tokens in a chunk of `length` tokens; for the S-denoiser, the most target tokens."""
    if self.prefix_lm:
      most = math.floor(2 * self.noise_density * length + 0.5) - 1
    else:
      most = math.floor(self.noise_density * length + 0.5)
    return min(max(most, 1), max(length - 1, 1))

  def most_spans(self, length: int) -> int:
    """The most noise spans in a chunk of `length` tokens (0 for the S-denoiser)."""
    if self.prefix_lm:
      return 0
    noise = self.noise_tokens(length)
    if self.num_spans:
      spans = self.num_spans
    else:
      mean = self.span_fraction * length if self.span_fraction else self.mean_span_length
      spans = math.ceil(noise / mean)
    return min(max(spans, 1), noise, length - noise + 1)

  def longest_chunk(self, max_inputs: int, max_targets: int) -> int:
    """The longest chunk length such that it and every shorter chunk fit the token budgets."""
    length = 0
    while True:
      size = length + 1
      noise, spans = self.noise_tokens(size), self.most_spans(size)
      if self.prefix_lm:  # The mode token and at least one token less than the chunk.
        inputs, targets = size, noise
      else:
        inputs, targets = 1 + size - noise + spans, noise + spans
      if inputs > max_inputs or targets > max_targets:
        return length
      length = size


# The UL2 paper's mixture: 2 R-, 4 X- and the S-denoiser; equal rates, as its appendix code
# samples the tasks when no rates are given (the issue lists none).
UL2_PAPER = (
    (Denoiser(3, 0.15, "R"), 1.0), (Denoiser(8, 0.15, "R"), 1.0),
    (Denoiser(3, 0.5, "X"), 1.0), (Denoiser(8, 0.5, "X"), 1.0),
    (Denoiser(64, 0.15, "X"), 1.0), (Denoiser(64, 0.5, "X"), 1.0),
    (Denoiser(0, 0.5, "S", prefix_lm=True), 1.0))
# T5Gemma 2 (arXiv 2512.14856 §3.1), rates 1:1:1:1:4. It names no mode tokens; these follow
# UL2's definitions (R: short spans at low density; X: μ >= 12 or r >= 0.3).
T5GEMMA2 = (
    (Denoiser(3, 0.15, "R"), 1.0), (Denoiser(12, 0.5, "X"), 1.0),
    (Denoiser(32, 0.15, "X"), 1.0), (Denoiser(32, 0.5, "X"), 1.0),
    (Denoiser(0, 0.75, "X", num_spans=1, span_fraction=0.75), 4.0))


def _check_fits(denoiser: Denoiser, chunk: int, sequence_length: Mapping[str, int]) -> None:
  """Raises ValueError when the longest chunk cannot hold one span of the denoiser's size."""
  noise, spans = denoiser.noise_tokens(chunk), denoiser.most_spans(chunk)
  if denoiser.prefix_lm or denoiser.span_fraction:
    needed, fits = "2 tokens", chunk >= 2
  elif denoiser.num_spans:
    needed, fits = f"{denoiser.num_spans} spans", chunk >= 2 and spans == denoiser.num_spans
  else:
    needed = f"one span of {denoiser.mean_span_length} tokens"
    fits = noise >= denoiser.mean_span_length
  if not fits:
    raise InputError(
        f"sequence lengths {dict(sequence_length)} are too short for {denoiser}: the longest "
        f"chunk that fits has {chunk} tokens ({noise} noise tokens in at most {spans} spans); "
        f"it needs {needed}")


def ul2_objective(dataset: tf.data.Dataset, sequence_length: Mapping[str, int],
                  output_features: Mapping[str, seqio.Feature],
                  denoisers: Sequence[tuple[Denoiser, float]] = UL2_PAPER,
                  special_tokens: SpecialTokens = SpecialTokens()) -> tf.data.Dataset:
  """UL2 examples from tokenized `targets`, mixing `denoisers` ((Denoiser, rate) pairs).

  Special token ids come from `output_features["targets"].vocabulary`.

  Raises:
    ValueError: no denoiser, a rate <= 0, lengths too short for a denoiser, or a special token
      string that is not a single piece of the vocabulary.
  """
  if not denoisers or any(rate <= 0 for _, rate in denoisers):
    raise InputError(f"ul2_objective needs (Denoiser, rate > 0) pairs; got {denoisers}")
  max_inputs, max_targets = usable_lengths(sequence_length, output_features)
  chunks = [denoiser.longest_chunk(max_inputs, max_targets) for denoiser, _ in denoisers]
  for (denoiser, _), chunk in zip(denoisers, chunks):
    _check_fits(denoiser, chunk, sequence_length)
  vocabulary = output_features["targets"].vocabulary
  sentinels = tf.constant(special_tokens.sentinel_ids(vocabulary, len(special_tokens.sentinels)))
  table = {
      "mode": tf.constant([special_tokens.mode_id(vocabulary, d.mode) for d, _ in denoisers]),
      "prefix_lm": tf.constant([d.prefix_lm for d, _ in denoisers]),
      "density": tf.constant([d.noise_density for d, _ in denoisers], tf.float64),
      "mean": tf.constant([float(d.mean_span_length) for d, _ in denoisers], tf.float64),
      "fraction": tf.constant([d.span_fraction or 0.0 for d, _ in denoisers], tf.float64),
      "spans": tf.constant([d.num_spans or 0 for d, _ in denoisers]),
  }
  chunk_lengths = tf.constant(chunks)
  log_rates = tf.math.log(tf.constant([[rate for _, rate in denoisers]], tf.float64))

  @seqio.map_over_dataset(num_seeds=1)
  @tf.autograph.experimental.do_not_convert  # Plain TF ops: skip autograph's slow tracing.
  def draw_chunks(example, seed):
    tokens = tf.cast(example["targets"], tf.int32)
    length = tf.size(tokens)
    draws = length // min(chunks) + 1  # Enough chunks even if every draw is the shortest.
    choice_seed, chunk_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    choice = tf.random.stateless_categorical(log_rates, draws, choice_seed, dtype=tf.int32)[0]
    lengths = tf.gather(chunk_lengths, choice)
    ends = tf.cumsum(lengths)
    starts = ends - lengths
    count = tf.reduce_sum(tf.cast(starts < length, tf.int32))
    return {
        "tokens": tf.RaggedTensor.from_row_lengths(
            tokens, tf.minimum(ends[:count], length) - starts[:count]),
        "denoiser": choice[:count],
        "seed": tf.random.stateless_uniform(
            [count, 2], chunk_seed, minval=None, maxval=None, dtype=tf.int32),
    }

  @tf.autograph.experimental.do_not_convert
  def corrupt(chunk):
    tokens, seed = chunk["tokens"], chunk["seed"]
    params = {key: values[chunk["denoiser"]] for key, values in table.items()}
    inputs, targets = tf.cond(
        params["prefix_lm"], lambda: _split_prefix(tokens, params, seed),
        lambda: _replace_spans(tokens, params, sentinels, seed))
    return {"inputs": tf.concat([[params["mode"]], inputs], 0), "targets": targets}

  return draw_chunks(dataset).unbatch().map(corrupt, num_parallel_calls=tf.data.AUTOTUNE)


def _split_prefix(tokens, params, seed):
  """S-denoiser: (prefix, suffix) with a random suffix length (module docstring)."""
  length = tf.size(tokens)
  most = tf.cast(tf.floor(2 * params["density"] * tf.cast(length, tf.float64) + 0.5), tf.int32)
  most = tf.clip_by_value(most - 1, 1, tf.maximum(length - 1, 1))
  targets = tf.random.stateless_uniform([], seed, minval=1, maxval=most + 1, dtype=tf.int32)
  return tokens[:length - targets], tokens[length - targets:]


def _replace_spans(tokens, params, sentinels, seed):
  """Span corruption: (inputs without the mode token, targets) (module docstring)."""
  length = tf.size(tokens)
  noise = tf.cast(tf.floor(params["density"] * tf.cast(length, tf.float64) + 0.5), tf.int32)
  noise = tf.clip_by_value(noise, 1, tf.maximum(length - 1, 1))
  mean = tf.where(params["fraction"] > 0, params["fraction"] * tf.cast(length, tf.float64),
                  params["mean"])
  count_seed, noise_seed, text_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  rounding = tf.random.stateless_uniform([], count_seed, dtype=tf.float64)  # Up with p = frac.
  spans = tf.where(params["spans"] > 0, params["spans"],
                   tf.cast(tf.floor(tf.cast(noise, tf.float64) / mean + rounding), tf.int32))
  spans = tf.clip_by_value(spans, 1, tf.minimum(noise, length - noise + 1))
  noise_runs = _random_composition(noise, spans, noise_seed)
  text_runs = _random_composition(length - noise + 1, spans, text_seed) - tf.one_hot(
      0, spans, dtype=tf.int32)
  run = tf.repeat(tf.range(2 * spans), tf.reshape(tf.stack([text_runs, noise_runs], 1), [-1]))
  is_noise = run % 2 == 1
  opens_span = is_noise & (run != tf.concat([[-1], run[:-1]], 0))
  sentinel = tf.gather(sentinels, (run // 2) % tf.size(sentinels))
  return (_pick(sentinel, tokens, opens_span, ~is_noise),
          _pick(sentinel, tokens, opens_span, is_noise))


def _random_composition(total, parts, seed):
  """`total` split into `parts` positive integers, uniformly over all such splits."""
  cut_order = tf.argsort(tf.random.stateless_uniform([total - 1], seed))
  cuts = tf.sort(cut_order[:parts - 1] + 1)
  bounds = tf.concat([[0], cuts, [total]], 0)
  return bounds[1:] - bounds[:-1]


def _pick(first, second, keep_first, keep_second):
  """Per position, `first` (where `keep_first`) then `second` (where `keep_second`), in order."""
  values = tf.reshape(tf.stack([first, second], 1), [-1])
  return tf.boolean_mask(values, tf.reshape(tf.stack([keep_first, keep_second], 1), [-1]))

"""KV-cached generation for T5Gemma and Gemma 2: greedy, sampling and beam search.

`generate` runs one jitted function: the prefill, then the whole decode loop as a
`lax.while_loop` over one-token steps of a model with a KV cache (t5g/model/models.py `step`,
t5g/inference/cache.py). Inputs are [B, S] int32, right-padded with 0.

  T5Gemma: the encoder reads the inputs once; the decoder starts from BOS (id 2), the first step
  caches the cross-attention keys/values of the encoder states.
  Gemma 2: each row's sequence is [BOS] + inputs (as in t5g/scoring.py), left-padded to S + 1
  columns with segment id 0, so that every row's positions start at 0 on its BOS and all rows
  take their next token from the same column; the prompt goes in as one prefill step.

Each row stops at `eos_id` (kept) or after `max_new_tokens`; the loop ends when every row has.
Outputs: tokens [B, N] (N = max_new_tokens, 0 after the first EOS), lengths [B] (tokens up to
and including EOS), scores [B].

Choosing the next token: temperature 0 is greedy (argmax; top_k and top_p unused). Otherwise
the logits are divided by the temperature, cut to the top_k largest (top_k > 0), then to the
nucleus: the most probable tokens whose probabilities, before the last one, add up to less than
top_p (so at least one), and sampled (`rng`, folded with the step number). Score: the sum of
the model's own log-probabilities (before temperature and cuts) of the generated tokens.

Beam search (beam_size K > 1) is transformers' (`generate(num_beams=K, length_penalty=A,
early_stopping=False, do_sample=False)`, the other settings at their defaults) step for step:
each step keeps the 2K best continuations of the K running beams by summed log-probability;
those of the first K that end in EOS (or reach max_new_tokens) become finished hypotheses with
score `sum of log-probs / generated_length ** length_penalty` (length with the EOS), and the K
best of the others run on. A row stops when its K finished hypotheses are all at least the best
running beam's score divided by its current length ** length_penalty (transformers' heuristic
for early_stopping=False). The output is the best finished hypothesis and its score;
length_penalty > 0 favours longer sequences, < 0 shorter ones.

Layouts: scanned and unscanned parameters both work. Under `nn.scan` each layer's cache slice
goes in and out of the scan at every step, which made an S-S step at batch 4 ~1.6x slower on
CPU than with unscanned parameters (`model_dir.load(..., scanned=False)` converts on the host;
`t5g generate` does so).

Sharding: with `mesh`, parameters are placed by `t5g.runtime.partitioning.param_shardings`, the
batch and the outputs by rows over (data, fsdp), and the cache inside by the logical-axis rules
(batch -> data/fsdp, kv_heads -> tensor); the batch must divide into the mesh's rows. A mesh
may span several processes (jax.distributed): each passes the same whole inputs, its devices
take their rows of them (`partitioning.from_every_host`) and every process gets all the outputs
back (`partitioning.to_host`, which gathers them across processes).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from t5g.errors import InputError
from t5g.inference import cache as cache_lib
from t5g.model.config import BOS_ID, EOS_ID, ComputeConfig, EncoderDecoderConfig, ModelConfig
from t5g.model.masks import positions_from_segments, segments_from_tokens
from t5g.model.models import abstract_params, make_model

Array = jax.Array
NEG = -1.0e9  # transformers' "impossible" beam score.
FP32 = ComputeConfig(dtype=jnp.float32, param_dtype=jnp.float32)


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
  """How to decode (module docstring). temperature 0: greedy; top_k 0: off; top_p 1: off."""

  max_new_tokens: int = 64
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  beam_size: int = 1
  length_penalty: float = 1.0
  eos_id: int = EOS_ID

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise InputError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
      raise InputError(f"need temperature >= 0, top_k >= 0 and 0 < top_p <= 1, got "
                       f"{self.temperature}, {self.top_k}, {self.top_p}")
    if self.beam_size < 1 or (self.beam_size > 1 and self.temperature > 0):
      raise InputError(f"beam_size must be >= 1, and 1 when sampling (temperature > 0); got "
                       f"beam_size={self.beam_size}, temperature={self.temperature}")


gin.external_configurable(DecodeConfig, module="t5g")


class GenerateOutput(NamedTuple):
  """tokens int32 [B, N] (0 after the first EOS, which is kept), lengths int32 [B], scores
  float32 [B]."""

  tokens: Any
  lengths: Any
  scores: Any


def generate(config: ModelConfig, params: Any, inputs: Any, decode: DecodeConfig, *,
             rng: Array | None = None, compute: ComputeConfig = FP32, scanned: bool = True,
             mesh: Mesh | None = None, rules: Any = None) -> GenerateOutput:
  """Generates up to `decode.max_new_tokens` tokens after each row of inputs [B, S] int32.

  params: in the `scanned` (or unscanned) layout; compute: activation/parameter dtypes (its
  scan_layers and remat are taken from `scanned` and off); rng: for sampling (default key 0);
  mesh: shard over it (rules: the logical-axis rules, default partitioning.DEFAULT_RULES); on a
  mesh over several processes, every process calls this with the same inputs. Returns numpy
  arrays (all rows, on every process). One compilation serves every temperature > 0, top_p < 1,
  length_penalty and eos_id (they are traced), per input shape.
  """
  inputs = np.asarray(inputs, np.int32)
  if inputs.ndim != 2 or inputs.shape[0] == 0:
    raise ValueError(f"inputs must be [B, S] token ids, got shape {inputs.shape}")
  compute = dataclasses.replace(compute, scan_layers=scanned, remat_policy="none")
  rng = jax.random.PRNGKey(0) if rng is None else rng
  shape = _Shape(decode.max_new_tokens, decode.beam_size, decode.top_k,
                 decode.temperature > 0, decode.top_p < 1)
  knobs = _Knobs(np.float32(decode.temperature or 1), np.float32(decode.top_p),
                 np.float32(decode.length_penalty), np.int32(decode.eos_id))
  if mesh is None:
    out = _jitted(config, compute, shape, None, None)(params, inputs, rng, knobs)
    return GenerateOutput(*(np.asarray(x) for x in out))
  from t5g.runtime import partitioning
  rules = tuple(tuple(r) for r in (partitioning.DEFAULT_RULES if rules is None else rules))
  rows = partitioning.from_every_host(inputs, partitioning.batch_sharding(mesh))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    out = _jitted(config, compute, shape, mesh, rules)(params, rows, rng, knobs)
  return GenerateOutput(*(partitioning.to_host(x) for x in out))


class _Shape(NamedTuple):
  """What the compiled program depends on: the loop length, beams, top_k and which cuts."""

  max_new_tokens: int
  beam_size: int
  top_k: int
  sampling: bool
  nucleus: bool


class _Knobs(NamedTuple):
  """The traced settings: temperature, top_p, length_penalty (float32), eos_id (int32)."""

  temperature: Any
  top_p: Any
  length_penalty: Any
  eos_id: Any


@functools.lru_cache(maxsize=16)
def _jitted(config: ModelConfig, compute: ComputeConfig, shape: _Shape, mesh: Mesh | None,
            rules: tuple | None) -> Callable:
  """The jitted generate function (params, inputs, rng, knobs) -> GenerateOutput of arrays."""
  fn = functools.partial(_generate, config, compute, shape)
  if mesh is None:
    return jax.jit(fn)
  from t5g.runtime import partitioning
  params = partitioning.param_shardings(abstract_params(config, compute, boxed=True), mesh, rules)
  rows = NamedSharding(mesh, PartitionSpec(partitioning.BATCH_AXES))
  whole = NamedSharding(mesh, PartitionSpec())
  return jax.jit(fn, in_shardings=(params, rows, whole, whole),
                 out_shardings=GenerateOutput(rows, rows, rows))


class _Feed(NamedTuple):
  """The prefill's next-token logits [R, V] and cache, and `step(cache, tokens [R], i)` that
  feeds the i-th generated tokens and returns (logits [R, V], cache)."""

  logits: Array
  cache: Any
  step: Callable


def _generate(config, compute, shape, params, inputs, rng, knobs) -> GenerateOutput:
  """The traced body of `generate` (see the module docstring)."""
  feed = _feed(config, compute, shape, {"params": params}, inputs)
  if shape.beam_size > 1:
    return _beam_search(feed, shape, knobs, inputs.shape[0])
  return _sample(feed, shape, knobs, rng)


def _feed(config, compute, shape, variables, inputs) -> _Feed:
  """Runs the prefill on inputs [B, S] (each row repeated beam_size times) and gives the step."""
  beams, n = shape.beam_size, shape.max_new_tokens
  repeat = lambda x: jnp.repeat(x, beams, axis=0)
  column = lambda tokens, value: jnp.full_like(tokens[:, None], value)
  if isinstance(config, EncoderDecoderConfig):
    model = make_model(config, compute, cache_length=n)
    segments = segments_from_tokens(inputs)
    encoded = repeat(model.apply(variables, inputs, segments, method="encode"))
    segments = repeat(segments)
    apply = _cached_step(model, variables)
    first = jnp.full((segments.shape[0],), BOS_ID, jnp.int32)
    logits, cache = apply(None, encoded, segments, first[:, None], column(first, 1),
                          column(first, 0))
    return _Feed(logits, cache, lambda cache, tokens, i: apply(
        cache, None, segments, tokens[:, None], column(tokens, 1), column(tokens, i + 1)))
  prompt, next_position = _left_padded(inputs)
  prompt, next_position = repeat(prompt), repeat(next_position)
  model = make_model(config, compute, cache_length=prompt.shape[1] + n - 1)
  apply = _cached_step(model, variables)
  segments = segments_from_tokens(prompt)
  logits, cache = apply(None, prompt, segments, positions_from_segments(segments))
  return _Feed(logits, cache, lambda cache, tokens, i: apply(
      cache, tokens[:, None], column(tokens, 1), (next_position + i)[:, None]))


def _cached_step(model, variables) -> Callable:
  """apply(cache, *step arguments) -> (logits, cache) of `model.step`; cache None: create it."""
  def apply(cache, *args):
    extra = {} if cache is None else {"cache": cache}
    logits, out = model.apply({**variables, **extra}, *args, method="step", mutable=["cache"])
    return logits, cache_lib.constrain(out["cache"])
  return apply


def _left_padded(inputs: Array) -> tuple[Array, Array]:
  """Right-padded prompts [B, S] -> ([BOS] + prompt left-padded to [B, S + 1], lengths [B] of
  [BOS] + prompt: the position of the first generated token)."""
  lengths = (inputs != 0).sum(axis=1).astype(jnp.int32) + 1
  width = inputs.shape[1] + 1
  index = jnp.arange(width)[None, :] - (width - lengths)[:, None]  # 0: BOS, 1..: the prompt.
  padded = jnp.concatenate([jnp.full_like(inputs[:, :1], BOS_ID), inputs], axis=1)
  tokens = jnp.take_along_axis(padded, jnp.maximum(index, 0), axis=1)
  return jnp.where(index >= 0, tokens, 0).astype(jnp.int32), lengths


def _log_prob(logits: Array, tokens: Array) -> Array:
  """log_softmax(logits)[tokens]: logits [R, V], tokens [R] -> [R]."""
  picked = jnp.take_along_axis(logits, tokens[:, None], axis=1)[:, 0]
  return picked - jax.nn.logsumexp(logits, axis=1)


def _choose(logits: Array, shape: _Shape, knobs: _Knobs, key: Array) -> Array:
  """The next tokens [R] from logits [R, V]: argmax, or a sample after temperature/top-k/top-p."""
  if not shape.sampling:
    return jnp.argmax(logits, axis=1).astype(jnp.int32)
  logits = logits / knobs.temperature
  if shape.top_k:
    kth = jax.lax.top_k(logits, shape.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if shape.nucleus:
    ordered = jnp.sort(logits, axis=1)[:, ::-1]
    probs = jax.nn.softmax(ordered, axis=1)
    before = jnp.cumsum(probs, axis=1) - probs
    cut = jnp.min(jnp.where(before < knobs.top_p, ordered, jnp.inf), axis=1, keepdims=True)
    logits = jnp.where(logits < cut, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=1).astype(jnp.int32)


def _sample(feed: _Feed, shape: _Shape, knobs: _Knobs, rng: Array) -> GenerateOutput:
  """Greedy or sampled decoding: one token per row and step until EOS or max_new_tokens."""
  n, eos = shape.max_new_tokens, knobs.eos_id
  first = _choose(feed.logits, shape, knobs, jax.random.fold_in(rng, 0))
  rows = first.shape[0]
  tokens = jnp.zeros((rows, n), jnp.int32).at[:, 0].set(first)
  state = (jnp.int32(1), tokens, first == eos, jnp.ones((rows,), jnp.int32),
           _log_prob(feed.logits, first), first, feed.cache)

  def cond(state):
    i, _, done = state[:3]
    return (i < n) & ~jnp.all(done)

  def body(state):
    i, tokens, done, lengths, scores, last, cache = state
    logits, cache = feed.step(cache, last, i - 1)
    token = jnp.where(done, 0, _choose(logits, shape, knobs, jax.random.fold_in(rng, i)))
    tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, i))
    scores = scores + jnp.where(done, 0.0, _log_prob(logits, token))
    lengths = lengths + (~done).astype(jnp.int32)
    return (i + 1, tokens, done | (token == eos), lengths, scores, token, cache)

  _, tokens, _, lengths, scores, _, _ = jax.lax.while_loop(cond, body, state)
  return GenerateOutput(tokens, lengths, scores)


class _Beams(NamedTuple):
  """Beam search state for B examples of K beams: running and finished hypotheses."""

  running: Array        # [B, K, N] tokens
  running_scores: Array  # [B, K] summed log-probs (NEG for unused beams)
  finished: Array        # [B, K, N] tokens
  finished_scores: Array  # [B, K] length-penalised scores (NEG: none yet)
  finished_lengths: Array  # [B, K]
  is_finished: Array      # [B, K] bool
  open: Array             # [B] bool: a running beam may still beat the finished ones


def _beam_step(beams: _Beams, logits: Array, i: Array, knobs: _Knobs
               ) -> tuple[_Beams, Array, Array, Array]:
  """Chooses token i of every beam (transformers' beam search step, module docstring).

  logits [B*K, V] -> (beams, rows [B*K] the running beams came from, their tokens [B*K],
  whether every candidate of every example hit EOS or the length limit).
  """
  b, k, n = beams.running.shape
  vocab = logits.shape[-1]
  log_probs = jax.nn.log_softmax(logits, axis=-1).reshape(b, k, vocab)
  totals = (log_probs + beams.running_scores[:, :, None]).reshape(b, k * vocab)
  scores, index = jax.lax.top_k(totals, 2 * k)
  source, token = index // vocab, (index % vocab).astype(jnp.int32)
  take = lambda x, idx: jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)),
                                            axis=1)
  candidates = take(beams.running, source).at[:, :, i].set(token)
  hits = (token == knobs.eos_id) | (i + 1 >= n)

  running_scores, keep = jax.lax.top_k(scores + hits * NEG, k)
  rows = (jnp.arange(b)[:, None] * k + take(source, keep)).reshape(-1)
  penalised = scores / (i + 1).astype(jnp.float32) ** knobs.length_penalty
  penalised += (~beams.open[:, None]) * NEG
  ended = hits & (jnp.arange(2 * k) < k)[None, :]
  penalised += (~ended) * NEG
  merged_scores = jnp.concatenate([beams.finished_scores, penalised], axis=1)
  finished_scores, best = jax.lax.top_k(merged_scores, k)
  finished = take(jnp.concatenate([beams.finished, candidates], axis=1), best)
  lengths = jnp.concatenate([beams.finished_lengths, jnp.full_like(token, i + 1)], axis=1)
  is_finished = take(jnp.concatenate([beams.is_finished, ended], axis=1), best)

  best_running = running_scores[:, :1] / (i + 1).astype(jnp.float32) ** knobs.length_penalty
  worst = jnp.where(is_finished, jnp.min(finished_scores, axis=1, keepdims=True), NEG)
  beams = _Beams(take(candidates, keep), running_scores, finished, finished_scores,
                 take(lengths, best), is_finished,
                 beams.open & jnp.any(best_running > worst, axis=1))
  return beams, rows, take(token, keep).reshape(-1), jnp.all(hits)


def _beam_search(feed: _Feed, shape: _Shape, knobs: _Knobs, batch: int) -> GenerateOutput:
  """Beam search over `batch` examples of beam_size rows each (module docstring)."""
  k, n = shape.beam_size, shape.max_new_tokens
  zeros = jnp.zeros((batch, k, n), jnp.int32)
  beams = _Beams(zeros, jnp.where(jnp.arange(k) == 0, 0.0, NEG)[None, :].repeat(batch, 0),
                 zeros, jnp.full((batch, k), NEG), jnp.zeros((batch, k), jnp.int32),
                 jnp.zeros((batch, k), bool), jnp.ones((batch,), bool))
  beams, rows, tokens, stop = _beam_step(beams, feed.logits, jnp.int32(0), knobs)
  state = (jnp.int32(1), beams, rows, tokens, stop, feed.cache)

  def cond(state):
    i, beams, _, _, stop, _ = state
    return (i < n) & jnp.any(beams.open) & ~stop

  def body(state):
    i, beams, rows, tokens, _, cache = state
    logits, cache = feed.step(cache_lib.select_rows(cache, rows), tokens, i - 1)
    beams, rows, tokens, stop = _beam_step(beams, logits, i, knobs)
    return (i + 1, beams, rows, tokens, stop, cache)

  beams = jax.lax.while_loop(cond, body, state)[1]
  return GenerateOutput(beams.finished[:, 0], beams.finished_lengths[:, 0],
                        beams.finished_scores[:, 0])

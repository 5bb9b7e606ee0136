"""The two models: decoder-only Gemma 2 (teacher and baseline) and the T5Gemma encoder-decoder.

Inputs follow seqio's feature names. Segment ids default to `tokens != 0` (one example per row,
padding 0) and positions restart at 0 in every segment. The T5Gemma decoder input starts with
BOS (id 2).

Decoding: a model made with `cache_length > 0` keeps a KV cache in the `cache` collection
(`apply(..., mutable=["cache"])`); `step` appends tokens to it and returns the next-token
logits. The first `step` creates the cache (and, for T5Gemma, stores the cross-attention
keys/values of `encoded`); later steps pass the returned cache and `encoded=None`.
"""

from __future__ import annotations

import functools
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from t5g.errors import InputError
from t5g.model.classifier import EncoderClassifier
from t5g.model.config import (ClassifierConfig, ComputeConfig, EncoderDecoderConfig, ModelConfig,
                              StackConfig)
from t5g.model.masks import positions_from_segments, segments_from_tokens
from t5g.model.stack import Stack

Array = jax.Array

# The batch features (seqio's names) that the models take as arguments.
MODEL_FEATURES = ("encoder_input_tokens", "decoder_input_tokens", "encoder_segment_ids",
                  "decoder_segment_ids", "encoder_positions", "decoder_positions")


def model_inputs(batch: Mapping[str, Array]) -> dict[str, Array]:
  """The batch features that the models take as arguments."""
  return {name: batch[name] for name in MODEL_FEATURES if name in batch}


def _segments_and_positions(tokens, segment_ids, positions):
  if segment_ids is None:
    segment_ids = segments_from_tokens(tokens)
  if positions is None:
    positions = positions_from_segments(segment_ids)
  return segment_ids, positions


class Gemma2(nn.Module):
  """Decoder-only Gemma 2 language model; parameters under `transformer`."""

  config: StackConfig
  compute: ComputeConfig = ComputeConfig()
  cache_length: int = 0

  def setup(self):
    self.transformer = Stack(self.config, self.compute, causal=True,
                             cache_length=self.cache_length)

  def __call__(self, decoder_input_tokens: Array, decoder_segment_ids: Array | None = None,
               decoder_positions: Array | None = None) -> Array:
    """Tokens [B, T] -> float32 logits [B, T, V]."""
    hidden, _ = self.hidden_and_table(decoder_input_tokens, decoder_segment_ids,
                                      decoder_positions)
    return self.transformer.logits(hidden)

  def hidden_and_table(self, decoder_input_tokens: Array,
                       decoder_segment_ids: Array | None = None,
                       decoder_positions: Array | None = None) -> tuple[Array, Array]:
    """The forward up to the output head: tokens [B, T] -> (final-normed states [B, T, D] in
    the compute dtype, the tied embedding table [V, D]); `__call__`'s logits are the soft-capped
    states · tableᵀ (`t5g.train.chunked_loss` projects them a chunk at a time)."""
    segments, positions = _segments_and_positions(decoder_input_tokens, decoder_segment_ids,
                                                  decoder_positions)
    hidden = self.transformer(decoder_input_tokens, segments, positions)
    return hidden, self.transformer.embedder.embedding

  def step(self, tokens: Array, segment_ids: Array, positions: Array) -> Array:
    """Decoding: appends tokens [B, T] (segment ids and positions [B, T]) to the cache;
    float32 logits [B, V] of the next token after the last column."""
    hidden = self.transformer(tokens, segment_ids, positions)
    return self.transformer.logits(hidden[:, -1:])[:, 0]


class T5Gemma(nn.Module):
  """Encoder-decoder: bidirectional `encoder`, causal `decoder` with cross-attention."""

  config: EncoderDecoderConfig
  compute: ComputeConfig = ComputeConfig()
  cache_length: int = 0

  def setup(self):
    cfg = self.config
    self.encoder = Stack(cfg.encoder, self.compute, causal=False)
    self.decoder = Stack(cfg.decoder, self.compute, causal=True,
                         cross_kv_dim=cfg.encoder.embed_dim, cache_length=self.cache_length)

  def encode(self, encoder_input_tokens: Array, encoder_segment_ids: Array | None = None,
             encoder_positions: Array | None = None) -> Array:
    """Encoder tokens [B, S] -> final-normed encoder states [B, S, De]."""
    segments, positions = _segments_and_positions(encoder_input_tokens, encoder_segment_ids,
                                                  encoder_positions)
    return self.encoder(encoder_input_tokens, segments, positions)

  def decode(self, encoded: Array, encoder_segment_ids: Array, decoder_input_tokens: Array,
             decoder_segment_ids: Array | None = None,
             decoder_positions: Array | None = None) -> Array:
    """Encoder states [B, S, De] and decoder input tokens [B, T] -> float32 logits [B, T, V]."""
    return self.decoder.logits(self._decoded(encoded, encoder_segment_ids, decoder_input_tokens,
                                             decoder_segment_ids, decoder_positions))

  def _decoded(self, encoded, encoder_segment_ids, decoder_input_tokens, decoder_segment_ids,
               decoder_positions) -> Array:
    """Final-normed decoder states [B, T, D] (arguments as `decode`)."""
    segments, positions = _segments_and_positions(decoder_input_tokens, decoder_segment_ids,
                                                  decoder_positions)
    return self.decoder(decoder_input_tokens, segments, positions, encoded, encoder_segment_ids)

  def step(self, encoded: Array | None, encoder_segment_ids: Array, tokens: Array,
           segment_ids: Array, positions: Array) -> Array:
    """Decoding: appends decoder tokens [B, T] (segment ids and positions [B, T]) to the cache;
    float32 logits [B, V] of the next token after the last column. encoded [B, S, De]: the
    encoder states on the first step, None after (their keys/values are cached)."""
    hidden = self.decoder(tokens, segment_ids, positions, encoded, encoder_segment_ids)
    return self.decoder.logits(hidden[:, -1:])[:, 0]

  def __call__(self, encoder_input_tokens: Array, decoder_input_tokens: Array,
               encoder_segment_ids: Array | None = None, decoder_segment_ids: Array | None = None,
               encoder_positions: Array | None = None,
               decoder_positions: Array | None = None) -> Array:
    """Teacher-forced forward: tokens [B, S] and [B, T] -> float32 logits [B, T, V]."""
    hidden, _ = self.hidden_and_table(encoder_input_tokens, decoder_input_tokens,
                                      encoder_segment_ids, decoder_segment_ids,
                                      encoder_positions, decoder_positions)
    return self.decoder.logits(hidden)

  def hidden_and_table(self, encoder_input_tokens: Array, decoder_input_tokens: Array,
                       encoder_segment_ids: Array | None = None,
                       decoder_segment_ids: Array | None = None,
                       encoder_positions: Array | None = None,
                       decoder_positions: Array | None = None) -> tuple[Array, Array]:
    """The teacher-forced forward up to the output head: tokens [B, S] and [B, T] ->
    (final-normed decoder states [B, T, D] in the compute dtype, the decoder's tied embedding
    table [V, D]); `__call__`'s logits are the soft-capped states · tableᵀ
    (`t5g.train.chunked_loss` projects them a chunk at a time)."""
    if encoder_segment_ids is None:
      encoder_segment_ids = segments_from_tokens(encoder_input_tokens)
    encoded = self.encode(encoder_input_tokens, encoder_segment_ids, encoder_positions)
    hidden = self._decoded(encoded, encoder_segment_ids, decoder_input_tokens,
                           decoder_segment_ids, decoder_positions)
    return hidden, self.decoder.embedder.embedding


def make_model(config: ModelConfig, compute: ComputeConfig = ComputeConfig(),
               cache_length: int = 0) -> nn.Module:
  """The Flax module for `config`: `T5Gemma` for an encoder-decoder, `EncoderClassifier` for a
  classifier, else `Gemma2`. cache_length: > 0 for a decoding model with a KV cache of that many
  slots."""
  if isinstance(config, ClassifierConfig):
    if cache_length:
      raise InputError("an encoder-only classifier does not decode (cache_length must be 0)")
    return EncoderClassifier(config, compute)
  if isinstance(config, EncoderDecoderConfig):
    return T5Gemma(config, compute, cache_length)
  return Gemma2(config, compute, cache_length)


def dummy_inputs(config: ModelConfig) -> tuple[Array, ...]:
  """Smallest valid model inputs, for `init` and `eval_shape`."""
  tokens = jnp.ones((1, 1), jnp.int32)
  return (tokens, tokens) if isinstance(config, EncoderDecoderConfig) else (tokens,)


def init_params(config: ModelConfig, compute: ComputeConfig, rng: Array) -> dict:
  """Randomly initialised parameters (logical-axis boxes removed)."""
  model = make_model(config, compute)
  return nn.unbox(model.init(rng, *dummy_inputs(config)))["params"]


def abstract_params(config: ModelConfig, compute: ComputeConfig, boxed: bool = False) -> dict:
  """Parameter shapes and dtypes without allocating (jax.eval_shape of `init`).

  boxed: keep the `nn.LogicallyPartitioned` boxes that carry logical axis names. Tracing `init`
  costs seconds for deep unscanned models, so the trace is made once per (config, compute) and
  every call gets its own copy of the tree.
  """
  shapes = _traced_params(config, compute)
  shapes = shapes if boxed else nn.unbox(shapes)
  return jax.tree_util.tree_map(lambda x: x, shapes)


@functools.lru_cache(maxsize=32)
def _traced_params(config: ModelConfig, compute: ComputeConfig) -> dict:
  model = make_model(config, compute)
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *dummy_inputs(config)))["params"]

"""PrefixLM knowledge distillation: the decoder-only teacher reads the un-split sequence.

A PrefixLM example reaches T5Gemma split in two: the prefix p_1..p_n as encoder input and the
continuation t_1..t_m as decoder targets, with decoder input BOS t_1..t_{m-1}. The Gemma 2 teacher
reads the whole sequence as it was trained to, BOS p_1..p_n t_1..t_{m-1}, and its prediction of
t_i is its output at p_n (i = 1) or t_{i-1}: index n + i - 1. `teacher_inputs` builds that
sequence for every segment of a packed or padded row (segment k occupies n_k + m_k teacher
positions, in order), and `teacher_logits` runs the teacher and returns its logits aligned with
the decoder targets [B, T, V] (`teacher_hidden`: its states there, for the chunked head). The
teacher length is S + T, enough for any row.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from t5g.model.masks import positions_from_segments, segments_from_tokens

Array = jax.Array


def _segments_and_positions(batch: Mapping[str, Array], side: str, tokens: Array):
  segments = batch.get(f"{side}_segment_ids")
  if segments is None:
    segments = segments_from_tokens(tokens)
  positions = batch.get(f"{side}_positions")
  if positions is None:
    positions = positions_from_segments(segments)
  return segments, positions


def _count(segments: Array, num_segments: int) -> Array:
  """Tokens per segment id: [B, L] -> [B, num_segments] (id 0, padding, counted in column 0)."""
  return jax.vmap(lambda s: jnp.zeros(num_segments, jnp.int32).at[s].add(1))(segments)


def teacher_inputs(batch: Mapping[str, Array]) -> dict[str, Array]:
  """The teacher's view of an encoder-decoder batch.

  Returns decoder_input_tokens, decoder_segment_ids, decoder_positions [B, S + T] for the teacher
  and target_index [B, T]: the teacher position whose output predicts each decoder target.
  """
  enc_tokens, dec_tokens = batch["encoder_input_tokens"], batch["decoder_input_tokens"]
  (rows, s), t = enc_tokens.shape, dec_tokens.shape[1]
  length = s + t
  enc_segments, enc_positions = _segments_and_positions(batch, "encoder", enc_tokens)
  dec_segments, dec_positions = _segments_and_positions(batch, "decoder", dec_tokens)
  num_segments = max(s, t) + 1
  prefix = _count(enc_segments, num_segments).at[:, 0].set(0)       # n_k
  total = prefix + _count(dec_segments, num_segments).at[:, 0].set(0)  # n_k + m_k
  offset = jnp.cumsum(total, axis=1) - total                            # first index of k

  def at(values, segments):
    return jnp.take_along_axis(values, segments, axis=1)

  # Encoder token p (0-based) of segment k -> offset_k + 1 + p; decoder input q -> offset_k for
  # the BOS (q = 0), else offset_k + n_k + q. Padding goes out of range and is dropped.
  enc_index = jnp.where(enc_segments > 0, at(offset, enc_segments) + 1 + enc_positions, length)
  dec_start = at(offset, dec_segments)
  dec_index = jnp.where(dec_positions == 0, dec_start,
                        dec_start + at(prefix, dec_segments) + dec_positions)
  dec_index = jnp.where(dec_segments > 0, dec_index, length)
  target_index = jnp.where(dec_segments > 0, dec_start + at(prefix, dec_segments)
                           + dec_positions, 0)

  row = jnp.arange(rows)[:, None]

  def scatter(enc_values, dec_values):
    out = jnp.zeros((rows, length), enc_values.dtype)
    out = out.at[row, enc_index].set(enc_values, mode="drop")
    return out.at[row, dec_index].set(dec_values, mode="drop")

  segments = scatter(enc_segments, dec_segments)
  offsets = at(offset, segments)
  positions = jnp.where(segments > 0, jnp.arange(length)[None, :] - offsets, 0)
  return {"decoder_input_tokens": scatter(enc_tokens, dec_tokens),
          "decoder_segment_ids": segments, "decoder_positions": positions.astype(jnp.int32),
          "target_index": target_index.astype(jnp.int32)}


def _at_targets(teacher: nn.Module, teacher_params: Any, batch: Mapping[str, Array], head):
  """head(teacher's Stack, its final-normed states [B, T, Dt] at the target positions of
  `batch`), applied with the teacher's parameters."""
  inputs = teacher_inputs(batch)
  index = inputs.pop("target_index")

  def aligned(model, tokens, segments, positions):
    hidden = model.transformer(tokens, segments, positions)
    return head(model.transformer, jnp.take_along_axis(hidden, index[..., None], axis=1))

  return teacher.apply({"params": teacher_params}, inputs["decoder_input_tokens"],
                       inputs["decoder_segment_ids"], inputs["decoder_positions"],
                       method=aligned)


def teacher_logits(teacher: nn.Module, teacher_params: Any, batch: Mapping[str, Array]
                   ) -> Array:
  """The teacher's float32 logits for each decoder target of `batch`: [B, T, V].

  Only the target positions are projected onto the vocabulary.
  """
  return _at_targets(teacher, teacher_params, batch, lambda stack, hidden: stack.logits(hidden))


def teacher_hidden(teacher: nn.Module, teacher_params: Any, batch: Mapping[str, Array]
                   ) -> tuple[Array, Array]:
  """The teacher's output head inputs for each decoder target of `batch`: (final-normed states
  [B, T, Dt] in its compute dtype, its tied embedding table [V, Dt]); `teacher_logits` is the
  soft-capped states · tableᵀ. For `t5g.train.chunked_loss`, which projects a chunk at a time.
  """
  return _at_targets(teacher, teacher_params, batch,
                     lambda stack, hidden: (hidden, stack.embedder.embedding))

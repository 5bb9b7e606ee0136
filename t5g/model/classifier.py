"""Encoder-only classification (the T5Gemma paper's SuperGLUE set-up): a T5Gemma encoder and a
linear head on the last non-padding token's final-normed encoder state.

Parameters: `encoder` (exactly a T5Gemma's `encoder` subtree, so a T5Gemma checkpoint's encoder
loads into it unchanged) and `head/{kernel [D, C], bias [C]}`. Inputs are unpacked, right-padded
rows (padding 0); the pooled token is the last one with a non-zero segment id.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from t5g.model.config import ClassifierConfig, ComputeConfig
from t5g.model.layers import logical_param
from t5g.model.masks import positions_from_segments, segments_from_tokens
from t5g.model.stack import Stack

Array = jax.Array


class ClassifierHead(nn.Module):
  """Linear layer [B, D] -> float32 logits [B, C]; kernel [D, C] (embed, -), bias [C]."""

  num_classes: int
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, pooled: Array) -> Array:
    width = pooled.shape[-1]
    kernel = logical_param(self, "kernel", nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal"), (width, self.num_classes), ("embed", None),
        self.param_dtype)
    bias = logical_param(self, "bias", nn.initializers.zeros_init(), (self.num_classes,),
                         (None,), self.param_dtype)
    return pooled.astype(jnp.float32) @ kernel.astype(jnp.float32) + bias.astype(jnp.float32)


class EncoderClassifier(nn.Module):
  """T5Gemma encoder + linear classification head; all parameters train."""

  config: ClassifierConfig
  compute: ComputeConfig = ComputeConfig()

  def setup(self):
    self.encoder = Stack(self.config.encoder, self.compute, causal=False)
    self.head = ClassifierHead(self.config.num_classes, self.compute.param_dtype)

  def pooled(self, encoder_input_tokens: Array, encoder_segment_ids: Array | None = None,
             encoder_positions: Array | None = None) -> Array:
    """Tokens [B, S] -> the last non-padding token's final-normed state [B, D]."""
    segments = (segments_from_tokens(encoder_input_tokens) if encoder_segment_ids is None
                else encoder_segment_ids)
    positions = (positions_from_segments(segments) if encoder_positions is None
                 else encoder_positions)
    hidden = self.encoder(encoder_input_tokens, segments, positions)
    last = jnp.maximum(jnp.sum(segments != 0, axis=-1) - 1, 0)
    return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]

  def __call__(self, encoder_input_tokens: Array, encoder_segment_ids: Array | None = None,
               encoder_positions: Array | None = None) -> Array:
    """Tokens [B, S] (right-padded with 0) -> float32 class logits [B, C]."""
    return self.head(self.pooled(encoder_input_tokens, encoder_segment_ids, encoder_positions))


def init_head(config: ClassifierConfig, compute: ComputeConfig, rng: Array) -> dict:
  """Fresh head parameters {kernel, bias} (the encoder's initialisation is traced away)."""
  model = EncoderClassifier(config, compute)
  return nn.unbox(model.init(rng, jnp.ones((1, 1), jnp.int32)))["params"]["head"]

"""A Gemma 2 stack: embedding, layers (scanned in local/global pairs or unrolled), final norm.

Parameter layout (see t5g/model/layout.py):
  unscanned: embedder, layer_0 ... layer_{L-1}, final_norm
  scanned:   embedder, layers/{local,global} (leading axis L//2), [final_local_layer], final_norm

Decoding (`cache_length > 0`): each call appends its tokens to a KV cache in the `cache`
collection (stacked along the layer axis like the parameters when scanned); `slots` records the
segment id and position of every cache slot, from which the step's masks are built.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from t5g.model.attention import softcap
from t5g.model.block import Block, LayerPair, remat
from t5g.model.config import ComputeConfig, StackConfig
from t5g.model.layers import Embedder, RMSNorm, constrain
from t5g.model.masks import CacheSlots, attention_mask, segment_mask, window_band

Array = jax.Array


class Stack(nn.Module):
  """causal: decoder (True) or bidirectional encoder (False). cross_kv_dim: encoder width when
  the layers have cross-attention. cache_length: > 0 to decode with a KV cache of that many
  slots (causal stacks)."""

  config: StackConfig
  compute: ComputeConfig
  causal: bool
  cross_kv_dim: int | None = None
  cache_length: int = 0

  def setup(self):
    cfg, compute = self.config, self.compute
    layer_args = (cfg, compute, self.cross_kv_dim, self.cache_length)
    local_band = window_band(self.causal, cfg.sliding_window)
    self.embedder = Embedder(cfg.vocab_size, cfg.embed_dim, dtype=compute.dtype,
                             param_dtype=compute.param_dtype)
    if compute.scan_layers:
      self.layers = nn.scan(
          LayerPair, variable_axes={"params": 0, "cache": 0}, split_rngs={"params": True},
          in_axes=(nn.broadcast,) * 5, length=cfg.num_layers // 2,
          metadata_params={nn.PARTITION_NAME: "layers"},
      )(*layer_args, local_band=local_band)
      if cfg.num_layers % 2:
        self.final_local_layer = remat(Block, compute)(*layer_args, band=local_band)
    else:
      for i in range(cfg.num_layers):
        band = local_band if cfg.is_local(i) else None
        setattr(self, f"layer_{i}", remat(Block, compute)(*layer_args, band=band))
    if self.cache_length:
      self.slots = CacheSlots(self.cache_length)
    self.final_norm = RMSNorm(cfg.rms_norm_eps, dtype=compute.dtype,
                              param_dtype=compute.param_dtype)

  def __call__(self, tokens: Array, segment_ids: Array, positions: Array,
               encoded: Array | None = None, encoder_segment_ids: Array | None = None) -> Array:
    """tokens/segment_ids/positions [B, T]; encoded [B, S, De] and encoder_segment_ids [B, S]
    when the stack has cross-attention. Returns final-normed hidden states [B, T, D].

    Decoding: the tokens are appended to the cache; encoded is None once cached.
    """
    cfg = self.config
    kv_segments, kv_positions = segment_ids, positions
    if self.cache_length:
      kv_segments, kv_positions = self.slots(segment_ids, positions)
    global_mask = attention_mask(segment_ids, kv_segments, positions, kv_positions,
                                 causal=self.causal, window=None)
    local_mask = attention_mask(segment_ids, kv_segments, positions, kv_positions,
                                causal=self.causal, window=cfg.sliding_window)
    cross_mask = None
    if self.cross_kv_dim is not None:  # Global: only segment membership matters.
      cross_mask = segment_mask(segment_ids, encoder_segment_ids)
    x = self.embedder.encode(tokens)
    if self.compute.scan_layers:
      x, _ = self.layers(x, positions, local_mask, global_mask, encoded, cross_mask)
      if cfg.num_layers % 2:
        x = self.final_local_layer(x, positions, local_mask, encoded, cross_mask)
    else:
      for i in range(cfg.num_layers):
        mask = local_mask if cfg.is_local(i) else global_mask
        x = getattr(self, f"layer_{i}")(x, positions, mask, encoded, cross_mask)
    return constrain(self.final_norm(x), ("batch", "length", "embed"))

  def logits(self, hidden: Array) -> Array:
    """Tied output projection and final soft-cap: [B, T, D] -> float32 [B, T, V]."""
    return softcap(self.embedder.decode(hidden), self.config.final_logit_softcap)

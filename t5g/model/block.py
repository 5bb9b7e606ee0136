"""One Gemma 2 layer (optionally with T5Gemma cross-attention) and the scanned local/global pair.

Decoder layer order (Google's reference): pre-norm -> self-attention -> post-norm -> residual,
pre-norm -> cross-attention -> post-norm -> residual, pre-norm -> GeGLU -> post-norm -> residual.
"""

from __future__ import annotations

import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name

from t5g.model.attention import Attention
from t5g.model.config import ComputeConfig, StackConfig
from t5g.model.layers import GeGLU, RMSNorm, constrain

Array = jax.Array


class Block(nn.Module):
  """A transformer layer. cross_kv_dim: encoder width for cross-attention, None for none.
  cache_length: > 0 to decode with a KV cache (t5g/model/attention.py). band: a local layer's
  window band (t5g/model/masks.py `window_band`), None for a global layer."""

  config: StackConfig
  compute: ComputeConfig
  cross_kv_dim: int | None = None
  cache_length: int = 0
  band: tuple[int, int] | None = None

  def _norm(self, name: str) -> RMSNorm:
    return RMSNorm(self.config.rms_norm_eps, dtype=self.compute.dtype,
                   param_dtype=self.compute.param_dtype, name=name)

  @nn.compact
  def __call__(self, x: Array, positions: Array, self_mask: Array, encoded: Array | None = None,
               cross_mask: Array | None = None) -> Array:
    """x [B, T, D], positions [B, T], self_mask [B, T, T], encoded [B, S, De], cross_mask
    [B, T, S] -> [B, T, D]. Decoding: self_mask is [B, T, cache_length] and encoded is None once
    the cross-attention keys/values are cached."""
    cfg, dtypes = self.config, dict(dtype=self.compute.dtype, param_dtype=self.compute.param_dtype)
    attention = dict(cache_length=self.cache_length,
                     block_length=self.compute.attention_block_length, **dtypes)
    h = self._norm("pre_attention_norm")(x)
    h = Attention(cfg, use_rope=True, band=self.band, name="attn", **attention)(
        h, h, self_mask, positions, positions)
    x = x + checkpoint_name(self._norm("post_attention_norm")(h), "attn_out")
    if self.cross_kv_dim is not None:
      h = self._norm("pre_cross_attention_norm")(x)
      h = Attention(cfg, use_rope=False, kv_dim=self.cross_kv_dim, name="cross_attn",
                    **attention)(h, encoded, cross_mask)
      x = x + checkpoint_name(self._norm("post_cross_attention_norm")(h), "cross_attn_out")
    h = self._norm("pre_ffw_norm")(x)
    h = GeGLU(cfg.hidden_dim, name="mlp", **dtypes)(h)
    x = x + checkpoint_name(self._norm("post_ffw_norm")(h), "mlp_out")
    return constrain(x, ("batch", "length", "embed"))


class LayerPair(nn.Module):
  """A local (sliding-window) layer followed by a global one: the unit scanned over.
  local_band: the local layer's window band (Block's `band`)."""

  config: StackConfig
  compute: ComputeConfig
  cross_kv_dim: int | None = None
  cache_length: int = 0
  local_band: tuple[int, int] | None = None

  @nn.compact
  def __call__(self, x: Array, positions: Array, local_mask: Array, global_mask: Array,
               encoded: Array | None, cross_mask: Array | None) -> tuple[Array, None]:
    block = remat(Block, self.compute)
    args = (self.config, self.compute, self.cross_kv_dim, self.cache_length)
    x = block(*args, band=self.local_band, name="local")(x, positions, local_mask, encoded,
                                                         cross_mask)
    x = block(*args, name="global")(x, positions, global_mask, encoded, cross_mask)
    return x, None


_POLICIES = {
    "full": lambda: jax.checkpoint_policies.nothing_saveable,
    "dots": lambda: jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": lambda: jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_sublayer_outputs": lambda: jax.checkpoint_policies.save_only_these_names(
        "attn_out", "cross_attn_out", "mlp_out"),
}


def remat(module_cls, compute: ComputeConfig):
  """`module_cls` wrapped in `nn.remat` with the named policy (unchanged for 'none')."""
  if compute.remat_policy == "none":
    return module_cls
  return nn.remat(module_cls, policy=_POLICIES[compute.remat_policy](),
                  prevent_cse=not compute.scan_layers)

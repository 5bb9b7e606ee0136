"""Gemma 2 -> T5Gemma adaptation (paper §3.2), as a parameter source.

The encoder is the encoder-side Gemma 2 whole (embedding, layers, final norm; its attention
simply becomes bidirectional). The decoder is the decoder-side Gemma 2 whole, and each decoder
layer gains cross-attention:
- 'copy' (the balanced default, and possible whenever both widths agree): cross-attention
  q/k/v/o <- the same layer's self-attention q/k/v/o; its pre/post norms <- the self-attention
  pre/post norms.
- 'random' (the unbalanced default, e.g. 9B-2B, where keys/values read the encoder's width):
  q/k/v/o drawn from t5g's own initialiser (truncated normal, variance 1/fan_in over the input
  axes), pre/post cross-attention norm scales 0 (gain 1, as Gemma's RMSNorm initialises). These
  are recorded as new parameters so the trainer can warm them up alone first (paper: 1000 steps,
  everything else frozen).
"""

from __future__ import annotations

import jax
import numpy as np

from t5g.checkpoints.sources import ParamSource
from t5g.errors import InputError
from t5g.model import layout
from t5g.model.config import ComputeConfig, EncoderDecoderConfig, StackConfig
from t5g.model.layers import kernel_init
from t5g.model.models import abstract_params

CROSS_ATTENTION_MODES = ("auto", "copy", "random")
_CROSS_KERNELS = {"q_proj": ((0,), (1, 2)), "k_proj": ((0,), (1, 2)),
                  "v_proj": ((0,), (1, 2)), "o_proj": ((0, 1), (2,))}
_CROSS_NORMS = {"pre_cross_attention_norm": "pre_attention_norm",
                "post_cross_attention_norm": "post_attention_norm"}
_GEMMA2 = "transformer"


def _check_gemma2(source: ParamSource, role: str) -> StackConfig:
  if not isinstance(source.config, StackConfig):
    raise InputError(f"--{role}={source.where}: a decoder-only Gemma 2 checkpoint is needed, "
                     "this one is an encoder-decoder")
  return source.config


class AdaptedSource(ParamSource):
  """The T5Gemma parameters adapted from two Gemma 2 sources (the same one when balanced)."""

  def __init__(self, encoder: ParamSource, decoder: ParamSource,
               cross_attention: str = "auto", seed: int = 0):
    enc, dec = _check_gemma2(encoder, "encoder"), _check_gemma2(decoder, "decoder")
    if enc.vocab_size != dec.vocab_size:
      raise InputError(f"--encoder={encoder.where} has vocab_size {enc.vocab_size} but "
                       f"--decoder={decoder.where} has {dec.vocab_size}; they must agree")
    if cross_attention not in CROSS_ATTENTION_MODES:
      raise InputError(f"--cross_attention={cross_attention!r}: choose one of "
                       f"{CROSS_ATTENTION_MODES}")
    if cross_attention == "auto":
      cross_attention = "copy" if enc == dec else "random"
    if cross_attention == "copy" and enc.embed_dim != dec.embed_dim:
      raise InputError(f"--cross_attention=copy needs equal widths, but the encoder's "
                       f"embed_dim is {enc.embed_dim} and the decoder's {dec.embed_dim}; use "
                       "--cross_attention=random")
    self.encoder, self.decoder = encoder, decoder
    self.cross_attention, self.seed = cross_attention, seed
    self.config = EncoderDecoderConfig(enc, dec)
    self.where = f"adapt(encoder={encoder.where}, decoder={decoder.where})"
    self._shapes = abstract_params(self.config, ComputeConfig(scan_layers=False))

  def new_parameters(self) -> list[str]:
    """See base class: the cross-attention when it was freshly initialised."""
    if self.cross_attention == "copy":
      return []
    return ([f"decoder/cross_attn/{name}" for name in _CROSS_KERNELS]
            + [f"decoder/{name}/scale" for name in _CROSS_NORMS])

  def _random_kernel(self, layer: int, name: str) -> np.ndarray:
    shape = layout.get(self._shapes, self.config, False, "decoder", layer,
                       ("cross_attn", name)).shape
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(self.seed), layer),
                             list(_CROSS_KERNELS).index(name))
    return np.asarray(kernel_init(*_CROSS_KERNELS[name])(key, shape, np.float32))

  def get(self, stack: str, layer: int | None, sub: tuple[str, ...]) -> np.ndarray:
    """See base class."""
    if stack == "encoder":
      return self.encoder.get(_GEMMA2, layer, sub)
    if stack != "decoder":
      raise KeyError(f"{self.where}: no stack {stack!r}")
    copy = self.cross_attention == "copy"
    if sub[0] == "cross_attn":
      if copy:
        return self.decoder.get(_GEMMA2, layer, ("attn", *sub[1:]))
      return self._random_kernel(layer, sub[1])
    if sub[0] in _CROSS_NORMS:
      if copy:
        return self.decoder.get(_GEMMA2, layer, (_CROSS_NORMS[sub[0]], *sub[1:]))
      return np.zeros((self.config.decoder.embed_dim,), np.float32)
    return self.decoder.get(_GEMMA2, layer, sub)

  def close(self) -> None:
    """See base class."""
    self.encoder.close()
    if self.decoder is not self.encoder:
      self.decoder.close()

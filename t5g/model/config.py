"""Model configurations: the architecture (saved with every checkpoint) and how to compute it.

`StackConfig` describes one Gemma 2 transformer stack. A decoder-only Gemma 2 is one stack; a
T5Gemma encoder-decoder (`EncoderDecoderConfig`) is two, whose sizes may differ (e.g. 9B-2B).
`ClassifierConfig` is a T5Gemma encoder with a classification head (`t5g.model.classifier`).
`ComputeConfig` holds what does not change the function the model computes: dtypes, scan over
layers, rematerialisation. Only the architecture is written into checkpoints.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import gin
import jax.numpy as jnp

from t5g.errors import InputError

PAD_ID = 0
EOS_ID = 1
BOS_ID = 2  # Also the T5Gemma decoder start token.
# What a checkpoint records for t5g's embedded SentencePiece model (`t5g.data.vocabulary`); any
# other vocabulary is recorded as a copy of its file (`t5g.checkpoints.model_dir`).
EMBEDDED_VOCABULARY = "embedded"

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "save_sublayer_outputs")


@dataclasses.dataclass(frozen=True)
class StackConfig:
  """Architecture of one Gemma 2 stack: layer 0 local (sliding window), then alternating."""

  num_layers: int
  embed_dim: int
  hidden_dim: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  vocab_size: int = 256000
  sliding_window: int = 4096
  attn_logit_softcap: float | None = 50.0
  final_logit_softcap: float | None = 30.0
  query_pre_attn_scalar: float | None = None  # None: head_dim.
  rope_base: float = 10000.0
  rms_norm_eps: float = 1e-6

  def __post_init__(self):
    for name in ("num_layers", "embed_dim", "hidden_dim", "num_heads", "num_kv_heads",
                 "head_dim", "vocab_size", "sliding_window"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise InputError(f"StackConfig.{name} must be a positive int, got {value!r}")
    if self.num_heads % self.num_kv_heads:
      raise InputError(f"StackConfig.num_heads={self.num_heads} is not a multiple of "
                       f"num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise InputError(f"StackConfig.head_dim={self.head_dim} must be even for RoPE")

  @property
  def query_scale(self) -> float:
    """Factor applied to queries before the attention logits."""
    scalar = self.head_dim if self.query_pre_attn_scalar is None else self.query_pre_attn_scalar
    return float(scalar) ** -0.5

  def is_local(self, layer: int) -> bool:
    """Whether `layer` uses the sliding window (even layers) or attends globally (odd)."""
    return layer % 2 == 0

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], where: str = "config") -> "StackConfig":
    """Builds a config from a dict, naming `where` and the key at fault on bad input."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise InputError(f"{where}: unknown stack config key(s) {unknown}")
    try:
      return cls(**d)
    except TypeError as e:
      raise InputError(f"{where}: {e}") from None


@dataclasses.dataclass(frozen=True)
class EncoderDecoderConfig:
  """T5Gemma: a bidirectional encoder stack and a decoder stack with cross-attention.

  Cross-attention has the decoder's heads and head_dim; its keys and values read the encoder's
  width. Output logits use the decoder's (tied) embedding and final soft-cap.
  """

  encoder: StackConfig
  decoder: StackConfig

  def __post_init__(self):
    if self.encoder.vocab_size != self.decoder.vocab_size:
      raise InputError(f"encoder.vocab_size={self.encoder.vocab_size} != "
                       f"decoder.vocab_size={self.decoder.vocab_size}")

  @property
  def vocab_size(self) -> int:
    return self.decoder.vocab_size

  def to_dict(self) -> dict[str, Any]:
    return {"encoder": self.encoder.to_dict(), "decoder": self.decoder.to_dict()}


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
  """An encoder-only classifier: a T5Gemma encoder stack and a linear head over `num_classes`
  on the last non-padding token's final-normed state."""

  encoder: StackConfig
  num_classes: int

  def __post_init__(self):
    if not isinstance(self.num_classes, int) or self.num_classes < 2:
      raise InputError(f"ClassifierConfig.num_classes must be an int >= 2, got "
                       f"{self.num_classes!r}")

  def to_dict(self) -> dict[str, Any]:
    return {"encoder": self.encoder.to_dict(), "num_classes": self.num_classes}


ModelConfig = StackConfig | EncoderDecoderConfig | ClassifierConfig


def model_type(config: ModelConfig) -> str:
  """'gemma2' for a decoder-only stack, 't5gemma' for an encoder-decoder, 't5gemma_classifier'
  for an encoder with a classification head."""
  if isinstance(config, ClassifierConfig):
    return "t5gemma_classifier"
  return "t5gemma" if isinstance(config, EncoderDecoderConfig) else "gemma2"


def config_to_json(config: ModelConfig) -> dict[str, Any]:
  """A JSON-ready dict that `config_from_json` reads back."""
  return {"model_type": model_type(config), **config.to_dict()}


def config_from_json(d: Mapping[str, Any], where: str = "config") -> ModelConfig:
  """Reads a dict written by `config_to_json`; errors name `where` and the key at fault."""
  d = dict(d)
  kind = d.pop("model_type", None)
  if kind == "gemma2":
    return StackConfig.from_dict(d, where)
  if kind == "t5gemma":
    missing = [k for k in ("encoder", "decoder") if k not in d]
    if missing or set(d) - {"encoder", "decoder"}:
      raise InputError(f"{where}: a t5gemma config has exactly the keys 'encoder' and 'decoder', "
                       f"got {sorted(d)}")
    return EncoderDecoderConfig(StackConfig.from_dict(d["encoder"], f"{where}: encoder"),
                                StackConfig.from_dict(d["decoder"], f"{where}: decoder"))
  if kind == "t5gemma_classifier":
    if set(d) != {"encoder", "num_classes"}:
      raise InputError(f"{where}: a t5gemma_classifier config has exactly the keys 'encoder' and "
                       f"'num_classes', got {sorted(d)}")
    return ClassifierConfig(StackConfig.from_dict(d["encoder"], f"{where}: encoder"),
                            d["num_classes"])
  raise InputError(f"{where}: model_type must be 'gemma2', 't5gemma' or 't5gemma_classifier', "
                   f"got {kind!r}")


@dataclasses.dataclass(frozen=True)
class ComputeConfig:
  """How the model is computed; none of it changes the parameters' meaning.

  dtype: activations and matmul inputs; param_dtype: stored parameters (dtypes or their names,
  e.g. "bfloat16" from gin); scan_layers: run the layers as a `nn.scan` over (local, global)
  pairs; remat_policy: one of REMAT_POLICIES; attention_block_length: 0 computes each
  attention's scores for all queries at once, Q > 0 for Q queries at a time (local layers
  reading only their window's band of keys) when a call has more than Q queries
  (t5g/model/query_blocks.py): same results, peak memory O(Q·S) instead of O(T·S) per layer.
  """

  dtype: Any = jnp.bfloat16
  param_dtype: Any = jnp.float32
  scan_layers: bool = True
  remat_policy: str = "none"
  attention_block_length: int = 0

  def __post_init__(self):
    for name in ("dtype", "param_dtype"):
      try:
        object.__setattr__(self, name, jnp.dtype(getattr(self, name)).type)
      except TypeError:
        raise InputError(f"ComputeConfig.{name}={getattr(self, name)!r}: not a dtype") from None
    if self.remat_policy not in REMAT_POLICIES:
      raise InputError(f"ComputeConfig.remat_policy={self.remat_policy!r}: choose one of "
                       f"{REMAT_POLICIES}")
    block = self.attention_block_length
    if isinstance(block, bool) or not isinstance(block, int) or block < 0:
      raise InputError(f"t5g.ComputeConfig.attention_block_length={block!r}: must be an int >= 0 "
                       "(0: dense attention)")


gin.external_configurable(ComputeConfig, module="t5g")


FP32 = ComputeConfig(dtype=jnp.float32, param_dtype=jnp.float32, scan_layers=False)

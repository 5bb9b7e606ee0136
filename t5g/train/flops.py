"""Analytic FLOPs of a forward pass and a train step, and model FLOPs utilisation (MFU).

FLOPs are 2 × the multiply-adds of every matmul. Elementwise work (norms, soft-caps, softmax,
RoPE, GELU, masking) is not counted, nor is the embedding lookup (a gather). For batch B,
length L, width D, N query and K key/value heads of size H, MLP width F and vocabulary V, each
layer of a stack costs

  projections  2·B·L·D·(N+2K)·H + 2·B·L·N·H·D   (q, k, v in; o out)
  attention    2·2·B·pairs·N·H                   (Q·Kᵀ and probs·V)
  MLP          2·B·L·3·D·F                       (gate, up, down)

A decoder layer of length T with cross-attention over S encoder positions of width D_enc adds
2·B·T·D·N·H + 2·B·S·D_enc·2K·H + 2·B·T·N·H·D + 2·2·B·T·S·N·H: its K/V projections run over the
encoder length at the encoder's width. The decoder (or a Gemma 2) ends with the tied output
projection 2·B·T·D·V; the encoder has none.

`pairs` counts (query, key) pairs per sequence. attention="visible" counts those the mask lets
through for one unpacked full-length sequence: global causal L(L+1)/2, global bidirectional L²,
local causal window W sum_q min(q+1, W), local two-sided sum_q #{k : |q-k| < W, 0 <= k < L};
cross-attention T·S. attention="dense" counts L² (T·S) in every layer: the matmuls XLA runs
with masked dense attention (its cost analysis adds the elementwise work on top).

A train step is 3 student forwards (forward + backward, no recomputation) plus one forward of a
frozen decoder-only teacher when distilling. MFU = model FLOPs per step (attention="visible") /
(step time × peak FLOP/s). Recomputation under remat is not counted: this is MFU, not HFU.
"""

from __future__ import annotations

import numbers
import time

import jax
import jax.numpy as jnp

from t5g.model.config import EncoderDecoderConfig, ModelConfig, StackConfig

ATTENTION_MODES = ("visible", "dense")


def _check_length(name: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_positive(name: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
    raise ValueError(f"{name} must be a positive number, got {value!r}")


def _pairs(length: int, causal: bool, window: int | None, attention: str) -> int:
  """(query, key) pairs of one sequence; window None for global attention."""
  if attention == "dense":
    return length * length
  if window is None or window >= length:  # The window hides nothing.
    return length * (length + 1) // 2 if causal else length * length
  if causal:
    return window * (window + 1) // 2 + (length - window) * window
  return length * length - (length - window) * (length - window + 1)


def stack_forward_flops(config: StackConfig, batch: int, length: int, *, causal: bool,
                        cross_length: int | None = None, cross_kv_dim: int | None = None,
                        logits: bool, attention: str = "visible") -> float:
  """FLOPs of one stack's forward pass on tokens [batch, length].

  causal: decoder (True) or bidirectional encoder (False) masks. cross_length, cross_kv_dim:
  the encoder states [batch, cross_length, cross_kv_dim] every layer cross-attends to (both or
  neither). logits: add the tied output projection [batch, length, D] -> [batch, length, V].
  attention: "visible" or "dense" (see the module docstring).
  """
  _check_length("batch", batch)
  _check_length("length", length)
  if attention not in ATTENTION_MODES:
    raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
  if (cross_length is None) != (cross_kv_dim is None):
    raise ValueError(f"cross_length and cross_kv_dim go together, got cross_length="
                     f"{cross_length!r} and cross_kv_dim={cross_kv_dim!r}")
  d, f, v = config.embed_dim, config.hidden_dim, config.vocab_size
  n, k, h = config.num_heads, config.num_kv_heads, config.head_dim
  tokens = batch * length
  per_layer = 2 * tokens * d * (n + 2 * k) * h + 2 * tokens * n * h * d + 2 * tokens * 3 * d * f
  if cross_length is not None:
    _check_length("cross_length", cross_length)
    _check_length("cross_kv_dim", cross_kv_dim)
    per_layer += (2 * tokens * d * n * h + 2 * batch * cross_length * cross_kv_dim * 2 * k * h
                  + 2 * tokens * n * h * d + 2 * 2 * tokens * cross_length * n * h)
  total = config.num_layers * per_layer
  for layer in range(config.num_layers):
    window = config.sliding_window if config.is_local(layer) else None
    total += 2 * 2 * batch * _pairs(length, causal, window, attention) * n * h
  if logits:
    total += 2 * tokens * d * v
  return float(total)


def model_forward_flops(config: ModelConfig, batch: int, decoder_length: int,
                        encoder_length: int | None = None, attention: str = "visible") -> float:
  """FLOPs of a teacher-forced forward pass, up to float32 logits [batch, decoder_length, V].

  A T5Gemma `EncoderDecoderConfig` needs encoder_length (encoder tokens [batch,
  encoder_length]); a decoder-only Gemma 2 `StackConfig` takes none.
  """
  _check_length("decoder_length", decoder_length)
  if isinstance(config, EncoderDecoderConfig):
    if encoder_length is None:
      raise ValueError("encoder_length is required for an encoder-decoder (T5Gemma) config")
    _check_length("encoder_length", encoder_length)
    encoder = stack_forward_flops(config.encoder, batch, encoder_length, causal=False,
                                  logits=False, attention=attention)
    decoder = stack_forward_flops(config.decoder, batch, decoder_length, causal=True,
                                  cross_length=encoder_length,
                                  cross_kv_dim=config.encoder.embed_dim, logits=True,
                                  attention=attention)
    return encoder + decoder
  if not isinstance(config, StackConfig):
    raise ValueError(f"config must be a StackConfig or EncoderDecoderConfig, got "
                     f"{type(config).__name__}")
  if encoder_length is not None:
    raise ValueError(f"encoder_length must be None for a decoder-only Gemma 2 config, got "
                     f"{encoder_length!r}")
  return stack_forward_flops(config, batch, decoder_length, causal=True, logits=True,
                             attention=attention)


def train_step_flops(config: ModelConfig, batch: int, decoder_length: int,
                     encoder_length: int | None = None, attention: str = "visible",
                     teacher: StackConfig | None = None,
                     teacher_length: int | None = None) -> float:
  """FLOPs of one train step: 3 × the student forward (forward + backward) on [batch, lengths].

  teacher: a frozen decoder-only Gemma 2 run forward only on tokens [batch, teacher_length]
  (default encoder_length + decoder_length: the student's input and target concatenated).
  """
  flops = 3 * model_forward_flops(config, batch, decoder_length, encoder_length, attention)
  if teacher is None:
    if teacher_length is not None:
      raise ValueError(f"teacher_length={teacher_length!r} given without a teacher")
    return flops
  if not isinstance(teacher, StackConfig):
    raise ValueError(f"teacher must be a decoder-only Gemma 2 StackConfig, got "
                     f"{type(teacher).__name__}")
  if teacher_length is None:
    teacher_length = (encoder_length or 0) + decoder_length
  _check_length("teacher_length", teacher_length)
  return flops + stack_forward_flops(teacher, batch, teacher_length, causal=True, logits=True,
                                     attention=attention)


def mfu(flops_per_step: float, step_seconds: float, peak_flops_per_second: float) -> float:
  """Model FLOPs utilisation: flops_per_step / (step_seconds × peak_flops_per_second).

  Pass `train_step_flops(..., attention="visible")` and the peak of all devices together.
  """
  _check_positive("flops_per_step", flops_per_step)
  _check_positive("step_seconds", step_seconds)
  _check_positive("peak_flops_per_second", peak_flops_per_second)
  return flops_per_step / (step_seconds * peak_flops_per_second)


def measure_matmul_peak(dtype: str = "float32", size: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of one device on a jitted [size, size] @ [size, size] matmul (best of `repeats`):
  the measured peak that MFU is taken against when none is given."""
  a = jax.device_put(jnp.ones((size, size), dtype), jax.local_devices()[0])
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * size ** 3 / best

"""Helpers shared by the step benchmarks: timing, the matmul peak, random tokens, the HF model.

Imported by the scripts in this folder (which run with it on `sys.path`), not by t5g.
"""

from __future__ import annotations

import time

import numpy as np

from t5g.model.config import EncoderDecoderConfig
from t5g.train.flops import measure_matmul_peak

PEAK_N = 4096


def seconds(fn) -> float:
  """Wall-clock seconds of one call of `fn`."""
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def jax_matmul_gflops(n: int = PEAK_N, repeats: int = 5, dtype: str = "float32") -> float:
  """Best GFLOP/s of a jitted `dtype` [n, n] @ [n, n] matmul over `repeats` runs (the trainer's
  own peak measurement, `t5g.train.flops.measure_matmul_peak`)."""
  return measure_matmul_peak(dtype, n, repeats) / 1e9


def matmul_peak_gflops(n: int = PEAK_N, repeats: int = 5) -> tuple[float, float]:
  """Best fp32 [n, n] @ [n, n] GFLOP/s over `repeats` runs: jitted jnp, then torch."""
  import torch
  a, b = (torch.from_numpy(x) for x in _square_pair(n))
  a @ b
  best_torch = min(seconds(lambda: a @ b) for _ in range(repeats))
  return jax_matmul_gflops(n, repeats), 2 * n ** 3 / best_torch / 1e9


def _square_pair(n: int) -> tuple[np.ndarray, np.ndarray]:
  """Two random float32 [n, n] matrices (torch's side of the peak)."""
  rng = np.random.RandomState(0)
  return rng.randn(n, n).astype(np.float32), rng.randn(n, n).astype(np.float32)


def random_tokens(vocab: int, batch: int, enc_len: int, dec_len: int):
  """Encoder inputs, decoder inputs and decoder targets: int32 ids in [3, vocab)."""
  rng = np.random.RandomState(0)
  return tuple(rng.randint(3, vocab, (batch, n)).astype(np.int32)
               for n in (enc_len, dec_len, dec_len))


def hf_t5gemma(config: EncoderDecoderConfig):
  """transformers' `T5GemmaForConditionalGeneration` of `config`: random weights, train mode.

  Eager attention (transformers' T5Gemma rejects SDPA, which cannot apply the attention-logit
  soft-cap); dropout 0 (`stack_to_hf`).
  """
  import transformers
  from transformers.models.t5gemma.configuration_t5gemma import T5GemmaModuleConfig
  from t5g.compat.hf_config import stack_to_hf

  hf_config = transformers.T5GemmaConfig(
      encoder=T5GemmaModuleConfig(**stack_to_hf(config.encoder)),
      decoder=T5GemmaModuleConfig(**stack_to_hf(config.decoder)),
      vocab_size=config.vocab_size, attn_implementation="eager")
  return transformers.T5GemmaForConditionalGeneration(hf_config).train()


def memory_bandwidth_gbps(megabytes: int = 512, repeats: int = 5) -> float:
  """Best GB/s of a jitted float32 sum over a `megabytes` array (each byte read once): the
  machine's read bandwidth, what a weight-bound decode step is limited by."""
  import jax
  import jax.numpy as jnp
  x = jnp.ones((megabytes * 2 ** 20 // 4,), jnp.float32)
  total = jax.jit(jnp.sum)
  total(x).block_until_ready()
  best = min(seconds(lambda: total(x).block_until_ready()) for _ in range(repeats))
  return x.nbytes / best / 1e9

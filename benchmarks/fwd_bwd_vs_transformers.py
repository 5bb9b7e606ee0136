"""Forward+backward throughput of t5g vs transformers on the same T5Gemma size, one process.

    python benchmarks/fwd_bwd_vs_transformers.py [--preset=t5gemma-s-s] [--batch=2]
        [--enc_len=256] [--dec_len=256] [--steps=3] [--scan_layers=true]

Both sides compute the mean token cross-entropy of random targets (fp32, CPU) and its gradient
with respect to every parameter; the step is timed after a warm-up (compile) step. Figures
printed: tokens/s (encoder + decoder tokens), the t5g/transformers ratio, and each side's
achieved GFLOP/s against this machine's fp32 matmul peak, measured here with jnp and torch.

FLOPs per step (analytic, multiply-add = 2): forward = 2 * tokens * matmul parameters used
(encoder layers on encoder tokens; decoder layers, cross-attention Q/O and the V x D output
projection on decoder tokens; cross-attention K/V on encoder tokens) + attention
4 * B * T_q * T_kv * N * H per attention (encoder self, decoder self, cross), ignoring the
sliding window (which does not shorten 256-token inputs with W = 4096); backward = 2 x forward.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from t5g.model import ComputeConfig, get_preset, init_params, make_model
from t5g.model.config import EncoderDecoderConfig, StackConfig


def layer_matmul_params(cfg: StackConfig) -> int:
  """Matmul parameters of one self-attention + MLP layer."""
  attn = cfg.embed_dim * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
  return attn + 3 * cfg.embed_dim * cfg.hidden_dim


def step_flops(config: EncoderDecoderConfig, batch: int, enc_len: int, dec_len: int) -> float:
  """Analytic forward+backward FLOPs of one step (see the module docstring)."""
  enc, dec = config.encoder, config.decoder
  s, t = batch * enc_len, batch * dec_len
  cross_q_o = 2 * dec.embed_dim * dec.num_heads * dec.head_dim
  cross_k_v = 2 * enc.embed_dim * dec.num_kv_heads * dec.head_dim
  matmul = (2 * s * enc.num_layers * layer_matmul_params(enc)
            + 2 * t * dec.num_layers * (layer_matmul_params(dec) + cross_q_o)
            + 2 * s * dec.num_layers * cross_k_v
            + 2 * t * dec.vocab_size * dec.embed_dim)
  attention = 4 * batch * (enc.num_layers * enc_len * enc_len * enc.num_heads * enc.head_dim
                           + dec.num_layers * dec_len * (dec_len + enc_len) * dec.num_heads
                           * dec.head_dim)
  return 3.0 * (matmul + attention)


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> tuple[float, float]:
  """Best fp32 (n x n) @ (n x n) GFLOP/s with jax and with torch."""
  import torch
  a = jnp.asarray(np.random.RandomState(0).randn(n, n).astype(np.float32))
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best_jax = min(_timed(lambda: f(a).block_until_ready()) for _ in range(repeats))
  ta = torch.randn(n, n)
  ta @ ta
  best_torch = min(_timed(lambda: ta @ ta) for _ in range(repeats))
  return 2 * n ** 3 / best_jax / 1e9, 2 * n ** 3 / best_torch / 1e9


def _timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def t5g_step_seconds(config, batch, enc_len, dec_len, steps, scan_layers) -> float:
  """Mean seconds of a jitted loss+grad step of t5g."""
  compute = ComputeConfig(jnp.float32, jnp.float32, scan_layers=scan_layers)
  model = make_model(config, compute)
  params = init_params(config, compute, jax.random.PRNGKey(0))
  rng = np.random.RandomState(0)
  enc = jnp.asarray(rng.randint(3, config.vocab_size, (batch, enc_len)), jnp.int32)
  dec = jnp.asarray(rng.randint(3, config.vocab_size, (batch, dec_len)), jnp.int32)
  targets = jnp.asarray(rng.randint(3, config.vocab_size, (batch, dec_len)), jnp.int32)

  def loss_fn(p):
    logits = model.apply({"params": p}, enc, dec)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(log_probs, targets[..., None], axis=-1))

  step = jax.jit(jax.value_and_grad(loss_fn))
  jax.block_until_ready(step(params))
  times = [_timed(lambda: jax.block_until_ready(step(params))) for _ in range(steps)]
  return float(np.mean(times))


def transformers_step_seconds(config, batch, enc_len, dec_len, steps) -> float:
  """Mean seconds of an eager loss.backward() step of transformers' T5Gemma."""
  import torch
  import transformers
  from transformers.models.t5gemma.configuration_t5gemma import T5GemmaModuleConfig

  def module(cfg: StackConfig) -> T5GemmaModuleConfig:
    return T5GemmaModuleConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.embed_dim, intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
        sliding_window=cfg.sliding_window, query_pre_attn_scalar=cfg.head_dim,
        attn_logit_softcapping=cfg.attn_logit_softcap,
        final_logit_softcapping=cfg.final_logit_softcap)

  torch.set_num_threads(os.cpu_count())
  hf_config = transformers.T5GemmaConfig(encoder=module(config.encoder),
                                         decoder=module(config.decoder),
                                         vocab_size=config.vocab_size,
                                         attn_implementation="eager")
  model = transformers.T5GemmaForConditionalGeneration(hf_config).train()
  gen = torch.Generator().manual_seed(0)
  enc = torch.randint(3, config.vocab_size, (batch, enc_len), generator=gen)
  dec = torch.randint(3, config.vocab_size, (batch, dec_len), generator=gen)
  targets = torch.randint(3, config.vocab_size, (batch, dec_len), generator=gen)

  def step():
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=enc, decoder_input_ids=dec).logits
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    loss = -log_probs.gather(-1, targets[..., None]).mean()
    loss.backward()

  step()
  return float(np.mean([_timed(step) for _ in range(steps)]))


def main() -> None:
  """Runs both sides and prints the comparison."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="t5gemma-s-s")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--enc_len", type=int, default=256)
  parser.add_argument("--dec_len", type=int, default=256)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--scan_layers", choices=("true", "false"), default="true")
  args = parser.parse_args()
  config = get_preset(args.preset)
  shape = (config, args.batch, args.enc_len, args.dec_len)
  peak_jax, peak_torch = matmul_peak_gflops()
  ours = t5g_step_seconds(*shape, args.steps, args.scan_layers == "true")
  theirs = transformers_step_seconds(*shape, args.steps)
  flops, tokens = step_flops(*shape), args.batch * (args.enc_len + args.dec_len)
  peak = max(peak_jax, peak_torch)
  print(f"preset {args.preset}, batch {args.batch}, lengths {args.enc_len}/{args.dec_len}, fp32, "
        f"{os.cpu_count()} CPU cores; step = {flops / 1e9:.1f} GFLOP")
  print(f"matmul peak (fp32, 2048^3): jax {peak_jax:.1f} GFLOP/s, torch {peak_torch:.1f} GFLOP/s")
  for name, seconds in (("t5g", ours), ("transformers", theirs)):
    print(f"{name:>12}: {seconds:.3f} s/step, {tokens / seconds:,.0f} tokens/s, "
          f"{flops / seconds / 1e9:.1f} GFLOP/s = {100 * flops / seconds / 1e9 / peak:.0f}% of peak")
  print(f"ratio t5g / transformers (tokens/s): {theirs / ours:.2f}x")


if __name__ == "__main__":
  main()

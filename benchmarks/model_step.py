"""Forward+backward step throughput of t5g vs transformers, both measured in one process.

    python benchmarks/model_step.py [--preset=t5gemma-s-s] [--batch=2] [--enc_len=256]
        [--dec_len=256] [--steps=3] [--warmup=1] [--scan_layers=true] [--remat=none]

Each side builds the preset at the same sizes (random weights; only throughput is compared),
computes the loss on random tokens in [3, vocab) (fp32, CPU) and its gradient with respect to
every parameter: t5g as one jitted `jax.value_and_grad`, transformers' T5Gemma (eager
attention, train mode, no dropout) as `loss.backward()` with gradients set to None between
steps. The loss is the mean token cross-entropy of the decoder targets from `log_softmax` of the
logits. `--warmup` untimed steps (t5g compiles in the first) precede `--steps` timed ones.

Printed: the median step time (robust to the one-off stalls of a shared machine; every timed
step is listed), tokens/s (encoder + decoder tokens), the t5g/transformers ratio, and each
side's achieved GFLOP/s as a share of this machine's fp32 matmul peak: the best of several
4096^3 matmuls, jitted `jnp` and torch (both printed; the share uses the higher).

FLOPs per step (analytic; a multiply-add counts 2; S = encoder, T = decoder length, B batch):
  forward = 2 * tokens * matmul parameters used
              encoder layers (q, k, v, o, gate, up, down) on the B*S encoder tokens;
              decoder layers and cross-attention q, o on the B*T decoder tokens;
              cross-attention k, v on the B*S encoder tokens;
              the tied V x D output projection (256000 x 512 for S-S) on the B*T decoder tokens
          + 2 * 2 * B * Tq * Tkv * N * H per attention layer (scores and values): encoder self
              (S x S), decoder self (T x T), cross (T x S); causal and window masks not deducted
  backward = 2 * forward;  step = 3 * forward.
The embedding lookups, norms, soft-caps, softmaxes and the loss are not counted.
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np

from common import PEAK_N, hf_t5gemma, matmul_peak_gflops, random_tokens, seconds
from t5g.model import ComputeConfig, get_preset, init_params, make_model
from t5g.model.config import REMAT_POLICIES, EncoderDecoderConfig, StackConfig


def layer_matmul_params(cfg: StackConfig) -> int:
  """Matmul parameters of one self-attention + GeGLU layer."""
  attention = cfg.embed_dim * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
  return attention + 3 * cfg.embed_dim * cfg.hidden_dim


def step_flops(config: EncoderDecoderConfig, batch: int, enc_len: int, dec_len: int) -> float:
  """Analytic forward+backward FLOPs of one step (formula in the module docstring)."""
  enc, dec = config.encoder, config.decoder
  s, t = batch * enc_len, batch * dec_len
  cross_q_o = 2 * dec.embed_dim * dec.num_heads * dec.head_dim
  cross_k_v = 2 * enc.embed_dim * dec.num_kv_heads * dec.head_dim
  matmul = 2 * (s * enc.num_layers * layer_matmul_params(enc)
                + t * dec.num_layers * (layer_matmul_params(dec) + cross_q_o)
                + s * dec.num_layers * cross_k_v
                + t * dec.vocab_size * dec.embed_dim)
  attention = 4 * batch * (enc.num_layers * enc_len * enc_len * enc.num_heads * enc.head_dim
                           + dec.num_layers * dec_len * (dec_len + enc_len) * dec.num_heads
                           * dec.head_dim)
  return 3.0 * (matmul + attention)


def t5g_step_times(config, tokens, steps: int, warmup: int, compute: ComputeConfig) -> list[float]:
  """Seconds of each timed jitted loss-and-gradient step of t5g."""
  model = make_model(config, compute)
  params = init_params(config, compute, jax.random.PRNGKey(0))
  enc, dec, targets = (jnp.asarray(x) for x in tokens)

  def loss_fn(p):
    log_probs = jax.nn.log_softmax(model.apply({"params": p}, enc, dec), axis=-1)
    return -jnp.mean(jnp.take_along_axis(log_probs, targets[..., None], axis=-1))

  step = jax.jit(jax.value_and_grad(loss_fn))
  run = lambda: jax.block_until_ready(step(params))
  for _ in range(warmup):
    run()
  return [seconds(run) for _ in range(steps)]


def transformers_step_times(config, tokens, steps: int, warmup: int) -> list[float]:
  """Seconds of each timed eager forward + `loss.backward()` step of transformers' T5Gemma."""
  import torch

  model = hf_t5gemma(config)
  enc, dec, targets = (torch.from_numpy(x).long() for x in tokens)

  def run():
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=enc, decoder_input_ids=dec).logits
    log_probs = torch.log_softmax(logits, dim=-1)
    loss = -log_probs.gather(-1, targets[..., None]).mean()
    loss.backward()

  for _ in range(warmup):
    run()
  return [seconds(run) for _ in range(steps)]


def main() -> None:
  """Parses the flags, measures the peak and both sides, and prints the summary."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="t5gemma-s-s")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--enc_len", type=int, default=256)
  parser.add_argument("--dec_len", type=int, default=256)
  parser.add_argument("--steps", type=int, default=3, help="timed steps per side")
  parser.add_argument("--warmup", type=int, default=1, help="untimed steps per side")
  parser.add_argument("--scan_layers", choices=("true", "false"), default="true")
  parser.add_argument("--remat", choices=REMAT_POLICIES, default="none")
  args = parser.parse_args()
  config = get_preset(args.preset)
  if not isinstance(config, EncoderDecoderConfig):
    parser.error(f"--preset={args.preset} is not a T5Gemma (encoder-decoder) preset")

  import torch
  cores = len(os.sched_getaffinity(0))
  torch.set_num_threads(cores)
  compute = ComputeConfig(dtype=jnp.float32, param_dtype=jnp.float32,
                          scan_layers=args.scan_layers == "true", remat_policy=args.remat)
  tokens = random_tokens(config.vocab_size, args.batch, args.enc_len, args.dec_len)
  peak_jax, peak_torch = matmul_peak_gflops()
  times = {"t5g": t5g_step_times(config, tokens, args.steps, args.warmup, compute),
           "transformers": transformers_step_times(config, tokens, args.steps, args.warmup)}

  flops = step_flops(config, args.batch, args.enc_len, args.dec_len)
  n_tokens = args.batch * (args.enc_len + args.dec_len)
  print(f"preset {args.preset}, batch {args.batch}, lengths {args.enc_len}/{args.dec_len}, fp32, "
        f"{cores} CPU cores, scan_layers={args.scan_layers}, remat={args.remat}, "
        f"{args.warmup} warm-up + {args.steps} timed steps")
  print(f"step = {flops / 1e9:.1f} GFLOP (analytic); fp32 matmul peak ({PEAK_N}^3): "
        f"jax {peak_jax:.1f} GFLOP/s, torch {peak_torch:.1f} GFLOP/s")
  peak = max(peak_jax, peak_torch)
  median = {name: float(np.median(t)) for name, t in times.items()}
  for name, t in times.items():
    gflops = flops / median[name] / 1e9
    print(f"{name:>12}: {median[name]:.3f} s/step (steps: {', '.join(f'{x:.2f}' for x in t)}), "
          f"{n_tokens / median[name]:,.1f} tokens/s, {gflops:.1f} GFLOP/s = "
          f"{100 * gflops / peak:.0f}% of peak")
  print(f"ratio t5g / transformers (tokens/s, median steps): "
        f"{median['transformers'] / median['t5g']:.2f}x")


if __name__ == "__main__":
  main()

"""Train-step time of dense vs query-blocked attention (`ComputeConfig.attention_block_length`).

    python benchmarks/attention_blocks.py [--preset=t5gemma-tiny-tiny] [--batch=8]
        [--enc_len=512] [--dec_len=512] [--rounds=5] [--blocks=0,64,128,256]

For each block length Q (0: the dense path) the script builds the trainer's jitted float32
step (`make_train_step`, AdamW with clipping, state donated) on the same random full rows,
compiles it and prints the first step's loss (the same for every Q: the blocked path is exact).
It then times `--rounds` rounds, each running one step of every Q in turn, so that a busy
machine slows all of them alike, and prints each Q's median step time and its speed-up over the
first Q in `--blocks`.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from t5g.model import ComputeConfig, get_preset, init_params, make_model
from t5g.train.optimizers import (OptimizerConfig, Phase, learning_rate_schedule,
                                  make_optimizer)
from t5g.train.train_step import LossConfig, StepState, make_train_step

OPTIMIZER = OptimizerConfig(name="adamw", learning_rate=1e-4, schedule="constant",
                            clip_global_norm=1.0)


def random_batch(vocab: int, batch: int, enc_len: int, dec_len: int) -> dict[str, jax.Array]:
  """Full (unpadded) random rows: encoder [batch, enc_len], decoder [batch, dec_len]."""
  rng = np.random.RandomState(0)
  tokens = lambda length: jnp.asarray(rng.randint(3, vocab, (batch, length)), jnp.int32)
  return {"encoder_input_tokens": tokens(enc_len), "decoder_input_tokens": tokens(dec_len),
          "decoder_target_tokens": tokens(dec_len),
          "decoder_loss_weights": jnp.ones((batch, dec_len), jnp.float32)}


def compiled_step(config, block_length: int):
  """(jitted train step, its initial state) with attention blocks of `block_length`."""
  compute = ComputeConfig(dtype="float32", attention_block_length=block_length)
  params = init_params(config, compute, jax.random.PRNGKey(0))
  optimizer = make_optimizer(OPTIMIZER, params, Phase(0))
  step = jax.jit(make_train_step(make_model(config, compute), optimizer, LossConfig(),
                                 learning_rate_schedule(OPTIMIZER)), donate_argnums=0)
  return step, StepState(jnp.zeros((), jnp.int32), params, optimizer.init(params))


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--preset", default="t5gemma-tiny-tiny")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--enc_len", type=int, default=512)
  parser.add_argument("--dec_len", type=int, default=512)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--blocks", default="0,64,128,256")
  args = parser.parse_args()

  config = get_preset(args.preset)
  data = random_batch(config.vocab_size, args.batch, args.enc_len, args.dec_len)
  blocks = [int(q) for q in args.blocks.split(",")]
  steps, states = {}, {}
  for q in blocks:
    steps[q], states[q] = compiled_step(config, q)
    start = time.perf_counter()
    states[q], metrics = jax.block_until_ready(steps[q](states[q], data))
    print(f"Q={q}: first step (compiles) {time.perf_counter() - start:.1f} s, loss "
          f"{float(metrics['loss']):.6f}", flush=True)
  print(f"load {os.getloadavg()[0]:.2f}", flush=True)
  times = {q: [] for q in blocks}
  for _ in range(args.rounds):
    for q in blocks:
      start = time.perf_counter()
      states[q], _ = jax.block_until_ready(steps[q](states[q], data))
      times[q].append(time.perf_counter() - start)
  base = np.median(times[blocks[0]])
  for q in blocks:
    median = np.median(times[q])
    print(f"Q={q}: median {median:.3f} s/step [{', '.join(f'{t:.2f}' for t in times[q])}]; "
          f"{base / median:.2f}x Q={blocks[0]}")
  print(f"load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
  main()

"""Greedy decoding throughput of t5g vs transformers `generate`, and t5g's step against the bound.

    python benchmarks/decode.py [--preset=t5gemma-s-s] [--input_len=256] [--new_tokens=64]
        [--batches=4,32] [--scan_layers=false]

Both sides decode the same checkpoint: random t5g parameters saved as a t5g step and exported
with t5g's export (float32) to a HF folder that transformers loads (eager attention, the only
one its T5Gemma allows). Inputs: random ids in [3, vocab), `--input_len` per row; EOS is
disabled on both sides, so every row generates `--new_tokens`. Per batch size: one warm-up call
(t5g compiles in it; transformers' generates 2 tokens), then one timed call of each;
tokens/s = batch * new_tokens / wall time (encoder included). Printed: t5g / transformers.

The decode step: t5g's time per new token, (T(new_tokens) - T(1)) / (new_tokens - 1), against
this machine's bound for one step, max(bytes / bandwidth, FLOPs / matmul peak):
  bytes = every decoder layer weight (self-attention, cross-attention q/o, MLP, norms; cross
          k/v are cached) + the vocab x D output table, float32, read once per step;
  FLOPs = 2 * batch * those matmul parameters + the attention over the cache and the encoder
          states (2 * 2 * batch * heads * head_dim * (T + S) per layer);
bandwidth: best jitted float32 sum over 512 MiB (common.memory_bandwidth_gbps); peak: best
jitted fp32 4096^3 matmul (t5g.train.flops.measure_matmul_peak). Printed: bound / step.

The head alone: the step's output projection, [batch, D] x [D, vocab] float32, timed by itself
(best of 5) as a jitted XLA dot and as a torch (BLAS) matmul on the same table; its time is a
floor under any step that computes the logits, and bound / head says how much of the bound that
floor alone takes up.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import jax
import numpy as np

from common import PEAK_N, jax_matmul_gflops, memory_bandwidth_gbps, seconds
from t5g.checkpoints import model_dir
from t5g.compat.convert import export_checkpoint
from t5g.inference.decoding import DecodeConfig, generate
from t5g.model import ComputeConfig, get_preset, init_params
from t5g.model.config import EncoderDecoderConfig, StackConfig

NO_EOS = -1


def step_params(dec: StackConfig) -> tuple[int, int]:
  """(weights read per decode step, of which matmul parameters) of a decoder stack + table."""
  attention = dec.embed_dim * dec.head_dim * (2 * dec.num_heads + 2 * dec.num_kv_heads)
  cross_q_o = 2 * dec.embed_dim * dec.num_heads * dec.head_dim
  mlp = 3 * dec.embed_dim * dec.hidden_dim
  matmul = dec.num_layers * (attention + cross_q_o + mlp) + dec.vocab_size * dec.embed_dim
  return matmul + dec.num_layers * 6 * dec.embed_dim, matmul


def step_bound(config: EncoderDecoderConfig, batch: int, input_len: int, new_tokens: int,
               gbps: float, gflops: float) -> tuple[float, float, float]:
  """(bound seconds, memory seconds, compute seconds) of one decode step (module docstring)."""
  dec = config.decoder
  weights, matmul = step_params(dec)
  attention = 4 * batch * dec.num_heads * dec.head_dim * (new_tokens + input_len) * dec.num_layers
  memory = 4 * weights / (gbps * 1e9)
  compute = (2 * batch * matmul + attention) / (gflops * 1e9)
  return max(memory, compute), memory, compute


def head_alone_seconds(table: np.ndarray, batch: int, repeats: int = 5) -> tuple[float, float]:
  """Best seconds of [batch, D] x [D, V] against `table` [V, D] float32: (jitted XLA, torch)."""
  import torch
  hidden = np.random.RandomState(0).randn(batch, table.shape[1]).astype(np.float32)
  project = jax.jit(lambda h, t: jax.numpy.einsum("bd,vd->bv", h, t))
  h_jax, t_jax = jax.numpy.asarray(hidden), jax.numpy.asarray(table)
  project(h_jax, t_jax).block_until_ready()
  h_torch, t_torch = torch.from_numpy(hidden), torch.from_numpy(table)
  with torch.no_grad():
    ours = min(seconds(lambda: project(h_jax, t_jax).block_until_ready())
               for _ in range(repeats))
    theirs = min(seconds(lambda: h_torch @ t_torch.T) for _ in range(repeats))
  return ours, theirs


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--preset", default="t5gemma-s-s")
  parser.add_argument("--input_len", type=int, default=256)
  parser.add_argument("--new_tokens", type=int, default=64)
  parser.add_argument("--batches", default="4,32")
  parser.add_argument("--scan_layers", type=lambda v: v.lower() == "true", default=False)
  args = parser.parse_args()

  import torch
  import transformers
  config = get_preset(args.preset)
  gbps, gflops = memory_bandwidth_gbps(), jax_matmul_gflops(PEAK_N)
  print(f"machine: read bandwidth {gbps:.1f} GB/s, fp32 matmul peak {gflops:.1f} GFLOP/s, "
        f"load {os.getloadavg()[0]:.2f}")
  with tempfile.TemporaryDirectory() as tmp:
    params = init_params(config, ComputeConfig(scan_layers=args.scan_layers),
                         jax.random.PRNGKey(0))
    model_dir.save(os.path.join(tmp, "t5g"), 0, params, config, args.scan_layers)
    del params
    export_checkpoint(os.path.join(tmp, "t5g"), os.path.join(tmp, "hf"), verify=False)
    loaded = model_dir.load(os.path.join(tmp, "t5g"))
    table = np.array(loaded.params["decoder"]["embedder"]["embedding"], np.float32)  # writable
    hf = transformers.T5GemmaForConditionalGeneration.from_pretrained(
        os.path.join(tmp, "hf"), attn_implementation="eager", dtype=torch.float32).eval()
  hf.generation_config.eos_token_id = None

  for batch in (int(b) for b in args.batches.split(",")):
    rng = np.random.RandomState(batch)
    inputs = rng.randint(3, config.vocab_size, (batch, args.input_len)).astype(np.int32)

    def ours(n):
      return generate(loaded.config, loaded.params, inputs,
                      DecodeConfig(max_new_tokens=n, eos_id=NO_EOS), scanned=loaded.scanned)

    def theirs(n):
      with torch.no_grad():
        return hf.generate(input_ids=torch.tensor(inputs).long(), do_sample=False,
                           max_new_tokens=n, pad_token_id=0)

    ours(args.new_tokens), ours(1), theirs(2)  # Warm-up (t5g compiles).
    t_ours, t_one, t_theirs = (seconds(lambda: ours(args.new_tokens)), seconds(lambda: ours(1)),
                               seconds(lambda: theirs(args.new_tokens)))
    tokens = batch * args.new_tokens
    step = (t_ours - t_one) / (args.new_tokens - 1)
    bound, memory, compute = step_bound(config, batch, args.input_len, args.new_tokens, gbps,
                                        gflops)
    print(f"batch {batch}: t5g {tokens / t_ours:.1f} tokens/s ({t_ours:.2f} s), transformers "
          f"{tokens / t_theirs:.1f} tokens/s ({t_theirs:.2f} s): t5g / transformers = "
          f"{t_theirs / t_ours:.2f}x; step {step * 1e3:.1f} ms vs bound {bound * 1e3:.1f} ms "
          f"(memory {memory * 1e3:.1f}, compute {compute * 1e3:.1f}): bound / step = "
          f"{bound / step:.0%}; load {os.getloadavg()[0]:.2f}")
    head_xla, head_torch = head_alone_seconds(table, batch)
    print(f"batch {batch}: head alone {head_xla * 1e3:.1f} ms (XLA), {head_torch * 1e3:.1f} ms "
          f"(torch): bound / head = {bound / head_xla:.0%} (XLA), {bound / head_torch:.0%} "
          f"(torch); load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
  main()

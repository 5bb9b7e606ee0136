"""Train-step throughput and MFU of t5g vs transformers + torch AdamW, both in one process.

    python benchmarks/train_step.py [--preset=t5gemma-s-s] [--batch=2] [--enc_len=128]
        [--dec_len=128] [--steps=3] [--warmup=1] [--dtype=float32] [--scan_layers=true]
        [--remat=none] [--breakdown] [--logits_chunk_length=0[,N...]] [--t5g_only]

Both sides train the preset at the same sizes from random weights (only throughput is
compared) on one batch of full rows: random tokens in [3, vocab), every target weighted 1, CPU.
Parameters and optimizer state are float32 on both sides; `--dtype` is t5g's compute dtype
(activations and matmul inputs; its logits and loss stay float32). transformers always computes
in float32, the baseline: on this project's 2-core AMD EPYC (no AVX-512 BF16), torch's bfloat16
matmul runs at about 0.3 GFLOP/s, which makes autocast training unusable.

  t5g: the trainer's step, `t5g.train.train_step.make_train_step` with `LossConfig()` (token
    cross-entropy) and `make_optimizer` (AdamW b1 0.9, b2 0.999, eps 1e-8, no weight decay,
    gradient clipping at global norm 1, constant learning rate 1e-4), jitted with the
    `StepState` donated, as `t5g.train.trainer` runs it.
  transformers: `T5GemmaForConditionalGeneration` (eager attention: its T5Gemma rejects SDPA,
    which cannot soft-cap the attention logits; train mode, dropout 0), `loss =
    model(..., labels=targets).loss` (its mean token cross-entropy), `loss.backward()`,
    `torch.nn.utils.clip_grad_norm_(params, 1.0)`, `torch.optim.AdamW` with the same
    hyper-parameters (its default implementation), `zero_grad(set_to_none=True)`. torch uses
    one thread per CPU core.

`--warmup` untimed steps (t5g compiles in the first) precede `--steps` timed ones, each ended by
`block_until_ready` on t5g's new state and metrics. Printed: the 1-minute load average at start
and end (other processes on the cores lower the peak and slow transformers' threads far more
than t5g: such runs overstate both MFU and the ratio); per side the median step time (robust to
the stalls of a shared machine; every timed step is listed), tokens/s (decoder target tokens,
and encoder + decoder tokens), achieved GFLOP/s and MFU; then the t5g / transformers ratio and
whether the targets (≥ 2× transformers, t5g ≥ 65% of peak) are met.

FLOPs per step: `t5g.train.flops.train_step_flops(attention="visible")` (3 × the forward's
matmuls, visible attention pairs only; elementwise work, the loss and the optimizer not
counted). MFU = those FLOPs / (median step time × peak), the peak being the best GFLOP/s this
machine reached on a 4096³ matmul, best of 5: float32 jitted jnp or torch, and (if `--dtype` is
bfloat16) bfloat16 jitted jnp.

`--breakdown` also times, per side, three parts alone: the loss and gradients (no optimizer);
the output head: the tied [V, D] projection of random decoder states, the final soft-cap and
the token cross-entropy, forward and backward (t5g: its `Embedder.decode` and `losses` in
`--dtype`; torch: the same ops in float32); and the optimizer update (clipping, AdamW, the new
parameters) on one step's gradients. Loss-and-gradients − head is the embeddings and the layers.
The parts need not add up to the step: t5g's loss and gradients alone write fresh buffers each
call (the page faults of about 1.3 GB of gradients), where the donated step reuses its inputs'.

`--logits_chunk_length`: t5g's `LossConfig.logits_chunk_length` (0: materialised logits; N: the
vocabulary-tiled head, `t5g.train.chunked_loss`, N decoder positions per chunk; its head alone
is then `chunked_loss_sums`' forward and backward). Several comma-separated values are an A/B
in one process: each is compiled, and every warm-up and timed round runs one step of each in
turn on the same training state, so that the load of a shared machine falls on all alike. `--t5g_only` skips
transformers (and the ratio).
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from common import (PEAK_N, hf_t5gemma, jax_matmul_gflops, matmul_peak_gflops, random_tokens,
                    seconds)
from t5g.model import ComputeConfig, get_preset, init_params, make_model
from t5g.model.config import REMAT_POLICIES, EncoderDecoderConfig
from t5g.model.layers import Embedder
from t5g.train import losses
from t5g.train.chunked_loss import chunked_loss_sums
from t5g.train.flops import mfu, train_step_flops
from t5g.train.optimizers import OptimizerConfig, Phase, learning_rate_schedule, make_optimizer
from t5g.train.train_step import LossConfig, StepState, loss_sums, make_train_step

OPTIMIZER = OptimizerConfig(name="adamw", learning_rate=1e-4, schedule="constant",
                            b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, clip_global_norm=1.0)
TARGET_RATIO, TARGET_MFU = 2.0, 0.65


def timed(run, steps: int, warmup: int) -> list[float]:
  """Seconds of each of `steps` calls of `run` after `warmup` untimed ones."""
  for _ in range(warmup):
    run()
  return [seconds(run) for _ in range(steps)]


def t5g_batch(tokens) -> dict[str, jax.Array]:
  """The trainer's features of full unpacked rows, every target weighted 1."""
  enc, dec, targets = (jnp.asarray(x) for x in tokens)
  return {"encoder_input_tokens": enc, "decoder_input_tokens": dec,
          "decoder_target_tokens": targets,
          "decoder_loss_weights": jnp.ones(targets.shape, jnp.float32)}


def t5g_name(chunk_length: int) -> str:
  """The printed name of t5g with `--logits_chunk_length` value chunk_length."""
  return "t5g" if chunk_length == 0 else f"t5g chunk {chunk_length}"


def t5g_times(config, tokens, args, compute: ComputeConfig, chunk_lengths: list[int]
              ) -> dict[str, dict[str, list[float]]]:
  """Per `t5g_name`: seconds of each timed t5g train step (and, with --breakdown, of its parts)
  with each logits chunk length, the steps of all lengths run in turn."""
  model = make_model(config, compute)
  params = init_params(config, compute, jax.random.PRNGKey(0))
  batch = t5g_batch(tokens)
  optimizer = make_optimizer(OPTIMIZER, params, Phase(0))
  times = {t5g_name(n): {} for n in chunk_lengths}
  if args.breakdown:
    grad_fn = jax.grad(loss_sums, has_aux=True)
    for n in chunk_lengths:
      loss_grads = jax.jit(lambda p, b, n=n: grad_fn(p, b, model,
                                                     LossConfig(logits_chunk_length=n), None))
      times[t5g_name(n)]["loss+grad"] = timed(
          lambda: jax.block_until_ready(loss_grads(params, batch)), args.steps, args.warmup)
      times[t5g_name(n)]["head"] = t5g_head_times(config.decoder, tokens[2], args, compute, n)
    optimizer_times = t5g_optimizer_times(optimizer, params, loss_grads(params, batch)[0], args)
    for parts in times.values():
      parts["optimizer"] = optimizer_times
  steps = {n: jax.jit(make_train_step(model, optimizer, LossConfig(logits_chunk_length=n),
                                      learning_rate_schedule(OPTIMIZER)), donate_argnums=0)
           for n in chunk_lengths}
  state = StepState(jnp.zeros((), jnp.int32), params, optimizer.init(params))
  losses_seen = {n: [] for n in chunk_lengths}

  def run(n):  # The steps of all lengths train one state in turn (one copy in memory).
    nonlocal state
    state, metrics = jax.block_until_ready(steps[n](state, batch))
    losses_seen[n].append(float(metrics["loss"]))

  for n in chunk_lengths * args.warmup:
    run(n)
  for n in chunk_lengths:
    times[t5g_name(n)]["step"] = []
  for _ in range(args.steps):
    for n in chunk_lengths:
      times[t5g_name(n)]["step"].append(seconds(lambda: run(n)))
  for n in chunk_lengths:
    check_finite(t5g_name(n), losses_seen[n])
  return times


def t5g_optimizer_times(optimizer, params, grads, args) -> list[float]:
  """Seconds of the optimizer update alone, on copies of the parameters (donated, as in the
  step) and a fresh optimizer state."""
  def update(params, opt_state, grads):
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  update = jax.jit(update, donate_argnums=(0, 1))
  held = (jax.tree_util.tree_map(jnp.copy, params), optimizer.init(params))

  def run():
    nonlocal held
    held = jax.block_until_ready(update(*held, grads))

  return timed(run, args.steps, args.warmup)


def t5g_head_times(decoder, targets: np.ndarray, args, compute: ComputeConfig,
                   chunk_length: int) -> list[float]:
  """Seconds of the output head's forward and backward alone: tied projection, soft-cap, CE
  (materialised, or `chunked_loss_sums` in chunks of chunk_length > 0 positions)."""
  embedder = Embedder(decoder.vocab_size, decoder.embed_dim, compute.dtype, compute.param_dtype)
  rng = np.random.RandomState(1)
  hidden = jnp.asarray(rng.randn(*targets.shape, decoder.embed_dim), compute.dtype)
  table = {"embedding": jnp.asarray(rng.randn(decoder.vocab_size, decoder.embed_dim)
                                    * decoder.embed_dim ** -0.5, compute.param_dtype)}
  targets = jnp.asarray(targets)
  cap = decoder.final_logit_softcap

  def loss(table, hidden):
    if chunk_length:
      return chunked_loss_sums(hidden, table["embedding"], targets, jnp.ones(targets.shape),
                               chunk_length=chunk_length, final_softcap=cap)[0]
    logits = embedder.apply({"params": table}, hidden, method=Embedder.decode)
    if cap is not None:
      logits = jnp.tanh(logits / cap) * cap
    return jnp.sum(losses.cross_entropy(logits, targets)[0])

  grads = jax.jit(jax.grad(loss, argnums=(0, 1)))
  return timed(lambda: jax.block_until_ready(grads(table, hidden)), args.steps, args.warmup)


def transformers_times(config, tokens, args) -> dict[str, list[float]]:
  """Seconds of each timed transformers + torch AdamW train step (and, with --breakdown, of its
  parts)."""
  import torch

  model = hf_t5gemma(config)
  params = [p for p in model.parameters() if p.requires_grad]
  optimizer = torch.optim.AdamW(params, lr=OPTIMIZER.learning_rate,
                                betas=(OPTIMIZER.b1, OPTIMIZER.b2), eps=OPTIMIZER.eps,
                                weight_decay=OPTIMIZER.weight_decay)
  enc, dec, targets = (torch.from_numpy(x).long() for x in tokens)
  losses_seen = []

  def loss_and_grads():
    loss = model(input_ids=enc, decoder_input_ids=dec, labels=targets).loss
    loss.backward()
    return loss

  def run():
    losses_seen.append(loss_and_grads().item())
    torch.nn.utils.clip_grad_norm_(params, OPTIMIZER.clip_global_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

  times = {}
  if args.breakdown:
    def grads_only():
      loss_and_grads()
      model.zero_grad(set_to_none=True)
    times["loss+grad"] = timed(grads_only, args.steps, args.warmup)
    loss_and_grads()

    def update_only():
      torch.nn.utils.clip_grad_norm_(params, OPTIMIZER.clip_global_norm)
      optimizer.step()
    times["optimizer"] = timed(update_only, args.steps, args.warmup)
    model.zero_grad(set_to_none=True)
    times["head"] = torch_head_times(config.decoder, tokens[2], args.steps, args.warmup)
  times["step"] = timed(run, args.steps, args.warmup)
  check_finite("transformers", losses_seen)
  return times


def torch_head_times(decoder, targets: np.ndarray, steps: int, warmup: int) -> list[float]:
  """Seconds of the output head's forward and backward alone, as transformers computes it."""
  import torch

  rng = np.random.RandomState(1)
  hidden = torch.from_numpy(rng.randn(*targets.shape, decoder.embed_dim).astype(np.float32))
  table = torch.from_numpy((rng.randn(decoder.vocab_size, decoder.embed_dim)
                            * decoder.embed_dim ** -0.5).astype(np.float32))
  hidden.requires_grad_(True)
  table.requires_grad_(True)
  targets = torch.from_numpy(targets).long()
  cap = decoder.final_logit_softcap

  def run():
    logits = torch.nn.functional.linear(hidden, table)
    if cap is not None:
      logits = torch.tanh(logits / cap) * cap
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                             reduction="sum")
    loss.backward()
    hidden.grad = table.grad = None

  return timed(run, steps, warmup)


def check_finite(name: str, values: list[float]) -> None:
  """Raises if a step's loss was not finite (a broken step is not a benchmark)."""
  if not np.all(np.isfinite(values)):
    raise RuntimeError(f"{name}: non-finite loss in {values}")


def main() -> None:
  """Parses the flags, measures the peak and both sides, and prints the summary."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="t5gemma-s-s")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--enc_len", type=int, default=128)
  parser.add_argument("--dec_len", type=int, default=128)
  parser.add_argument("--steps", type=int, default=3, help="timed steps per side")
  parser.add_argument("--warmup", type=int, default=1, help="untimed steps per side")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                      help="t5g's compute dtype (parameters and optimizer state stay float32)")
  parser.add_argument("--scan_layers", choices=("true", "false"), default="true")
  parser.add_argument("--remat", choices=REMAT_POLICIES, default="none")
  parser.add_argument("--breakdown", action="store_true",
                      help="also time the loss+gradients, the output head and the optimizer "
                      "alone")
  parser.add_argument("--logits_chunk_length", default="0",
                      help="t5g's LossConfig.logits_chunk_length; comma-separated values are "
                      "timed in turn in this process (an A/B)")
  parser.add_argument("--t5g_only", action="store_true", help="do not run transformers")
  args = parser.parse_args()
  chunk_lengths = [int(n) for n in args.logits_chunk_length.split(",")]
  config = get_preset(args.preset)
  if not isinstance(config, EncoderDecoderConfig):
    parser.error(f"--preset={args.preset} is not a T5Gemma (encoder-decoder) preset")

  import torch
  load_before = os.getloadavg()[0]
  cores = len(os.sched_getaffinity(0))
  torch.set_num_threads(cores)
  compute = ComputeConfig(dtype=args.dtype, param_dtype=jnp.float32,
                          scan_layers=args.scan_layers == "true", remat_policy=args.remat)
  tokens = random_tokens(config.vocab_size, args.batch, args.enc_len, args.dec_len)
  peaks = dict(zip(("float32 jax", "float32 torch"), matmul_peak_gflops()))
  if args.dtype == "bfloat16":
    peaks["bfloat16 jax"] = jax_matmul_gflops(dtype="bfloat16")
  peak = max(peaks.values())
  times = t5g_times(config, tokens, args, compute, chunk_lengths)
  if not args.t5g_only:
    times["transformers"] = transformers_times(config, tokens, args)

  flops = train_step_flops(config, args.batch, args.dec_len, args.enc_len, attention="visible")
  head = 3 * 2 * args.batch * args.dec_len * config.decoder.embed_dim * config.vocab_size
  print(f"preset {args.preset}, batch {args.batch}, lengths {args.enc_len}/{args.dec_len}, "
        f"t5g compute {args.dtype} (transformers float32), fp32 params and AdamW state, "
        f"{cores} CPU cores, scan_layers={args.scan_layers}, remat={args.remat}, "
        f"{args.warmup} warm-up + {args.steps} timed steps, t5g logits chunk length(s) "
        f"{args.logits_chunk_length}")
  print(f"1-minute load average: {load_before:.2f} at start, {os.getloadavg()[0]:.2f} at end "
        f"(this run adds up to {cores}; more means other processes shared the cores)")
  print(f"step = {flops / 1e9:.1f} GFLOP (analytic, visible attention; output projection "
        f"{head / 1e9:.1f}); matmul peak ({PEAK_N}^3): " + ", ".join(
            f"{name} {gflops:.1f}" for name, gflops in peaks.items()) + f" GFLOP/s; peak used "
        f"{peak:.1f}")
  median = {name: {part: float(np.median(t)) for part, t in parts.items()}
            for name, parts in times.items()}
  for name, parts in times.items():
    step = median[name]["step"]
    print(f"{name:>12}: {step:.3f} s/step (steps: {', '.join(f'{x:.2f}' for x in parts['step'])}),"
          f" {args.batch * args.dec_len / step:,.1f} target tokens/s, "
          f"{args.batch * (args.enc_len + args.dec_len) / step:,.1f} enc+dec tokens/s, "
          f"{flops / step / 1e9:.1f} GFLOP/s, MFU {mfu(flops, step, peak * 1e9):.1%}")
    if args.breakdown:
      grads, head_s = median[name]["loss+grad"], median[name]["head"]
      print(f"{'':>12}  loss+grad {grads:.3f} s (output head alone {head_s:.3f} s, "
            f"{head / head_s / 1e9:.1f} GFLOP/s; rest {grads - head_s:.3f} s), "
            f"optimizer alone {median[name]['optimizer']:.3f} s")
  if args.t5g_only:
    return
  t5g_step = median[t5g_name(chunk_lengths[0])]["step"]
  ratio = median["transformers"]["step"] / t5g_step
  t5g_mfu = mfu(flops, t5g_step, peak * 1e9)
  print(f"ratio {t5g_name(chunk_lengths[0])} / transformers (tokens/s, median steps): "
        f"{ratio:.2f}x")
  verdict = {True: "met", False: "NOT met"}
  print(f"target >= {TARGET_RATIO:.0f}x transformers: {verdict[ratio >= TARGET_RATIO]}; "
        f"target t5g MFU >= {TARGET_MFU:.0%}: {verdict[t5g_mfu >= TARGET_MFU]}")


if __name__ == "__main__":
  main()

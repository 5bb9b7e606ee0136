"""Input pipeline throughput of the packed UL2 and PrefixLM tasks on the embedded corpus.

    python benchmarks/data_pipeline.py [--lengths=512] [--batch=8] [--batches=300]
        [--resume_after=2000] [--step_preset=t5gemma-tiny-tiny] [--step_steps=5]
        [--presets=t5gemma-s-s,t5gemma-b-b,t5gemma-2b-2b,t5gemma-9b-9b]
        [--peak_tflops=989] [--mfu=0.4]

For `t5g.embedded.ul2` and `t5g.embedded.prefix_lm` (train split, shuffled, seed 0, packed by
the T5Gemma feature converter, one host), the script times `--batches` batches of `--batch`
rows after the first one and prints batches/s, slot tokens/s (batch × (inputs + targets)
lengths: what a train step processes) and real tokens/s (non-padding encoder + decoder tokens),
then the cost of resuming: the time to the first batch of an iterator restored after
`--resume_after` batches (recomputed inside tf.data and skipped) less a fresh one's startup,
as a skip rate in batches/s.

What the train step consumes is measured on this machine for `--step_preset` (default: the
embedded default's tiny T5Gemma): the trainer's jitted step (`make_train_step`, AdamW with
clipping, float32, state donated) on a packed batch of each task at the same batch and lengths,
median of `--step_steps` steps after one warm-up; the printed ratio is the pipeline's slot
tokens/s over the step's. For larger presets on an accelerator the script adds an estimate (not
a measurement): a step costs `step_flops` FLOPs (analytic forward + backward, from
benchmarks/model_step.py); at `--mfu` of a `--peak_tflops` device (default: H100 bf16 dense), one
device consumes batch × (S + T) tokens every step_flops / (peak × mfu) seconds; a host feeding n
devices needs n times one device's rate.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import seqio

from t5g.data import pipeline
from t5g.model import ComputeConfig, get_preset, init_params, make_model
from t5g.train.optimizers import OptimizerConfig, Phase, learning_rate_schedule, make_optimizer
from t5g.train.train_step import LossConfig, StepState, make_train_step

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model_step import step_flops  # noqa: E402

TASKS = ("t5g.embedded.ul2", "t5g.embedded.prefix_lm")


def real_tokens(batch: dict[str, np.ndarray]) -> int:
  """Non-padding encoder and decoder tokens of a packed batch."""
  return int((batch["encoder_segment_ids"] > 0).sum() + (batch["decoder_segment_ids"] > 0).sum())


def measure(config: pipeline.InputConfig, batches: int, resume_after: int) -> dict[str, float]:
  """Startup and steady-state rates of one task's iterator, and the resume cost."""
  shard = seqio.ShardInfo(0, 1)
  start = time.perf_counter()
  iterator = pipeline.InputIterator(config, shard)
  next(iterator)
  first = time.perf_counter()
  real = sum(real_tokens(next(iterator)) for _ in range(batches))
  elapsed = time.perf_counter() - first
  state = iterator.state()
  state["batches_consumed"] = resume_after
  resume_start = time.perf_counter()
  next(pipeline.InputIterator(config, shard, state=state))
  resumed = time.perf_counter() - resume_start
  slots = config.batch_size * sum(config.task_feature_lengths.values())
  return {"startup": first - start, "batches_per_s": batches / elapsed,
          "slot_tokens_per_s": batches * slots / elapsed, "real_tokens_per_s": real / elapsed,
          "resumed_first_batch": resumed}


def train_step_seconds(preset: str, batch: dict[str, np.ndarray], steps: int) -> float:
  """Median seconds of the trainer's jitted float32 AdamW step of `preset` on `batch`."""
  config = get_preset(preset)
  compute = ComputeConfig(dtype="float32")
  params = init_params(config, compute, jax.random.PRNGKey(0))
  optimizer_config = OptimizerConfig(name="adamw", learning_rate=1e-4, schedule="constant",
                                     clip_global_norm=1.0)
  optimizer = make_optimizer(optimizer_config, params, Phase(0))
  step = jax.jit(make_train_step(make_model(config, compute), optimizer, LossConfig(),
                                 learning_rate_schedule(optimizer_config)), donate_argnums=0)
  state = StepState(jnp.zeros((), jnp.int32), params, optimizer.init(params))
  batch = {name: jnp.asarray(value) for name, value in batch.items()}
  times = []
  for _ in range(steps + 1):
    start = time.perf_counter()
    state, metrics = jax.block_until_ready(step(state, batch))
    times.append(time.perf_counter() - start)
  if not np.isfinite(float(metrics["loss"])):
    raise SystemExit(f"{preset}: the train step's loss is {float(metrics['loss'])}")
  return float(np.median(times[1:]))


def main() -> None:
  """Parses the flags, measures both tasks and prints the figures and the step estimates."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--lengths", type=int, default=512, help="inputs and targets length")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--batches", type=int, default=300, help="timed batches per task")
  parser.add_argument("--resume_after", type=int, default=2000, help="batches skipped on restore")
  parser.add_argument("--step_preset", default="t5gemma-tiny-tiny",
                      help="preset whose train step is measured here")
  parser.add_argument("--step_steps", type=int, default=5, help="timed train steps per task")
  parser.add_argument("--presets", default="t5gemma-s-s,t5gemma-b-b,t5gemma-2b-2b,t5gemma-9b-9b")
  parser.add_argument("--peak_tflops", type=float, default=989.0, help="device peak, TFLOP/s")
  parser.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOP utilisation")
  args = parser.parse_args()
  lengths = {"inputs": args.lengths, "targets": args.lengths}

  print(f"embedded corpus, train split, lengths {args.lengths}/{args.lengths}, batch "
        f"{args.batch}, packed, {len(os.sched_getaffinity(0))} CPU cores, load average "
        f"{os.getloadavg()[0]:.1f} at start")
  results = {}
  for task in TASKS:
    config = pipeline.InputConfig(task, lengths, batch_size=args.batch)
    results[task] = result = measure(config, args.batches, args.resume_after)
    skipping = result["resumed_first_batch"] - result["startup"]
    print(f"{task}: first batch after {result['startup']:.2f} s; then "
          f"{result['batches_per_s']:.1f} batches/s = {result['slot_tokens_per_s']:,.0f} slot "
          f"tokens/s, {result['real_tokens_per_s']:,.0f} real tokens/s (fill "
          f"{result['real_tokens_per_s'] / result['slot_tokens_per_s']:.0%}); restored after "
          f"{args.resume_after} batches: first batch after {result['resumed_first_batch']:.2f} s "
          f"= startup + {skipping:.2f} s, {args.resume_after / skipping:.0f} batches/s skipped")

  slots = args.batch * sum(lengths.values())
  print(f"measured train step of {args.step_preset} (float32, AdamW) on this machine:")
  for task in TASKS:
    config = pipeline.InputConfig(task, lengths, batch_size=args.batch)
    batch = next(pipeline.InputIterator(config, seqio.ShardInfo(0, 1)))
    step = train_step_seconds(args.step_preset, batch, args.step_steps)
    print(f"  {task}: {step * 1e3:.1f} ms/step = {slots / step:,.0f} slot tokens/s; pipeline / "
          f"step: {results[task]['slot_tokens_per_s'] * step / slots:.1f}x")

  print(f"estimated train-step consumption per device (analytic FLOPs, not measured): "
        f"{args.peak_tflops:g} TFLOP/s peak at {args.mfu:.0%} MFU")
  for preset in args.presets.split(","):
    flops = step_flops(get_preset(preset), args.batch, args.lengths, args.lengths)
    step_seconds = flops / (args.peak_tflops * 1e12 * args.mfu)
    consumed = slots / step_seconds
    ratios = ", ".join(f"{task.split('.')[-1]} {results[task]['slot_tokens_per_s'] / consumed:.1f}x"
                       for task in TASKS)
    print(f"  {preset}: {flops / 1e12:.2f} TFLOP/step, {step_seconds * 1e3:.1f} ms/step, "
          f"{consumed:,.0f} tokens/s; pipeline / step: {ratios}")


if __name__ == "__main__":
  main()

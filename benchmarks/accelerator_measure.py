"""One measurement of `benchmarks/accelerator.py`, run in a process of its own.

    python benchmarks/accelerator_measure.py SETTINGS.json NAME RESULT.json DEADLINE

NAME is one of `peak`, `t5g-<blocked|dense>-<length>`, `transformers-<length>`,
`tokamax-<length>`; SETTINGS.json holds accelerator.py's flags, DEADLINE the Unix time by which
the measurement stops starting new work. The result (a JSON object) is rewritten after every
finished part, so a process killed at its time limit or by an out-of-memory error leaves what
it had measured. Imports no TensorFlow or seqio: t5g's model, train step and optimizer, optax,
and (transformers, tokamax) only in their own measurements.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from typing import Any, Callable

import numpy as np

from common import hf_t5gemma, random_tokens


class Result:
  """The measurement's JSON object, written to its file whenever it changes."""

  def __init__(self, path: str):
    self.path = path
    self.data: dict[str, Any] = {}

  def update(self, **fields: Any) -> None:
    """Adds `fields` and rewrites the file."""
    self.data.update(fields)
    with open(self.path + ".tmp", "w") as f:
      json.dump(self.data, f, indent=1)
    os.replace(self.path + ".tmp", self.path)


def median_seconds(run: Callable[[], Any], steps: int, warmup: int) -> list[float]:
  """Seconds of each of `steps` calls of `run` (each must end synchronised with the device)
  after `warmup` untimed ones."""
  for _ in range(warmup):
    run()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return times


def t5g_config(settings: dict):
  """The preset with `layers` layers in each stack (the width and everything else as is)."""
  from t5g.model import get_preset
  from t5g.model.config import EncoderDecoderConfig
  preset = get_preset(settings["preset"])
  layers = settings["layers"]
  return EncoderDecoderConfig(dataclasses.replace(preset.encoder, num_layers=layers),
                              dataclasses.replace(preset.decoder, num_layers=layers))


def measure_peak(settings: dict, result: Result) -> None:
  """bf16 [n, n] @ [n, n] through jitted jnp on random data: `repeats` products dispatched
  back to back and synchronised once, per round; TFLOP/s of each round."""
  import jax
  import jax.numpy as jnp
  n, repeats = settings["peak_n"], settings["peak_repeats"]
  device = jax.devices()[0]
  result.update(device=str(device.device_kind), platform=device.platform,
                jax_version=jax.__version__, n=n)
  key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(key_a, (n, n), jnp.bfloat16)
  b = jax.random.normal(key_b, (n, n), jnp.bfloat16)
  matmul = jax.jit(jnp.matmul)
  jax.block_until_ready([matmul(a, b) for _ in range(3)])
  rounds = []
  for _ in range(settings["peak_rounds"]):
    start = time.perf_counter()
    jax.block_until_ready([matmul(a, b) for _ in range(repeats)])
    rounds.append(2 * n ** 3 * repeats / (time.perf_counter() - start) / 1e12)
  result.update(tflops_rounds=rounds, tflops=float(np.median(rounds)))


def measure_t5g(settings: dict, result: Result, attention: str, length: int) -> None:
  """t5g's trainer step (`make_train_step`, AdamW through `make_optimizer`, the donated state)
  on random full rows of `length` encoder and `length` decoder tokens."""
  import jax
  import jax.numpy as jnp

  from t5g.model import ComputeConfig, init_params, make_model
  from t5g.train.flops import train_step_flops
  from t5g.train.optimizers import OptimizerConfig, Phase, learning_rate_schedule, make_optimizer
  from t5g.train.train_step import LossConfig, StepState, make_train_step

  config = t5g_config(settings)
  batch_size = settings["batch"][str(length)]
  block = settings["block_length"] if attention == "blocked" else 0
  compute = ComputeConfig(dtype=jnp.bfloat16, param_dtype=settings["param_dtype"],
                          scan_layers=True, remat_policy=settings["remat"],
                          attention_block_length=block)
  loss_config = LossConfig(logits_chunk_length=settings["logits_chunk_length"])
  optimizer_config = OptimizerConfig(name="adamw", learning_rate=1e-4, schedule="constant",
                                     clip_global_norm=1.0)
  result.update(batch=batch_size, length=length, attention_block_length=block,
                flops=train_step_flops(config, batch_size, length, length, attention="visible"),
                tokens=batch_size * 2 * length, device=str(jax.devices()[0].device_kind))

  params = jax.jit(lambda rng: init_params(config, compute, rng))(jax.random.PRNGKey(0))
  optimizer = make_optimizer(optimizer_config, params, Phase(0))
  state = StepState(jnp.zeros((), jnp.int32), params, jax.jit(optimizer.init)(params))
  result.update(parameters=int(sum(x.size for x in jax.tree_util.tree_leaves(params))))
  del params
  enc, dec, targets = (jnp.asarray(x) for x in random_tokens(config.vocab_size, batch_size,
                                                             length, length))
  batch = {"encoder_input_tokens": enc, "decoder_input_tokens": dec,
           "decoder_target_tokens": targets,
           "decoder_loss_weights": jnp.ones(targets.shape, jnp.float32)}
  step = jax.jit(make_train_step(make_model(config, compute), optimizer, loss_config,
                                 learning_rate_schedule(optimizer_config)), donate_argnums=0)
  start = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  memory = compiled.memory_analysis()
  result.update(compile_s=time.perf_counter() - start,
                temp_bytes=getattr(memory, "temp_size_in_bytes", None))
  losses = []

  def run():
    nonlocal state
    state, metrics = jax.block_until_ready(compiled(state, batch))
    losses.append(float(metrics["loss"]))

  times = median_seconds(run, settings["steps"], settings["warmup"])
  stats = jax.devices()[0].memory_stats() or {}
  result.update(step_s=times, median_s=float(np.median(times)), losses=losses,
                peak_bytes_in_use=stats.get("peak_bytes_in_use"))
  if not np.all(np.isfinite(losses)):
    raise RuntimeError(f"non-finite loss: {losses}")


def measure_transformers(settings: dict, result: Result, length: int) -> None:
  """transformers' T5GemmaForConditionalGeneration + torch AdamW (fused on CUDA), bf16 autocast
  over float32 parameters (or bfloat16 parameters), same shapes as t5g. Attempts in turn, until
  one fits: no gradient checkpointing, then checkpointing, then checkpointing at half the batch
  down to 1 row; each attempt's outcome is recorded."""
  import gc

  import torch

  from t5g.train.flops import train_step_flops

  config = t5g_config(settings)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  param_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[settings["param_dtype"]]
  result.update(device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
                torch_version=torch.__version__, attention=settings["hf_attention"],
                param_dtype=settings["param_dtype"], length=length)
  result.update(torch_peak_tflops=torch_matmul_tflops(settings, device))
  batch_size = settings["batch"][str(length)]
  attempts = [(batch_size, False), (batch_size, True)]
  while attempts[-1][0] > 1:
    attempts.append((attempts[-1][0] // 2, True))
  outcomes = []
  for rows, checkpointing in attempts:
    try:
      times, losses, peak = transformers_steps(settings, config, device, param_dtype, rows,
                                               checkpointing, length)
    except torch.OutOfMemoryError as error:
      outcomes.append({"batch": rows, "gradient_checkpointing": checkpointing,
                       "outcome": "out of memory: " + str(error).split("\n")[0][:200]})
      result.update(attempts=outcomes)
      gc.collect()
      torch.cuda.empty_cache()
      continue
    outcomes.append({"batch": rows, "gradient_checkpointing": checkpointing, "outcome": "ran"})
    result.update(attempts=outcomes, batch=rows, gradient_checkpointing=checkpointing,
                  step_s=times, median_s=float(np.median(times)), losses=losses,
                  peak_bytes_in_use=peak, tokens=rows * 2 * length,
                  flops=train_step_flops(config, rows, length, length, attention="visible"))
    if not np.all(np.isfinite(losses)):
      raise RuntimeError(f"non-finite loss: {losses}")
    return
  raise RuntimeError("out of memory at every attempt: " + json.dumps(outcomes))


def torch_matmul_tflops(settings: dict, device: str) -> float:
  """bf16 [n, n] @ [n, n] TFLOP/s through torch on random data (median of rounds, each of
  `peak_repeats` products synchronised once)."""
  import torch
  n, repeats = settings["peak_n"], settings["peak_repeats"]
  generator = torch.Generator(device=device).manual_seed(0)
  a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=generator)
          for _ in range(2))
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  for _ in range(3):
    a @ b
  sync()
  rounds = []
  for _ in range(settings["peak_rounds"]):
    start = time.perf_counter()
    for _ in range(repeats):
      a @ b
    sync()
    rounds.append(2 * n ** 3 * repeats / (time.perf_counter() - start) / 1e12)
  return float(np.median(rounds))


def transformers_steps(settings: dict, config, device: str, param_dtype, rows: int,
                       checkpointing: bool, length: int):
  """(step seconds, losses, peak bytes allocated) of transformers' train steps at `rows` rows."""
  import torch
  with torch.device(device):
    model = hf_t5gemma(config).to(param_dtype)
  if settings["hf_attention"] != "eager":
    model.set_attn_implementation(settings["hf_attention"])
  if checkpointing:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
  params = [p for p in model.parameters() if p.requires_grad]
  optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                                fused=device == "cuda")
  enc, dec, targets = (torch.from_numpy(x).long().to(device)
                       for x in random_tokens(config.vocab_size, rows, length, length))
  losses = []

  def run():
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
      loss = model(input_ids=enc, decoder_input_ids=dec, labels=targets, use_cache=False).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    losses.append(loss.item())  # .item() waits for the device.

  if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
  times = median_seconds(run, settings["hf_steps"], settings["hf_warmup"])
  peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
  return times, losses[settings["hf_warmup"]:], peak


def attention_pairs(length: int, causal: bool, window: int | None) -> int:
  """Visible (query, key) pairs of one full-length sequence (`t5g.train.flops`' count)."""
  q = np.arange(length)[:, None]
  k = np.arange(length)[None, :]
  visible = np.ones((length, length), bool) if not causal else k <= q
  if window is not None:
    visible &= (q - k < window) if causal else (np.abs(q - k) < window)
  return int(visible.sum())


TOKAMAX_CASES = {  # name: (causal, local window or None)
    "causal": (True, None), "causal_local": (True, "window"), "bidir_local": (False, "window")}


def measure_tokamax(settings: dict, result: Result, deadline: float) -> None:
  """Attention alone, forward and forward+backward, bf16, soft-cap 50, GQA: t5g's dense and
  query-blocked paths and each `tokamax.dot_product_attention` implementation, per mask case;
  outputs and gradients against t5g's dense path."""
  import jax
  import jax.numpy as jnp

  from t5g.model.attention import dot_product_attention
  from t5g.model.query_blocks import blocked_attention

  b, length = settings["tokamax_batch"], settings["tokamax_length"]
  n, k, h = settings["tokamax_heads"], settings["tokamax_kv_heads"], settings["tokamax_head_dim"]
  window, cap = settings["tokamax_window"], 50.0
  result.update(batch=b, length=length, heads=n, kv_heads=k, head_dim=h, window=window,
                softcap=cap, device=str(jax.devices()[0].device_kind), cases={})
  try:
    import tokamax
    result.update(tokamax_version=tokamax.__version__)
  except Exception as error:  # noqa: BLE001 - a probe: report why tokamax is unusable.
    tokamax = None
    result.update(tokamax_error=f"{type(error).__name__}: {error}")
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  q = jax.random.normal(keys[0], (b, length, n, h), jnp.bfloat16) * jnp.bfloat16(h ** -0.5)
  key = jax.random.normal(keys[1], (b, length, k, h), jnp.bfloat16)
  value = jax.random.normal(keys[2], (b, length, k, h), jnp.bfloat16)
  cotangent = jax.random.normal(keys[3], (b, length, n, h), jnp.float32)
  positions = jnp.arange(length)
  distance = positions[:, None] - positions[None, :]

  for case in settings["tokamax_cases"]:
    causal, local = TOKAMAX_CASES[case]
    case_window = window if local else None
    mask = jnp.ones((length, length), bool) if not causal else distance >= 0
    if case_window is not None:
      mask &= (distance < case_window) if causal else (jnp.abs(distance) < case_window)
    mask = jnp.broadcast_to(mask, (b, length, length))
    band = None if case_window is None else ((1 - case_window, 0) if causal
                                             else (1 - case_window, case_window - 1))
    flops = 4 * b * attention_pairs(length, causal, case_window) * n * h
    dense = functools.partial(dot_product_attention, cap=cap, dtype=jnp.bfloat16)
    variants: dict[str, Callable] = {
        "t5g dense": lambda q, kk, v: dense(q, kk, v, mask),
        f"t5g blocked {settings['block_length']}": lambda q, kk, v: blocked_attention(
            dense, q, kk, v, mask, block_length=settings["block_length"], band=band)}
    if tokamax is not None:
      for impl in settings["tokamax_impls"]:
        variants[f"tokamax {impl}"] = tokamax_variant(tokamax, impl, causal, case_window, cap)
    rows: dict[str, Any] = {"flops_forward": flops}
    result.data["cases"][case] = rows
    reference = None
    for name, attend in variants.items():
      if time.time() > deadline:
        rows[name] = {"error": "skipped: time budget spent"}
        result.update()
        continue
      try:
        rows[name] = time_attention(attend, q, key, value, cotangent, settings)
        out, grads = rows[name].pop("values")
        if reference is None:  # t5g dense, unless it failed.
          reference = (name, out, grads)
        rows[name].update(compare(out, grads, *reference[1:]), compared_with=reference[0])
      except Exception as error:  # noqa: BLE001 - a probe: report the failure, go on.
        rows[name] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}
      print(f"tokamax probe {case} {name}: {json.dumps(rows[name])}", flush=True)
      result.update()


def tokamax_variant(tokamax, impl: str, causal: bool, window: int | None, cap: float):
  """tokamax.dot_product_attention with implementation `impl` on pre-scaled queries."""
  local = None if window is None else ((window - 1, 0) if causal else (window - 1, window - 1))

  def attend(q, key, value):
    return tokamax.dot_product_attention(q, key, value, scale=1.0, is_causal=causal,
                                         local_window_size=local, logits_soft_cap=cap,
                                         implementation=impl)
  return attend


def time_attention(attend: Callable, q, key, value, cotangent, settings: dict) -> dict:
  """Compile and median seconds of the forward and of forward+backward (gradients of
  sum(out · cotangent) for q, k, v); `values` holds (output, gradients) for the comparison."""
  import jax
  import jax.numpy as jnp

  def loss(q, key, value):
    return jnp.sum(attend(q, key, value).astype(jnp.float32) * cotangent)

  forward = jax.jit(attend)
  both = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
  start = time.perf_counter()
  out = jax.block_until_ready(forward(q, key, value))
  _, grads = jax.block_until_ready(both(q, key, value))
  compile_s = time.perf_counter() - start
  steps, warmup = settings["tokamax_steps"], 1
  forward_s = median_seconds(lambda: jax.block_until_ready(forward(q, key, value)), steps,
                             warmup)
  both_s = median_seconds(lambda: jax.block_until_ready(both(q, key, value)), steps, warmup)
  return {"compile_s": compile_s, "forward_s": float(np.median(forward_s)),
          "forward_backward_s": float(np.median(both_s)), "values": (out, grads)}


def compare(out, grads, ref_out, ref_grads) -> dict:
  """Largest |output - reference| and, per gradient, largest |difference| / largest |reference|."""
  import jax.numpy as jnp

  def largest(x):
    return float(jnp.max(jnp.abs(x.astype(jnp.float32))))

  return {"max_abs_out_diff": largest(out.astype(jnp.float32) - ref_out.astype(jnp.float32)),
          "max_rel_grad_diff": max(
              largest(g.astype(jnp.float32) - r.astype(jnp.float32)) / max(largest(r), 1e-30)
              for g, r in zip(grads, ref_grads))}


def main() -> None:
  """Runs the measurement NAME with the settings file's flags."""
  settings_path, name, result_path, deadline = sys.argv[1:5]
  with open(settings_path) as f:
    settings = json.load(f)
  result = Result(result_path)
  result.update(name=name, status="started")
  kind, _, rest = name.partition("-")
  try:
    if kind == "peak":
      measure_peak(settings, result)
    elif kind == "t5g":
      attention, length = rest.split("-")
      measure_t5g(settings, result, attention, int(length))
    elif kind == "transformers":
      measure_transformers(settings, result, int(rest))
    elif kind == "tokamax":
      measure_tokamax(settings, result, float(deadline))
    else:
      raise ValueError(f"unknown measurement {name!r}")
  except BaseException as error:
    result.update(status="error", error=f"{type(error).__name__}: {str(error)[:500]}")
    raise
  result.update(status="ok")


if __name__ == "__main__":
  main()

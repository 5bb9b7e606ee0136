"""Train-step MFU on one accelerator: t5g (dense and query-blocked attention) vs transformers.

    PYTHONUNBUFFERED=1 python3 benchmarks/accelerator.py [--budget_s=420] [--layers=8]
        [--lengths=4096,8192] [--batches=4,2] [--only=peak,t5g,transformers,tokamax] [--toy]

For a T5Gemma of `--preset`'s width (default 2B-2B) with `--layers` layers per stack, bf16
compute, float32 (`--param_dtype`) parameters and AdamW state, full remat and the
vocabulary-tiled head (the adaptation recipes' settings, gin/experiments/_c4_adaptation.gin),
at each of `--lengths` encoder = decoder lengths with the matching `--batches` rows, in this
order (most important first):

  peak                   bf16 `--peak_n`³ matmul through jitted jnp on random data
  t5g-blocked-L          t5g's trainer step, attention_block_length `--block_length`
  t5g-dense-L            the same with dense attention (attention_block_length 0)
  transformers-L         T5GemmaForConditionalGeneration (`--hf_attention`, eager by default:
                         transformers' T5Gemma rejects SDPA, which cannot soft-cap), bf16
                         autocast, torch AdamW (fused on CUDA), gradient clipping 1.0; if the
                         batch does not fit: gradient checkpointing, then half the batch
  ... (the next length)
  tokamax-L              attention alone (forward, forward+backward) of t5g's dense and blocked
                         paths and `tokamax.dot_product_attention` per `--tokamax_impls`, with
                         max |difference| against t5g's dense path (a probe; needs tokamax)

Each measurement runs in a process of its own (`accelerator_measure.py`), so an out-of-memory
error or a hang loses only that one; it is killed after `--max_each_s` or when `--budget_s`
(counted from this script's start) is spent, and later measurements are skipped once less than
`--min_left_s` remains. Per run: step time (median of `--steps` steps after `--warmup`, each
synchronised), tokens/s (encoder + decoder), TFLOP/s from `t5g.train.flops.train_step_flops`
(visible attention pairs, 3 × forward; MFU, not HFU: remat's recomputation is not counted), and
MFU against the highest measured bf16 matmul rate (jnp, and torch's in the transformers runs).
The table is printed last; with `$OUT` set (or `--json`) every figure goes to
$OUT/accelerator.json, rewritten after each measurement, and the measurements' own output to
$OUT/accelerator.log.

`--toy`: a tiny T5Gemma at tiny lengths on whatever device there is (CPU here), every code path
of the full run at one length (minutes on a busy 2-core CPU: XLA:CPU compiles take most of it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SECTIONS = ("peak", "t5g", "transformers", "tokamax")
TOY = {"preset": "t5gemma-tiny-tiny", "layers": 2, "lengths": "32", "batches": "2",
       "budget_s": 1500.0, "max_each_s": 600.0,
       "block_length": 16, "logits_chunk_length": 16, "steps": 2, "warmup": 1, "hf_steps": 2,
       "hf_warmup": 1, "peak_n": 256, "peak_repeats": 3, "peak_rounds": 2,
       "tokamax_length": 64, "tokamax_batch": 1, "tokamax_heads": 4, "tokamax_kv_heads": 2,
       "tokamax_head_dim": 16, "tokamax_window": 8, "tokamax_steps": 2,
       "tokamax_impls": "mosaic,triton,xla"}


def parse_flags() -> argparse.Namespace:
  """The flags (see the module docstring); `--toy` replaces the sizes with TOY's."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  add = parser.add_argument
  add("--toy", action="store_true", help="tiny sizes, for testing the script on a CPU")
  add("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
  add("--budget_s", type=float, default=420.0, help="wall-clock budget of the whole run")
  add("--max_each_s", type=float, default=170.0, help="limit of one measurement")
  add("--min_left_s", type=float, default=25.0,
      help="skip a measurement when less than this is left of the budget")
  add("--preset", default="t5gemma-2b-2b")
  add("--layers", type=int, default=8, help="layers per stack (encoder and decoder)")
  add("--lengths", default="4096,8192", help="encoder = decoder lengths")
  add("--batches", default="4,2", help="rows per step, one per length")
  add("--attention", default="blocked,dense", help="t5g's attention paths, in this order")
  add("--block_length", type=int, default=1024, help="attention_block_length of 'blocked'")
  add("--logits_chunk_length", type=int, default=512)
  add("--remat", default="full")
  add("--param_dtype", choices=("float32", "bfloat16"), default="float32",
      help="parameters and optimizer state of both sides (compute is bfloat16)")
  add("--steps", type=int, default=5)
  add("--warmup", type=int, default=2)
  add("--hf_attention", default="eager", help="transformers' attn_implementation")
  add("--hf_steps", type=int, default=3)
  add("--hf_warmup", type=int, default=1)
  add("--peak_n", type=int, default=8192)
  add("--peak_repeats", type=int, default=20)
  add("--peak_rounds", type=int, default=5)
  add("--tokamax_length", type=int, default=8192)
  add("--tokamax_batch", type=int, default=2)
  add("--tokamax_heads", type=int, default=8)
  add("--tokamax_kv_heads", type=int, default=4)
  add("--tokamax_head_dim", type=int, default=256)
  add("--tokamax_window", type=int, default=4096)
  add("--tokamax_steps", type=int, default=5)
  add("--tokamax_impls", default="mosaic,triton", help="tokamax implementations to time")
  add("--tokamax_cases", default="causal,causal_local", help="of causal, causal_local, "
      "bidir_local")
  add("--json", default=None, help="where to write the figures (default $OUT/accelerator.json)")
  args = parser.parse_args()
  if args.toy:
    explicit = {arg.split("=")[0].lstrip("-") for arg in sys.argv[1:]}
    for name, value in TOY.items():
      if name not in explicit:
        setattr(args, name, value)
  unknown = set(args.only.split(",")) - set(SECTIONS)
  if unknown:
    parser.error(f"--only: unknown section(s) {sorted(unknown)}; choose from {SECTIONS}")
  if len(args.lengths.split(",")) != len(args.batches.split(",")):
    parser.error(f"--lengths={args.lengths} and --batches={args.batches} differ in count")
  return args


def settings_of(args: argparse.Namespace) -> dict:
  """The flags as the measurement processes read them."""
  settings = dict(vars(args))
  lengths = [int(x) for x in args.lengths.split(",")]
  settings["lengths"] = lengths
  settings["batch"] = {str(n): int(b) for n, b in zip(lengths, args.batches.split(","))}
  for name in ("attention", "tokamax_impls", "tokamax_cases", "only"):
    settings[name] = [x for x in getattr(args, name).split(",") if x]
  return settings


def plan(settings: dict) -> list[str]:
  """Measurement names, most important first."""
  only = settings["only"]
  names = ["peak"] if "peak" in only else []
  for length in settings["lengths"]:
    if "t5g" in only:
      names += [f"t5g-{attention}-{length}" for attention in settings["attention"]]
    if "transformers" in only:
      names.append(f"transformers-{length}")
  if "tokamax" in only:
    names.append(f"tokamax-{settings['tokamax_length']}")
  return names


def run_measurement(name: str, settings_path: str, folder: str, log, timeout: float) -> dict:
  """Runs one measurement process with `timeout` seconds; its result, with the process's wall
  time and, if it failed, the reason and the last lines of its output."""
  result_path = os.path.join(folder, name + ".json")
  env = dict(os.environ, PYTHONUNBUFFERED="1", XLA_PYTHON_CLIENT_MEM_FRACTION="0.92")
  if name.startswith("transformers"):  # torch takes the memory; jax is imported, not used.
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
  start = time.time()
  log.write(f"\n===== {name} (limit {timeout:.0f} s) =====\n")
  log.flush()
  log_start = log.tell()
  command = [sys.executable, os.path.join(HERE, "accelerator_measure.py"), settings_path, name,
             result_path, str(start + timeout - 10)]
  process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
  try:
    code = process.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    process.kill()
    process.wait()
    code = None
  result = {"name": name, "status": "no result"}
  if os.path.exists(result_path):
    with open(result_path) as f:
      result = json.load(f)
  result["process_s"] = time.time() - start
  if code is None:
    result["status"], result["error"] = "killed", f"killed at its {timeout:.0f} s limit"
  elif code != 0:
    result["status"] = "error"
    result.setdefault("error", f"exit status {code}")
  if result["status"] != "ok":
    result["log_tail"] = log_tail(log.name, log_start, 8)
  return result


def log_tail(path: str, offset: int, lines: int) -> list[str]:
  """The last `lines` lines of the log file at `path` after byte `offset`."""
  with open(path, errors="replace") as f:
    f.seek(offset)
    return [line.rstrip()[:300] for line in f.readlines()[-lines:]]


def peak_tflops(results: dict) -> float | None:
  """The highest measured bf16 matmul rate (jnp's, or torch's in a transformers run)."""
  rates = [results.get("peak", {}).get("tflops")]
  rates += [r.get("torch_peak_tflops") for n, r in results.items()
            if n.startswith("transformers")]
  rates = [r for r in rates if r]
  return max(rates) if rates else None


def add_rates(result: dict, peak: float | None) -> None:
  """Tokens/s, TFLOP/s and MFU of a step measurement, from its median step time."""
  if "median_s" not in result or "flops" not in result:
    return
  result["tokens_per_s"] = result["tokens"] / result["median_s"]
  result["tflops"] = result["flops"] / result["median_s"] / 1e12
  if peak:
    result["mfu"] = result["tflops"] / peak


def label(name: str, result: dict) -> str:
  """The run's name in the table."""
  kind, _, rest = name.partition("-")
  if kind == "t5g":
    attention = rest.split("-")[0]
    return "t5g " + (f"blocked {result.get('attention_block_length')}" if attention == "blocked"
                     else "dense")
  if kind == "transformers":
    checkpointing = " +ckpt" if result.get("gradient_checkpointing") else ""
    return f"transformers {result.get('attention', '')}{checkpointing}"
  return name


def print_table(settings: dict, results: dict) -> None:
  """The compact summary: peak, one row per step measurement, ratios, the tokamax probe."""
  peak = peak_tflops(results)
  print("\n=== accelerator.py summary ===")
  peak_run = results.get("peak", {})
  torch_peaks = [f"{r['torch_peak_tflops']:.0f}" for n, r in results.items()
                 if n.startswith("transformers") and r.get("torch_peak_tflops")]
  print(f"device: {peak_run.get('device', '?')}; bf16 matmul {settings['peak_n']}^3: jnp "
        f"{peak_run.get('tflops', float('nan')):.1f} TFLOP/s, torch "
        f"{', '.join(torch_peaks) or '-'}; MFU against {peak or float('nan'):.1f}")
  params = next((r["parameters"] for r in results.values() if "parameters" in r), None)
  print(f"model: {settings['preset']} width, {settings['layers']}+{settings['layers']} layers"
        f"{f', {params / 1e9:.2f}B parameters' if params else ''}; params+AdamW "
        f"{settings['param_dtype']}, compute bfloat16, t5g remat {settings['remat']}, head "
        f"chunk {settings['logits_chunk_length']}; median of {settings['steps']} (transformers "
        f"{settings['hf_steps']}) steps")
  header = (f"{'run':<26} {'rows':>4} {'len':>5} {'step s':>7} {'tok/s':>9} {'TFLOP/s':>7} "
            f"{'MFU':>6} {'compile':>7} {'GiB':>6}")
  print(header)
  for name, result in results.items():
    if name == "peak" or name.startswith("tokamax"):
      continue
    add_rates(result, peak)
    if result.get("status") != "ok":
      print(f"{name:<26} {result.get('status')}: {result.get('error', '')[:150]}")
      continue
    memory = result.get("temp_bytes") or result.get("peak_bytes_in_use")
    print(f"{label(name, result):<26} {result['batch']:>4} {result['length']:>5} "
          f"{result['median_s']:>7.3f} {result['tokens_per_s']:>9,.0f} "
          f"{result['tflops']:>7.1f} {result.get('mfu', float('nan')):>6.1%} "
          f"{result.get('compile_s', float('nan')):>7.1f} "
          f"{(memory or float('nan')) / 2 ** 30:>6.1f}")
  print("(GiB: t5g the compiled step's temporaries, transformers torch's peak allocation)")
  for length in settings["lengths"]:
    peer = results.get(f"transformers-{length}", {})
    for attention in settings["attention"]:
      t5g = results.get(f"t5g-{attention}-{length}", {})
      if "tokens_per_s" in t5g and "tokens_per_s" in peer:
        print(f"{length}: t5g {attention} / transformers tokens/s = "
              f"{t5g['tokens_per_s'] / peer['tokens_per_s']:.2f}x")
  for name, result in results.items():
    if name.startswith("tokamax"):
      print_tokamax(result)


def print_tokamax(result: dict) -> None:
  """The tokamax probe's rows: forward and forward+backward times, TFLOP/s, differences."""
  print(f"attention alone: batch {result.get('batch')}, length {result.get('length')}, "
        f"{result.get('heads')}/{result.get('kv_heads')} heads x {result.get('head_dim')}, "
        f"window {result.get('window')}, soft-cap {result.get('softcap')}; tokamax "
        f"{result.get('tokamax_version', result.get('tokamax_error', '?'))}; status "
        f"{result.get('status')} {result.get('error', '')[:150]}")
  for case, rows in result.get("cases", {}).items():
    flops = rows.get("flops_forward", 0)
    for name, row in rows.items():
      if name == "flops_forward":
        continue
      if "error" in row:
        print(f"  {case:<13} {name:<20} {row['error'][:160]}")
        continue
      print(f"  {case:<13} {name:<20} fwd {row['forward_s'] * 1e3:7.2f} ms "
            f"({flops / row['forward_s'] / 1e12:5.1f} TFLOP/s)  fwd+bwd "
            f"{row['forward_backward_s'] * 1e3:7.2f} ms ({3 * flops / row['forward_backward_s'] / 1e12:5.1f})"
            f"  max|dout| {row['max_abs_out_diff']:.2e}  max|dgrad|/max|grad| "
            f"{row['max_rel_grad_diff']:.2e}"
            + ("" if row.get("compared_with") == "t5g dense" else f" vs {row.get('compared_with')}"))


def main() -> None:
  """Runs the planned measurements within the budget, then prints the table."""
  start = time.time()
  args = parse_flags()
  settings = settings_of(args)
  out = os.environ.get("OUT")
  json_path = args.json or (os.path.join(out, "accelerator.json") if out else None)
  folder = tempfile.mkdtemp(prefix="accelerator-")
  log_path = os.path.join(out, "accelerator.log") if out else os.path.join(folder, "log")
  settings_path = os.path.join(folder, "settings.json")
  with open(settings_path, "w") as f:
    json.dump(settings, f)
  results: dict[str, dict] = {}
  with open(log_path, "a") as log:
    for name in plan(settings):
      left = args.budget_s - (time.time() - start)
      if left < args.min_left_s:
        results[name] = {"name": name, "status": "skipped",
                         "error": f"budget: {left:.0f} s left"}
      else:
        results[name] = run_measurement(name, settings_path, folder, log,
                                        min(args.max_each_s, left))
      brief = {k: v for k, v in results[name].items()
               if k in ("status", "error", "median_s", "tflops", "compile_s", "batch",
                        "gradient_checkpointing", "process_s", "torch_peak_tflops")}
      print(f"[{time.time() - start:6.1f} s] {name}: {json.dumps(brief)}", flush=True)
      for line in results[name].get("log_tail", []):
        print(f"    | {line}")
      if json_path:
        write_json(json_path, settings, results, start)
  print_table(settings, results)
  if json_path:
    write_json(json_path, settings, results, start)
    print(f"figures: {json_path}; measurement output: {log_path}")


def write_json(path: str, settings: dict, results: dict, start: float) -> None:
  """Writes the settings, the peak used and every result to `path` (atomically)."""
  peak = peak_tflops(results)
  for result in results.values():
    add_rates(result, peak)
  with open(path + ".tmp", "w") as f:
    json.dump({"settings": settings, "peak_tflops": peak, "elapsed_s": time.time() - start,
               "results": results}, f, indent=1)
  os.replace(path + ".tmp", path)


if __name__ == "__main__":
  main()

"""Training metrics: averaged over each logging interval, written to TensorBoard and the console.

Throughput figures per interval: `tokens_per_second` (weighted target tokens of the global batch;
the encoder's tokens are not counted), `step_seconds` (wall time per step, data loading
included) and `mfu` = analytic model FLOPs per step (`t5g.train.flops.train_step_flops`, full
rows, visible attention pairs) / (step time × peak FLOP/s of all devices).
"""

from __future__ import annotations

import os
import time
from typing import Mapping

import numpy as np
import tensorflow as tf


class MetricsLogger:
  """Collects per-step metrics and writes their interval means.

  flops_per_step: analytic FLOPs of one train step; peak_flops: peak FLOP/s of the whole mesh.
  Only process 0 writes (TensorBoard event files under `directory`/`name`, and the console).
  """

  def __init__(self, directory: str, name: str, flops_per_step: float, peak_flops: float,
               total_steps: int, write: bool = True):
    self._flops, self._peak, self._total = flops_per_step, peak_flops, total_steps
    self._write = write
    self._writer = tf.summary.create_file_writer(os.path.join(directory, name)) if write else None
    self._pending: list[Mapping[str, float]] = []
    self._since = time.perf_counter()

  def add(self, metrics: Mapping[str, float]) -> None:
    """Records one step's metrics (host floats)."""
    self._pending.append(metrics)

  def restart_clock(self) -> None:
    """Starts the next interval's clock now (e.g. after a compile or an evaluation)."""
    self._since = time.perf_counter()

  def flush(self, step: int) -> dict[str, float]:
    """Writes and returns the means since the last flush, with the throughput figures."""
    if not self._pending:
      return {}
    elapsed = time.perf_counter() - self._since
    steps = len(self._pending)
    means = {k: float(np.mean([m[k] for m in self._pending])) for k in self._pending[0]}
    means["step_seconds"] = elapsed / steps
    means["tokens_per_second"] = means["tokens"] * steps / elapsed
    means["mfu"] = self._flops / means["step_seconds"] / self._peak
    self._pending, self._since = [], time.perf_counter()
    self.write(step, means, "train")
    return means

  def write(self, step: int, values: Mapping[str, float], prefix: str) -> None:
    """Writes `values` as TensorBoard scalars `prefix/NAME` and one console line."""
    if not self._write:
      return
    with self._writer.as_default(step=step):
      for name, value in values.items():
        tf.summary.scalar(f"{prefix}/{name}", value)
    self._writer.flush()
    print(progress_line(step, self._total, values, prefix), flush=True)

  def close(self) -> None:
    """Flushes and closes the event file."""
    if self._writer is not None:
      self._writer.close()


def progress_line(step: int, total: int, values: Mapping[str, float], prefix: str) -> str:
  """'train step 120/1000 | loss 3.210 | acc 0.412 | ...' with the figures present."""
  parts = [f"{prefix} step {step}/{total}"]
  formats = [("loss", "loss {:.4f}"), ("accuracy", "acc {:.3f}"), ("kd_loss", "kd {:.4f}"),
             ("grad_norm", "gnorm {:.3f}"), ("learning_rate", "lr {:.2e}"),
             ("tokens_per_second", "{:,.0f} tok/s"), ("step_seconds", "{:.3f} s/step"),
             ("mfu", "MFU {:.1%}")]
  for name, fmt in formats:
    if name in values and not (name == "kd_loss" and values[name] == 0):
      parts.append(fmt.format(values[name]))
  return " | ".join(parts)

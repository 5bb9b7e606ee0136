"""Peak memory of checkpoint conversions, against the checkpoint size and its largest tensor group.

Writes a synthetic Gemma 2 HF folder of about 1 GB (float32, random weights), then runs each
conversion in a fresh process and reads that process's peak resident memory (VmHWM) before and
after the conversion:

  import  HF folder -> t5g directory (scanned layout)
  export  t5g directory -> HF folder (no transformers verification)
  adapt   HF Gemma 2 -> balanced T5Gemma t5g directory (about twice the checkpoint)

The claim checked: peak growth <= 1.5 x the largest tensor group (the largest array of the
scanned t5g layout, i.e. one parameter stacked over half the layers, or the embedding) plus a
constant, whatever the checkpoint size. Two sizes (8 and 16 layers: about 1 and 1.8 GB) give
the slope and the constant.

    python benchmarks/conversion_memory.py [--workdir=/tmp/t5g_conversion_memory] [--layers=8,16]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

import numpy as np

CHILD = r"""
import os, sys, json
def hwm():
  for line in open('/proc/self/status'):
    if line.startswith('VmHWM'):
      return int(line.split()[1]) * 1024
from t5g.compat import convert  # Imports jax, orbax and the model before the baseline.
import jax.numpy as jnp
jnp.zeros(1).block_until_ready()
base = hwm()
job, a, b = sys.argv[1:4]
if job == 'import':
  convert.import_checkpoint(a, b, scan_layers=True)
elif job == 'export':
  convert.export_checkpoint(a, b, verify=False)
else:
  convert.adapt_checkpoint(a, a, b)
print(json.dumps({'base': base, 'peak': hwm()}))
"""


def _config(layers: int):
  from t5g.model.config import StackConfig
  return StackConfig(num_layers=layers, embed_dim=1024, hidden_dim=8192, num_heads=8,
                     num_kv_heads=4, head_dim=128, vocab_size=32768)


def write_synthetic_folder(folder: str, layers: int) -> int:
  """A random-weight Gemma 2 HF folder; returns its size in bytes."""
  from t5g.checkpoints.sources import ParamSource
  from t5g.compat import hf_checkpoints

  class RandomSource(ParamSource):
    """Random float32 parameters, generated one at a time."""

    def __init__(self, config):
      from t5g.model import layout
      from t5g.model.config import ComputeConfig
      from t5g.model.models import abstract_params
      self.config, self.where = config, "random"
      self._abstract = abstract_params(config, ComputeConfig(scan_layers=False))
      self._layout = layout

    def get(self, stack, layer, sub):
      shape = self._layout.get(self._abstract, self.config, False, stack, layer, sub).shape
      rng = np.random.default_rng(abs(hash((stack, layer, sub))) % (1 << 32))
      return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)

  hf_checkpoints.save(folder, RandomSource(_config(layers)))
  return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))


def largest_group_bytes(layers: int) -> int:
  """Bytes of the largest array of the scanned t5g layout of the synthetic model."""
  import jax
  from t5g.model.config import ComputeConfig
  from t5g.model.models import abstract_params
  leaves = jax.tree_util.tree_leaves(abstract_params(_config(layers), ComputeConfig()))
  return max(int(np.prod(x.shape)) * x.dtype.itemsize for x in leaves)


def run_child(job: str, a: str, b: str) -> dict:
  """Runs one conversion in a fresh interpreter; returns its baseline and peak VmHWM."""
  out = subprocess.run([sys.executable, "-c", CHILD, job, a, b], capture_output=True,
                       text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def measure(workdir: str, layers: int) -> tuple[int, int, dict[str, int]]:
  """(checkpoint bytes, largest group bytes, {job: peak growth bytes}) for one model size."""
  shutil.rmtree(workdir, ignore_errors=True)
  os.makedirs(workdir)
  hf, t5g, back, adapted = (os.path.join(workdir, n) for n in ("hf", "t5g", "hf_back",
                                                               "adapted"))
  size = write_synthetic_folder(hf, layers)
  group = largest_group_bytes(layers)
  mib = 1 << 20
  print(f"{layers} layers: checkpoint {size / mib:.0f} MiB (float32), largest tensor group "
        f"{group / mib:.0f} MiB")
  growth = {}
  for job, a, b in (("import", hf, t5g), ("export", t5g, back), ("adapt", hf, adapted)):
    r = run_child(job, a, b)
    growth[job] = r["peak"] - r["base"]
    print(f"  {job:7s} baseline {r['base'] / mib:5.0f} MiB  peak {r['peak'] / mib:5.0f} MiB  "
          f"growth {growth[job] / mib:5.0f} MiB = {growth[job] / group:.2f} x largest group = "
          f"{growth[job] / size:.2f} x checkpoint")
  shutil.rmtree(workdir, ignore_errors=True)
  return size, group, growth


def main() -> None:
  """Measures two model sizes and fits growth = slope x largest group + constant per job."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default="/tmp/t5g_conversion_memory")
  parser.add_argument("--layers", default="8,16", help="two layer counts, comma-separated")
  args = parser.parse_args()
  small, large = (measure(args.workdir, int(n)) for n in args.layers.split(","))
  print("fit: growth = slope x largest group + constant")
  for job in small[2]:
    slope = (large[2][job] - small[2][job]) / (large[1] - small[1])
    constant = small[2][job] - slope * small[1]
    print(f"  {job:7s} slope {slope:.2f}, constant {constant / (1 << 20):.0f} MiB; peak growth "
          f"/ checkpoint falls from {small[2][job] / small[0]:.2f} to "
          f"{large[2][job] / large[0]:.2f} as the checkpoint grows")


if __name__ == "__main__":
  main()

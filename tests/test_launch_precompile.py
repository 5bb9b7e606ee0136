"""`t5g precompile`: the tiny T5Gemma's real train step compiled for a TPU v5p:2x2x2 on this CPU.

Compiling for a TPU needs libtpu (`pip install -e '.[tpu-aot]'`); without it the tests that
compile are skipped, saying so. Bad flags fail before any compile, with or without libtpu. The
commands run in child processes with JAX_PLATFORMS=cpu, so that libtpu, where installed, does
not look for a TPU to run on.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from t5g import cli
from t5g.model.config import ComputeConfig
from t5g.model.models import abstract_params
from t5g.model.presets import get_preset
from t5g.runtime import tpu_topology
from t5g.train import precompile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(
    not HAS_LIBTPU, reason="libtpu is not installed (pip install -e '.[tpu-aot]'), so no TPU "
    "program can be compiled here")
# The README's embedded UL2 stage, shorter, fsdp over the 8 chips of a v5p:2x2x2.
COMMAND = ["precompile", "--gin_file=experiments/embedded_t5gemma_ul2.gin",
           "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 32}",
           "--gin.t5g.MeshConfig.data=1", "--gin.t5g.MeshConfig.fsdp=-1"]


def _t5g(*args: str) -> subprocess.CompletedProcess:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
  return subprocess.run([sys.executable, "-m", "t5g", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


@needs_libtpu
def test_precompile_reports_memory(tmp_path):
  """Every phase compiles; parameters and AdamW moments are split 8 ways; the report fits."""
  out = str(tmp_path / "report.json")
  result = _t5g(*COMMAND, "--topology=v5p:2x2x2", f"--output_json={out}")
  assert result.returncode == 0, result.stderr[-4000:]
  assert "8 devices (TPU v5)" in result.stdout
  assert "FITS" in result.stdout and "temporaries" in result.stdout
  with open(out) as f:
    report = json.load(f)
  assert (report["topology"], report["devices"]) == ("v5p:2x2x2", 8)
  assert report["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
  (phase,) = report["phases"]
  shapes = abstract_params(get_preset("t5gemma-tiny-tiny"), ComputeConfig())
  param_bytes = sum(math.prod(s.shape) * np.dtype(s.dtype).itemsize
                    for s in __import__("jax").tree_util.tree_leaves(shapes))
  assert phase["parameters"] == param_bytes // 8
  assert param_bytes // 4 <= phase["optimizer_state"] <= param_bytes // 4 + 64  # mu, nu, count
  assert phase["temporaries"] > 0 and phase["fits"]
  assert phase["hbm"] == 95 * 2 ** 30
  assert phase["total"] == sum(phase[k] for k in ("parameters", "optimizer_state",
                                                  "other_inputs", "temporaries",
                                                  "unaliased_outputs", "code"))


@needs_libtpu
def test_precompile_mesh_must_divide_devices():
  """A mesh that does not divide the topology's devices fails before compiling."""
  result = _t5g(*COMMAND, "--topology=v5p:2x2x2", "--gin.t5g.MeshConfig.data=-1",
                "--gin.t5g.MeshConfig.fsdp=3")
  assert result.returncode == 2
  assert "ICI mesh sizes (-1, 3, 1) do not divide 8 devices" in result.stderr
  assert "compiled" not in result.stdout


def test_precompile_unknown_topology(capsys):
  """An unknown TPU kind ends the command with status 2 naming --topology, before gin or
  libtpu."""
  assert cli.main([*COMMAND, "--topology=v9x:2x2"]) == 2
  assert "--topology='v9x:2x2': unknown TPU kind 'v9x'" in capsys.readouterr().err


@pytest.mark.parametrize("topology,message", [
    ("v5p:2x2", "a v5p slice has 3 positive sizes"),
    ("v5e:0x4", "a v5e slice has 2 positive sizes"),
    ("v5p", "expected KIND:AxB[xC]"),
])
def test_malformed_topology(topology, message):
  """A malformed --topology is a ValueError naming it."""
  with pytest.raises(ValueError, match=re.escape(f"--topology='{topology}': {message}")):
    tpu_topology.parse(topology)


def test_topology_figures():
  """Chips and HBM per chip of a few topologies."""
  assert tpu_topology.parse("v5e:16x16").chips == 256
  assert tpu_topology.parse("v5p:4x4x4", num_slices=2).chips == 128
  assert tpu_topology.parse("v6e:8x8").hbm_bytes_per_chip == 32 * 2 ** 30


@needs_libtpu
def test_precompile_does_not_fit(tmp_path):
  """An absurd batch of the tiny model: libtpu refuses to compile it for want of HBM; the report
  says DOES NOT FIT with libtpu's figures, the one-row compile and the largest batch that fits,
  and the command exits with status 1."""
  out = str(tmp_path / "report.json")
  result = _t5g(*COMMAND, "--topology=v5p:2x2x2", "--gin.BATCH_SIZE=262144",
                f"--output_json={out}")
  assert result.returncode == precompile.DOES_NOT_FIT_STATUS == 1, result.stderr[-4000:]
  assert "phase 0 at batch 262144: libtpu refused to compile it for want of HBM" in result.stdout
  assert "phase 0 at batch 8 compiled in" in result.stdout
  with open(out) as f:
    (phase,) = json.load(f)["phases"]
  assert phase["batch_size"] == 262144 and not phase["fits"]
  needed, available = phase["out_of_memory"]["temporaries"], phase["out_of_memory"]["available"]
  assert needed == phase["temporaries"] > available > 90 * 2 ** 30
  largest, one_row = phase["largest_batch"], phase["largest_batch"]["one_row"]
  assert largest["one_row_batch_size"] == 8 and one_row["out_of_memory"] is None
  assert largest["batch_size"] == 8 * largest["rows"] and 1 < largest["rows"] < 262144 // 8
  # On the line through the one-row compile and the refused one, the next row would not fit.
  one_row_total = sum(one_row[k] for k in ("parameters", "optimizer_state", "other_inputs",
                                           "temporaries", "unaliased_outputs", "code"))
  per_row = (phase["total"] - one_row_total) / (262144 // 8 - 1)
  assert largest["total"] <= phase["hbm"] < largest["total"] + per_row
  gib = 2 ** 30
  assert (f"  DOES NOT FIT: libtpu refused to compile it, its temporaries needing "
          f"{needed / gib:.3f} GiB of the {available / gib:.3f} GiB it has for them"
          in result.stdout)
  assert (f"  largest batch that fits: {largest['batch_size']} ({largest['rows']} rows per "
          f"batch shard): ≈ {largest['total'] / gib:.2f} GiB" in result.stdout)


@pytest.mark.parametrize("message,needed,available", [
    ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
     "temporaries (98.53G) exceeds available HBM (95.74G).", 98.53 * 2 ** 30, 95.74 * 2 ** 30),
    ("Compile failed: RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required "
     "for HLO temporaries (6.43T) exceeds available HBM (15.75G).\nmore", 6.43 * 2 ** 40,
     15.75 * 2 ** 30),
    ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
     "temporaries (900.5M) exceeds available HBM (512M).", 900.5 * 2 ** 20, 512 * 2 ** 20),
])
def test_parse_out_of_memory(message, needed, available):
  """libtpu's out-of-memory message gives the temporaries' bytes and the HBM it has (binary
  units)."""
  assert tpu_topology.parse_out_of_memory(message) == tpu_topology.OutOfMemory(
      round(needed), round(available))


@pytest.mark.parametrize("message", [
    "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.00GiB",
    "INVALID_ARGUMENT: Ran out of patience",
])
def test_parse_out_of_memory_other_errors(message):
  """Any other compile error is not taken for an out-of-memory refusal."""
  assert tpu_topology.parse_out_of_memory(message) is None


GIB = 2 ** 30


def _report(total_gib: float, hbm_gib: float = 95, temporaries_gib: float | None = None,
            available_gib: float | None = None) -> tpu_topology.MemoryReport:
  """A report of `total_gib`, 3 GiB of it parameters and optimizer state, the rest temporaries
  (or `temporaries_gib`, and other inputs the rest); refused by libtpu when `available_gib`."""
  temporaries = total_gib - 3 if temporaries_gib is None else temporaries_gib
  refusal = (None if available_gib is None else
             tpu_topology.OutOfMemory(round(temporaries * GIB), round(available_gib * GIB)))
  return tpu_topology.MemoryReport(
      parameters=GIB, optimizer_state=2 * GIB,
      other_inputs=round((total_gib - 3 - temporaries) * GIB),
      temporaries=round(temporaries * GIB), unaliased_outputs=0, code=0,
      hbm=round(hbm_gib * GIB), out_of_memory=refusal)


def test_largest_rows_from_the_total():
  """A line through 23 GiB at one row and 98 GiB at 16 rows (5 GiB per row): 15 rows are 93 GiB
  of 95."""
  rows, total = precompile.largest_rows(_report(23), _report(98), 16)
  assert (rows, total) == (15, 93 * GIB)


def test_largest_rows_below_the_refused_batch():
  """The estimate stays below the batch that did not fit, however the line runs."""
  assert precompile.largest_rows(_report(90), _report(96), 2) == (1, 90 * GIB)


def test_largest_rows_within_what_libtpu_has():
  """When libtpu refused the batch, its temporaries must also stay within what it has for them,
  and the tighter of the two limits sets the rows (4 GiB more of each per row here)."""
  one_row = _report(4, hbm_gib=16, temporaries_gib=1)
  refused = _report(20, hbm_gib=16, temporaries_gib=17, available_gib=9)
  # temporaries: 1 + 4 (rows - 1) <= 9 -> 3 rows; total: 4 + 4 (rows - 1) <= 16 -> 4 rows.
  assert precompile.largest_rows(one_row, refused, 5) == (3, 12 * GIB)
  one_row = _report(7, hbm_gib=16, temporaries_gib=3)
  refused = _report(23, hbm_gib=16, temporaries_gib=19, available_gib=15.75)
  # temporaries: 3 + 4 (rows - 1) <= 15.75 -> 4 rows; total: 7 + 4 (rows - 1) <= 16 -> 3 rows.
  assert precompile.largest_rows(one_row, refused, 5) == (3, 15 * GIB)


def test_largest_rows_when_one_row_does_not_fit():
  """No batch fits when one row per batch shard does not."""
  assert precompile.largest_rows(_report(100), _report(200), 4) == (0, 0)


def test_refused_report_lines():
  """A refused program's report gives libtpu's figures, the lower-bound total and DOES NOT FIT,
  even when that lower bound is within the HBM."""
  report = _report(15.9, hbm_gib=16, temporaries_gib=15.8, available_gib=15.75)
  assert not report.fits
  lines = report.lines()
  assert lines[3] == "  temporaries (libtpu)      15.800 GiB"
  assert lines[4] == "  total, at least           15.900 GiB"
  assert lines[-1] == ("  DOES NOT FIT: libtpu refused to compile it, its temporaries needing "
                       "15.800 GiB of the 15.750 GiB it has for them; the step needs at least "
                       "15.900 GiB of 16.000 GiB (99% of HBM)")


def test_compiled_report_verdict():
  """A compiled program's verdict gives the total and the HBM."""
  assert _report(98).lines()[-1] == "  DOES NOT FIT: needs 98.000 GiB of 95.000 GiB (103% of HBM)"
  assert _report(30).lines()[-1] == "  FITS: needs 30.000 GiB of 95.000 GiB (32% of HBM)"


def test_largest_batch_lines():
  """The estimate's line: rows per batch shard (and microbatch), or none, saying why."""
  one_row = _report(23)
  assert precompile.LargestBatch(240, 15, 93 * GIB, 1, 16, one_row).line() == (
      "  largest batch that fits: 240 (15 rows per batch shard): ≈ 93.00 GiB (98% of HBM), "
      "estimated per row from batch 16 compiled: 23.00 GiB and this batch")
  assert precompile.LargestBatch(480, 15, 93 * GIB, 2, 32, one_row).line().startswith(
      "  largest batch that fits: 480 (15 rows per batch shard in each of 2 microbatches)")
  refused = _report(100, temporaries_gib=97, available_gib=95.74)
  assert precompile.LargestBatch(0, 0, 0, 1, 16, refused).line() == (
      "  largest batch that fits: none (batch 16 refused by libtpu too: at least 100.00 GiB)")
  assert precompile.LargestBatch(0, 0, 0, 1, 16, None).line() == (
      "  largest batch that fits: none; the run's batch has no more than one row per batch "
      "shard (and microbatch)")

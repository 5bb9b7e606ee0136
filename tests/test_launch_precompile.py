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

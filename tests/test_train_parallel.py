"""Parallel training gives the 1-device run's numbers: meshes, microbatches and several hosts.

Every run trains the tiny T5Gemma in fp32 with AdamW for 3 steps on global batches of 8 rows,
from the same initial parameters (`tests/train_children.py`). The runs happen in child
processes on fake CPU devices, all started at once: a 1-device reference (with and without
4 microbatches, and reading the 2 hosts' batches), the 4 meshes on 8 devices (2 children of 2
meshes: one child's 4 compiles in a row would be the last to end, with a core idle), and 2
processes joined by `jax.distributed` (4 devices each). The tests compare the last step's loss and
gradient norm (relative difference ≤ 1e-5) and the saved parameters (absolute difference
≤ 1e-5; they are O(0.1)) with those of the 1-device run.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from t5g.checkpoints import model_dir
from tests import train_children
from tests.train_children import MESHES, STEPS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = 1e-5
TIMEOUT_S = 600
MESH_GROUPS = (("fsdp8", "data8"), ("tensor2_fsdp4", "data2_fsdp2_tensor2"))  # One child each.
assert sorted(sum(MESH_GROUPS, ())) == sorted(MESHES)


class _Child:
  """A running `python -m tests.train_children` and, once it ends, its JSON report.

  Its output goes to files in `out` (a pipe that nobody reads could fill up and stall it).
  """

  def __init__(self, out: str, name: str, devices: int, *args: str):
    self.name = name
    self._log = os.path.join(out, f"{name}.stderr")
    self._out = os.path.join(out, f"{name}.stdout")
    with open(self._out, "w") as stdout, open(self._log, "w") as stderr:
      self._process = subprocess.Popen(
          [sys.executable, "-m", "tests.train_children", args[0], out, *args[1:]],
          env=train_children.child_env(devices), cwd=ROOT, stdout=stdout, stderr=stderr)
    self._report: dict | None = None

  def report(self) -> dict:
    """The child's report; fails with the end of its stderr when it failed."""
    if self._report is None:
      try:
        code = self._process.wait(timeout=TIMEOUT_S)
      except subprocess.TimeoutExpired:
        self.stop()
        code = f"a timeout ({TIMEOUT_S} s)"
      with open(self._log) as log:
        assert code == 0, f"child {self.name} ended with {code}:\n{log.read()[-6000:]}"
      with open(self._out) as stdout:
        self._report = json.loads(stdout.read().strip().splitlines()[-1])
    return self._report

  def stop(self) -> None:
    """Kills the child if it still runs."""
    if self._process.poll() is None:
      self._process.kill()
      self._process.wait()


def _free_port() -> int:
  """A TCP port that is free now (for the jax.distributed coordinator)."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """(output directory, {child name: _Child}): every child, started together."""
  out = str(tmp_path_factory.mktemp("train_parallel"))
  train_children.write_init(os.path.join(out, "init"))
  port = str(_free_port())
  children = {"reference": _Child(out, "reference", 1, "reference"),
              **{f"meshes{i}": _Child(out, f"meshes{i}", 8, "meshes", *names)
                 for i, names in enumerate(MESH_GROUPS)},
              **{f"host{i}": _Child(out, f"host{i}", 4, "host", port, str(i))
                 for i in range(2)}}
  yield out, children
  for child in children.values():
    child.stop()


def _params(out: str, run: str) -> dict:
  """The parameters (numpy) that run OUT/<run> saved after its last step."""
  loaded = model_dir.load(os.path.join(out, run))
  assert loaded.step == STEPS
  return loaded.params


def _assert_same(out: str, run: str, report: dict, reference: str, expected: dict) -> None:
  """Run `run` ended with the loss, gradient norm and parameters of run `reference`."""
  assert report["step"] == STEPS
  for metric in ("loss", "grad_norm"):
    assert abs(report[metric] - expected[metric]) <= TOLERANCE * abs(expected[metric]), (
        run, metric, report[metric], expected[metric])
  differences = jax.tree_util.tree_map(lambda a, b: float(np.max(np.abs(a - b))),
                                       _params(out, run), _params(out, reference))
  assert max(jax.tree_util.tree_leaves(differences)) <= TOLERANCE, (run, differences)


def test_meshes_equal_one_device(runs):
  """data=8, fsdp=8, tensor=2×fsdp=4 and data=2×fsdp=2×tensor=2 give the 1-device run."""
  out, children = runs
  reference = children["reference"].report()
  assert reference["devices"] == 1
  meshes = {}
  for i in range(len(MESH_GROUPS)):
    report = children[f"meshes{i}"].report()
    assert report["devices"] == 8
    meshes.update(report)
  for name in MESHES:
    assert meshes[name]["input"] == {"batch_size": 8, "shards": [[0, 1]], "rows": 8}
    _assert_same(out, name, meshes[name], "reference", reference["reference"])
  # fsdp=8: parameters and their Adam moments are split 8 ways (all but the scalars).
  saved = meshes["fsdp8"]["saved"]
  assert saved["params_not_fsdp"] < 0.01
  assert saved["opt_state_not_fsdp"] < 0.01
  assert saved["embedding"] == [[512, 64], "P('tensor', 'fsdp')", [[512, 8]], 8]
  assert meshes["tensor2_fsdp4"]["saved"]["embedding"][2:] == [[[256, 16]], 8]
  assert meshes["data8"]["saved"]["embedding"][2:] == [[[512, 64]], 8]


def test_microbatches_equal_full_batch(runs):
  """4 accumulated microbatches of 2 rows give the step of the whole batch of 8."""
  out, children = runs
  report = children["reference"].report()
  _assert_same(out, "microbatches4", report["microbatches4"], "reference", report["reference"])


def test_two_hosts_equal_one(runs):
  """2 processes (jax.distributed, gloo; 4 devices each, fsdp=8 over both), each reading its
  half of the batch, give the run of 1 process (1 device) reading the same global batches."""
  out, children = runs
  hosts = [children[f"host{i}"].report() for i in range(2)]
  one = children["reference"].report()["hosts_joined"]
  assert one["input"] == {"batch_size": 4, "shards": [[0, 2], [1, 2]], "rows": 8}
  for i, report in enumerate(hosts):
    assert report["process"] == [i, 2]
    assert (report["devices"], report["local_devices"]) == (8, 4)
    host = report["host"]
    assert host["input"] == {"batch_size": 4, "shards": [[i, 2]], "rows": 4}
    assert host["saved"]["embedding"] == [[512, 64], "P('tensor', 'fsdp')", [[512, 8]], 4]
    assert host["saved"]["params_not_fsdp"] < 0.01
    for metric in ("step", "loss", "grad_norm"):  # Every process gets the global metrics.
      assert host[metric] == hosts[0]["host"][metric]
  _assert_same(out, "host", hosts[0]["host"], "hosts_joined", one)

"""Decoding sharded over a 4-device mesh gives the single device's tokens.

JAX fixes its device count when it starts, so the runs happen in a child process on 4 fake CPU
devices (tests/inference_children.py, environment from tests/train_children.child_env).
"""

import json
import os
import subprocess
import sys

from tests import train_children

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sharded_decoding_matches_one_device():
  child = subprocess.run([sys.executable, "-m", "tests.inference_children"], cwd=ROOT,
                         env=train_children.child_env(4), capture_output=True, text=True,
                         timeout=600)
  assert child.returncode == 0, child.stderr[-6000:]
  report = json.loads(child.stdout.strip().splitlines()[-1])
  assert set(report) == {"one", "fsdp2_tensor2"}
  assert report["fsdp2_tensor2"] == report["one"]
  assert len({t for row in report["one"] for t in row}) > 4  # Not a degenerate output.

"""launch/local.py: 2 processes joined by jax.distributed train as 1 process does.

The tiny T5Gemma trains 3 steps in fp32 (AdamW as in tests/train_children.py) on a text file of
short lines, unshuffled and unpacked: seqio deals line k to host k mod 2, each line is one
example, so the 2 hosts' rows of a step are the rows the single process reads (in another
order, which the loss does not depend on). Both runs are `t5g train` commands with the same gin
file, started at once; the 2-process one through the launcher, with fsdp=2 across the processes.
They start from the same saved random parameters (`train_children.write_init`), so no process
compiles a random initialisation.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow as tf

from t5g.checkpoints import model_dir
from t5g.data import embedded_corpus
from tests import train_children

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3
TOLERANCE = 1e-5
TIMEOUT_S = 600
GIN = """
include 'models/t5gemma-tiny-tiny.gin'
include 'runs/pretrain.gin'
MIXTURE_OR_TASK_NAME = "launch_test.prefix_lm"
TASK_FEATURE_LENGTHS = {{"inputs": 32, "targets": 32}}
TRAIN_STEPS = {steps}
INIT_CHECKPOINT = "{init}"
BATCH_SIZE = 8
LEARNING_RATE = 1e-3
WARMUP_STEPS = 0
SAVE_EVERY = {steps}
t5g.train.register_tasks = [@t5g.register_text_tasks]
t5g.register_text_tasks.name = "launch_test"
t5g.register_text_tasks.files = "{data}"
t5g.register_text_tasks.documents_per_example = 1
train/t5g.InputConfig.shuffle = False
train/t5g.InputConfig.pack = False
t5g.ComputeConfig.dtype = "float32"
t5g.MeshConfig.data = 1
t5g.MeshConfig.fsdp = -1
t5g.OptimizerConfig.schedule = "constant"
t5g.OptimizerConfig.eps = 1e-3
t5g.OptimizerConfig.weight_decay = 0.1
t5g.OptimizerConfig.clip_global_norm = None
t5g.train.log_every = 1
t5g.train.peak_flops_per_device = 1e12
"""
# Cheaper CPU code generation (as tests/train_children.py): a third less compile time.
XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _env() -> dict[str, str]:
  return {**os.environ, "XLA_FLAGS": XLA_FLAGS, "JAX_PLATFORMS": "cpu",
          "TF_CPP_MIN_LOG_LEVEL": "3"}


def _train_loss(run_dir: str) -> float:
  """The loss TensorBoard recorded for the last step of the run in `run_dir`."""
  losses = {}
  events = os.path.join(run_dir, "train")
  for name in os.listdir(events):
    for event in tf.compat.v1.train.summary_iterator(os.path.join(events, name)):
      for value in event.summary.value:
        if value.tag == "train/loss":
          losses[event.step] = float(tf.make_ndarray(value.tensor))
  return losses[STEPS]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """(output directory, launcher's output): a 1-process and a 2-process run, done together."""
  out = str(tmp_path_factory.mktemp("launch_local"))
  words = " ".join(embedded_corpus.documents()[:20]).split()
  with open(os.path.join(out, "lines.txt"), "w") as f:
    f.writelines(" ".join(words[i * 7:(i + 1) * 7]) + "\n" for i in range(64))
  train_children.write_init(os.path.join(out, "init"))
  gin_file = os.path.join(out, "run.gin")
  with open(gin_file, "w") as f:
    f.write(GIN.format(steps=STEPS, data=os.path.join(out, "lines.txt"),
                       init=os.path.join(out, "init")))

  def command(name):
    return ["train", f"--gin_file={gin_file}", f"--gin.MODEL_DIR='{os.path.join(out, name)}'"]
  one = subprocess.Popen([sys.executable, "-m", "t5g", *command("one")], cwd=ROOT, env=_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  two = subprocess.run(
      [sys.executable, os.path.join(ROOT, "launch", "local.py"), "--num_processes=2",
       f"--timeout_s={TIMEOUT_S}", "--", *command("two")],
      cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S + 60)
  one_out = one.communicate(timeout=TIMEOUT_S)[0]
  assert one.returncode == 0, one_out[-4000:]
  assert two.returncode == 0, (two.stdout + two.stderr)[-4000:]
  return out, two.stdout


def test_two_processes_equal_one(runs):
  """The launcher's 2 processes end with the single process's loss and parameters."""
  out, output = runs
  for i in range(2):  # Every process prints the result, prefixed.
    assert f"[{i}] finished at step {STEPS}: loss" in output, output[-3000:]
  one, two = _train_loss(os.path.join(out, "one")), _train_loss(os.path.join(out, "two"))
  assert abs(one - two) <= TOLERANCE * abs(one), (one, two)
  params = [model_dir.load(os.path.join(out, name)) for name in ("one", "two")]
  assert params[0].step == params[1].step == STEPS
  differences = jax.tree_util.tree_map(lambda a, b: float(np.max(np.abs(a - b))),
                                       params[0].params, params[1].params)
  assert max(jax.tree_util.tree_leaves(differences)) <= TOLERANCE, differences


def test_failure_stops_and_reports():
  """A failing command: the launcher names the process and exits with its status."""
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, "launch", "local.py"), "--num_processes=2", "--",
       "train"],
      cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stdout + result.stderr
  assert "the following arguments are required: --gin_file" in result.stdout
  assert "failed with exit status 2" in result.stdout

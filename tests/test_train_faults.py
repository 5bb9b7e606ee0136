"""Faults during training: a process of a multi-process run killed, a save that cannot write.

The killed process: `launch/local.py` runs `t5g train` as 2 processes (CPU, gloo; the tiny
T5Gemma, fsdp over both, as tests/test_launch_local.py) for STEPS steps, saving every SAVE_EVERY.
The test SIGKILLs process 1 once a step directory is complete on disk (Orbax renames a step once
it is whole, as tests/test_train_resume.py relies on), before the last step: the launcher must
end within a bound (process 0 either fails on its own or is stopped), exit 128 + 9 and name
process 1 and the signal; the same command then resumes from the newest saved step and ends
bitwise equal to an uninterrupted 2-process run. The runs share a JAX compilation cache and use
XLA's cheaper CPU code generation.

The unwritable directory: a save whose write fails with ENOSPC (injected at Orbax's JSON write, in
process: root ignores file modes, so chmod cannot make a directory unwritable here) raises a
`CheckpointWriteError` naming the directory, the step and the OS error, from the asynchronous
write or the synchronous one, and the previous step still restores; a training run whose last
save fails ends with that error (it surfaces when the run waits for its writes) and keeps the
step saved before.

Every test is bounded: each child has a timeout, and a hang in-process ends pytest
(`faulthandler`) with the stacks instead of blocking CI.
"""

from __future__ import annotations

import errno
import faulthandler
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from orbax.checkpoint._src.handlers import json_checkpoint_handler

from t5g.checkpoints import model_dir
from t5g.checkpoints.manager import (CheckpointOptions, CheckpointWriteError,
                                     TrainCheckpointManager, TrainState)
from t5g.data import embedded_corpus
from t5g.data.pipeline import InputConfig
from t5g.model.config import ComputeConfig
from t5g.model.presets import get_preset
from t5g.train import trainer
from tests import train_children

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, SAVE_EVERY = 10, 2
RUN_TIMEOUT_S = 600  # One launcher run (it compiles when the cache is cold).
STOP_BOUND_S = 90  # From the kill to the launcher's exit (its SIGKILL grace is GRACE_S).
GRACE_S = 10
IN_PROCESS_TIMEOUT_S = 300
CHEAP_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
GIN = """
include 'models/t5gemma-tiny-tiny.gin'
include 'runs/pretrain.gin'
MIXTURE_OR_TASK_NAME = "faults_test.prefix_lm"
TASK_FEATURE_LENGTHS = {{"inputs": 32, "targets": 32}}
TRAIN_STEPS = {steps}
INIT_CHECKPOINT = "{init}"
BATCH_SIZE = 4
LEARNING_RATE = 1e-3
WARMUP_STEPS = 0
SAVE_EVERY = {save_every}
t5g.train.register_tasks = [@t5g.register_text_tasks]
t5g.register_text_tasks.name = "faults_test"
t5g.register_text_tasks.files = "{data}"
t5g.register_text_tasks.documents_per_example = 1
train/t5g.InputConfig.shuffle = False
train/t5g.InputConfig.pack = False
t5g.ComputeConfig.dtype = "float32"
t5g.MeshConfig.data = 1
t5g.MeshConfig.fsdp = -1
t5g.OptimizerConfig.schedule = "constant"
t5g.train.log_every = 1
t5g.train.peak_flops_per_device = 1e12
"""


@pytest.fixture(autouse=True)
def _bounded():
  """Ends pytest, printing every thread's stack, when a test runs past its bound."""
  faulthandler.dump_traceback_later(IN_PROCESS_TIMEOUT_S + RUN_TIMEOUT_S * 3, exit=True)
  yield
  faulthandler.cancel_dump_traceback_later()


def _env(cache: str) -> dict[str, str]:
  return {**os.environ, "XLA_FLAGS": CHEAP_XLA_FLAGS, "JAX_PLATFORMS": "cpu",
          "TF_CPP_MIN_LOG_LEVEL": "3", "JAX_COMPILATION_CACHE_DIR": cache,
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[str, str]:
  """(output directory, gin file): the data, the initial parameters and the run's gin file."""
  out = str(tmp_path_factory.mktemp("faults"))
  words = " ".join(embedded_corpus.documents()[:20]).split()
  with open(os.path.join(out, "lines.txt"), "w") as f:
    f.writelines(" ".join(words[i * 7:(i + 1) * 7]) + "\n" for i in range(64))
  train_children.write_init(os.path.join(out, "init"))
  gin_file = os.path.join(out, "run.gin")
  with open(gin_file, "w") as f:
    f.write(GIN.format(steps=STEPS, save_every=SAVE_EVERY, data=os.path.join(out, "lines.txt"),
                       init=os.path.join(out, "init")))
  return out, gin_file


def _launch(out: str, gin_file: str, run: str) -> subprocess.Popen:
  """Starts the 2-process run into OUT/<run>; its output goes to OUT/<run>-<n>.log."""
  log = os.path.join(out, f"{run}-{time.monotonic_ns()}.log")
  with open(log, "w") as f:
    process = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "launch", "local.py"), "--num_processes=2",
         f"--timeout_s={RUN_TIMEOUT_S}", f"--grace_s={GRACE_S}", "--", "train",
         f"--gin_file={gin_file}", f"--gin.MODEL_DIR='{os.path.join(out, run)}'"],
        cwd=ROOT, env=_env(os.path.join(out, "jax_cache")), stdout=f, stderr=subprocess.STDOUT,
        text=True)
  process.log = log
  return process


def _output(process: subprocess.Popen) -> str:
  with open(process.log) as f:
    return f.read()


def _finish(process: subprocess.Popen) -> str:
  """Waits for a launcher run that should succeed; its output."""
  rc = process.wait(RUN_TIMEOUT_S + 60)
  assert rc == 0, _output(process)[-5000:]
  return _output(process)


def _complete_steps(directory: str) -> list[int]:
  """Steps whose directory exists under its final name: complete (tmp names are not numbers)."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def _saved(directory: str, step: int) -> dict:
  """What a step holds besides the model item (params, opt_state, train_state: on this process's
  CPU device, whatever mesh saved them; data: the JSON)."""
  cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
  saved = {}
  with ocp.StandardCheckpointer() as checkpointer:
    for item in ("params", "opt_state", "train_state"):
      path = os.path.join(directory, str(step), item)
      target = jax.tree_util.tree_map(
          lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=cpu),
          checkpointer.metadata(path).item_metadata)
      saved[item] = checkpointer.restore(path, target)
  with open(os.path.join(directory, str(step), "data", "metadata")) as f:
    saved["data"] = json.load(f)
  return saved


def _assert_bitwise_equal(got: dict, expected: dict) -> None:
  """Every leaf of every item of two restored steps is bitwise equal."""
  assert got["data"] == expected["data"]
  for item in ("params", "opt_state", "train_state"):
    got_leaves, got_tree = jax.tree_util.tree_flatten_with_path(got[item])
    expected_leaves, expected_tree = jax.tree_util.tree_flatten_with_path(expected[item])
    assert got_tree == expected_tree, item
    assert got_leaves
    for (path, x), (_, y) in zip(got_leaves, expected_leaves):
      assert np.array_equal(np.asarray(x), np.asarray(y)), f"{item}{jax.tree_util.keystr(path)}"


def test_killed_process_stops_the_run_and_the_command_resumes_exactly(setup):
  out, gin_file = setup
  reference = _launch(out, gin_file, "reference")
  _finish(reference)  # First: it fills the compilation cache.
  assert _complete_steps(os.path.join(out, "reference"))[-1] == STEPS

  run_dir = os.path.join(out, "run")
  process = _launch(out, gin_file, "run")
  deadline = time.monotonic() + RUN_TIMEOUT_S
  while not _complete_steps(run_dir):
    assert process.poll() is None, _output(process)[-5000:]
    assert time.monotonic() < deadline
    time.sleep(0.01)
  pid = int(re.search(r"process 1 is pid (\d+)", _output(process)).group(1))
  os.kill(pid, signal.SIGKILL)
  killed_at = time.monotonic()
  rc = process.wait(STOP_BOUND_S)
  stopped_in = time.monotonic() - killed_at
  output = _output(process)
  assert rc == 128 + signal.SIGKILL, output[-5000:]
  assert ("launch/local.py: process 1 failed with signal 9 (SIGKILL) (the first to fail)"
          in output), output[-5000:]
  assert re.search(r"launch/local.py: process 0 (stopped by the launcher|ended): ", output)
  saved = _complete_steps(run_dir)
  assert saved and STEPS not in saved, f"the kill did not land mid-run: saved {saved}"
  print(f"killed after step {saved[-1]} was saved; the launcher exited {stopped_in:.1f} s later")

  resumed = _finish(_launch(out, gin_file, "run"))
  printed = [int(n) for n in re.findall(r"\[0\] train step (\d+)/", resumed)]
  assert printed == list(range(saved[-1] + 1, STEPS + 1)), resumed[-5000:]
  for i in range(2):
    assert f"[{i}] finished at step {STEPS}: loss" in resumed, resumed[-3000:]
  _assert_bitwise_equal(_saved(run_dir, STEPS), _saved(os.path.join(out, "reference"), STEPS))


def _state(step: int, scale: float) -> TrainState:
  """A small train state (the manager stores any trees)."""
  params = {"w": np.full((4, 3), scale, np.float32), "b": np.arange(3, dtype=np.float32) * scale}
  return TrainState(step, params, {"mu": params}, jax.random.key_data(jax.random.key(step)),
                    {"position": step})


def _restore(manager: TrainCheckpointManager, step: int | None = None) -> TrainState:
  target = _state(0, 0.0)
  return manager.restore(target.params, target.opt_state, target.rng, step)


def _fill_disk(monkeypatch) -> None:
  """Makes Orbax's JSON writes (every step writes some) fail as a full disk does."""
  def no_space(self, x, directory):  # noqa: ARG001
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / self._filename))
  monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", no_space)


@pytest.mark.parametrize("async_save", [True, False])
def test_failed_save_is_named_and_keeps_the_previous_step(tmp_path, monkeypatch, async_save):
  directory = str(tmp_path / "run")
  options = CheckpointOptions(save_every=1, async_save=async_save)
  with TrainCheckpointManager(directory, get_preset("t5gemma-tiny-tiny"), True, options) as manager:
    manager.save(_state(1, 1.0))
    manager.wait_until_finished()
    _fill_disk(monkeypatch)
    with pytest.raises(CheckpointWriteError) as error:
      manager.save(_state(2, 2.0))
      manager.wait_until_finished()  # An asynchronous write fails here.
    message = str(error.value)
    assert message.startswith(f"{directory}: saving step 2 failed: "), message
    assert "[Errno 28] No space left on device" in message, message
    assert error.value.errno == errno.ENOSPC and error.value.step == 2
    monkeypatch.undo()
    assert manager.all_steps() == [1]
    restored = _restore(manager)
  assert restored.step == 1 and restored.data == {"position": 1}
  np.testing.assert_array_equal(restored.params["w"], _state(1, 1.0).params["w"])
  with TrainCheckpointManager(directory, get_preset("t5gemma-tiny-tiny"), True, options) as again:
    assert again.all_steps() == [1]
    assert _restore(again).step == 1
  assert not os.path.exists(os.path.join(directory, "2"))  # Only a temporary name, if any.


def test_training_stops_on_a_failed_save_and_keeps_the_previous_step(tmp_path, monkeypatch,
                                                                     setup):
  """The asynchronous write of the last step fails: `train` raises the named error when it
  ends (no hang), and the step saved before it restores."""
  out, _ = setup
  directory = str(tmp_path / "run")
  write = json_checkpoint_handler.JsonCheckpointHandler._save_fn

  def full_at_step_4(self, x, path):
    if os.path.basename(str(path.parent)).startswith("4."):  # RUN/4.<tmp>/<item>/
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path / self._filename))
    return write(self, x, path)

  monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", full_at_step_4)
  with pytest.raises(CheckpointWriteError, match=re.escape(
      f"{directory}: saving step 4 failed: [Errno 28] No space left on device")):
    trainer.train(
        model_dir=directory, init_checkpoint=os.path.join(out, "init"),
        train_input=InputConfig("t5g.embedded.prefix_lm", {"inputs": 16, "targets": 16}, 2),
        train_steps=4, model=get_preset("t5gemma-tiny-tiny"),
        compute=ComputeConfig(dtype=jnp.float32),
        checkpoint=CheckpointOptions(save_every=2), log_every=1, peak_flops_per_device=1e12)
  monkeypatch.undo()
  assert model_dir.steps(directory) == [2]
  assert model_dir.load(directory, 2).step == 2

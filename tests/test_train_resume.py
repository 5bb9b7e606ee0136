"""The trainer stops and resumes exactly: SIGKILL, SIGTERM, a non-finite loss, warmup phases.

The signal tests run the trainer in a child process: `python -m tests.test_train_resume` trains
the tiny T5Gemma on the embedded PrefixLM task (`_run_kwargs`) from saved random parameters (no
initialisation to compile), printing a progress line per step. The children share a JAX
compilation cache, so only the first one compiles, and use XLA's cheaper CPU code generation
(as tests/train_children.py). A restarted child runs the same command in the same directory and
continues from the newest complete step; its final parameters and optimizer state must be
bitwise equal to those of an uninterrupted child.

Where the SIGKILL lands: the test polls the run directory and kills the child as soon as a step
directory named "3", "6" or "9" exists. Orbax writes a step under a temporary name and renames
it once complete, so that name means the step is whole on disk, and the kill lands after that
save and before the end (the child still has several steps and the final save to go, which the
test checks: step 12 is absent). Nothing in the child is patched or slowed down. SIGTERM is sent
once the child prints its second progress line; that child saves only when stopped and at the
end, so the one step on disk is the signal's.

The non-finite loss and the warmup phases run in-process (no signal involved).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.experimental.compilation_cache import compilation_cache

from t5g.checkpoints import model_dir
from t5g.checkpoints.manager import CheckpointOptions
from t5g.compat.convert import adapt_checkpoint
from t5g.data.pipeline import InputConfig
from t5g.model.config import ComputeConfig
from t5g.model.models import abstract_params
from t5g.model.presets import get_preset
from t5g.train import trainer
from t5g.train.optimizers import OptimizerConfig
from tests import train_children

STEPS, SAVE_EVERY = 12, 3
TIMEOUT_S = 300
CHEAP_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _run_kwargs(directory: str, **overrides) -> dict:
  """The `trainer.train` arguments of every run here (tiny model, float32, short sequences)."""
  kwargs = dict(
      model_dir=directory,
      train_input=InputConfig("t5g.embedded.prefix_lm", {"inputs": 32, "targets": 32}, 4),
      train_steps=STEPS, model=get_preset("t5gemma-tiny-tiny"),
      compute=ComputeConfig(dtype=jnp.float32),
      optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=2),
      checkpoint=CheckpointOptions(save_every=SAVE_EVERY), log_every=1,
      peak_flops_per_device=1e12)
  kwargs.update(overrides)
  return kwargs


@contextlib.contextmanager
def _compilation_cache(cache: str):
  """JAX's persistent compilation cache in directory `cache` for this process, in the block."""
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
  saved = {name: getattr(jax.config, name) for name in names}
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  compilation_cache.reset_cache()
  try:
    yield
  finally:
    for name, value in saved.items():
      jax.config.update(name, value)
    compilation_cache.reset_cache()


def _child(directory: str, init: str, cache: str, save_every: str) -> None:
  """The child process: one training run in `directory` from `init`, compiling through `cache`."""
  with _compilation_cache(cache):
    trainer.train(**_run_kwargs(directory, init_checkpoint=init,
                                checkpoint=CheckpointOptions(save_every=int(save_every))))


def _start(directory: str, init: str, cache: str, save_every: int = SAVE_EVERY
           ) -> tuple[subprocess.Popen, str]:
  """Starts a child training in `directory` from the parameters in `init`: (process, path of its
  stdout; stderr: '.err')."""
  os.makedirs(directory, exist_ok=True)
  out = os.path.join(directory, f"child-{time.monotonic_ns()}.out")
  with open(out, "w") as stdout, open(out[:-len(".out")] + ".err", "w") as stderr:
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.test_train_resume", directory, init, cache,
         str(save_every)], stdout=stdout, stderr=stderr,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", XLA_FLAGS=CHEAP_XLA_FLAGS),
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  return process, out


def _finish(process: subprocess.Popen, out: str) -> list[int]:
  """Waits for a child that should succeed; the steps it printed progress lines for."""
  rc = process.wait(TIMEOUT_S)
  with open(out[:-len(".out")] + ".err") as f:
    assert rc == 0, f"child exited with {rc}:\n{f.read()[-5000:]}"
  return _printed_steps(out)


def _printed_steps(out: str) -> list[int]:
  """The steps of the progress lines ('train step 4/12 | ...') a child printed so far."""
  with open(out) as f:
    return [int(line.split()[2].split("/")[0]) for line in f if line.startswith("train step")]


def _complete_steps(directory: str) -> list[int]:
  """Steps whose directory exists under its final name: complete (tmp names are not numbers)."""
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def _saved(directory: str, step: int) -> dict:
  """Everything a step holds besides the model item: params, opt_state, train_state, data."""
  items = {"params": ocp.args.StandardRestore(), "opt_state": ocp.args.StandardRestore(),
           "train_state": ocp.args.StandardRestore(), "data": ocp.args.JsonRestore()}
  with ocp.CheckpointManager(os.path.abspath(directory)) as manager:
    return dict(manager.restore(step, args=ocp.args.Composite(**items)))


def _assert_same_state(directory: str, reference: str, step: int = STEPS) -> None:
  """The saved `step` of two runs is bitwise equal: every leaf of every item."""
  got, expected = _saved(directory, step), _saved(reference, step)
  assert got["data"] == expected["data"]
  for item in ("params", "opt_state", "train_state"):
    got_leaves, got_tree = jax.tree_util.tree_flatten_with_path(got[item])
    expected_leaves, expected_tree = jax.tree_util.tree_flatten_with_path(expected[item])
    assert got_tree == expected_tree, item
    assert len(got_leaves) > 0
    for (path, x), (_, y) in zip(got_leaves, expected_leaves):
      assert np.array_equal(np.asarray(x), np.asarray(y)), f"{item}{jax.tree_util.keystr(path)}"


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
  """The JAX compilation cache that the children share."""
  return str(tmp_path_factory.mktemp("jax_cache"))


@pytest.fixture(scope="module")
def init(tmp_path_factory) -> str:
  """Random (numpy) parameters of the tiny T5Gemma saved as step 0: every run's starting point."""
  directory = str(tmp_path_factory.mktemp("init"))
  train_children.write_init(directory)
  return directory


@pytest.fixture(scope="module")
def reference(tmp_path_factory, init, cache) -> str:
  """The directory of an uninterrupted run of STEPS steps."""
  directory = str(tmp_path_factory.mktemp("reference"))
  assert _finish(*_start(directory, init, cache)) == list(range(1, STEPS + 1))
  return directory


def test_sigkill_after_a_save_then_restart_is_exact(tmp_path, init, cache, reference):
  directory = str(tmp_path / "run")
  process, out = _start(directory, init, cache)
  deadline = time.monotonic() + TIMEOUT_S
  while not set(_complete_steps(directory)) & {3, 6, 9}:
    assert process.poll() is None, f"the child ended before a save (rc {process.returncode})"
    assert time.monotonic() < deadline
    time.sleep(0.01)
  process.send_signal(signal.SIGKILL)
  assert process.wait(TIMEOUT_S) == -signal.SIGKILL
  saved = _complete_steps(directory)
  assert STEPS not in saved and saved, f"the kill did not land mid-run: saved {saved}"
  resumed_from = saved[-1]
  assert _printed_steps(out)[-1] < STEPS
  printed = _finish(*_start(directory, init, cache))
  assert printed == list(range(resumed_from + 1, STEPS + 1))
  _assert_same_state(directory, reference)


def test_sigterm_saves_the_current_step_and_a_restart_is_exact(tmp_path, init, cache,
                                                               reference):
  directory = str(tmp_path / "run")
  process, out = _start(directory, init, cache, save_every=1000)
  deadline = time.monotonic() + TIMEOUT_S
  while len(_printed_steps(out)) < 2:
    assert process.poll() is None, f"the child ended early (rc {process.returncode})"
    assert time.monotonic() < deadline
    time.sleep(0.01)
  process.send_signal(signal.SIGTERM)
  stopped = _finish(process, out)[-1]
  assert 2 <= stopped < STEPS, f"the signal did not land mid-run (stopped at {stopped})"
  assert _complete_steps(directory) == [stopped]
  assert _finish(*_start(directory, init, cache, save_every=1000)) == list(
      range(stopped + 1, STEPS + 1))
  _assert_same_state(directory, reference)


def test_non_finite_loss_stops_before_saving_its_step(tmp_path, init):
  """Adam moves every parameter by the learning rate in its first step: at 1e30 the second
  step's logits overflow."""
  directory = str(tmp_path / "run")
  optimizer = OptimizerConfig(learning_rate=1e30, schedule="constant", clip_global_norm=None)
  with pytest.raises(trainer.NonFiniteLoss, match=r"step 2: loss is (nan|inf)") as error:
    trainer.train(**_run_kwargs(directory, optimizer=optimizer, init_checkpoint=init,
                                checkpoint=CheckpointOptions(save_every=1)))
  assert "Newest saved step: 1" in str(error.value)
  assert model_dir.steps(directory) == [1]
  saved = model_dir.load(directory, 1)
  assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(saved.params))
  assert max(np.abs(x).max() for x in jax.tree_util.tree_leaves(saved.params)) > 1e29


def _random_gemma2(directory: str, preset: str, seed: int) -> str:
  """A t5g directory holding random parameters of a Gemma 2 preset (unscanned layout)."""
  config = get_preset(preset)
  rng = np.random.RandomState(seed)
  params = jax.tree_util.tree_map(
      lambda s: rng.normal(scale=0.1 if len(s.shape) == 1 else s.shape[0] ** -0.5,
                           size=s.shape).astype(np.float32),
      abstract_params(config, ComputeConfig(scan_layers=False)))
  model_dir.save(directory, 0, params, config, scanned=False)
  return directory


def _is_new(path) -> bool:
  """Whether a parameter path is one of the fresh cross-attention parameters."""
  return "cross_att" in jax.tree_util.keystr(path)


def test_warmup_of_new_parameters_then_everything(tmp_path):
  """An unbalanced adaptation trains its fresh cross-attention alone for 2 steps, then all;
  a run resumed at the phase boundary ends as the uninterrupted one. (Both runs compile through
  a compilation cache: the resumed run's programs are the first run's.)"""
  init = str(tmp_path / "adapted")
  adapt_checkpoint(_random_gemma2(str(tmp_path / "wide"), "gemma2-tiny_wide", 0),
                   _random_gemma2(str(tmp_path / "tiny"), "gemma2-tiny", 1), init)
  kwargs = dict(model=None, init_checkpoint=init, train_steps=4, warmup_new_parameters_steps=2,
                optimizer=OptimizerConfig(learning_rate=1e-3, schedule="constant"),
                checkpoint=CheckpointOptions(save_every=2, keep_last=None))
  run = str(tmp_path / "run")
  with _compilation_cache(str(tmp_path / "jax_cache")):
    trainer.train(**_run_kwargs(run, **kwargs))
  assert model_dir.steps(run) == [2, 4]
  start, warmed, trained = (model_dir.load(d, step).params
                            for d, step in ((init, 0), (run, 2), (run, 4)))
  new = []
  for (path, before), during, after in zip(jax.tree_util.tree_leaves_with_path(start),
                                           jax.tree_util.tree_leaves(warmed),
                                           jax.tree_util.tree_leaves(trained)):
    name = jax.tree_util.keystr(path)
    if _is_new(path):
      new.append(name)
      assert not np.array_equal(during, before), f"{name} did not train during the warmup"
    else:
      np.testing.assert_array_equal(during, before, err_msg=f"{name} trained during the warmup")
    assert not np.array_equal(after, during), f"{name} did not train after the warmup"
  assert len(new) == 2 * 6  # q/k/v/o and the 2 norms, of the local and the global layers.

  resumed = str(tmp_path / "resumed")  # Holds only step 2, the phase boundary.
  shutil.copytree(os.path.join(run, "2"), os.path.join(resumed, "2"))
  with _compilation_cache(str(tmp_path / "jax_cache")):
    trainer.train(**_run_kwargs(resumed, **kwargs))
  assert model_dir.steps(resumed) == [2, 4]
  _assert_same_state(resumed, run, 4)


if __name__ == "__main__":
  _child(*sys.argv[1:])

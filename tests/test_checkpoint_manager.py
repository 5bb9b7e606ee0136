"""The trainer's checkpoint lifecycle: policies, async saves, dtypes, resume, integrity."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from t5g.checkpoints import model_dir
from t5g.checkpoints.average import average
from t5g.checkpoints.manager import CheckpointOptions, TrainCheckpointManager, TrainState
from t5g.checkpoints.sources import ModelDirSource
from t5g.model import ComputeConfig, abstract_params, get_preset

CONFIG = get_preset("t5gemma-tiny-tiny")
ABSTRACT = abstract_params(CONFIG, ComputeConfig(scan_layers=True))
OPTIMIZER = optax.adamw(1e-3)
SYNC = dict(save_every=1, keep_last=None, async_save=False)


def make_state(step: int, seed: int = 0) -> TrainState:
  """A tiny T5Gemma run's state with random (not initial) values everywhere."""
  rng = np.random.default_rng(seed * 1000 + step)
  params = jax.tree_util.tree_map(
      lambda s: jnp.asarray(rng.standard_normal(s.shape, np.float32)), ABSTRACT)
  opt_state = jax.tree_util.tree_map(
      lambda x: jnp.asarray(rng.standard_normal(x.shape).astype(x.dtype))
      if jnp.issubdtype(x.dtype, jnp.floating) else x + step, OPTIMIZER.init(params))
  return TrainState(step, params, opt_state, jax.random.key(seed + step),
                    {"epoch": step // 5, "offsets": [step, 7], "shard": "train-00001"})


def targets(state: TrainState):
  """The abstract restore targets of a state like `state` (default device)."""
  return jax.eval_shape(lambda: (state.params, state.opt_state, state.rng))


def assert_same(restored: TrainState, expected: TrainState) -> None:
  assert restored.step == expected.step and restored.data == expected.data
  np.testing.assert_array_equal(jax.random.key_data(restored.rng),
                                jax.random.key_data(expected.rng))
  for got, want in [(restored.params, expected.params), (restored.opt_state, expected.opt_state)]:
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)


@pytest.mark.parametrize("mode, best", [("min", 6), ("max", 2)])
def test_policies_keep_last_every_and_best(tmp_path, mode, best):
  options = CheckpointOptions(save_every=2, keep_last=2, keep_every=4, best_metric="loss",
                              best_mode=mode, keep_best=1, async_save=False)
  state = make_state(0)
  losses = {2: 5.0, 4: 3.0, 6: 1.0, 8: 2.0, 10: 4.0, 11: 3.5}  # 6: lowest, 2: highest.
  with TrainCheckpointManager(tmp_path / "run", CONFIG, True, options) as manager:
    saved = [step for step in range(1, 12) if manager.save(
        state._replace(step=step), {"loss": losses.get(step, 9.0)}, force=step == 11)]
    assert saved == [2, 4, 6, 8, 10, 11]
    assert manager.all_steps() == sorted({4, 8, 10, 11, best})
    assert manager.metrics(best) == {"loss": losses[best]}
    assert manager.should_save(12) and not manager.should_save(13)
    assert not manager.save(state._replace(step=11), {"loss": 0.0}, force=True)  # Already saved.
    with pytest.raises(ValueError, match="lack best_metric 'loss'"):
      manager.save(state._replace(step=12), {"accuracy": 1.0})


def test_async_save_returns_after_the_host_copy(tmp_path):
  state = make_state(5)
  expected = state._replace(params=jax.tree_util.tree_map(np.array, state.params),
                            opt_state=jax.tree_util.tree_map(np.array, state.opt_state))
  with TrainCheckpointManager(tmp_path, CONFIG, True, CheckpointOptions(save_every=5)) as manager:
    assert manager.save(state)
    # The trainer donates the state to its next step: the device buffers go away at once.
    for array in jax.tree_util.tree_leaves((state.params, state.opt_state)):
      array.delete()
    manager.wait_until_finished()
  with TrainCheckpointManager(tmp_path, CONFIG, True, CheckpointOptions(**SYNC)) as manager:
    restored = manager.restore(*make_state(0)[1:4])  # Arrays as targets: their shape and place.
  assert_same(restored, expected)


def test_bf16_save_dtype_and_model_dir_reads_the_run(tmp_path):
  options = CheckpointOptions(save_dtype="bfloat16", **SYNC)
  state = make_state(3)
  with TrainCheckpointManager(tmp_path, CONFIG, True, options, ["decoder/cross_attn/k_proj"]
                              ) as manager:
    manager.save(state, {"loss": 1.5})
    assert manager.metrics(3) == {"loss": 1.5}  # Saved without a best_metric too.
    restored = manager.restore(*targets(state))
  rounded = jax.tree_util.tree_map(lambda x: np.asarray(x.astype(jnp.bfloat16), np.float32),
                                   state.params)
  assert jax.tree_util.tree_leaves(restored.params)[0].dtype == jnp.float32
  jax.tree_util.tree_map(np.testing.assert_array_equal, restored.params, rounded)
  assert_same(restored._replace(params=state.params), state)  # Optimizer state: float32 kept.
  assert not np.array_equal(rounded["encoder"]["embedder"]["embedding"],
                            state.params["encoder"]["embedder"]["embedding"])
  stored = ocp.StandardCheckpointer().metadata(tmp_path / "3" / "params").item_metadata
  assert {np.dtype(leaf.dtype) for leaf in jax.tree_util.tree_leaves(stored)} == {
      np.dtype(jnp.bfloat16)}
  # What `t5g export` and `t5g score` use reads the run's directory.
  assert model_dir.steps(str(tmp_path)) == [3]
  meta, _ = model_dir.read_metadata(str(tmp_path))
  assert meta["param_layout"] == "scanned" and meta["new_parameters"] == [
      "decoder/cross_attn/k_proj"]
  loaded = model_dir.load(str(tmp_path), scanned=False)
  assert loaded.config == CONFIG and loaded.step == 3 and not loaded.scanned
  with ModelDirSource(str(tmp_path)) as source:
    np.testing.assert_array_equal(source.get("decoder", 2, ("mlp", "up_proj")),
                                  rounded["decoder"]["layers"]["local"]["mlp"]["up_proj"][1])


def test_params_only_restore(tmp_path):
  state = make_state(4)
  plain = str(tmp_path / "pretrained")
  model_dir.save(plain, 7, jax.tree_util.tree_map(np.asarray, state.params), CONFIG, True)
  params, step = model_dir.restore_params(plain, ABSTRACT, CONFIG, scanned=True)
  assert step == 7
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, state.params)
  # Another layout: converted on the host, then placed as the target says.
  target = abstract_params(CONFIG, ComputeConfig(scan_layers=False))
  params, _ = model_dir.restore_params(plain, target, CONFIG, scanned=False)
  np.testing.assert_array_equal(params["encoder"]["layer_3"]["attn"]["q_proj"],
                                state.params["encoder"]["layers"]["global"]["attn"]["q_proj"][1])
  assert isinstance(params["encoder"]["layer_3"]["attn"]["q_proj"], jax.Array)
  # From a run's step.
  with TrainCheckpointManager(tmp_path / "run", CONFIG, True, CheckpointOptions(**SYNC)) as m:
    m.save(state)
  params, step = model_dir.restore_params(str(tmp_path / "run"), ABSTRACT, CONFIG, scanned=True)
  assert step == 4
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, state.params)
  with pytest.raises(ValueError, match=r"pretrained/7/model: saved for another model: .*embed"):
    model_dir.restore_params(plain, ABSTRACT, get_preset("t5gemma-tiny_wide-tiny"), scanned=True)


def _truncate_a_params_file(run, step: int) -> None:
  data = sorted(glob.glob(os.path.join(str(run), str(step), "params", "**", "d", "*"),
                          recursive=True), key=os.path.getsize)
  with open(data[-1], "r+b") as f:  # The largest: it holds array data, not just an index.
    f.truncate(os.path.getsize(data[-1]) // 2)


# Orbax leaves the reads still pending after the first failure to be garbage-collected.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_step_names_itself_and_resume_falls_back(tmp_path):
  run = tmp_path / "run"
  with TrainCheckpointManager(run, CONFIG, True, CheckpointOptions(**SYNC)) as manager:
    for step in (1, 2, 3):
      manager.save(make_state(step))
  _truncate_a_params_file(run, 3)
  with pytest.raises(ValueError, match=f"{run}/3/params: cannot restore .*Error reading"):
    model_dir.load(str(run))
  with TrainCheckpointManager(run, CONFIG, True, CheckpointOptions(**SYNC)) as manager:
    with pytest.raises(ValueError, match=f"{run}/3: cannot restore .*Error reading.*"
                                         r"\(steps saved: \[1, 2, 3\]\)"):
      manager.restore(*targets(make_state(0)), step=3)
    with pytest.raises(ValueError, match=r"step 7 does not exist \(available: \[1, 2, 3\]\)"):
      manager.restore(*targets(make_state(0)), step=7)
    with pytest.warns(UserWarning, match=f"{run}/3: cannot restore .*resuming from step 2, "
                                         f"moved it to {run}/3.unreadable-"):
      restored = manager.restore(*targets(make_state(0)))
    assert_same(restored, make_state(2))
    assert manager.all_steps() == [1, 2] and model_dir.steps(str(run)) == [1, 2]
    assert manager.save(make_state(3))  # The run saves the step again.
    assert_same(manager.restore(*targets(make_state(0))), make_state(3))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # As above.
def test_restore_checks_the_model(tmp_path):
  with TrainCheckpointManager(tmp_path, CONFIG, True, CheckpointOptions(**SYNC)) as manager:
    manager.save(make_state(1))
    params, _, rng = targets(make_state(0))
    # Targets that fit no step (another optimizer): an error, and every step stays in place.
    with pytest.raises(ValueError, match="no step could be restored: .*1: cannot restore .*"
                                         "structures do not match"):
      manager.restore(params, optax.sgd(0.1).init(params), rng)
    assert manager.all_steps() == [1] and sorted(os.listdir(tmp_path)) == ["1"]
  with TrainCheckpointManager(tmp_path, CONFIG, False, CheckpointOptions(**SYNC)) as manager:
    with pytest.raises(ValueError, match="1: saved for another model than this run's: "
                                         "param_layout: saved 'scanned', expected 'unscanned'"):
      manager.restore(*targets(make_state(0)))


_KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys
    from orbax.checkpoint._src.path import atomicity
    from t5g.checkpoints.manager import CheckpointOptions, TrainCheckpointManager
    from tests.test_checkpoint_manager import CONFIG, make_state

    manager = TrainCheckpointManager(sys.argv[1], CONFIG, True, CheckpointOptions(save_every=1))
    manager.save(make_state(1))
    manager.wait_until_finished()

    async def killed(self):  # Every file of step 2 is written; its rename never happens.
      os.kill(os.getpid(), signal.SIGKILL)

    atomicity.AtomicRenameTemporaryPath.finalize = killed
    manager.save(make_state(2))
    manager.wait_until_finished()
""")


def test_killed_save_leaves_the_previous_step(tmp_path):
  run = str(tmp_path / "run")
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  child = subprocess.run([sys.executable, "-c", _KILLED_SAVE, run], capture_output=True,
                         text=True, cwd=repo, timeout=120)
  assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
  leftover = [name for name in os.listdir(run) if name.startswith("2.")]
  assert leftover and "orbax-checkpoint-tmp" in leftover[0]
  assert model_dir.steps(run) == [1]
  with TrainCheckpointManager(run, CONFIG, True, CheckpointOptions(**SYNC)) as manager:
    assert_same(manager.restore(*targets(make_state(0))), make_state(1))
    assert sorted(os.listdir(run)) == ["1"]  # The leftover is cleaned up.
    assert manager.save(make_state(2))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # As above.
def test_average_last_steps(tmp_path):
  run, out, other = str(tmp_path / "run"), str(tmp_path / "averaged"), str(tmp_path / "other")
  with TrainCheckpointManager(run, CONFIG, True, CheckpointOptions(**SYNC)) as manager:
    for step in (1, 2, 3):
      manager.save(make_state(step))
  assert average(run, 2, out) == [2, 3]
  loaded = model_dir.load(out)
  assert (loaded.config, loaded.scanned, loaded.step) == (CONFIG, True, 3)
  assert "new_parameters" not in model_dir.read_metadata(out)[0]

  def mean(*arrays):  # In numpy: XLA may divide by multiplying with the reciprocal.
    total = np.zeros(arrays[0].shape, np.float32)
    for array in arrays:
      total += np.asarray(array)
    return total / np.float32(len(arrays))

  expected = jax.tree_util.tree_map(mean, make_state(2).params, make_state(3).params)
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded.params, expected)

  with pytest.raises(FileExistsError, match=f"{out}: output exists"):
    average(run, 2, out)
  with pytest.raises(ValueError, match=r"last 4 steps: only 3 to choose from \(\[1, 2, 3\]\)"):
    average(run, 4, other)
  with pytest.raises(ValueError, match=r"steps \[9\] do not exist \(available: \[1, 2, 3\]\)"):
    average(run, 2, other, steps=[1, 9])
  _truncate_a_params_file(run, 3)
  with pytest.raises(ValueError, match=f"{run}/3/params: cannot read .*Error reading"):
    average(run, 2, other)
  assert not os.path.exists(other)  # Nothing half-written.
  unscanned = abstract_params(CONFIG, ComputeConfig(scan_layers=False))
  model_dir.save(run, 4, jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), unscanned),
                 CONFIG, False)
  with pytest.raises(ValueError, match=f"{run}/3/model: config or parameter layout differs "
                                       "from step 4's"):
    average(run, 2, other)

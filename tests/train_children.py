"""Child processes of tests/test_train_parallel.py: short training runs on fake CPU devices.

JAX fixes its device count when it starts, so each run happens in a child started with
`XLA_FLAGS=--xla_force_host_platform_device_count=N` in its environment (`child_env`):

    python -m tests.train_children reference OUT             # 1 device
    python -m tests.train_children meshes OUT [MESH ...]     # 8 devices (default: all MESHES)
    python -m tests.train_children host OUT PORT PROCESS_ID  # 4 devices, one of 2 processes

Every run starts from the parameters in OUT/init (`write_init`), trains the same model for
`STEPS` steps into OUT/<run> and the child prints one JSON line: per run, the last step's loss
and gradient norm, how the trainer laid out the state it saved and which rows this process read.
The test compares the saved parameters.

The data: every single-process run reads the same global batches. Two hosts read other ones
(seqio shards the examples before packing them, so the rows of host k are not rows of the
1-host batches), so the reference child also trains `hosts_joined`: one process reading both
hosts' shards, each into the rows that host's devices hold. Its train step is the `reference`
run's program, so the reference child compiles through a persistent compilation cache
(OUT/reference_cache) and `hosts_joined` loads that program instead of compiling it again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import seqio

from t5g.checkpoints import model_dir
from t5g.checkpoints.manager import CheckpointOptions, TrainCheckpointManager
from t5g.data.pipeline import InputConfig, InputIterator
from t5g.model.config import ComputeConfig
from t5g.model.models import abstract_params
from t5g.model.presets import get_preset
from t5g.runtime import distributed, partitioning
from t5g.train import trainer
from t5g.train.optimizers import OptimizerConfig
from t5g.runtime.partitioning import MeshConfig

STEPS = 3
GLOBAL_BATCH = 8
PRESET = "t5gemma-tiny-tiny"
MESHES = {  # run name: MeshConfig arguments, on 8 devices.
    "data8": {"data": 8},
    "fsdp8": {"data": 1, "fsdp": 8},
    "tensor2_fsdp4": {"data": 1, "fsdp": 4, "tensor": 2},
    "data2_fsdp2_tensor2": {"data": 2, "fsdp": 2, "tensor": 2},
}
HOST_MESH = "fsdp8"  # The 2-process run's mesh: 4 devices in each process.
# AdamW. eps: Adam's step g / (|g| + eps) is about ±lr wherever |g| ≫ eps, so with the default
# eps=1e-8 the float rounding of gradients that nearly cancel, which each mesh's reduction order
# changes, moves a few parameters by a good part of lr (up to 2.9e-4 after 3 steps here);
# eps=1e-3 (typical |g|: 1e-2) bounds that by the rounding itself. No clipping: a gradient
# scaled wrongly changes the steps.
OPTIMIZER = dict(learning_rate=1e-3, schedule="constant", eps=1e-3, weight_decay=0.1,
                 clip_global_norm=None)


def child_env(devices: int) -> dict[str, str]:
  """This process's environment, with the host platform split into `devices` CPU devices.

  XLA's cheaper CPU code generation cuts each run's compile by about a third; every run uses it.
  """
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
             "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true",
             JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  return env


def write_init(directory: str) -> None:
  """Saves random (numpy, seeded) parameters of the test model as step 0 of a t5g directory,
  the runs' `init_checkpoint`: no run then compiles a random initialisation."""
  config = get_preset(PRESET)
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(
      lambda s: rng.normal(0.0, 0.2, s.shape).astype(s.dtype),
      abstract_params(config, ComputeConfig()))
  model_dir.save(directory, 0, params, config, scanned=True)


def _fsdp_fraction(tree: Any) -> float:
  """Fraction of the elements of `tree`'s arrays not sharded over the mesh axis 'fsdp'."""
  return partitioning.replicated_fraction(tree, jax.tree_util.tree_map(lambda x: x.sharding,
                                                                       tree))


_REPORT: dict = {}  # What the current run reports (`_record_runs`).


class _Reader:
  """Stands in for the trainer's `InputIterator` and records what this host reads.

  join_hosts > 1 (in a single process): reads the global batches of that many hosts, host k's
  rows (its shard k) as rows [k·b, (k+1)·b) of the global batch, where the mesh puts them.
  """

  join_hosts = 1

  def __init__(self, config: InputConfig, shard_info: seqio.ShardInfo,
               state: dict | None = None):
    shards = [shard_info]
    if self.join_hosts > 1:
      assert shard_info.num_shards == 1 and state is None, shard_info
      config = dataclasses.replace(config, batch_size=config.batch_size // self.join_hosts)
      shards = [seqio.ShardInfo(k, self.join_hosts) for k in range(self.join_hosts)]
    self._parts = [InputIterator(config, shard, state) for shard in shards]
    _REPORT["input"] = {"batch_size": config.batch_size,
                        "shards": [[s.index, s.num_shards] for s in shards]}

  def __next__(self) -> dict[str, np.ndarray]:
    parts = [next(part) for part in self._parts]
    batch = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
    _REPORT["input"]["rows"] = len(batch["decoder_target_tokens"])
    return batch

  def state(self) -> dict:
    """The (first) host's position."""
    return self._parts[0].state()


def _record_runs() -> None:
  """Makes the trainer read through `_Reader` and report into `_REPORT` the layout of the state
  it saves."""
  save = TrainCheckpointManager.save

  def recording_save(self, state, *args, **kwargs):
    embedding = state.params["encoder"]["embedder"]["embedding"]
    _REPORT["saved"] = {
        "params_not_fsdp": _fsdp_fraction(state.params),
        "opt_state_not_fsdp": _fsdp_fraction(state.opt_state),
        "embedding": [list(embedding.shape), str(embedding.sharding.spec),
                      sorted({tuple(s.data.shape) for s in embedding.addressable_shards}),
                      len(embedding.addressable_shards)]}
    return save(self, state, *args, **kwargs)

  trainer.InputIterator = _Reader
  TrainCheckpointManager.save = recording_save


def _train(out: str, name: str, mesh: dict, num_microbatches: int = 1,
           join_hosts: int = 1) -> dict:
  """Trains OUT/<name> from OUT/init for STEPS steps in fp32; returns what the run reported.

  join_hosts: read the data as that many hosts would (see `_Reader`).
  """
  _REPORT.clear()
  _Reader.join_hosts = join_hosts
  metrics = trainer.train(
      model_dir=os.path.join(out, name), init_checkpoint=os.path.join(out, "init"),
      train_input=InputConfig("t5g.embedded.prefix_lm", {"inputs": 32, "targets": 32},
                              GLOBAL_BATCH),
      train_steps=STEPS, model=get_preset(PRESET), compute=ComputeConfig(dtype=jnp.float32),
      mesh=MeshConfig(**mesh), optimizer=OptimizerConfig(**OPTIMIZER),
      num_microbatches=num_microbatches, checkpoint=CheckpointOptions(save_every=STEPS),
      log_every=1, peak_flops_per_device=1e12, seed=0)
  return {**_REPORT, **{k: metrics[k] for k in ("step", "loss", "grad_norm")}}


def main(mode: str, out: str, *host: str) -> None:
  """Runs the child `mode` (see the module docstring) and prints its JSON report."""
  if mode == "host":  # Before anything initialises the backend.
    port, process_id = host
    distributed.initialize(f"localhost:{port}", 2, int(process_id))
  _record_runs()
  report: dict = {"devices": jax.device_count(), "local_devices": jax.local_device_count(),
                  "process": [jax.process_index(), jax.process_count()]}
  if mode == "reference":
    jax.config.update("jax_compilation_cache_dir", os.path.join(out, "reference_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    report["reference"] = _train(out, "reference", {"data": 1})
    report["microbatches4"] = _train(out, "microbatches4", {"data": 1}, num_microbatches=4)
    report["hosts_joined"] = _train(out, "hosts_joined", {"data": 1}, join_hosts=2)
  elif mode == "meshes":
    for name in host or MESHES:
      report[name] = _train(out, name, MESHES[name])
  elif mode == "host":
    report["host"] = _train(out, "host", MESHES[HOST_MESH])
  else:
    raise SystemExit(f"unknown mode {mode!r}")
  print(json.dumps(report))


if __name__ == "__main__":
  main(*sys.argv[1:])

"""A run saved on one device resumes sharded over an 8-device mesh, and back.

JAX fixes its device count when it starts, so the test runs in a subprocess that asks the host
platform for 8 devices before importing jax.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

_RESHARD = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import flax.linen as nn
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding
    from t5g.checkpoints import model_dir
    from t5g.checkpoints.manager import CheckpointOptions, TrainCheckpointManager
    from t5g.model import ComputeConfig, abstract_params
    from tests.test_checkpoint_manager import (
        CONFIG, SYNC, assert_same, make_state, targets)

    assert len(jax.devices()) == 8, jax.devices()
    run = sys.argv[1]
    state = make_state(6)
    assert state.params["encoder"]["embedder"]["embedding"].sharding.num_devices == 1
    with TrainCheckpointManager(run, CONFIG, True, CheckpointOptions(**SYNC)) as manager:
      manager.save(state)

    # The trainer's way: logical axes of every parameter -> mesh axes by a rules table.
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    rules = (("embed", "data"), ("mlp", "model"), ("heads", "model"), ("vocab", "model"),
             ("kv_heads", None), ("head_dim", None), ("layers", None))
    boxed = abstract_params(CONFIG, ComputeConfig(scan_layers=True), boxed=True)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    params = jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                                                       sharding=sh),
                                    nn.unbox(boxed), shardings)
    replicated = NamedSharding(mesh, PartitionSpec())
    _, opt_state, rng = targets(state)
    adam = opt_state[0]
    opt_state = (adam._replace(count=jax.ShapeDtypeStruct((), adam.count.dtype,
                                                          sharding=replicated),
                               mu=params, nu=params), *opt_state[1:])
    rng = jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=replicated)

    def check_placed(tree, target):
      for leaf, want in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(target)):
        assert leaf.sharding == want.sharding, (leaf.sharding, want.sharding)

    with TrainCheckpointManager(run, CONFIG, True, CheckpointOptions(save_every=1)) as manager:
      sharded = manager.restore(params, opt_state, rng)
      assert_same(sharded, state)
      check_placed((sharded.params, sharded.opt_state, sharded.rng), (params, opt_state, rng))
      q = sharded.params["decoder"]["layers"]["global"]["attn"]["q_proj"]  # [L, embed, heads, H]
      assert q.sharding.spec == PartitionSpec(None, "data", "model", None)
      assert {s.data.shape for s in q.addressable_shards} == {(q.shape[0], 32, 1, 16)}
      assert len(q.addressable_shards) == 8
      # Saved again from the mesh (asynchronously), restored onto one device.
      assert manager.save(sharded._replace(step=7))
      manager.wait_until_finished()
      one = SingleDeviceSharding(jax.devices()[3])
      single = jax.tree_util.tree_map(
          lambda t: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=one), (params, opt_state, rng))
      back = manager.restore(*single)
    assert back.step == 7
    assert_same(back._replace(step=6), state)
    check_placed((back.params, back.opt_state, back.rng), single)
    # A fine-tune's start: the parameters alone, onto the mesh.
    only, step = model_dir.restore_params(run, params, CONFIG, scanned=True, step=6)
    check_placed(only, params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, only, state.params)
    print("resharded", step)
""")


def test_save_on_one_device_restore_on_eight_and_back(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  child = subprocess.run([sys.executable, "-c", _RESHARD, str(tmp_path / "run")], env=env,
                         capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert child.returncode == 0, child.stderr[-4000:]
  assert child.stdout.split()[-2:] == ["resharded", "6"]

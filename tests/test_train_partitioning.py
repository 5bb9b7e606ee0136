"""Mesh sizes, the logical-axis rules, and the fsdp coverage check (one CPU device; the
multi-device runs are in test_train_parallel.py)."""

from __future__ import annotations

import flax.linen as nn
import jax
import pytest
from jax.sharding import PartitionSpec

from t5g.model import ComputeConfig, abstract_params, get_preset
from t5g.runtime import partitioning
from t5g.runtime.partitioning import MeshConfig


def test_mesh_sizes_fill_in_and_fail_naming_the_axes():
  assert partitioning._fill((-1, 2, 2), 8, "ICI") == (2, 2, 2)
  assert partitioning._fill((1, -1, 1), 8, "ICI") == (1, 8, 1)
  with pytest.raises(ValueError, match="at most one -1"):
    partitioning._fill((-1, -1, 1), 8, "ICI")
  with pytest.raises(ValueError, match="do not divide 8"):
    partitioning._fill((-1, 3, 1), 8, "ICI")
  with pytest.raises(ValueError, match=r"'data': 2, 'fsdp': 2, 'tensor': 1.*need 4 devices, have 8"):
    partitioning._fill((2, 2, 1), 8, "ICI")
  mesh = partitioning.make_mesh(MeshConfig(data=-1))
  assert mesh.axis_names == ("data", "fsdp", "tensor") and mesh.size == len(jax.devices())


def test_default_rules_shard_every_parameter_over_fsdp():
  boxed = abstract_params(get_preset("t5gemma-tiny-tiny"), ComputeConfig(), boxed=True)
  specs = nn.get_partition_spec(boxed)
  with nn.logical_axis_rules(partitioning.DEFAULT_RULES):
    mesh_specs = jax.tree_util.tree_map(
        lambda spec: nn.logical_to_mesh_axes(spec), specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec))
  flat = {jax.tree_util.keystr(p): s for p, s in
          jax.tree_util.tree_leaves_with_path(mesh_specs,
                                              is_leaf=lambda x: isinstance(x, PartitionSpec))}
  # Every parameter has an embed dimension, which goes to fsdp; heads/mlp/vocab to tensor.
  assert all("fsdp" in str(spec) for spec in flat.values()), flat
  embedding = flat["['decoder']['embedder']['embedding']"]
  assert tuple(embedding) == ("tensor", "fsdp")
  q_proj = flat["['encoder']['layers']['local']['attn']['q_proj']"]
  assert tuple(q_proj) == (None, "fsdp", "tensor", None)
  # Activations: batch takes (data, fsdp), so embed stays whole.
  with nn.logical_axis_rules(partitioning.DEFAULT_RULES):
    assert tuple(nn.logical_to_mesh_axes(("batch", "length", "embed"))) == (
        ("data", "fsdp"), None, None)


def test_fsdp_coverage_check_names_replicated_parameters():
  boxed = abstract_params(get_preset("t5gemma-tiny-tiny"), ComputeConfig(), boxed=True)
  shapes = nn.unbox(boxed)
  no_fsdp = tuple((name, None if name == "embed" else axes)
                  for name, axes in partitioning.DEFAULT_RULES)

  class _FakeSharding:
    def __init__(self, spec):
      self.spec = spec

  def shardings(rules):
    with nn.logical_axis_rules(rules):
      return jax.tree_util.tree_map(
          lambda spec: _FakeSharding(nn.logical_to_mesh_axes(spec)), nn.get_partition_spec(boxed),
          is_leaf=lambda x: isinstance(x, PartitionSpec))

  assert partitioning.replicated_fraction(shapes, shardings(partitioning.DEFAULT_RULES)) == 0.0
  assert partitioning.replicated_fraction(shapes, shardings(no_fsdp)) == 1.0

  class _Mesh:
    shape = {"fsdp": 8}

  with pytest.raises(ValueError, match=r"100.0% of the parameters are replicated over fsdp=8"):
    partitioning.check_fsdp_coverage(shapes, shardings(no_fsdp), _Mesh(), 0.01)
  partitioning.check_fsdp_coverage(shapes, shardings(partitioning.DEFAULT_RULES), _Mesh(), 0.01)


def test_one_host_reads_the_whole_batch():
  mesh = partitioning.make_mesh(MeshConfig(data=-1))
  shard = partitioning.data_shard_info(mesh, 4)
  assert (shard.index, shard.num_shards) == (0, 1)

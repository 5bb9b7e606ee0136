"""Device meshes, the logical-axis rules table, parameter shardings and host-local batches.

The mesh has three axes: `data` (pure data parallelism), `fsdp` (data parallelism with
parameters and optimizer state sharded) and `tensor` (heads, MLP width and vocabulary split).
Each has an ICI size (inside a slice) and a DCN size (across slices, multi-slice TPU); -1 fills
in what the devices leave. The model names its axes (`t5g.model.layers`): parameters use
`vocab, embed, mlp, heads, kv_heads, head_dim, layers`, activations `batch, length, embed,
heads, head_dim, mlp, vocab`. `DEFAULT_RULES` maps them to mesh axes in priority order, as
T5X's rules tables do: a logical axis takes the first rule whose mesh axes are still free in
that array, so activations shard `batch` over (data, fsdp) and leave `embed` whole, while
parameters shard `embed` over fsdp.

Host data: the batch is split over (data, fsdp). Each host loads the rows its devices hold
(`data_shard_info`) and `global_batch` assembles the global arrays from them. Evaluation and
decoding read the same whole batch on every host instead: `from_every_host` gives each device
its block of it (no data moves between hosts), and `to_host` brings a result back whole to every
host (gathering it across hosts when it is spread over them).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import gin
import jax
import numpy as np
import seqio
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from t5g.errors import InputError
from t5g.model.config import ComputeConfig, ModelConfig
from t5g.model.models import abstract_params

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
Rules = Sequence[tuple[str, Any]]

DEFAULT_RULES: Rules = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),
    ("length", None),
    ("head_dim", None),
    ("layers", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh axis sizes. ICI: inside a slice; DCN: across slices. One -1 per group is filled in."""

  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  dcn_data: int = 1
  dcn_fsdp: int = 1
  dcn_tensor: int = 1

  def ici_shape(self) -> tuple[int, int, int]:
    """(data, fsdp, tensor) inside a slice, before -1 is filled in."""
    return (self.data, self.fsdp, self.tensor)

  def dcn_shape(self) -> tuple[int, int, int]:
    """(data, fsdp, tensor) across slices, before -1 is filled in."""
    return (self.dcn_data, self.dcn_fsdp, self.dcn_tensor)


gin.external_configurable(MeshConfig, module="t5g")


def _fill(shape: Sequence[int], total: int, what: str) -> tuple[int, ...]:
  """Replaces a single -1 so that the product is `total`; checks the product otherwise."""
  if any(s == 0 or s < -1 for s in shape) or list(shape).count(-1) > 1:
    raise InputError(f"{what} mesh sizes {tuple(shape)}: positive, with at most one -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if total % known:
      raise InputError(f"{what} mesh sizes {tuple(shape)} do not divide {total} devices")
    shape = [total // known if s == -1 else s for s in shape]
  if math.prod(shape) != total:
    raise InputError(f"{what} mesh sizes {dict(zip(MESH_AXES, shape))} need "
                     f"{math.prod(shape)} devices, have {total}")
  return tuple(shape)


def make_mesh(config: MeshConfig, devices: Sequence[Any] | None = None) -> Mesh:
  """The (data, fsdp, tensor) mesh over `devices` (default: all), multi-slice when DCN > 1."""
  devices = list(jax.devices() if devices is None else devices)
  num_slices = _num_slices(devices)
  dcn = _fill(config.dcn_shape(), num_slices, "DCN")
  ici = _fill(config.ici_shape(), len(devices) // num_slices, "ICI")
  if num_slices > 1:
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
  else:
    grid = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
  return Mesh(grid, MESH_AXES)


def _num_slices(devices: Sequence[Any]) -> int:
  """Number of TPU slices among `devices` (1 off TPU)."""
  return len({getattr(d, "slice_index", 0) for d in devices})


def param_shardings(boxed_params: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
  """NamedShardings for a tree of `nn.LogicallyPartitioned` leaves (e.g. boxed abstract params)."""
  specs = nn.get_partition_spec(boxed_params)
  return nn.logical_to_mesh_sharding(specs, mesh, list(rules))


def replicated_fraction(shapes: Any, shardings: Any, axis: str = "fsdp") -> float:
  """Fraction of the parameters (by element count) not sharded over mesh axis `axis`."""
  total = replicated = 0
  for shape, sharding in zip(jax.tree_util.tree_leaves(shapes),
                             jax.tree_util.tree_leaves(shardings)):
    size = math.prod(shape.shape)
    total += size
    used = {a for entry in sharding.spec if entry is not None
            for a in (entry if isinstance(entry, tuple) else (entry,))}
    replicated += 0 if axis in used else size
  return replicated / max(total, 1)


def check_fsdp_coverage(shapes: Any, shardings: Any, mesh: Mesh,
                        max_replicated_fraction: float) -> None:
  """Fails when fsdp > 1 and more than `max_replicated_fraction` of parameters is not fsdp-sharded."""
  if mesh.shape["fsdp"] == 1:
    return
  fraction = replicated_fraction(shapes, shardings)
  if fraction > max_replicated_fraction:
    names = [jax.tree_util.keystr(path) for path, s in
             jax.tree_util.tree_leaves_with_path(shardings)
             if "fsdp" not in str(s.spec)][:5]
    raise InputError(
        f"{fraction:.1%} of the parameters are replicated over fsdp={mesh.shape['fsdp']} "
        f"(allowed {max_replicated_fraction:.1%}); check the logical axis rules. "
        f"Unsharded, e.g.: {names}")


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows split over (data, fsdp); every other dimension whole."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def data_shard_info(mesh: Mesh, global_batch_size: int) -> seqio.ShardInfo:
  """This host's shard of the global batch: which block of rows its devices hold.

  Hosts that hold the same rows (e.g. tensor parallelism across hosts) get the same shard.
  """
  sharding = batch_sharding(mesh)
  rows = sorted({(idx[0].start or 0, idx[0].stop or global_batch_size) for idx in
                 sharding.addressable_devices_indices_map((global_batch_size,)).values()})
  start, stop = rows[0][0], rows[-1][1]
  if global_batch_size % mesh_rows(mesh):
    raise InputError(f"global batch size {global_batch_size} is not divisible by the "
                     f"{mesh_rows(mesh)} batch shards (data × fsdp) of the mesh")
  if sum(b - a for a, b in rows) != stop - start:
    raise ValueError(f"process {jax.process_index()} holds non-contiguous rows {rows}")
  per_host = stop - start
  return seqio.ShardInfo(index=start // per_host, num_shards=global_batch_size // per_host)


def mesh_rows(mesh: Mesh) -> int:
  """How many ways the batch is split (data × fsdp)."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Global arrays, rows over (data, fsdp), from this host's rows of every feature."""
  sharding = batch_sharding(mesh)
  return {name: jax.make_array_from_process_local_data(sharding, np.asarray(value))
          for name, value in local.items()}


def from_every_host(value: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
  """The global array laid out by `sharding` from `value`, which every host holds whole (the
  same everywhere): each addressable device takes its block of the host's copy."""
  value = np.asarray(value)
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def to_host(x: jax.Array) -> np.ndarray:
  """All of `x` as a numpy array on this host. An array whose blocks are spread over several
  hosts is gathered across them, so every process must call this for it (a collective)."""
  if x.is_fully_addressable or x.is_fully_replicated:
    return np.asarray(x)
  return multihost_utils.process_allgather(x, tiled=True)


def with_shardings(shapes: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs like `shapes`, each carrying its sharding from `shardings`."""
  return jax.tree_util.tree_map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def sharded_abstract_params(config: ModelConfig, compute: ComputeConfig, mesh: Mesh,
                            rules: Rules) -> tuple[Any, Any]:
  """(ShapeDtypeStructs with shardings, NamedShardings) of the parameters under `rules` (also
  inside a mesh and rules context: no sharding constraint is traced)."""
  boxed = abstract_params(config, compute, boxed=True)
  shardings = param_shardings(boxed, mesh, rules)
  values = jax.tree_util.tree_map(lambda box: box.unbox(apply_constraint=False), boxed,
                                  is_leaf=lambda x: isinstance(x, nn.Partitioned))
  return with_shardings(values, shardings), shardings


@dataclasses.dataclass(frozen=True)
class PlacedModel:
  """A model placed on a mesh: its config, how it is computed, its module, the mesh and the
  logical-axis rules that place it there (what evaluation and decoding need of a run)."""

  config: ModelConfig
  compute: ComputeConfig
  module: nn.Module
  mesh: Mesh
  rules: tuple

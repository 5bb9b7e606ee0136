"""What a run trains: the model, its shardings, the optimizer of each phase, and the first state.

The first state comes from, in this order: the run directory's newest readable step (resume),
an initial checkpoint (`init_checkpoint`: an adapted or imported t5g directory), or a random
initialisation. An encoder-only classifier (`num_classes`, `t5g.model.classifier`) takes its
encoder from a T5Gemma init checkpoint and starts its head fresh. Parameters are created or
restored directly into their shardings; the optimizer state of each phase is sharded like the
parameters it mirrors (factored or scalar statistics are replicated).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from t5g.checkpoints import model_dir
from t5g.checkpoints.manager import TrainCheckpointManager
from t5g.errors import InputError
from t5g.model import classifier
from t5g.model.config import (ClassifierConfig, ComputeConfig, EncoderDecoderConfig, ModelConfig,
                              StackConfig)
from t5g.model.models import init_params, make_model
from t5g.runtime import partitioning
from t5g.train import optimizers
from t5g.train.optimizers import OptimizerConfig, Phase
from t5g.train.train_step import LossConfig, StepState, make_train_step


def _names(path: Sequence[Any]) -> tuple[str, ...]:
  return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def mirrored_shardings(state_shapes: Any, param_shapes: Any, param_shardings: Any,
                       mesh: Mesh) -> Any:
  """Shardings for an optimizer state: a leaf whose path ends with a parameter's path and has its
  shape gets that parameter's sharding; every other leaf is replicated."""
  by_path = {}
  for (path, shape), sharding in zip(jax.tree_util.tree_leaves_with_path(param_shapes),
                                     jax.tree_util.tree_leaves(param_shardings)):
    by_path[_names(path)] = (shape.shape, sharding)
  replicated = NamedSharding(mesh, PartitionSpec())

  def pick(path, leaf):
    names = _names(path)
    for start in range(len(names)):
      found = by_path.get(names[start:])
      if found is not None and found[0] == leaf.shape:
        return found[1]
    return replicated
  return jax.tree_util.tree_map_with_path(pick, state_shapes)


@dataclasses.dataclass
class RunModel:
  """The trained model and how it is laid out on the mesh."""

  config: ModelConfig
  compute: ComputeConfig
  module: nn.Module
  param_shapes: Any           # ShapeDtypeStructs with shardings
  param_shardings: Any
  new_parameters: list[str]   # from the initial checkpoint (fresh, not adapted)
  rules: partitioning.Rules

  @property
  def scanned(self) -> bool:
    """Whether the parameters are in the scanned layout."""
    return self.compute.scan_layers


def classifier_config(config: ModelConfig | None, num_classes: int, init_checkpoint: str | None
                      ) -> ClassifierConfig:
  """The classifier over `config`'s encoder (None: the init checkpoint's); the init checkpoint
  must hold that encoder (a T5Gemma) or that very classifier."""
  saved = None if init_checkpoint is None else model_dir.read_model(init_checkpoint)[0]
  base = saved if config is None else config
  if base is None:
    raise InputError("train: num_classes needs `model` (a T5Gemma preset) or init_checkpoint")
  if isinstance(base, StackConfig):
    raise InputError("train: num_classes needs a T5Gemma (encoder-decoder) model or init "
                     "checkpoint; a decoder-only Gemma 2 has no encoder")
  wanted = ClassifierConfig(base.encoder, num_classes)
  if saved is not None and not (saved == wanted or (isinstance(saved, EncoderDecoderConfig)
                                                    and saved.encoder == wanted.encoder)):
    found = model_dir.differences(saved.to_dict(), wanted.to_dict())
    raise InputError(f"init_checkpoint={init_checkpoint} holds neither the encoder nor the "
                     f"classifier configured: {', '.join(found)}")
  return wanted


def build_model(config: ModelConfig | None, compute: ComputeConfig, mesh: Mesh,
                rules: partitioning.Rules, init_checkpoint: str | None,
                max_replicated_fraction: float, num_classes: int | None = None) -> RunModel:
  """The run's model: `config`, or the initial checkpoint's (they must agree when both given);
  with `num_classes`, the encoder-only classifier over that model's encoder."""
  new_parameters: list[str] = []
  if num_classes is not None:
    config = classifier_config(config, num_classes, init_checkpoint)
  elif init_checkpoint is not None:
    meta, _ = model_dir.read_metadata(init_checkpoint)
    saved, _, _ = model_dir.read_model(init_checkpoint)
    if config is not None and config != saved:
      found = model_dir.differences(saved.to_dict(), config.to_dict())
      raise InputError(f"init_checkpoint={init_checkpoint} holds another model than the one "
                       f"configured: {', '.join(found)}")
    config, new_parameters = saved, list(meta.get("new_parameters", []))
  if config is None:
    raise InputError("train: set `model` (e.g. MODEL = @t5g.get_preset()) or init_checkpoint")
  shapes, shardings = partitioning.sharded_abstract_params(config, compute, mesh, rules)
  partitioning.check_fsdp_coverage(shapes, shardings, mesh, max_replicated_fraction)
  return RunModel(config, compute, make_model(config, compute), shapes, shardings,
                  new_parameters, rules)


def default_phases(model: RunModel, warmup_steps: int) -> list[Phase]:
  """One phase training everything, or first `warmup_steps` of only the new parameters."""
  if not warmup_steps:
    return [Phase(0)]
  if not model.new_parameters:
    raise InputError(f"warmup_new_parameters_steps={warmup_steps}, but the initial checkpoint "
                     "records no new parameters (only an unbalanced adaptation has them)")
  return [Phase(0, tuple(model.new_parameters)), Phase(warmup_steps)]


@dataclasses.dataclass
class PhaseOptimizer:
  """One phase's optimizer, which parameters it trains, and its state's shapes/shardings."""

  phase: Phase
  optimizer: optax.GradientTransformation
  trainable: Any
  state_shapes: Any  # ShapeDtypeStructs with shardings

  @property
  def state_shardings(self) -> Any:
    """The optimizer state's shardings."""
    return jax.tree_util.tree_map(lambda s: s.sharding, self.state_shapes)


def phase_optimizers(config: OptimizerConfig, phases: Sequence[Phase], model: RunModel,
                     mesh: Mesh) -> list[PhaseOptimizer]:
  """The optimizer of every phase, with its state's sharded shapes."""
  out = []
  for phase in phases:
    tx = optimizers.make_optimizer(config, model.param_shapes, phase)
    shapes = jax.eval_shape(tx.init, model.param_shapes)
    shardings = mirrored_shardings(shapes, model.param_shapes, model.param_shardings, mesh)
    out.append(PhaseOptimizer(phase, tx, optimizers.trainable_mask(model.param_shapes,
                                                                   phase.trainable),
                              partitioning.with_shardings(shapes, shardings)))
  return out


def init_opt_state(phase: PhaseOptimizer, params: Any) -> Any:
  """A fresh optimizer state for `params`, created in its shardings."""
  return jax.jit(phase.optimizer.init, out_shardings=phase.state_shardings)(params)


def first_state(model: RunModel, phases: list[PhaseOptimizer],
                manager: TrainCheckpointManager, init_checkpoint: str | None, seed: int
                ) -> tuple[StepState, Any, dict | None]:
  """(state, rng, data-iterator state or None) to start from (see the module docstring)."""
  rng = jax.random.PRNGKey(seed)
  if manager.all_steps():
    starts = [p.phase for p in phases]

    def opt_target(step: int) -> Any:  # Saved after step - 1 ran, by that step's phase.
      return phases[optimizers.phase_at(starts, max(step - 1, 0))].state_shapes
    restored = manager.restore(model.param_shapes, opt_target, rng)
    state = StepState(jnp.asarray(restored.step, jnp.int32), restored.params,
                      restored.opt_state)
    return state, restored.rng, restored.data
  if init_checkpoint is not None:
    params = _init_checkpoint_params(model, init_checkpoint, rng)
  else:
    params = jax.jit(lambda key: init_params(model.config, model.compute, key),
                     out_shardings=model.param_shardings)(rng)
  return StepState(jnp.zeros((), jnp.int32), params, init_opt_state(phases[0], params)), rng, None


def _init_checkpoint_params(model: RunModel, init_checkpoint: str, rng: Any) -> Any:
  """The run's parameters from its init checkpoint: all of them, or for a classifier started
  from a T5Gemma its encoder (the decoder is read and dropped) and a fresh head."""
  saved, _, _ = model_dir.read_model(init_checkpoint)
  if not isinstance(model.config, ClassifierConfig) or saved == model.config:
    return model_dir.restore_params(init_checkpoint, model.param_shapes, model.config,
                                    model.scanned)[0]
  mesh = model.param_shardings["head"]["kernel"].mesh
  target, _ = partitioning.sharded_abstract_params(saved, model.compute, mesh, model.rules)
  encoder = model_dir.restore_params(init_checkpoint, target, saved, model.scanned)[0]["encoder"]
  head = jax.jit(lambda key: classifier.init_head(model.config, model.compute, key),
                 out_shardings=model.param_shardings["head"])(rng)
  return {"encoder": encoder, "head": head}


def load_teacher(checkpoint: str, compute: ComputeConfig, mesh: Mesh,
                 rules: partitioning.Rules) -> tuple[nn.Module, Any, StackConfig]:
  """A decoder-only Gemma 2 teacher from a t5g directory: (module, sharded params, config)."""
  config, scanned, _ = model_dir.read_model(checkpoint)
  if isinstance(config, EncoderDecoderConfig):
    raise InputError(f"teacher_checkpoint={checkpoint}: the teacher must be a decoder-only "
                     "Gemma 2, this is a T5Gemma")
  compute = dataclasses.replace(compute, scan_layers=scanned, remat_policy="none")
  target, _ = partitioning.sharded_abstract_params(config, compute, mesh, rules)
  params, _ = model_dir.restore_params(checkpoint, target, config, scanned)
  return make_model(config, compute), params, config


def jit_train_step(model: RunModel, phase: PhaseOptimizer, mesh: Mesh, loss: LossConfig,
                   learning_rate: Callable[[jax.Array], jax.Array], num_microbatches: int,
                   teacher_model: nn.Module | None = None, teacher_shardings: Any = None
                   ) -> Callable:
  """The train step of `phase`, jitted with the run's shardings: (state, batch, teacher params)
  -> (state, metrics), the state donated, the batch's rows over (data, fsdp), metrics
  replicated. The trainer runs it; `t5g precompile` lowers it for a TPU topology."""
  fn = make_train_step(model.module, phase.optimizer, loss, learning_rate, num_microbatches,
                       phase.trainable, teacher_model)
  replicated = NamedSharding(mesh, PartitionSpec())
  shardings = StepState(replicated, model.param_shardings, phase.state_shardings)
  return jax.jit(fn, in_shardings=(shardings, partitioning.batch_sharding(mesh),
                                   teacher_shardings),
                 out_shardings=(shardings, replicated), donate_argnums=0)


def abstract_step_state(model: RunModel, phase: PhaseOptimizer, mesh: Mesh) -> StepState:
  """The state `jit_train_step(model, phase, ...)` takes, as ShapeDtypeStructs with shardings."""
  step = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, PartitionSpec()))
  return StepState(step, model.param_shapes, phase.state_shapes)


def abstract_teacher(config: StackConfig, compute: ComputeConfig, mesh: Mesh,
                     rules: partitioning.Rules) -> tuple[nn.Module, Any]:
  """A decoder-only Gemma 2 teacher of `config` without a checkpoint: (module, parameter
  ShapeDtypeStructs with shardings), laid out as `load_teacher` lays out a restored one."""
  compute = dataclasses.replace(compute, remat_policy="none")
  shapes, _ = partitioning.sharded_abstract_params(config, compute, mesh, rules)
  return make_model(config, compute), shapes

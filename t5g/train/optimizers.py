"""Optimizers, learning-rate schedules and phased parameter freezing for training.

`make_optimizer` builds, for one training phase, the optax chain
  global-norm clipping -> Adam or Adafactor scaling -> masked decoupled weight decay -> -lr(step)
on the phase's trainable parameters only; frozen parameters get zero updates and hold no
optimizer state. Each phase starts with a fresh optimizer state (count 0), and its schedule is
shifted by the phase's start step so that the learning rate is always a function of the global
step.

Trainable patterns are fnmatch patterns on '/'-joined parameter paths ('*' also crosses '/').
A pattern may name a path as laid out ('decoder/layers/local/cross_attn/k_proj' when scanned,
'decoder/layer_3/cross_attn/k_proj' when not) or layout-independently, without the layer part
('decoder/cross_attn/k_proj': that sub-path in every layer, as in the `new_parameters` that an
unbalanced adaptation records), so `Phase(0, tuple(new_parameters))` warms up the fresh
cross-attention alone in either layout.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import re
from typing import Any, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax

from t5g.errors import InputError

NAMES = ("adamw", "adafactor")
SCHEDULES = ("cosine", "rsqrt", "constant")
_LAYER_KEY = re.compile(r"layer_\d+|final_local_layer")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """The optimizer and its learning-rate schedule.

  schedule: after a linear warmup from 0 (step 0 gets 0, step `warmup_steps` the peak),
  'cosine' decays to end_fraction * learning_rate at step `decay_steps` (counted from 0, warmup
  included; None: the trainer uses the run's train_steps) and stays there, 'rsqrt' is learning_rate * sqrt(warmup_steps / step), 'constant'
  stays at learning_rate. b1, b2 and eps are Adam's (adamw only); adafactor_decay_rate is
  Adafactor's second-moment decay exponent. weight_decay is decoupled (added to the scaled
  update before the learning rate, for both optimizers) on parameters with at least
  `decay_ndim_at_least` dimensions: matrices and the embedding, not norm scales.
  clip_global_norm: the largest global norm of the trainable gradients (None: no clipping).
  """

  name: str = "adamw"
  learning_rate: float = 1e-4
  schedule: str = "cosine"
  warmup_steps: int = 0
  decay_steps: int | None = None
  end_fraction: float = 0.1
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  adafactor_decay_rate: float = 0.8
  weight_decay: float = 0.0
  decay_ndim_at_least: int = 2
  clip_global_norm: float | None = 1.0

  def __post_init__(self):
    checks = (
        ("name", self.name in NAMES, f"one of {NAMES}"),
        ("learning_rate", self.learning_rate > 0, "> 0"),
        ("schedule", self.schedule in SCHEDULES, f"one of {SCHEDULES}"),
        ("warmup_steps", self.warmup_steps >= 0, ">= 0"),
        ("warmup_steps", self.schedule != "rsqrt" or self.warmup_steps > 0,
         "> 0 for the rsqrt schedule"),
        ("decay_steps", self.decay_steps is None or self.decay_steps > self.warmup_steps,
         f"None or > warmup_steps ({self.warmup_steps})"),
        ("end_fraction", 0 <= self.end_fraction <= 1, "in [0, 1]"),
        ("b1", 0 <= self.b1 < 1, "in [0, 1)"),
        ("b2", 0 <= self.b2 < 1, "in [0, 1)"),
        ("eps", self.eps > 0, "> 0"),
        ("adafactor_decay_rate", 0 < self.adafactor_decay_rate <= 1, "in (0, 1]"),
        ("weight_decay", self.weight_decay >= 0, ">= 0"),
        ("decay_ndim_at_least", self.decay_ndim_at_least >= 0, ">= 0"),
        ("clip_global_norm", self.clip_global_norm is None or self.clip_global_norm > 0,
         "None or > 0"),
    )
    for field, ok, need in checks:
      if not ok:
        raise InputError(f"OptimizerConfig.{field}={getattr(self, field)!r}: must be {need}")


gin.external_configurable(OptimizerConfig, module="t5g")


@dataclasses.dataclass(frozen=True)
class Phase:
  """From `start_step` on, only parameters matching one of `trainable` are updated.

  trainable: fnmatch patterns on the '/'-joined path, as laid out or layout-independent (see
  the module docstring); () = all.
  """

  start_step: int
  trainable: tuple[str, ...] = ()

  def __post_init__(self):
    if self.start_step < 0:
      raise InputError(f"Phase.start_step={self.start_step}: must be >= 0")
    if not isinstance(self.trainable, tuple) or not all(
        isinstance(p, str) for p in self.trainable):
      raise InputError(f"Phase.trainable={self.trainable!r}: must be a tuple of strings")


gin.external_configurable(Phase, module="t5g")


def learning_rate_schedule(config: OptimizerConfig) -> optax.Schedule:
  """The learning rate as a function of the global step (see `OptimizerConfig.schedule`)."""
  peak, warmup = config.learning_rate, config.warmup_steps
  if config.schedule == "cosine" and config.decay_steps is None:
    raise InputError("OptimizerConfig.decay_steps=None: the cosine schedule needs it")

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    if config.schedule == "constant":
      after = jnp.asarray(peak, jnp.float32)
    elif config.schedule == "rsqrt":
      after = peak * jnp.sqrt(warmup / jnp.maximum(step, warmup))
    else:
      end = peak * config.end_fraction
      progress = jnp.clip((step - warmup) / (config.decay_steps - warmup), 0.0, 1.0)
      after = end + (peak - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    return jnp.where(step < warmup, peak * step / max(warmup, 1), after)

  return schedule


def _paths(params: Any) -> Any:
  """A tree like `params` holding each leaf's '/'-joined path."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "/".join(str(k.key) for k in path), params)


def _layout_free(path: str) -> str:
  """`path` without its layer part: 'decoder/layers/local/attn/q' -> 'decoder/attn/q'."""
  parts = path.split("/")
  if len(parts) > 1 and _LAYER_KEY.fullmatch(parts[1]):
    del parts[1]
  elif len(parts) > 2 and parts[1] == "layers" and parts[2] in ("local", "global"):
    del parts[1:3]
  return "/".join(parts)


def trainable_mask(params: Any, patterns: Sequence[str]) -> Any:
  """A tree of bools like `params`: True where a leaf's path matches one of `patterns`.

  () marks every leaf trainable. Paths are matched as laid out and without their layer part
  (see the module docstring). A pattern that matches no leaf raises ValueError naming it.
  """
  paths = _paths(params)
  if not patterns:
    return jax.tree.map(lambda _: True, paths)
  names = [(path, _layout_free(path)) for path in jax.tree.leaves(paths)]
  for pattern in patterns:
    if not any(fnmatch.fnmatchcase(n, pattern) for pair in names for n in pair):
      raise InputError(f"trainable pattern {pattern!r} matches no parameter")
  return jax.tree.map(
      lambda path: any(fnmatch.fnmatchcase(n, pattern) for pattern in patterns
                       for n in (path, _layout_free(path))), paths)


def phase_at(phases: Sequence[Phase], step: int) -> int:
  """The index of the phase active at global `step`.

  phases must be non-empty, the first starting at step 0 and the starts strictly increasing.
  """
  if not phases:
    raise InputError("phases: at least one phase is needed")
  starts = [phase.start_step for phase in phases]
  if starts[0] != 0:
    raise InputError(f"phases: the first phase must start at step 0, not {starts[0]}")
  if any(b <= a for a, b in zip(starts, starts[1:])):
    raise InputError(f"phases: start steps {starts} must be strictly increasing")
  if step < 0:
    raise ValueError(f"step {step}: must be >= 0")
  return max(i for i, start in enumerate(starts) if start <= step)


def make_optimizer(config: OptimizerConfig, params: Any,
                   phase: Phase) -> optax.GradientTransformation:
  """The optimizer of `phase` for `params` (arrays or ShapeDtypeStructs; only paths are read).

  Its state starts at count 0 at `phase.start_step`; the learning rate at count c is
  `learning_rate_schedule(config)(c + phase.start_step)`. Frozen parameters get zero updates,
  hold no state and do not count in the clipping norm.
  """
  schedule = learning_rate_schedule(config)
  chain = []
  if config.clip_global_norm is not None:
    chain.append(optax.clip_by_global_norm(config.clip_global_norm))
  if config.name == "adamw":
    chain.append(optax.scale_by_adam(b1=config.b1, b2=config.b2, eps=config.eps))
  else:
    chain.append(optax.scale_by_factored_rms(decay_rate=config.adafactor_decay_rate,
                                             min_dim_size_to_factor=1))
  if config.weight_decay:
    ndim = config.decay_ndim_at_least
    chain.append(optax.add_decayed_weights(
        config.weight_decay, mask=lambda p: jax.tree.map(lambda x: x.ndim >= ndim, p)))
  chain.append(optax.scale_by_schedule(lambda count: -schedule(count + phase.start_step)))
  labels = jax.tree.map(lambda t: "trainable" if t else "frozen",
                        trainable_mask(params, phase.trainable))
  return optax.multi_transform(
      {"trainable": optax.chain(*chain), "frozen": optax.set_to_zero()}, labels)


def optimizer_state_bytes(opt_state: Any) -> int:
  """The bytes held by the array leaves of `opt_state` (arrays or ShapeDtypeStructs)."""
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(opt_state) if hasattr(x, "dtype"))

"""Gemma 2 building blocks: RMSNorm, the scaled/tied embedding, the GeGLU MLP and RoPE.

Every parameter carries logical axis names (`vocab`, `embed`, `mlp`, `heads`, `kv_heads`,
`head_dim`, and `layers` when scanned), which the trainer maps to mesh axes with a rules table.
Activations are annotated with `batch`, `length`, `embed`, `mlp`, `vocab`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


def kernel_init(in_axes: tuple[int, ...], out_axes: tuple[int, ...]):
  """Fan-in scaled truncated normal for a kernel whose input dims are `in_axes`."""
  return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                          in_axis=in_axes, out_axis=out_axes)


def logical_param(module: nn.Module, name: str, init, shape: tuple[int, ...],
                  axes: tuple[str, ...], dtype: Any) -> Array:
  """Declares a parameter annotated with logical axis names."""
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def constrain(x: Array, axes: tuple[str, ...]) -> Array:
  """Sharding constraint by logical names (a no-op outside a mesh with rules)."""
  return nn.with_logical_constraint(x, axes)


class RMSNorm(nn.Module):
  """x * rsqrt(mean(x^2) + eps) * (1 + scale), computed in float32; scale starts at 0."""

  eps: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:  # [..., D] -> [..., D]
    scale = logical_param(self, "scale", nn.initializers.zeros_init(), (x.shape[-1],),
                          ("embed",), self.param_dtype)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (normed * (1.0 + scale.astype(jnp.float32))).astype(self.dtype)


class Embedder(nn.Module):
  """Token embedding scaled by sqrt(embed_dim); `decode` is the tied output projection."""

  vocab_size: int
  embed_dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    self.embedding = logical_param(
        self, "embedding", nn.initializers.normal(stddev=self.embed_dim ** -0.5),
        (self.vocab_size, self.embed_dim), ("vocab", "embed"), self.param_dtype)

  def encode(self, tokens: Array) -> Array:  # [B, T] int -> [B, T, D]
    x = jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)
    x = x * jnp.asarray(self.embed_dim ** 0.5, dtype=self.dtype)
    return constrain(x, ("batch", "length", "embed"))

  def decode(self, x: Array) -> Array:  # [B, T, D] -> [B, T, V] float32
    logits = jnp.einsum("btd,vd->btv", x, self.embedding.astype(self.dtype),
                        preferred_element_type=jnp.float32)
    return constrain(logits, ("batch", "length", "vocab"))


class GeGLU(nn.Module):
  """down(gelu_tanh(gate(x)) * up(x))."""

  hidden_dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:  # [B, T, D] -> [B, T, D]
    d = x.shape[-1]
    init = kernel_init((0,), (1,))
    gate_w = logical_param(self, "gate_proj", init, (d, self.hidden_dim), ("embed", "mlp"),
                           self.param_dtype)
    up_w = logical_param(self, "up_proj", init, (d, self.hidden_dim), ("embed", "mlp"),
                         self.param_dtype)
    down_w = logical_param(self, "down_proj", init, (self.hidden_dim, d), ("mlp", "embed"),
                           self.param_dtype)
    x = x.astype(self.dtype)
    gate = jnp.einsum("btd,df->btf", x, gate_w.astype(self.dtype))
    up = jnp.einsum("btd,df->btf", x, up_w.astype(self.dtype))
    hidden = constrain(nn.gelu(gate, approximate=True) * up, ("batch", "length", "mlp"))
    return jnp.einsum("btf,fd->btd", hidden, down_w.astype(self.dtype))


def apply_rope(x: Array, positions: Array, base: float) -> Array:
  """Rotary embedding, split-half convention: x [B, T, N, H], positions [B, T]."""
  half = x.shape[-1] // 2
  timescale = base ** (2.0 * jnp.arange(half, dtype=jnp.float32) / x.shape[-1])
  angles = positions.astype(jnp.float32)[..., None, None] / timescale  # [B, T, 1, H/2]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
  return rotated.astype(x.dtype)

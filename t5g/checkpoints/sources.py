"""Parameter sources: a model's parameters read one logical parameter at a time.

Every conversion in t5g (HF, Google Flax and t5g directories in, t5g directories and HF folders
out, Gemma 2 -> T5Gemma adaptation) is a `ParamSource` feeding a writer that asks for one
tensor group at a time (`t5g.checkpoints.lazy`), so that no conversion holds a whole model in
memory. A logical parameter is (stack, layer, sub-path) as in `t5g.model.layout`, with the
unscanned shape, e.g. ('decoder', 3, ('attn', 'q_proj')) -> [D, N, H]; `stack` names any
top-level part, including the classifier's non-stack `head` (layer None).
"""

from __future__ import annotations

import abc
import os
from typing import Any, Iterable

import numpy as np

from t5g.checkpoints import model_dir
from t5g.errors import InputError
from t5g.model import layout
from t5g.model.config import ComputeConfig, ModelConfig
from t5g.model.models import abstract_params

Sub = tuple[str, ...]
Name = tuple[str, int | None, Sub]  # (stack, layer, sub-path) of one logical parameter.


class ParamSource(abc.ABC):
  """A model's parameters (with its config), read one logical parameter at a time."""

  config: ModelConfig
  where: str  # What the parameters are read from, for messages.

  @abc.abstractmethod
  def get(self, stack: str, layer: int | None, sub: Sub) -> np.ndarray:
    """The parameter (stack, layer, sub) as a numpy array of its unscanned shape."""

  def read_order(self, names: Iterable[Name]) -> list[Name]:
    """`names` in the order that reads each stored array once (as given, by default)."""
    return list(names)

  def new_parameters(self) -> list[str]:
    """Layout-independent names ('decoder/cross_attn/k_proj') of freshly initialised params."""
    return []

  def close(self) -> None:
    """Releases files held open by the source."""

  def __enter__(self) -> "ParamSource":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class TreeSource(ParamSource):
  """Parameters already in memory, in the scanned or unscanned layout."""

  def __init__(self, params: Any, config: ModelConfig, scanned: bool, where: str = "memory"):
    self.params, self.config, self.scanned, self.where = params, config, scanned, where

  def get(self, stack: str, layer: int | None, sub: Sub) -> np.ndarray:
    """See base class."""
    return np.asarray(layout.get(self.params, self.config, self.scanned, stack, layer, sub))


class ModelDirSource(ParamSource):
  """One step of a t5g checkpoint directory, restored one stored array at a time.

  A scanned layout stores all local (or global) layers of a parameter in one array: that array
  is the unit read, kept until a parameter from another array is asked for (`read_order` puts
  the layers of one array together).
  """

  def __init__(self, directory: str, step: int | None = None):
    self.config, self.scanned, self.step = model_dir.read_model(directory, step)
    self.where = os.path.join(directory, str(self.step), model_dir.PARAMS_ITEM)
    self._abstract = abstract_params(self.config, ComputeConfig(scan_layers=self.scanned))
    self._cached: tuple[tuple[str, ...], np.ndarray] | None = None

  def _read(self, path: tuple[str, ...]) -> np.ndarray:
    if self._cached is None or self._cached[0] != path:
      self._cached = None  # Drop the previous array before reading the next.
      leaf = self._abstract
      for key in path:
        leaf = leaf[key]
      self._cached = (path, model_dir.read_arrays(self.where, {path: leaf})[path])
    return self._cached[1]

  def _stored_at(self, stack: str, layer: int | None, sub: Sub) -> tuple[tuple[str, ...], int]:
    """(path of the stored array holding the parameter, its index along the layer axis)."""
    prefix, index = layout.location(layout.parts(self.config)[stack], layer, self.scanned)
    return (stack, *prefix, *sub), index

  def read_order(self, names: Iterable[Name]) -> list[Name]:
    """See base class: grouped by stored array, layers in order."""
    def key(name: Name) -> tuple[tuple[str, ...], int]:
      path, index = self._stored_at(*name)
      return path, -1 if index is None else index
    return sorted(names, key=key)

  def get(self, stack: str, layer: int | None, sub: Sub) -> np.ndarray:
    """See base class."""
    path, index = self._stored_at(stack, layer, sub)
    value = self._read(path)
    return value if index is None else value[index]

  def close(self) -> None:
    """See base class."""
    self._cached = None


def materialize(source: ParamSource, scanned: bool) -> dict:
  """All of `source`'s parameters in memory (numpy), in the scanned or unscanned layout."""
  params = layout.allocate(abstract_params(source.config, ComputeConfig(scan_layers=scanned)))
  unscanned = abstract_params(source.config, ComputeConfig(scan_layers=False))
  targets = {(stack, layer, sub): target
             for stack, layer, sub, target in layout.entries(unscanned, source.config, False)}
  for stack, layer, sub in source.read_order(targets):
    target = targets[(stack, layer, sub)]
    value = source.get(stack, layer, sub)
    if tuple(value.shape) != tuple(target.shape):
      raise InputError(f"{source.where}: {stack}/{layer}/{'/'.join(sub)} has shape "
                       f"{value.shape}, expected {target.shape}")
    layout.put(params, source.config, scanned, stack, layer, sub,
               np.asarray(value, dtype=target.dtype))
  return params

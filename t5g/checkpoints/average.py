"""`t5g average`: the mean of the parameters of a run's last N steps (T5Gemma 2 averages 5).

The mean is taken in float32, a group of stored arrays at a time: each averaged step's copy of
the group is read in turn and added into float32 accumulators, which are written to the output
before the next group is read. A group is one array, or several holding together at most
GROUP_BYTES, so memory holds about two copies of max(largest array, GROUP_BYTES).
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Iterator, Sequence

import jax
import numpy as np

from t5g.checkpoints import lazy, model_dir
from t5g.errors import ExistingFileError, InputError, MissingFileError
from t5g.model.config import ComputeConfig, config_from_json
from t5g.model.models import abstract_params

GROUP_BYTES = 256 << 20
Path = tuple[str, ...]


def _nested(leaves: dict[Path, Any]) -> dict:
  """{('a', 'b'): x} -> {'a': {'b': x}}."""
  tree: dict = {}
  for path, value in leaves.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


class _GroupMean:
  """The float32 means of a group of arrays over `steps`, read together, each handed out once."""

  def __init__(self, checkpoint: str, steps: list[int], shapes: dict[Path, tuple[int, ...]]):
    self._checkpoint, self._steps, self._shapes = checkpoint, steps, shapes
    self._means: dict[Path, np.ndarray] | None = None

  def blocks(self, path: Path) -> Iterator[np.ndarray]:
    """Yields the mean of the array at `path` (one block); the group is read on first use."""
    if self._means is None:
      self._means = self._read_means()
    yield self._means.pop(path)

  def _read_means(self) -> dict[Path, np.ndarray]:
    totals = {path: np.zeros(shape, np.float32) for path, shape in self._shapes.items()}
    leaves = {path: jax.ShapeDtypeStruct(shape, np.float32)
              for path, shape in self._shapes.items()}
    for step in self._steps:
      where = os.path.join(self._checkpoint, str(step), model_dir.PARAMS_ITEM)
      for path, value in model_dir.read_arrays(where, leaves).items():
        totals[path] += value
    return {path: total / np.float32(len(self._steps)) for path, total in totals.items()}


def _averaged_tree(checkpoint: str, steps: list[int], abstract: dict) -> dict:
  """`abstract` with each leaf replaced by a LazyArray of its mean, in groups of GROUP_BYTES."""
  flat = [(tuple(k.key for k in keys), tuple(leaf.shape))
          for keys, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]]
  groups: list[dict[Path, tuple[int, ...]]] = [{}]
  group_bytes = 0
  for path, shape in flat:  # In the order the writer asks for them: each group read once.
    size = 4 * int(np.prod(shape))
    if groups[-1] and group_bytes + size > GROUP_BYTES:
      groups.append({})
      group_bytes = 0
    groups[-1][path] = shape
    group_bytes += size
  lazy_leaves = {}
  for shapes in groups:
    group = _GroupMean(checkpoint, steps, shapes)
    for path, shape in shapes.items():
      lazy_leaves[path] = lazy.LazyArray(shape, np.dtype(np.float32),
                                         lambda group=group, path=path: group.blocks(path))
  return _nested(lazy_leaves)


def average(checkpoint: str, last: int, output: str,
            steps: Sequence[int] | None = None) -> list[int]:
  """Writes the float32 mean of the params of the last `last` steps of t5g directory
  `checkpoint` (of `steps` when given, else of all saved steps) to the new t5g directory
  `output` as one step numbered as the newest averaged step; returns the averaged steps.

  The steps must share their model config and parameter layout; the output keeps them and the
  newest step's vocabulary (without `new_parameters`: averaged parameters are trained ones).
  """
  if last < 1:
    raise InputError(f"last={last}: average at least 1 step")
  if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
    raise ExistingFileError(f"{output}: output exists and is not an empty directory")
  if not os.path.isdir(checkpoint):
    raise MissingFileError(f"{checkpoint}: no such directory")
  available = model_dir.steps(checkpoint)
  candidates = available if steps is None else sorted(set(steps))
  missing = sorted(set(candidates) - set(available))
  if missing:
    raise InputError(f"{checkpoint}: steps {missing} do not exist (available: {available})")
  if len(candidates) < last:
    raise InputError(f"{checkpoint}: cannot average the last {last} steps: only "
                     f"{len(candidates)} to choose from ({candidates})")
  chosen = candidates[-last:]
  newest, _ = model_dir.read_metadata(checkpoint, chosen[-1])
  for step in chosen[:-1]:
    meta, _ = model_dir.read_metadata(checkpoint, step)
    if (meta["model"], meta["param_layout"]) != (newest["model"], newest["param_layout"]):
      raise InputError(f"{os.path.join(checkpoint, str(step), model_dir.MODEL_ITEM)}: config or "
                       f"parameter layout differs from step {chosen[-1]}'s")
  where = os.path.join(checkpoint, str(chosen[-1]), model_dir.MODEL_ITEM)
  config = config_from_json(newest["model"], where=where)
  scanned = newest["param_layout"] == "scanned"
  abstract = abstract_params(config, ComputeConfig(scan_layers=scanned))
  created = not os.path.exists(output)
  try:
    model_dir.save(output, chosen[-1], _averaged_tree(checkpoint, chosen, abstract), config,
                   scanned, vocabulary=model_dir.read_vocabulary(checkpoint, chosen[-1]))
  except BaseException:
    # Nothing half-written: `output` was absent or empty, so all it holds is from this attempt.
    for name in os.listdir(output) if os.path.isdir(output) else []:
      path = os.path.join(output, name)
      if os.path.isdir(path):
        shutil.rmtree(path)
      else:
        os.remove(path)
    if created and os.path.isdir(output):
      os.rmdir(output)
    raise
  return chosen

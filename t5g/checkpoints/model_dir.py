"""The t5g checkpoint directory: Orbax steps, each self-describing.

    T5G_DIR/<step>/params/   Orbax PyTree of the model parameters (numpy/jax arrays)
    T5G_DIR/<step>/model/    JSON: {"model": <config_to_json>, "param_layout": "scanned"|...}

Nothing else is needed to load a step: the config saved beside the weights rebuilds the model.
Orbax writes each step under a temporary name and renames it when complete, so a step either
exists whole or not at all. Loading reads JSON and tensor data only (nothing is unpickled).
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from t5g.model import layout
from t5g.model.config import ComputeConfig, ModelConfig, config_from_json, config_to_json
from t5g.model.models import abstract_params

PARAMS_ITEM = "params"
MODEL_ITEM = "model"
LAYOUTS = {True: "scanned", False: "unscanned"}


def _manager(directory: str, create: bool = False) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.abspath(directory), item_names=(PARAMS_ITEM, MODEL_ITEM),
      options=ocp.CheckpointManagerOptions(create=create, enable_async_checkpointing=False))


def steps(directory: str) -> list[int]:
  """Saved steps, ascending ([] when there are none)."""
  if not os.path.isdir(directory):
    return []
  with _manager(directory) as mgr:
    return sorted(mgr.all_steps())


def is_model_dir(directory: str) -> bool:
  """Whether `directory` holds at least one t5g step (with its model description)."""
  found = steps(directory)
  return bool(found) and os.path.isdir(os.path.join(directory, str(found[-1]), MODEL_ITEM))


def save(directory: str, step: int, params: Any, config: ModelConfig, scanned: bool) -> None:
  """Saves `params` (in the `scanned` or unscanned layout) and the model config as `step`."""
  meta = {"model": config_to_json(config), "param_layout": LAYOUTS[scanned]}
  with _manager(directory, create=True) as mgr:
    if step in mgr.all_steps():
      raise FileExistsError(f"{directory}: step {step} already exists")
    mgr.save(step, args=ocp.args.Composite(**{
        PARAMS_ITEM: ocp.args.StandardSave(params), MODEL_ITEM: ocp.args.JsonSave(meta)}))
    mgr.wait_until_finished()


def _resolve_step(directory: str, step: int | None) -> int:
  available = steps(directory)
  if not available:
    raise FileNotFoundError(f"{directory}: no t5g checkpoint steps found")
  if step is None:
    return available[-1]
  if step not in available:
    raise ValueError(f"{directory}: step {step} does not exist (available: {available})")
  return step


def read_model(directory: str, step: int | None = None) -> tuple[ModelConfig, bool, int]:
  """(config, scanned, step) of a saved step (latest when `step` is None)."""
  step = _resolve_step(directory, step)
  path = os.path.join(directory, str(step), MODEL_ITEM)
  with _manager(directory) as mgr:
    meta = mgr.restore(step, args=ocp.args.Composite(**{MODEL_ITEM: ocp.args.JsonRestore()}))[
        MODEL_ITEM]
  if meta.get("param_layout") not in LAYOUTS.values():
    raise ValueError(f"{path}: param_layout={meta.get('param_layout')!r}")
  return (config_from_json(meta["model"], where=path), meta["param_layout"] == "scanned", step)


class Loaded(NamedTuple):
  """A loaded step: its config, numpy params in the `scanned` (or unscanned) layout."""

  config: ModelConfig
  params: Any
  step: int
  scanned: bool


def load(directory: str, step: int | None = None, scanned: bool | None = None) -> Loaded:
  """Loads a step (latest when None). scanned: target layout (None: as saved)."""
  config, saved_scanned, step = read_model(directory, step)
  cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
  abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=cpu),
      abstract_params(config, ComputeConfig(scan_layers=saved_scanned)))
  with _manager(directory) as mgr:
    try:
      restored = mgr.restore(step, args=ocp.args.Composite(**{
          PARAMS_ITEM: ocp.args.StandardRestore(abstract)}))[PARAMS_ITEM]
    except (ValueError, KeyError, FileNotFoundError) as e:
      raise ValueError(f"{os.path.join(directory, str(step), PARAMS_ITEM)}: cannot restore "
                       f"({type(e).__name__}: {str(e).splitlines()[0][:300]})") from None
  params = jax.tree_util.tree_map(np.asarray, restored)
  if scanned is None or scanned == saved_scanned:
    return Loaded(config, params, step, saved_scanned)
  target = abstract_params(config, ComputeConfig(scan_layers=scanned))
  return Loaded(config, layout.convert(params, config, saved_scanned, target, scanned), step,
                scanned)

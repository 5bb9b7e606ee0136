"""The t5g checkpoint directory: Orbax steps, each self-describing.

    T5G_DIR/<step>/params/   Orbax PyTree of the model parameters (numpy/jax arrays)
    T5G_DIR/<step>/model/    JSON: {"model": <config_to_json>, "param_layout": "scanned"|...,
                                   "new_parameters": [...] (optional, see `save`),
                                   "vocabulary": "embedded"|"tokenizer.model" (optional)}
    T5G_DIR/tokenizer.model  the SentencePiece model, when a step records that file

Nothing else is needed to load a step: the config saved beside the weights rebuilds the model.
The `vocabulary` a step records is the one its model was trained with, for text in and out:
"embedded" (t5g's embedded SentencePiece model, `t5g.data.vocabulary`) or the path, relative to
T5G_DIR, of a copy of the user's SentencePiece model, so that the directory stays whole when
moved. Steps saved before t5g recorded vocabularies, or converted from a checkpoint without a
tokenizer, have none (`read_vocabulary` gives None).
Orbax writes each step under a temporary name and renames it when complete, so a step either
exists whole or not at all. Loading reads JSON and tensor data only (nothing is unpickled).
A training run's directory (`t5g.checkpoints.manager`) holds these two items in every step, next
to the optimizer and trainer state, so everything here reads it too. `load` gives numpy arrays;
`restore_params` places the parameters as a target says (e.g. sharded, to start a fine-tune).
"""

from __future__ import annotations

import logging
import os
from typing import Any, NamedTuple, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from t5g.errors import ExistingFileError, InputError, MissingFileError
from t5g.model import layout
from t5g.model.config import (EMBEDDED_VOCABULARY, ComputeConfig, ModelConfig, config_from_json,
                              config_to_json)
from t5g.model.models import abstract_params

PARAMS_ITEM = "params"
MODEL_ITEM = "model"
LAYOUTS = {True: "scanned", False: "unscanned"}
VOCABULARY_KEY = "vocabulary"  # In the model item.
VOCABULARY_FILE = "tokenizer.model"  # A copied SentencePiece model, in the directory's root.


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


def model_item(config: ModelConfig, scanned: bool,
               new_parameters: Sequence[str] | None = None,
               vocabulary: str | None = None) -> dict:
  """The JSON of a step's `model` item (see `save` for new_parameters; vocabulary: the record
  `store_vocabulary` returned, None for none)."""
  meta = {"model": config_to_json(config), "param_layout": LAYOUTS[scanned]}
  if new_parameters:
    meta["new_parameters"] = list(new_parameters)
  if vocabulary is not None:
    meta[VOCABULARY_KEY] = vocabulary
  return meta


def store_vocabulary(directory: str, vocabulary: str | None, write: bool = True) -> str | None:
  """What a step of `directory` records for `vocabulary`, its SentencePiece file copied in.

  vocabulary: None (nothing to record), EMBEDDED_VOCABULARY (recorded by name), or the path of
  a SentencePiece model (local or any path `etils.epath` reads), copied to
  `directory/tokenizer.model` under a temporary name renamed when complete. A directory that
  already holds the same bytes there is left as it is. write: False only computes the record
  (the processes of a run other than the one that writes).

  Raises:
    FileNotFoundError: the SentencePiece model does not exist.
    FileExistsError: `directory` already holds another tokenizer.model.
  """
  if vocabulary is None or vocabulary == EMBEDDED_VOCABULARY:
    return vocabulary
  if not write:
    return VOCABULARY_FILE
  source = epath.Path(vocabulary)
  if not source.exists():
    raise MissingFileError(f"SentencePiece vocabulary not found: {vocabulary}")
  data = source.read_bytes()
  target = os.path.join(os.path.abspath(directory), VOCABULARY_FILE)
  if os.path.exists(target):
    with open(target, "rb") as f:
      if f.read() != data:
        raise ExistingFileError(f"{target}: holds another SentencePiece model than {vocabulary}; "
                                "a checkpoint directory records one vocabulary")
    return VOCABULARY_FILE
  os.makedirs(os.path.dirname(target), exist_ok=True)
  partial = f"{target}.tmp-{os.getpid()}"
  try:
    with open(partial, "wb") as f:
      f.write(data)
    os.replace(partial, target)
  finally:
    if os.path.exists(partial):
      os.remove(partial)
  return VOCABULARY_FILE


def save(directory: str, step: int, params: Any, config: ModelConfig, scanned: bool,
         new_parameters: list[str] | None = None, vocabulary: str | None = None) -> None:
  """Saves `params` (in the `scanned` or unscanned layout) and the model config as `step`.

  new_parameters: layout-independent names ("decoder/cross_attn/k_proj": that sub-path in every
  layer of the stack) of parameters that were freshly initialised rather than adapted, for the
  trainer's warmup; recorded in the model item and returned by `read_metadata`.
  vocabulary: the vocabulary the model reads and writes text with, as `store_vocabulary` takes
  it (a SentencePiece file is copied into `directory` first, and removed again when this call
  put it there and the step fails to save); None records none.
  params may hold `t5g.checkpoints.lazy.LazyArray` leaves, written one at a time.
  """
  copied = os.path.join(directory, VOCABULARY_FILE)
  had_copy = os.path.exists(copied)
  meta = model_item(config, scanned, new_parameters, store_vocabulary(directory, vocabulary))
  try:
    with _manager(directory, create=True) as mgr:
      if step in mgr.all_steps():
        raise ExistingFileError(f"{directory}: step {step} already exists")
      mgr.save(step, args=ocp.args.Composite(**{
          PARAMS_ITEM: ocp.args.PyTreeSave(params), MODEL_ITEM: ocp.args.JsonSave(meta)}))
      mgr.wait_until_finished()
  except BaseException:
    if not had_copy and os.path.exists(copied):
      os.remove(copied)
    raise


def _resolve_step(directory: str, step: int | None) -> int:
  available = steps(directory)
  if not available:
    raise MissingFileError(f"{directory}: no t5g checkpoint steps found")
  if step is None:
    return available[-1]
  if step not in available:
    raise InputError(f"{directory}: step {step} does not exist (available: {available})")
  return step


def read_metadata(directory: str, step: int | None = None) -> tuple[dict, int]:
  """(the model item's JSON, step) of a saved step (latest when `step` is None)."""
  step = _resolve_step(directory, step)
  path = os.path.join(directory, str(step), MODEL_ITEM)
  with _manager(directory) as mgr:
    try:
      meta = mgr.restore(step, args=ocp.args.Composite(**{MODEL_ITEM: ocp.args.JsonRestore()}))[
          MODEL_ITEM]
    except Exception as e:  # Orbax and TensorStore raise bare Exceptions for unreadable files.
      raise InputError(f"{path}: cannot read ({short_error(e)})") from None
  if not isinstance(meta, dict) or meta.get("param_layout") not in LAYOUTS.values():
    raise InputError(f"{path}: param_layout="
                     f"{meta.get('param_layout') if isinstance(meta, dict) else meta!r}")
  return meta, step


def read_vocabulary(directory: str, step: int | None = None) -> str | None:
  """The vocabulary a step (latest when `step` is None) records: EMBEDDED_VOCABULARY, the path
  of the SentencePiece model stored in `directory`, or None when it records none.

  Raises:
    ValueError: the record is neither "embedded" nor a relative path inside `directory`.
    FileNotFoundError: the recorded SentencePiece file is missing.
  """
  meta, step = read_metadata(directory, step)
  record = meta.get(VOCABULARY_KEY)
  if record is None or record == EMBEDDED_VOCABULARY:
    return record
  where = os.path.join(directory, str(step), MODEL_ITEM)
  if (not isinstance(record, str) or not record or os.path.isabs(record)
      or ".." in record.split("/")):
    raise InputError(f"{where}: vocabulary={record!r}: expected {EMBEDDED_VOCABULARY!r} or a "
                     "relative path inside the checkpoint directory")
  path = os.path.join(os.path.abspath(directory), record)
  if not os.path.isfile(path):
    raise MissingFileError(f"{where}: records the vocabulary {record!r}, but {path} does not "
                           "exist (copy it back, or pass --vocabulary)")
  return path


def read_model(directory: str, step: int | None = None) -> tuple[ModelConfig, bool, int]:
  """(config, scanned, step) of a saved step (latest when `step` is None)."""
  meta, step = read_metadata(directory, step)
  path = os.path.join(directory, str(step), MODEL_ITEM)
  return (config_from_json(meta["model"], where=path), meta["param_layout"] == "scanned", step)


class Loaded(NamedTuple):
  """A loaded step: its config, numpy params in the `scanned` (or unscanned) layout."""

  config: ModelConfig
  params: Any
  step: int
  scanned: bool


def read_params(directory: str, step: int, abstract: Any) -> Any:
  """The `params` item of `step`, restored onto `abstract` (jax.ShapeDtypeStruct leaves; their
  dtype is the one restored, their `sharding` where the arrays go)."""
  with _manager(directory) as mgr:
    try:
      return mgr.restore(step, args=ocp.args.Composite(**{
          PARAMS_ITEM: ocp.args.StandardRestore(abstract)}))[PARAMS_ITEM]
    except Exception as e:  # TensorStore read errors (missing, truncated files) are bare.
      raise InputError(f"{os.path.join(directory, str(step), PARAMS_ITEM)}: cannot restore "
                       f"({short_error(e)})") from None


def read_arrays(item_dir: str, leaves: dict[tuple[str, ...], jax.ShapeDtypeStruct]
                ) -> dict[tuple[str, ...], np.ndarray]:
  """Some arrays of the Orbax PyTree in `item_dir`, read alone (partial restore) as numpy.

  leaves: stored key path -> shape and dtype to read as (None dtype: as stored). A missing or
  unreadable array, or one of another shape, raises a ValueError naming the path.
  """
  def nested(value_of) -> dict:
    tree: dict = {}
    for path, leaf in leaves.items():
      node = tree
      for key in path[:-1]:
        node = node.setdefault(key, {})
      node[path[-1]] = value_of(leaf)
    return tree

  args = ocp.args.PyTreeRestore(
      nested(lambda leaf: leaf),
      restore_args=nested(lambda leaf: ocp.RestoreArgs(restore_type=np.ndarray,
                                                       dtype=leaf.dtype)),
      partial_restore=True)
  names = ", ".join("/".join(path) for path in leaves)
  try:
    restored = ocp.PyTreeCheckpointer().restore(os.path.abspath(item_dir), args=args)
  except Exception as e:  # Orbax and TensorStore raise bare Exceptions for unreadable files.
    raise InputError(f"{item_dir}: cannot read {names} ({short_error(e)})") from None
  arrays = {}
  for path, leaf in leaves.items():
    value = restored
    for key in path:
      value = value[key]
    if tuple(value.shape) != tuple(leaf.shape):
      raise InputError(f"{item_dir}: {'/'.join(path)} has shape {tuple(value.shape)}, "
                       f"expected {tuple(leaf.shape)}")
    arrays[path] = np.asarray(value)
  return arrays


def short_error(error: BaseException) -> str:
  """'<type>: <first line>' of the error's root cause (TensorStore's names the array and file)."""
  while error.__cause__ is not None:
    error = error.__cause__
  text = str(error).strip()
  return f"{type(error).__name__}: {text.splitlines()[0][:300]}" if text else type(error).__name__


def load(directory: str, step: int | None = None, scanned: bool | None = None) -> Loaded:
  """Loads a step (latest when None). scanned: target layout (None: as saved)."""
  config, saved_scanned, step = read_model(directory, step)
  cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
  abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=cpu),
      abstract_params(config, ComputeConfig(scan_layers=saved_scanned)))
  params = jax.tree_util.tree_map(np.asarray, read_params(directory, step, abstract))
  if scanned is None or scanned == saved_scanned:
    return Loaded(config, params, step, saved_scanned)
  target = abstract_params(config, ComputeConfig(scan_layers=scanned))
  return Loaded(config, layout.convert(params, config, saved_scanned, target, scanned), step,
                scanned)


def differences(saved: Any, expected: Any, path: str = "") -> list[str]:
  """'key: saved X, expected Y' for each leaf in which two JSON trees differ."""
  if isinstance(saved, dict) and isinstance(expected, dict):
    return [d for k in sorted(set(saved) | set(expected))
            for d in differences(saved.get(k), expected.get(k), f"{path}/{k}" if path else k)]
  return [] if saved == expected else [f"{path}: saved {saved!r}, expected {expected!r}"]


def restore_params(directory: str, target: Any, config: ModelConfig, scanned: bool,
                   step: int | None = None) -> tuple[Any, int]:
  """(params, step) of a step (latest when None), e.g. to start a fine-tune from, restored onto
  `target` (jax.ShapeDtypeStruct leaves with `sharding=`, or arrays: the dtype and placement to
  restore as). The saved config must be `config`; another saved layout than `scanned` is
  converted on the host."""
  meta, step = read_metadata(directory, step)
  where = os.path.join(directory, str(step), MODEL_ITEM)
  if config_from_json(meta["model"], where=where) != config:
    found = differences(meta["model"], config_to_json(config))
    raise InputError(f"{where}: saved for another model: {', '.join(found)}")
  if (meta["param_layout"] == "scanned") == scanned:
    return read_params(directory, step, target), step
  logging.info("%s: converting the %s layout on the host", where, meta["param_layout"])
  loaded = load(directory, step, scanned=scanned)
  params = jax.tree_util.tree_map(
      lambda x, t: jax.device_put(np.asarray(x, t.dtype), t.sharding), loaded.params, target)
  return params, step

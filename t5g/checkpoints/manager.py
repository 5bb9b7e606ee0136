"""The trainer's checkpoints: periodic asynchronous saves, retention, resume, fine-tune starts.

A run directory is a t5g checkpoint directory (`t5g.checkpoints.model_dir`) whose steps also hold
the trainer's state, so `model_dir.load`, `t5g export` and `t5g score` read it as it is:

    RUN/<step>/params/       the parameters (floating ones optionally stored narrower, e.g. bf16)
    RUN/<step>/model/        JSON, as model_dir writes it: the config, the parameter layout and
                             the vocabulary (RUN/tokenizer.model when it is a copied file)
    RUN/<step>/opt_state/    the optimizer state (any pytree of arrays, e.g. an optax state)
    RUN/<step>/train_state/  {"step": int64, "rng": the RNG key (its key data and impl)}
    RUN/<step>/data/         JSON: the data iterator's state (host-agnostic)
    RUN/<step>/metrics/      JSON: the metrics saved with the step, when given

Orbax writes a step under a temporary name and renames it once every item is complete, so a
killed save leaves the previous steps intact; the next manager removes the leftover. Restoring
reads JSON and tensor data only (StandardRestore / JsonRestore): nothing is unpickled. A step
with missing or truncated files fails to restore with a ValueError naming it; auto-resume then
resumes from the newest step that restores and moves the unreadable newer ones aside, with a
warning. Orbax keeps no checksums of chunk data: a flipped bit in a chunk goes unnoticed.
Parameters alone (to start a fine-tune) come from `model_dir.restore_params`.

A save that cannot be written (a full disk, a directory gone or read-only) raises a
`CheckpointWriteError` naming the directory, the step and the OS error, where the failure
surfaces: an asynchronous write fails in the background, so its error is raised by the next
`save`, `wait_until_finished` or `close` (the trainer's loop meets it at its next save or when it
ends), a synchronous one by `save` itself. The failed step's files never get the step's name (Orbax
leaves them under a temporary one), and the previous steps are untouched and restore.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import warnings
from typing import Any, NamedTuple, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

from t5g.checkpoints import model_dir
from t5g.errors import InputError, MissingFileError
from t5g.model.config import ModelConfig

_CHECKED = ("model", "param_layout")  # What a step's model item must share with the run.


@dataclasses.dataclass(frozen=True)
class CheckpointOptions:
  """When a run saves, what it keeps and how it writes.

  save_every: `save` writes the steps that are multiples of this (`force=True` writes any step).
  keep_last: the newest steps always kept (None: keep every step).
  keep_every: steps that are multiples of this are kept as well (None: no such rule).
  best_metric, best_mode, keep_best: the `keep_best` steps with the lowest ("min") or highest
    ("max") metrics[best_metric] are kept as well; steps saved without metrics are kept only by
    the other rules. best_metric None: no such rule.
  async_save: `save` returns once the state is copied to host memory and the files are written
    in the background; at most one save is in flight (the next one waits for it).
  save_dtype: dtype in which floating parameters are stored (e.g. "bfloat16"); restoring casts
    them to the target's dtype. None: as they are. The optimizer state is stored as it is.
  async_timeout_s: how long a background write may take before it fails.
  """

  save_every: int = 1000
  keep_last: int | None = 3
  keep_every: int | None = None
  best_metric: str | None = None
  best_mode: str = "min"
  keep_best: int = 1
  async_save: bool = True
  save_dtype: str | None = None
  async_timeout_s: int = 1200

  def __post_init__(self):
    for name in ("save_every", "keep_last", "keep_every", "keep_best", "async_timeout_s"):
      value = getattr(self, name)
      if value is not None and (not isinstance(value, int) or value < 1):
        raise InputError(f"CheckpointOptions.{name}={value!r}: must be a positive integer")
    if self.best_mode not in ("min", "max"):
      raise InputError(f"CheckpointOptions.best_mode={self.best_mode!r}: 'min' or 'max'")
    if self.save_dtype not in (None, "bfloat16", "float16", "float32"):
      raise InputError(f"CheckpointOptions.save_dtype={self.save_dtype!r}: None, 'bfloat16', "
                       "'float16' or 'float32'")


gin.external_configurable(CheckpointOptions, module="t5g")


class TrainState(NamedTuple):
  """Everything a run needs to continue exactly where a saved step left it."""

  step: int
  params: Any
  opt_state: Any
  rng: Any  # A jax PRNG key (typed, or raw uint32 key data).
  data: dict


class CheckpointWriteError(OSError):
  """Writing a step failed (the disk is full, the directory unwritable...): `str()` names the
  directory, the step and the cause; `errno` is the cause's, when it is an OSError."""

  def __init__(self, directory: str, step: int | None, cause: BaseException):
    os_error = _os_error(cause)
    what = "a save" if step is None else f"saving step {step}"
    super().__init__(None if os_error is None else os_error.errno,
                     f"{directory}: {what} failed: "
                     f"{model_dir.short_error(cause) if os_error is None else os_error}. "
                     "The steps saved before it are intact.")
    self.directory, self.step = directory, step

  def __str__(self) -> str:
    return self.strerror


def _os_error(error: BaseException) -> OSError | None:
  """The first OSError among `error` and its causes and contexts."""
  seen = set()
  while error is not None and id(error) not in seen:
    if isinstance(error, OSError):
      return error
    seen.add(id(error))
    error = error.__cause__ or error.__context__
  return None


class _Unreadable(ValueError):
  """A step whose files cannot be read: auto-resume falls back to the step before."""


def _as_json(value: Any, what: str) -> Any:
  """A deep copy of a JSON-serialisable value (taken now: async writes serialise later)."""
  try:
    return json.loads(json.dumps(value))
  except (TypeError, ValueError) as e:
    raise ValueError(f"{what} is not JSON-serialisable: {e}") from None


class TrainCheckpointManager:
  """Saves and restores a run's `TrainState` in `directory` (see the module docstring).

  config, scanned: the model and parameter layout of the run, written with every step and
  checked on restore. new_parameters, vocabulary: as in `model_dir.save` (process 0 copies a
  SentencePiece file in when the manager is made). Not thread-safe; one writer per
  directory. Use as a context manager, or call `close()`, so pending writes complete.
  """

  def __init__(self, directory: str, config: ModelConfig, scanned: bool,
               options: CheckpointOptions = CheckpointOptions(),
               new_parameters: Sequence[str] | None = None, vocabulary: str | None = None):
    self.directory = os.path.abspath(directory)
    self.options = options
    recorded = model_dir.store_vocabulary(self.directory, vocabulary,
                                          write=jax.process_index() == 0)
    self._model = model_dir.model_item(config, scanned, new_parameters, recorded)
    keep: list[Any] = [policies.LatestN(options.keep_last)]
    if options.keep_every:
      keep.append(policies.EveryNSteps(options.keep_every))
    best_fn = None
    if options.best_metric is not None:
      metric = options.best_metric
      best_fn = lambda metrics: float(metrics[metric])  # noqa: E731
      keep.append(policies.BestN(get_metric_fn=best_fn, reverse=options.best_mode == "min",
                                 n=options.keep_best, keep_checkpoints_without_metrics=False))
    self._manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
        save_decision_policy=policies.AnySavePolicy([
            policies.FixedIntervalPolicy(options.save_every),
            policies.PreemptionCheckpointingPolicy()]),
        preservation_policy=policies.AnyPreservationPolicy(keep),
        best_fn=best_fn, best_mode=options.best_mode,
        enable_async_checkpointing=options.async_save,
        async_options=ocp.AsyncOptions(timeout_secs=options.async_timeout_s),
        cleanup_tmp_directories=True, create=True))
    self._writing: int | None = None  # The step whose write may still be in flight.

  def all_steps(self) -> list[int]:
    """The saved steps, ascending (including one still being written in the background)."""
    return sorted(self._manager.all_steps())

  def should_save(self, step: int) -> bool:
    """Whether `save` (without force) writes `step`."""
    return self._manager.should_save(step)

  def save(self, state: TrainState, metrics: dict | None = None, force: bool = False) -> bool:
    """Saves `state` as step `state.step` when the options say so (any step when `force`).

    metrics: JSON-serialisable numbers saved with the step (required for best_metric to count
    the step). Returns whether a save started; with async_save the files are complete after
    `wait_until_finished()`. A forced save of a step already saved writes nothing.
    """
    step = int(state.step)
    if force and step in self._manager.all_steps():
      logging.info("%s: step %d is already saved", self.directory, step)
      return False
    if not force and not self._manager.should_save(step):
      return False
    if metrics is not None:
      metrics = _as_json(metrics, f"step {step} metrics")
      if self.options.best_metric is not None and self.options.best_metric not in metrics:
        raise InputError(f"step {step} metrics lack best_metric "
                         f"{self.options.best_metric!r} (have {sorted(metrics)})")
    params = state.params
    if self.options.save_dtype is not None:
      dtype = jnp.dtype(self.options.save_dtype)
      params = jax.tree_util.tree_map(
          lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
    items = {
        "params": ocp.args.StandardSave(params),
        "model": ocp.args.JsonSave(self._model),
        "opt_state": ocp.args.StandardSave(state.opt_state),
        "train_state": ocp.args.StandardSave({"step": np.asarray(step, np.int64),
                                              "rng": state.rng}),
        "data": ocp.args.JsonSave(_as_json(state.data, f"step {step} data state")),
    }
    if metrics is not None:
      items["metrics"] = ocp.args.JsonSave(metrics)
    self.wait_until_finished()  # Orbax would wait too; this names the previous step's failure.
    self._writing = step
    # The decision is made above: force=True keeps Orbax from evaluating its policies again.
    started = self._finished_writing(lambda: self._manager.save(
        step, args=ocp.args.Composite(**items), metrics=metrics, force=True))
    if not self.options.async_save:
      self._writing = None
    return started

  def restore(self, params: Any, opt_state: Any, rng: Any, step: int | None = None
              ) -> TrainState:
    """Restores `step` (None: the newest readable one) onto the given targets.

    params, opt_state, rng: trees of jax.ShapeDtypeStruct (with `sharding=` where the arrays go
    and the dtype to restore as) or of arrays whose shape, dtype and sharding are used.
    opt_state may also be a function of the step giving that step's target (the optimizer
    state's structure can change during a run, e.g. when frozen parameters start training). A step
    that cannot be read raises a ValueError naming it; with step None the steps before are tried
    and, once one restores, the unreadable newer ones are moved aside with a warning.
    """
    self._manager.wait_until_finished()
    self._manager.reload()
    available = self.all_steps()
    targets = (params, opt_state, rng)
    if step is not None:
      if step not in available:
        raise InputError(f"{self.directory}: step {step} does not exist (available: "
                         f"{available})")
      try:
        return self._restore_step(step, *targets)
      except _Unreadable as e:
        raise InputError(f"{e} (steps saved: {available})") from None
    if not available:
      raise MissingFileError(f"{self.directory}: no saved steps")
    unreadable = []
    for candidate in reversed(available):
      try:
        state = self._restore_step(candidate, *targets)
      except _Unreadable as e:
        unreadable.append((candidate, e))
        continue
      if unreadable:
        self._move_aside(unreadable, candidate)
      return state
    raise InputError(f"{self.directory}: no step could be restored: "
                     + "; ".join(str(error) for _, error in unreadable))

  def _move_aside(self, unreadable: list[tuple[int, Exception]], restored: int) -> None:
    """Renames damaged steps newer than `restored` so that the run can save those steps again.

    The same targets restored an older step, so the newer ones are damaged, not mismatched.
    Every host reaches the same verdict; process 0 renames and the others wait for it.
    """
    stamp = time.strftime('%Y%m%d-%H%M%S')
    for bad, error in unreadable:
      aside = f"{self._step_dir(bad)}.unreadable-{stamp}"
      if jax.process_index() == 0:
        os.rename(self._step_dir(bad), aside)
      warnings.warn(f"{error}; resuming from step {restored}, moved it to {aside}", stacklevel=3)
    multihost_utils.sync_global_devices(f"t5g: {self.directory}: unreadable steps moved aside")
    self._manager.reload()

  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _read(self, step: int, **items: Any) -> Any:
    try:
      return self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # Orbax and TensorStore raise bare Exceptions for unreadable files.
      raise _Unreadable(f"{self._step_dir(step)}: cannot restore ({model_dir.short_error(e)})"
                        ) from None

  def _restore_step(self, step: int, params: Any, opt_state: Any, rng: Any) -> TrainState:
    meta = self._read(step, model=ocp.args.JsonRestore())["model"]
    differences = model_dir.differences({k: meta.get(k) for k in _CHECKED},
                                        {k: self._model[k] for k in _CHECKED})
    if differences:
      raise InputError(f"{self._step_dir(step)}: saved for another model than this run's: "
                       f"{', '.join(differences)}")
    if callable(opt_state):
      opt_state = opt_state(step)
    restored = self._read(
        step, params=ocp.args.StandardRestore(params),
        opt_state=ocp.args.StandardRestore(opt_state),
        train_state=ocp.args.StandardRestore({"step": np.zeros((), np.int64), "rng": rng}),
        data=ocp.args.JsonRestore())
    train_state = restored["train_state"]
    return TrainState(int(train_state["step"]), restored["params"], restored["opt_state"],
                      train_state["rng"], restored["data"])

  def metrics(self, step: int) -> dict | None:
    """The metrics saved with `step` (None when it was saved without)."""
    return self._manager.metrics(step)

  def wait_until_finished(self) -> None:
    """Blocks until the save in flight, if any, is written (its failure: CheckpointWriteError)."""
    self._finished_writing(self._manager.wait_until_finished)
    self._writing = None

  def _finished_writing(self, call: Any) -> Any:
    """`call()`, its failure raised as the CheckpointWriteError of the step being written."""
    try:
      return call()
    except Exception as e:  # Orbax and TensorStore raise bare Exceptions for failed writes.
      step, self._writing = self._writing, None
      raise CheckpointWriteError(self.directory, step, e) from e  # The cause, chained.

  def close(self) -> None:
    """Waits for the save in flight and releases Orbax's resources (CheckpointWriteError when
    that save failed)."""
    self._finished_writing(self._manager.close)
    self._writing = None

  def __enter__(self) -> "TrainCheckpointManager":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

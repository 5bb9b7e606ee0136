"""Gin files for `t5g train` / `eval` / `precompile`: layered files, flag bindings, REQUIRED checks.

Gin files come in layers, as in T5X: `gin/models/<preset>.gin` binds MODEL (and compute
choices), `gin/runs/{pretrain,finetune,eval}.gin` bind the run function and declare the macros a
run must set (`MIXTURE_OR_TASK_NAME = %gin.REQUIRED`, ...), and `gin/experiments/*.gin` include
one of each and fill the macros in. Files are found relative to the working directory and to
the project's `gin/` folder (so `include 'runs/pretrain.gin'` works from anywhere). Everything is parsed before any model is built: an unknown
configurable or parameter fails at parse time (gin names it) and `check_required` names every
macro or parameter still `%gin.REQUIRED`.

Configurables are registered by the modules that define them (`gin.external_configurable(...,
module="t5g")` beside the class, `@gin.configurable` on the run functions); the command line
imports every layer before it parses.
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

import gin

from t5g.errors import InputError, MissingFileError

GIN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "gin")


def parse(gin_files: Sequence[str], bindings: Sequence[str], check: bool = True) -> None:
  """Parses `gin_files` in order, then `bindings` ("NAME = VALUE" lines, applied last).

  check: fail when a %gin.REQUIRED is left, then lock the configuration (gin's finalize, which
  fails on them too). False: neither; the caller checks the values it reads, as `t5g precompile`
  does, which needs no MODEL_DIR or checkpoint.
  """
  gin.clear_config()
  gin.add_config_file_search_path(GIN_DIR)
  for name in gin_files:
    if not os.path.exists(name) and not os.path.exists(os.path.join(GIN_DIR, name)):
      raise MissingFileError(f"--gin_file={name}: no such file (looked in {os.getcwd()} and "
                             f"{GIN_DIR})")
  quiet = _DropMessages("Path not found")  # gin's probe of Python packages for each include
  logging.getLogger().addFilter(quiet)
  try:
    gin.parse_config_files_and_bindings(list(gin_files), list(bindings), finalize_config=False)
  except (ValueError, KeyError, SyntaxError, TypeError, OSError) as e:  # OSError: an include.
    raise InputError(f"gin: {e}") from None
  finally:
    logging.getLogger().removeFilter(quiet)
  if check:
    check_required()
    gin.finalize()


class _DropMessages(logging.Filter):
  """Drops log records whose message starts with `prefix`."""

  def __init__(self, prefix: str):
    super().__init__()
    self._prefix = prefix

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(self._prefix)


def check_required() -> None:
  """Raises a ValueError naming every macro or binding still set to %gin.REQUIRED."""
  missing = []
  for (scope, selector), params in gin.config._CONFIG.items():  # pylint: disable=protected-access
    for param, value in params.items():
      if (isinstance(value, gin.config.ConfigurableReference)
          and value.scoped_selector == "gin.REQUIRED/gin.constant"):
        where = f"{scope}/{selector}" if scope else selector
        missing.append(scope if selector == "gin.macro" else f"{where}.{param}")
  missing.sort()
  if missing:
    raise InputError(f"gin: required value(s) not set: {', '.join(missing)} "
                     "(bind them in a gin file or with --gin.NAME=VALUE)")


def flag_bindings(gin_flags: Sequence[str], gin_bindings: Sequence[str]) -> list[str]:
  """Bindings from `--gin.NAME=VALUE` flags (given without the leading `--gin.`) and from
  `--gin_bindings` (whole "NAME = VALUE" lines)."""
  out = []
  for flag in gin_flags:
    name, sep, value = flag.partition("=")
    if not sep or not name:
      raise InputError(f"--gin.{flag}: expected --gin.NAME=VALUE")
    out.append(f"{name} = {value}")
  return out + list(gin_bindings)


def write_config(directory: str) -> str:
  """Writes the resolved configuration to `directory`/config.gin; returns its path."""
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, "config.gin")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(gin.config_str())
  os.replace(tmp, path)
  return path

"""Gin files for `t5g train` / `eval` / `precompile`: layered files, flag bindings, REQUIRED checks.

Gin files come in layers, as in T5X: `gin/models/<preset>.gin` binds MODEL (and compute
choices), `gin/runs/{pretrain,finetune,eval}.gin` bind the run function and declare the macros a
run must set (`MIXTURE_OR_TASK_NAME = %gin.REQUIRED`, ...), and `gin/experiments/*.gin` include
one of each and fill the macros in. Files and includes are plain files, found under the
working directory first, then under the project's `gin/` folder (so `include
'runs/pretrain.gin'` works from anywhere), never as resources of Python packages. Everything is
parsed before any model is built: an unknown configurable or parameter fails at parse time (gin
names it) and `check_required` names every macro or parameter still `%gin.REQUIRED`.

Configurables are registered by the modules that define them (`gin.external_configurable(...,
module="t5g")` beside the class, `@gin.configurable` on the run functions); the command line
imports every layer before it parses.
"""

from __future__ import annotations

import contextlib
import os
import tokenize
from typing import Iterator, Sequence, TextIO

import gin

from t5g.errors import InputError, MissingFileError

GIN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "gin")
# The gin flags of `t5g train`, `eval` and `precompile`, for their --help (kept as laid out).
FLAGS_HELP = """gin flags:
  --gin_file=F      a gin file, found under the working directory, then under t5g's gin/
                    folder (e.g. experiments/embedded_gemma2_teacher.gin); repeat to layer files
  --gin.NAME=VALUE  binds a macro or parameter after the files, e.g. --gin.TRAIN_STEPS=100;
                    VALUE is gin, so text is quoted: --gin.MODEL_DIR="'runs/x'"
See gin/README.md for the files and their macros."""


def parse(gin_files: Sequence[str], bindings: Sequence[str], check: bool = True) -> None:
  """Parses `gin_files` in order, then `bindings` ("NAME = VALUE" lines, applied last).

  Files and their includes are read as `resolve` finds them. check: fail when a %gin.REQUIRED
  is left, then lock the configuration (gin's finalize, which fails on them too). False:
  neither; the caller checks the values it reads, as `t5g precompile` does, which needs no
  MODEL_DIR or checkpoint.
  """
  gin.clear_config()
  with _read_files_only():
    for name in gin_files:
      try:
        gin.parse_config_file(name)
      except tokenize.TokenError as e:  # An unclosed bracket: gin does not say where.
        raise InputError(f"gin: {e.args[0]} in {name} or a file it includes") from None
      except MissingFileError:  # ours, from `resolve`: already names the file
        raise
      except (ValueError, KeyError, SyntaxError, TypeError) as e:
        raise InputError(f"gin: {_one_line(e)}") from None
    for binding in bindings:
      try:
        gin.parse_config(binding)
      except (SyntaxError, tokenize.TokenError) as e:
        detail = e.args[0] if isinstance(e, tokenize.TokenError) else str(e).splitlines()[-1]
        hint = ("; text is quoted: NAME = 'text', on the command line --gin.NAME=\"'text'\""
                if detail.strip().startswith("Failed to parse token") else "")
        raise InputError(f"gin: cannot read {binding!r} ({detail.strip()}){hint}") from None
      except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"gin: {binding!r}: {str(e).splitlines()[0]}") from None
  if check:
    check_required()
    gin.finalize()


def _one_line(error: Exception) -> str:
  """gin's message on one line: what is wrong, then where (gin puts the file, line and text on
  lines of their own, which the command line's one-line errors would drop)."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip(" ^")]
  return lines[0] + (f" ({'; '.join(lines[1:])})" if len(lines) > 1 else "")


def resolve(name: str, included_from: str | None = None) -> str:
  """The file a `--gin_file` or an `include` names: `name` itself when absolute, else `name`
  under the working directory, else under GIN_DIR; always a plain file. Raises a
  FileNotFoundError naming it, the file that includes it (`included_from`) and where it looked.
  """
  places = [""] if os.path.isabs(name) else [os.getcwd(), GIN_DIR]
  for place in places:
    path = os.path.join(place, name)
    if os.path.isfile(path):
      return path
  what = f"include '{name}' in {included_from}" if included_from else f"--gin_file={name}"
  looked = "" if os.path.isabs(name) else f" (looked in {places[0]} and {places[1]})"
  raise MissingFileError(f"gin: {what}: no such file{looked}")


class _FileReader:
  """A gin file reader that opens what `resolve` finds and remembers which file is being parsed
  (gin parses an include inside its reader's `with`), to name it when an include is missing."""

  def __init__(self):
    self._parsing: list[str] = []  # outermost first

  @contextlib.contextmanager
  def __call__(self, name: str) -> Iterator[TextIO]:
    path = resolve(name, self._parsing[-1] if self._parsing else None)
    with open(path) as f:
      self._parsing.append(path)
      try:
        yield f
      finally:
        self._parsing.pop()


@contextlib.contextmanager
def _read_files_only() -> Iterator[None]:
  """Makes gin read files through `_FileReader` alone while parsing.

  Left to itself, gin tries each name under its search paths with `open`, then as a resource of
  a Python package (gin.resource_reader: `include 'runs/pretrain.gin'` looks up a package
  `runs`); a `runs/` folder in a working directory that is on sys.path (`python -m`, pytest)
  is then a namespace package without a file, and gin fails with a TypeError. gin has no public
  way to drop a reader, so its two lists are swapped for the parse and put back after.
  """
  config = gin.config
  readers, prefixes = config._FILE_READERS, config._LOCATION_PREFIXES  # pylint: disable=protected-access
  config._FILE_READERS = [(_FileReader(), lambda name: True)]  # the reader raises when missing
  config._LOCATION_PREFIXES = [""]  # resolve searches
  try:
    yield
  finally:
    config._FILE_READERS, config._LOCATION_PREFIXES = readers, prefixes


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

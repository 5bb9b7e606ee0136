"""Errors in the user's input, told apart from bugs in t5g (the bottom layer: imports no t5g).

A check that validates what the user gave (a path, a flag, a config or gin value, a checkpoint's
files, keys or shapes, a jsonl record) or needs installed raises `InputError`, or the subclass
that also is the built-in error such a check raised before (so `except FileNotFoundError` and
`pytest.raises(KeyError)` still match). Internal invariants keep plain ValueError, KeyError or
RuntimeError. The command line prints an input error's first line and exits with status 2; any
other exception (`is_input_error` is False) is a bug in t5g: a traceback and exit status 1.
"""


class InputError(ValueError):
  """The user's input is wrong; the message names the file, key, shape, flag or value."""


class MissingFileError(InputError, FileNotFoundError):
  """A file or directory the input names, or needs, does not exist."""


class ExistingFileError(InputError, FileExistsError):
  """An output path the user named already exists (t5g does not overwrite)."""


class MissingKeyError(InputError, KeyError):
  """A name the input asks for (a preset, task, tensor or parameter) is not there."""

  __str__ = InputError.__str__  # The message as written, not KeyError's quoted repr.


class MissingDependencyError(InputError, RuntimeError):
  """A package or module the asked-for work needs is not installed; the message says which."""


def is_input_error(error: BaseException) -> bool:
  """Whether `error` is the user's to fix (exit status 2): an `InputError`, or the system refusing
  a named file (missing, not readable or writable, a full disk: an OSError with errno and
  filename). Anything else is a bug in t5g."""
  return isinstance(error, InputError) or (isinstance(error, OSError) and error.errno is not None
                                           and error.filename is not None)

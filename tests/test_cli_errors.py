"""The command line tells the user's errors from t5g's: an input error (or the system refusing a
named file) is one line and exit status 2; anything else is a traceback, a line saying it is a
bug in t5g, and exit status 1; Ctrl-C is exit status 130."""

import gin
import numpy as np
import pytest

import t5g
from t5g import cli, errors

AVERAGE = ["average", "--checkpoint=in", "--output=out"]


def _fail_with(monkeypatch, error: BaseException) -> None:
  """Makes `t5g average` raise `error`."""
  def command(args):
    raise error
  monkeypatch.setattr(cli, "_cmd_average", command)


def test_input_error_is_one_line_exit_2(tmp_path, capsys):
  missing = tmp_path / "nothing"
  code = cli.main(["average", f"--checkpoint={missing}", f"--output={tmp_path / 'out'}"])
  err = capsys.readouterr().err
  assert code == 2, err
  assert err.splitlines() == [f"t5g average: error: {missing}: no such directory"]


@pytest.mark.parametrize("error", [
    errors.MissingKeyError("model.safetensors: missing tensor 'a'\nmore detail"),
    FileNotFoundError(2, "No such file or directory", "in.jsonl"),
])
def test_input_error_kinds_print_their_first_line(monkeypatch, capsys, error):
  _fail_with(monkeypatch, error)
  code = cli.main(AVERAGE)
  err = capsys.readouterr().err
  assert code == 2, err
  assert err.splitlines() == [f"t5g average: error: {str(error).splitlines()[0]}"]
  assert "'a'" in err or "in.jsonl" in err


def _numpy_error() -> ValueError:
  try:
    np.array([[1, 2], [3]])  # The inhomogeneous predictions of issue 19.
  except ValueError as error:
    return error
  raise AssertionError("numpy accepted a ragged array")


@pytest.mark.parametrize("error", [_numpy_error(), TypeError("unsupported operand"),
                                   KeyError("params"), RuntimeError("no memory analysis"),
                                   OSError("Not found: tokenizer.model")])
def test_internal_error_is_a_traceback_and_a_bug(monkeypatch, capsys, error):
  _fail_with(monkeypatch, error)
  code = cli.main(AVERAGE)
  err = capsys.readouterr().err
  assert code == 1, err
  assert err.startswith("Traceback (most recent call last):")
  assert ", in command\n" in err and f"\n{type(error).__name__}: " in err  # where and what
  last = err.splitlines()[-1]
  assert last.startswith("t5g average: internal error: this is a bug in t5g")
  assert t5g.__version__ in last and "please report it with the traceback above" in last


def test_interrupt_is_exit_130_without_traceback(monkeypatch, capsys):
  _fail_with(monkeypatch, KeyboardInterrupt())
  code = cli.main(AVERAGE)
  err = capsys.readouterr().err
  assert code == 130
  assert err.splitlines() == ["t5g average: interrupted"]


def test_diverged_run_stays_exit_1(monkeypatch, capsys):
  _fail_with(monkeypatch, FloatingPointError("run: step 7: loss is nan; stopped"))
  assert cli.main(AVERAGE) == 1
  assert capsys.readouterr().err.splitlines() == ["t5g average: run: step 7: loss is nan; stopped"]


@pytest.mark.parametrize("line,named", [
    ("t5g.NoSuchThing.value = 1", "No configurable matching 't5g.NoSuchThing'"),
    ("include 'experiments/nope.gin'", "include 'experiments/nope.gin' in "),
    ("MODEL_DIR = ", "gin: "),
])
def test_gin_parse_error_is_one_line_exit_2(tmp_path, capsys, line, named):
  path = tmp_path / "run.gin"
  path.write_text(line + "\n")
  code = cli.main(["train", f"--gin_file={path}"])
  err = capsys.readouterr().err
  assert code == 2, err
  assert len(err.splitlines()) == 1 and err.startswith("t5g train: error: gin: ") and named in err


def test_input_error_stays_one_through_a_gin_call():
  """gin re-raises an error from a configurable as a subclass of its type: still an input error."""

  @gin.configurable("test_cli_errors_checked")
  def checked(value=0):
    raise errors.InputError(f"checked.value={value}: must be positive")

  gin.parse_config("test_cli_errors_checked.value = -1")
  try:
    with pytest.raises(errors.InputError) as raised:
      checked()  # pylint: disable=no-value-for-parameter
  finally:
    gin.clear_config()
  assert errors.is_input_error(raised.value)
  assert str(raised.value).splitlines()[0] == "checked.value=-1: must be positive"


def test_input_error_subclasses_keep_the_builtin_types():
  assert isinstance(errors.MissingFileError("x"), FileNotFoundError)
  assert isinstance(errors.ExistingFileError("x"), FileExistsError)
  assert isinstance(errors.MissingKeyError("x"), KeyError)
  assert isinstance(errors.MissingDependencyError("x"), RuntimeError)
  assert str(errors.MissingKeyError("a: missing tensor 'w'")) == "a: missing tensor 'w'"
  assert not errors.is_input_error(ValueError("x"))
  assert not errors.is_input_error(OSError("no errno, no file"))

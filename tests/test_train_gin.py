"""`t5g train` configuration: layered gin files, REQUIRED macros, unknown bindings, config.gin.

The configuration errors are checked through `cli.main` in this process (they happen before
anything is built); one real `t5g train` command runs in its own process.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys

import gin
import pytest

from t5g import cli
from t5g.runtime import gin_files

cli.register_configurables()  # t5g.train, t5g.evaluate and the configurables they take

EXPERIMENTS = sorted(os.path.relpath(p, gin_files.GIN_DIR) for p in
                     glob.glob(os.path.join(gin_files.GIN_DIR, "experiments", "*.gin"))
                     if not os.path.basename(p).startswith("_"))
# Cheaper CPU code generation (as tests/train_children.py): a third less compile time.
CHEAP_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
MODEL_FIRST = ("superglue_finetune.gin", "superglue_classification.gin",
               "instruction_finetune.gin")  # take a model file first


def _files(experiment: str) -> list[str]:
  if os.path.basename(experiment) in MODEL_FIRST:
    return ["models/t5gemma-2b-2b.gin", experiment]
  return [experiment]


def _missing(files: list[str]) -> list[str]:
  with pytest.raises(ValueError, match="required value") as error:
    gin_files.parse(files, [])
  return re.search(r"not set: (.*) \(bind", str(error.value)).group(1).split(", ")


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_parses_once_its_required_macros_are_set(experiment):
  files = _files(experiment)
  missing = _missing(files)
  assert "MODEL_DIR" in missing
  gin_files.parse(files, [f"{name} = '/tmp/{name.lower()}'" for name in missing])
  assert gin.query_parameter("t5g.train.model_dir") is not None
  lengths = gin.query_parameter("train/t5g.InputConfig.task_feature_lengths")
  assert lengths is not None
  gin.clear_config()


def test_paper_lengths_in_the_adaptation_recipes():
  for name, lengths in (("t5gemma_2b_2b_prefixlm_kd", 4096), ("t5gemma_2b_2b_ul2", 8192),
                        ("t5gemma_9b_2b_ul2", 8192), ("t5gemma_9b_9b_ul2", 8192)):
    files = [f"experiments/{name}.gin"]
    gin_files.parse(files, [f"{m} = 'x'" for m in _missing(files)])
    assert gin.query_parameter("%TASK_FEATURE_LENGTHS") == {"inputs": lengths,
                                                             "targets": lengths}
  files = ["experiments/t5gemma_9b_2b_ul2.gin"]
  gin_files.parse(files, [f"{m} = 'x'" for m in _missing(files)])
  assert gin.query_parameter("t5g.train.warmup_new_parameters_steps") == 1000
  gin.clear_config()


def _t5g(*args: str, cwd: str) -> subprocess.CompletedProcess:
  """`t5g ARGS` run as a command in its own process, in `cwd`."""
  env = {**os.environ, "XLA_FLAGS": CHEAP_XLA_FLAGS, "JAX_PLATFORMS": "cpu",
         "TF_CPP_MIN_LOG_LEVEL": "3"}
  return subprocess.run([sys.executable, "-m", "t5g", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=600)


def _t5g_in_process(*args: str, cwd, monkeypatch, capsys) -> tuple[int, str]:
  """(exit status, stderr) of `t5g ARGS` run by `cli.main` in this process, in `cwd`: the
  configuration errors happen before anything is built, so no process start is needed."""
  monkeypatch.chdir(cwd)
  try:
    status = cli.main(list(args))
  finally:
    gin.clear_config()
  return status, capsys.readouterr().err


def test_missing_required_macro_fails_before_anything_is_built(tmp_path, monkeypatch, capsys):
  status, stderr = _t5g_in_process(
      "train", "--gin_file=models/gemma2-tiny.gin", "--gin_file=runs/pretrain.gin",
      f"--gin.MODEL_DIR='{tmp_path}/run'", "--gin.TRAIN_STEPS=2", cwd=tmp_path,
      monkeypatch=monkeypatch, capsys=capsys)
  assert status == 2, stderr
  assert "MIXTURE_OR_TASK_NAME" in stderr and "TASK_FEATURE_LENGTHS" in stderr
  assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("binding,named", [
    ("--gin.t5g.OptimizerConfig.learning_rat=0.1", "learning_rat"),
    ("--gin.t5g.NoSuchThing.value=1", "t5g.NoSuchThing"),
])
def test_unknown_binding_fails_naming_it(tmp_path, monkeypatch, capsys, binding, named):
  status, stderr = _t5g_in_process(
      "train", "--gin_file=experiments/embedded_gemma2_teacher.gin",
      f"--gin.MODEL_DIR='{tmp_path}/run'", binding, cwd=tmp_path, monkeypatch=monkeypatch,
      capsys=capsys)
  assert status == 2, stderr
  assert named in stderr
  assert not os.path.exists(tmp_path / "run")


def test_unquoted_text_value_gets_a_hint(tmp_path, monkeypatch, capsys):
  status, stderr = _t5g_in_process(
      "train", "--gin_file=experiments/embedded_gemma2_teacher.gin", "--gin.MODEL_DIR=runs/x",
      cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
  assert status == 2
  assert stderr.startswith("t5g train: error: gin: cannot read 'MODEL_DIR = runs/x' ")
  assert "--gin.NAME=\"'text'\"" in stderr


def test_error_in_a_gin_file_names_file_and_line(tmp_path, monkeypatch, capsys):
  (tmp_path / "typo.gin").write_text("include 'experiments/embedded_gemma2_teacher.gin'\n"
                                     "t5g.OptimizerConfig.learning_rat = 0.1\n")
  status, stderr = _t5g_in_process("train", "--gin_file=typo.gin", cwd=tmp_path,
                                   monkeypatch=monkeypatch, capsys=capsys)
  assert status == 2
  assert "learning_rat" in stderr and f'In file "{tmp_path}/typo.gin", line 2' in stderr


def test_missing_gin_file_is_named(tmp_path, monkeypatch, capsys):
  status, stderr = _t5g_in_process("train", "--gin_file=experiments/nope.gin", cwd=tmp_path,
                                   monkeypatch=monkeypatch, capsys=capsys)
  assert status == 2 and "experiments/nope.gin" in stderr


def _user_folders(cwd) -> None:
  """Folders named like gin's layers, with unrelated content, as a user's working directory
  has them (the embedded default leaves runs/embedded/)."""
  for folder in ("runs/embedded/gemma2", "models", "experiments"):
    os.makedirs(cwd / folder)
    (cwd / folder / "notes.txt").write_text("not a gin file\n")


def test_includes_are_files_with_same_named_folders_in_the_working_directory(tmp_path):
  """`python -m t5g` puts the working directory on sys.path: its runs/, models/ and
  experiments/ folders must not be taken for the Python packages gin could read includes from.
  MODEL_DIR is declared REQUIRED in runs/pretrain.gin: its error proves the includes were read."""
  _user_folders(tmp_path)
  run = _t5g("train", "--gin_file=experiments/embedded_gemma2_teacher.gin", cwd=str(tmp_path))
  assert run.returncode == 2, run.stderr[-3000:]
  assert "required value(s) not set: MODEL_DIR" in run.stderr, run.stderr[-3000:]


def test_parse_with_the_working_directory_on_sys_path(tmp_path, monkeypatch):
  """As under `python -m pytest` from a directory with a runs/ folder."""
  _user_folders(tmp_path)
  monkeypatch.chdir(tmp_path)
  monkeypatch.syspath_prepend(str(tmp_path))
  assert _missing(["experiments/embedded_gemma2_teacher.gin"]) == ["MODEL_DIR"]
  gin.clear_config()


def test_working_directory_file_comes_before_gin_dir(tmp_path, monkeypatch):
  (tmp_path / "runs").mkdir()
  (tmp_path / "runs" / "pretrain.gin").write_text("include 'runs/nope.gin'\n")
  monkeypatch.chdir(tmp_path)
  with pytest.raises(FileNotFoundError) as error:
    gin_files.parse(["experiments/embedded_gemma2_teacher.gin"], [])
  first_line = str(error.value).splitlines()[0]
  assert first_line == (f"gin: include 'runs/nope.gin' in {tmp_path}/runs/pretrain.gin: no "
                        f"such file (looked in {tmp_path} and {gin_files.GIN_DIR})")


def test_train_writes_config_gin_events_and_checkpoint(tmp_path):
  """A real `t5g train` command (its own process) trains 2 steps and writes its run directory."""
  model_dir = tmp_path / "run"
  run = _t5g("train", "--gin_file=experiments/embedded_gemma2_teacher.gin",
             f"--gin.MODEL_DIR='{model_dir}'", "--gin.TRAIN_STEPS=2", "--gin.WARMUP_STEPS=1",
             "--gin.BATCH_SIZE=4",
             "--gin.TASK_FEATURE_LENGTHS={'inputs': 16, 'targets': 16}",
             "--gin_bindings=t5g.train.log_every = 1", cwd=str(tmp_path))
  assert run.returncode == 0, run.stderr[-3000:]
  assert "train step 2/2" in run.stdout
  config = (model_dir / "config.gin").read_text()
  assert "TRAIN_STEPS = 2" in config and "'inputs': 16" in config
  assert glob.glob(str(model_dir / "train" / "events.out.tfevents.*"))
  assert (model_dir / "2").is_dir()

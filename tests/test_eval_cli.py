"""`t5g eval` on a tiny checkpoint (predict and score metrics; JSON and TensorBoard under
MODEL_DIR/inference_eval), the instruction-tuning and text-to-text SuperGLUE recipes end to end
on a small jsonl and TFDS mock data (the mixture average: tests/test_eval_classifier.py), and bad input: an unknown metric, an
unknown task, a missing checkpoint each end the command with one line naming it (exit 2)."""

from __future__ import annotations

import glob

import pytest

from t5g import cli
from tests import eval_fixtures


@pytest.fixture
def checkpoint(tiny_t5gemma_checkpoint):
  return tiny_t5gemma_checkpoint


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("chat") / "chat.jsonl")
  eval_fixtures.write_chat(path, 6)
  return path


def _eval(checkpoint: str, chat: str, *flags: str) -> list[str]:
  return ["eval", "--gin_file=runs/eval.gin", f"--gin.MODEL_DIR='{checkpoint}'",
          "--gin.MIXTURE_OR_TASK_NAME='chat'", "--gin.BATCH_SIZE=4",
          "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 16}",
          "--gin_bindings=t5g.evaluate.register_tasks = [@t5g.register_instruction_task]",
          "--gin_bindings=t5g.register_instruction_task.name = 'chat'",
          f"--gin_bindings=t5g.register_instruction_task.files = {{'validation': '{chat}'}}",
          *flags]


def test_eval_writes_json_and_tensorboard(checkpoint, chat, tmp_path, capsys):
  out = str(tmp_path / "out")
  assert cli.main(_eval(checkpoint, chat, f"--gin.OUTPUT_DIR='{out}'",
                        "--gin.MAX_NEW_TOKENS=4")) == 0
  line = capsys.readouterr().out.strip().splitlines()[-1]
  assert line.startswith("eval chat step 0 | exact_match 0.0000 | log_likelihood -")
  [record] = eval_fixtures.metrics_lines(f"{out}/chat-metrics.jsonl")
  assert record["step"] == 0 and record["log_likelihood"] < 0 and record["exact_match"] == 0
  assert glob.glob(f"{out}/chat/events.out.tfevents.*")
  inferences = eval_fixtures.metrics_lines(f"{out}/chat-000000.jsonl")
  assert len(inferences) == 6 and {"prediction", "score", "target"} <= set(inferences[0])
  assert f"MODEL_DIR = {checkpoint!r}" in open(f"{out}/config.gin").read()


@pytest.mark.parametrize("flags,named", [
    (["--gin_bindings=t5g.register_instruction_task.metric_names = ['bleu']"], "'bleu'"),
    (["--gin.MIXTURE_OR_TASK_NAME='t5g.superglue.boolk'"], "'t5g.superglue.boolk'"),
    (["--gin.CHECKPOINT_STEP=7"], "step 7 does not exist"),
])
def test_bad_input_is_named(checkpoint, chat, capsys, flags, named):
  assert cli.main(_eval(checkpoint, chat, *flags)) == 2
  error = capsys.readouterr().err.strip()
  assert len(error.splitlines()) == 1 and named in error, error


def test_missing_checkpoint_is_named(chat, tmp_path, capsys):
  missing = str(tmp_path / "nothing")
  assert cli.main(_eval(missing, chat)) == 2
  assert f"{missing}: no t5g checkpoint steps found" in capsys.readouterr().err


def test_instruction_recipe_trains_and_evaluates(checkpoint, chat, tmp_path):
  run = str(tmp_path / "run")
  metrics = eval_fixtures.train_recipe("instruction_finetune.gin", [
      f"TRAIN_FILES = '{chat}'", f"VALIDATION_FILES = '{chat}'",
      f"INIT_CHECKPOINT = '{checkpoint}'", f"MODEL_DIR = '{run}'",
      "TASK_FEATURE_LENGTHS = {'inputs': 32, 'targets': 16}", "MAX_NEW_TOKENS = 4"])
  assert metrics["step"] == 2
  [record] = eval_fixtures.metrics_lines(f"{run}/inference_eval/instructions-metrics.jsonl")
  assert record["step"] == 2 and {"exact_match", "log_likelihood"} <= set(record)


def test_superglue_text_recipe_decodes_label_names(checkpoint, tmp_path, monkeypatch):
  run = str(tmp_path / "run")
  with eval_fixtures.superglue_mock_data(monkeypatch):
    eval_fixtures.train_recipe("superglue_finetune.gin", [
        f"INIT_CHECKPOINT = '{checkpoint}'", f"MODEL_DIR = '{run}'",
        "MIXTURE_OR_TASK_NAME = 't5g.superglue.cb'",
        "TASK_FEATURE_LENGTHS = {'inputs': 48, 'targets': 8}", "MAX_NEW_TOKENS = 4"])
  [record] = eval_fixtures.metrics_lines(f"{run}/inference_eval/t5g.superglue.cb-metrics.jsonl")
  assert record["step"] == 2 and {"accuracy", "mean_3class_f1"} <= set(record)

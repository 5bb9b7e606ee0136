"""Evaluation on a trained model (`trained_arithmetic`, tests/trained_fixture.py), whose
predictions stop at different positions: the trainer's periodic evaluation at the last step and
`t5g eval` of that checkpoint give the same, non-trivial metrics; the score path prefers the right
answers; an evaluation that fails at step N stops the run with step N saved and readable, naming
the task and the cause, and the same command then resumes."""

from __future__ import annotations

import json
import logging
import os

import jax
import numpy as np
import pytest
import seqio

from t5g import cli
from t5g.checkpoints import model_dir as model_dirs
from t5g.evaluation import evaluator
from t5g.model.config import EOS_ID
from t5g.train.trainer import EvaluationFailed
from tests import eval_fixtures, trained_fixture

TASK = trained_fixture.TASK
STEP = trained_fixture.TRAIN_STEPS


def _inferences(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _eval(run: dict, name: str, validation: str, output_dir: str, *flags: str) -> list[str]:
  """`t5g eval` of the trained run on task `name` over the jsonl `validation`."""
  return ["eval", "--gin_file=runs/eval.gin", f"--gin.MODEL_DIR='{run['model_dir']}'",
          f"--gin.MIXTURE_OR_TASK_NAME='{name}'", f"--gin.OUTPUT_DIR='{output_dir}'",
          f"--gin.BATCH_SIZE={trained_fixture.EVALUATION_BATCH_SIZE}",
          "--gin.TASK_FEATURE_LENGTHS={'inputs': 48, 'targets': 16}", "--gin.MAX_NEW_TOKENS=16",
          "--gin_bindings=t5g.evaluate.register_tasks = [@t5g.register_instruction_task]",
          f"--gin_bindings=t5g.register_instruction_task.name = '{name}'",
          f"--gin_bindings=t5g.register_instruction_task.files = {{'validation': '{validation}'}}",
          "--gin_bindings=t5g.register_instruction_task.vocabulary_path = "
          f"'{trained_fixture.VOCABULARY}'", *flags]


def test_cut_at_eos_keeps_one_width_and_decodes_before_the_stop():
  vocabulary = seqio.SentencePieceVocabulary(trained_fixture.VOCABULARY)
  words = vocabulary.encode("The answer is 10.")
  width = len(words) + 4
  padded = lambda row: row + [0] * (width - len(row))
  rows = np.array([padded(words + [EOS_ID]),                          # stops after the words
                   padded(words[:3] + [EOS_ID] + words[3:6]),          # tokens after EOS go
                   padded(words[:2] + [0] + words[2:] + [EOS_ID]),     # padding stops as EOS
                   (words * 2)[:width]], np.int32)                     # never stops
  cut = evaluator.cut_at_eos(rows)
  assert cut.shape == rows.shape and cut.dtype == np.int32
  assert [vocabulary.decode(row) for row in cut] == [
      "The answer is 10.", vocabulary.decode(words[:3]), vocabulary.decode(words[:2]),
      vocabulary.decode((words * 2)[:width])]
  assert cut[1].tolist() == padded(words[:3] + [EOS_ID])
  assert cut[2].tolist() == padded(words[:2] + [EOS_ID])


def test_trainer_evaluates_the_trained_model(trained_arithmetic):
  out = os.path.join(trained_arithmetic["model_dir"], evaluator.OUTPUT_SUBDIR)
  [record] = eval_fixtures.metrics_lines(f"{out}/{TASK}-metrics.jsonl")
  # Measured (seeded run): exact_match 15.0, log_likelihood -3.84.
  assert record["step"] == STEP and 5 <= record["exact_match"] <= 60, record
  assert -6 < record["log_likelihood"] < -1.5, record
  inferences = _inferences(f"{out}/{TASK}-{STEP:06d}.jsonl")
  assert len(inferences) == 40
  right = [r["prediction"] == r["target"] for r in inferences]
  assert 100 * np.mean(right) == pytest.approx(record["exact_match"])
  assert all(r["prediction"].startswith("The answer is ") for r in inferences)
  vocabulary = seqio.SentencePieceVocabulary(trained_fixture.VOCABULARY)
  stops = {len(vocabulary.encode(r["prediction"])) for r in inferences}
  assert len(stops) >= 2, stops  # It stops at different positions.


def test_t5g_eval_matches_the_periodic_evaluation(trained_arithmetic, tmp_path, capsys):
  out = str(tmp_path / "eval")
  assert cli.main(_eval(trained_arithmetic, TASK, trained_arithmetic["validation_files"],
                        out)) == 0
  assert capsys.readouterr().out.strip().splitlines()[-1].startswith(f"eval {TASK} step {STEP}")
  [again] = eval_fixtures.metrics_lines(f"{out}/{TASK}-metrics.jsonl")
  [periodic] = eval_fixtures.metrics_lines(os.path.join(
      trained_arithmetic["model_dir"], evaluator.OUTPUT_SUBDIR, f"{TASK}-metrics.jsonl"))
  assert again["exact_match"] == periodic["exact_match"]
  assert again["log_likelihood"] == pytest.approx(periodic["log_likelihood"], rel=1e-5)


def test_scores_prefer_the_right_answer(trained_arithmetic, tmp_path):
  records = [json.loads(line) for line in open(trained_arithmetic["validation_files"])]
  wrong = str(tmp_path / "wrong.jsonl")
  with open(wrong, "w") as f:
    for record in records:
      # A wrong answer one digit longer: 10 -> 103.
      answer = int(record["response"].removeprefix("The answer is ").rstrip(".")) * 10 + 3
      f.write(json.dumps({**record, "response": f"The answer is {answer}."}) + "\n")
  out = str(tmp_path / "wrong_eval")
  assert cli.main(_eval(trained_arithmetic, "wrong", wrong, out,
                        "--gin_bindings=t5g.register_instruction_task.metric_names = "
                        "['log_likelihood']")) == 0
  wrong_scores = np.array([r["score"] for r in _inferences(f"{out}/wrong-{STEP:06d}.jsonl")])
  right_scores = np.array([r["score"] for r in _inferences(os.path.join(
      trained_arithmetic["model_dir"], evaluator.OUTPUT_SUBDIR, f"{TASK}-{STEP:06d}.jsonl"))])
  assert wrong_scores.shape == right_scores.shape == (40,)
  # Measured: right -3.84, wrong -13.63 on average; right higher on 39 of 40.
  assert np.mean(right_scores > wrong_scores) >= 0.9, (right_scores, wrong_scores)
  assert right_scores.mean() > wrong_scores.mean() + 5


def test_failed_evaluation_saves_the_step_and_stops(tmp_path, monkeypatch, caplog, capsys):
  directory = str(tmp_path)
  trained_fixture.write_arithmetic(str(tmp_path / "train.jsonl"), 400, seed=1)
  trained_fixture.write_arithmetic(str(tmp_path / "validation.jsonl"), 40, seed=2)
  run = str(tmp_path / "run")
  short = ["--gin.SAVE_EVERY=100", "--gin.EVALUATION_EVERY=2", "--gin.MAX_NEW_TOKENS=4"]

  def broken(self, params, step):
    raise ZeroDivisionError(f"injected at step {step}")

  with monkeypatch.context() as patch:
    patch.setattr(evaluator.Evaluator, "evaluate", broken)
    with caplog.at_level(logging.ERROR):
      status = cli.main(trained_fixture.train_arguments(directory, run,
                                                        [*short, "--gin.TRAIN_STEPS=4"]))
  # Not the user's input: the traceback of EvaluationFailed and the internal-error line, exit 1.
  assert status == 1
  message = capsys.readouterr().err
  assert f"{EvaluationFailed.__name__}: " in message and "internal error" in message
  assert f"evaluation of {TASK} at step 2 failed: ZeroDivisionError: injected at step 2" in message
  # gin re-raises without the chain, so the cause's traceback is in the log.
  [logged] = [r for r in caplog.records if r.exc_info and f"{TASK} at step" in r.getMessage()]
  assert isinstance(logged.exc_info[1], ZeroDivisionError)
  # Step 2 was not due for a save (SAVE_EVERY=100): the failure saved it, readable.
  loaded = model_dirs.load(run)
  assert loaded.step == 2
  assert all(np.isfinite(leaf).all() for leaf in jax.tree_util.tree_leaves(loaded.params))
  # The same command, the evaluation fixed, continues from step 2 and evaluates step 4.
  assert cli.main(trained_fixture.train_arguments(directory, run,
                                                  [*short, "--gin.TRAIN_STEPS=4"])) == 0
  [record] = eval_fixtures.metrics_lines(f"{run}/{evaluator.OUTPUT_SUBDIR}/{TASK}-metrics.jsonl")
  assert record["step"] == 4

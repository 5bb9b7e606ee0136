"""The encoder-only classifier: its encoder loaded from a T5Gemma checkpoint with a fresh head,
trained by `t5g.train` to well above chance on a learnable toy task (held-out accuracy from the
seqio evaluation the trainer runs every N steps), and the SuperGLUE classification recipe end to
end on TFDS mock data with the paper's average over the seven tasks."""

from __future__ import annotations

import glob
import os

import jax
import numpy as np
import pytest

from t5g.checkpoints import model_dir
from t5g.checkpoints.manager import CheckpointOptions
from t5g.data import classification_tasks
from t5g.data.pipeline import InputConfig
from t5g.evaluation.evaluator import EvalConfig
from t5g.model.config import ClassifierConfig, ComputeConfig
from t5g.runtime import partitioning
from t5g.train import run_state, trainer
from t5g.train.optimizers import OptimizerConfig
from tests import eval_fixtures

FP32 = ComputeConfig("float32", "float32", scan_layers=True)


@pytest.fixture
def checkpoint(tiny_t5gemma_checkpoint):
  return tiny_t5gemma_checkpoint


def test_encoder_comes_from_the_checkpoint_and_the_head_is_fresh(checkpoint):
  mesh = partitioning.make_mesh(partitioning.MeshConfig())
  run = run_state.build_model(None, FP32, mesh, partitioning.DEFAULT_RULES, checkpoint, 0.01,
                              num_classes=3)
  assert run.config == ClassifierConfig(model_dir.read_model(checkpoint)[0].encoder, 3)
  params = run_state._init_checkpoint_params(run, checkpoint, jax.random.PRNGKey(1))
  saved = model_dir.load(checkpoint).params["encoder"]
  jax.tree_util.tree_map(np.testing.assert_array_equal, params["encoder"], saved)
  assert params["head"]["kernel"].shape == (64, 3) and not np.any(params["head"]["bias"])
  with pytest.raises(ValueError, match="decoder-only Gemma 2 has no encoder"):
    run_state.classifier_config(model_dir.read_model(checkpoint)[0].encoder, 2, None)


def test_toy_task_is_learnt_and_evaluated_during_training(checkpoint, tmp_path):
  train, validation = str(tmp_path / "train.jsonl"), str(tmp_path / "validation.jsonl")
  eval_fixtures.write_toy_classification(train, 1000, seed=0)
  assert 0.3 < eval_fixtures.write_toy_classification(validation, 64, seed=1) < 0.7
  classification_tasks.register_classification_task(
      "toy_zebra", {"train": train, "validation": validation}, ["no", "yes"])
  lengths = {"inputs": 32, "targets": 1}
  run = str(tmp_path / "run")
  trainer.train(model_dir=run, train_steps=20, init_checkpoint=checkpoint, compute=FP32,
                train_input=InputConfig("toy_zebra", lengths, 32, pack=False,
                                        feature_converter="classification"),
                optimizer=OptimizerConfig(learning_rate=1e-3, schedule="constant"),
                num_classes=2, evaluation=EvalConfig("toy_zebra", lengths, batch_size=32),
                evaluation_every=10, peak_flops_per_device=1e12,
                checkpoint=CheckpointOptions(save_every=1000, async_save=False))
  lines = eval_fixtures.metrics_lines(f"{run}/inference_eval/toy_zebra-metrics.jsonl")
  assert [line["step"] for line in lines] == [10, 20]
  assert lines[-1]["accuracy"] > 90.0  # 64 held-out examples; chance is about 50
  assert glob.glob(f"{run}/inference_eval/toy_zebra/events.out.tfevents.*")
  assert model_dir.read_model(run)[0] == ClassifierConfig(
      model_dir.read_model(checkpoint)[0].encoder, 2)


def test_superglue_classification_recipe_reports_the_average(checkpoint, tmp_path,
                                                             monkeypatch):
  run = str(tmp_path / "run")
  with eval_fixtures.superglue_mock_data(monkeypatch):
    eval_fixtures.train_recipe("superglue_classification.gin", [
        f"INIT_CHECKPOINT = '{checkpoint}'", f"MODEL_DIR = '{run}'",
        "MIXTURE_OR_TASK_NAME = 't5g.superglue_cls.cb'",
        "t5g.EvalConfig.mixture_or_task_name = 't5g.superglue_cls'",
        "TASK_FEATURE_LENGTHS = {'inputs': 64, 'targets': 1}"])
  out = f"{run}/inference_eval"
  tasks = [f"t5g.superglue_cls.{name}" for name in classification_tasks.SUPERGLUE]
  accuracies = [eval_fixtures.metrics_lines(f"{out}/{task}-metrics.jsonl")[-1]["accuracy"]
                for task in tasks]
  mixture = eval_fixtures.metrics_lines(f"{out}/t5g.superglue_cls-metrics.jsonl")[-1]
  assert mixture["step"] == 2 and mixture["accuracy"] == pytest.approx(np.mean(accuracies))
  assert os.path.isdir(f"{out}/t5g.superglue_cls")
  multirc = eval_fixtures.metrics_lines(f"{out}/t5g.superglue_cls.multirc-metrics.jsonl")[-1]
  assert {"f1a", "exact_match"} <= set(multirc)

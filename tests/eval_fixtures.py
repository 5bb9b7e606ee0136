"""Shared pieces of the evaluation tests: a tiny random T5Gemma checkpoint, jsonl files, and
TFDS mock data that seqio's Evaluator can read."""

from __future__ import annotations

import contextlib
import json
import random
from typing import Iterator

import gin
import jax
import seqio
import tensorflow_datasets as tfds

from t5g.checkpoints import model_dir
from t5g.model import presets
from t5g.model.config import ComputeConfig
from t5g.model.models import init_params

PRESET = "t5gemma-tiny-tiny"
TOY_WORDS = ("cat", "dog", "bird", "fish", "horse", "mouse", "lion")
TOY_KEY = "zebra"


def tiny_checkpoint(directory: str) -> str:
  """A random t5gemma-tiny-tiny saved as step 0 (scanned layout) in `directory`."""
  config = presets.get_preset(PRESET)
  params = jax.jit(lambda key: init_params(config, ComputeConfig(scan_layers=True), key))(
      jax.random.PRNGKey(0))
  model_dir.save(directory, 0, params, config, scanned=True)
  return directory


def write_toy_classification(path: str, count: int, seed: int) -> float:
  """jsonl records of six animal words, label "yes" iff one is TOY_KEY; returns the yes rate."""
  rng = random.Random(seed)
  yes = 0
  with open(path, "w") as f:
    for _ in range(count):
      words = [rng.choice(TOY_WORDS) for _ in range(6)]
      if rng.random() < 0.5:
        words[rng.randrange(6)] = TOY_KEY
      label = "yes" if TOY_KEY in words else "no"
      yes += label == "yes"
      f.write(json.dumps({"text": " ".join(words), "label": label}) + "\n")
  return yes / count


def write_chat(path: str, count: int) -> None:
  """jsonl prompt/response records."""
  with open(path, "w") as f:
    for i in range(count):
      f.write(json.dumps({"prompt": f"say {i}", "response": f"number {i}"}) + "\n")


@contextlib.contextmanager
def superglue_mock_data(monkeypatch, num_examples: int = 4) -> Iterator[None]:
  """TFDS mock data for SuperGLUE. Mock data has no split sizes, which seqio's Evaluator asks
  TFDS for (to decide on its in-memory cache); real prepared data has them."""
  monkeypatch.setattr(seqio.TfdsDataSource, "num_input_examples", lambda self, split: None)
  with tfds.testing.mock_data(num_examples=num_examples):
    yield


# Bindings every tiny fine-tuning recipe run in the tests shares (one float32 compile, 2 steps).
TINY_RUN = ["VOCABULARY = None", "TRAIN_STEPS = 2", "BATCH_SIZE = 4", "EVAL_EVERY = 0",
            "EVALUATION_EVERY = 2", "t5g.ComputeConfig.dtype = 'float32'",
            "t5g.train.peak_flops_per_device = 1e12"]


def train_recipe(experiment: str, bindings: list[str]) -> dict:
  """Runs `t5g.train` on the tiny model with gin/experiments/`experiment` and TINY_RUN plus
  `bindings`; returns its last metrics. The gin config is cleared afterwards."""
  from t5g import cli
  from t5g.runtime import gin_files
  from t5g.train import trainer
  cli.register_configurables()
  gin_files.parse([f"models/{PRESET}.gin", f"experiments/{experiment}"], TINY_RUN + bindings)
  try:
    return trainer.train()
  finally:
    gin.clear_config()


def metrics_lines(path: str) -> list[dict]:
  """The JSON lines of a seqio `<task>-metrics.jsonl` file."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]

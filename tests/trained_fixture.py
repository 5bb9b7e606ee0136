"""A trained tiny T5Gemma for the tests: arithmetic instructions learnt by the real `t5g train`.

`write_arithmetic(path, count, seed)` writes jsonl records such as
{"prompt": "Please add 3 and 7.", "response": "The answer is 10."} (add or multiply two numbers
from 0 to 20, drawn independently, so some validation pairs also occur in training).
`train_arithmetic(directory)` trains `t5gemma-tiny-tiny` from a seeded random init on 400 of them
with `experiments/instruction_finetune.gin` and the embedded vocabulary, through `t5g train`
(`TRAINED_RUN`: the periodic seqio evaluation on the 40 validation records at the last step), so
the model stops at different positions and gets some, not all, answers right.
"""

from __future__ import annotations

import json
import os
import random
import time

import t5g
from t5g import cli

PRESET = "t5gemma-tiny-tiny"
VOCABULARY = os.path.join(os.path.dirname(t5g.__file__), "data", "assets", "embedded_spm.model")
TASK = "instructions"
TRAIN_STEPS = 300
EVALUATION_BATCH_SIZE = 40
# The run's settings after the model and experiment files (run from the repository root).
TRAINED_RUN = [
    f"--gin.VOCABULARY='{VOCABULARY}'", "--gin.INIT_CHECKPOINT=None",
    "--gin.TASK_FEATURE_LENGTHS={'inputs': 48, 'targets': 16}",
    f"--gin.TRAIN_STEPS={TRAIN_STEPS}", "--gin.BATCH_SIZE=16", "--gin.LEARNING_RATE=3e-3",
    f"--gin.SAVE_EVERY={TRAIN_STEPS}", f"--gin.EVALUATION_EVERY={TRAIN_STEPS}",
    "--gin.EVAL_EVERY=0", "--gin.MAX_NEW_TOKENS=16",
    f"--gin.EVALUATION_BATCH_SIZE={EVALUATION_BATCH_SIZE}", "--gin.SEED=0",
    "--gin.t5g.ComputeConfig.dtype='float32'", "--gin.t5g.train.peak_flops_per_device=1e12",
    "--gin.t5g.train.log_every=50", "--gin.t5g.EvalConfig.write_n_results=None",
]


def arithmetic_record(rng: random.Random) -> dict:
  """One {"prompt", "response"} record: add or multiply two numbers from 0 to 20."""
  a, b = rng.randint(0, 20), rng.randint(0, 20)
  if rng.random() < 0.5:
    return {"prompt": f"Please add {a} and {b}.", "response": f"The answer is {a + b}."}
  return {"prompt": f"Please multiply {a} and {b}.", "response": f"The answer is {a * b}."}


def write_arithmetic(path: str, count: int, seed: int) -> list[dict]:
  """Writes `count` arithmetic records drawn with `seed` to the jsonl `path`; returns them."""
  rng = random.Random(seed)
  records = [arithmetic_record(rng) for _ in range(count)]
  with open(path, "w") as f:
    f.writelines(json.dumps(record) + "\n" for record in records)
  return records


def train_arguments(directory: str, model_dir: str, extra: list[str] = ()) -> list[str]:
  """The `t5g train` arguments of the trained run on `directory`'s data, into `model_dir`."""
  return ["train", f"--gin_file=models/{PRESET}.gin",
          "--gin_file=experiments/instruction_finetune.gin",
          f"--gin.TRAIN_FILES='{os.path.join(directory, 'train.jsonl')}'",
          f"--gin.VALIDATION_FILES='{os.path.join(directory, 'validation.jsonl')}'",
          f"--gin.MODEL_DIR='{model_dir}'", *TRAINED_RUN, *extra]


def train_arithmetic(directory: str) -> dict:
  """Writes the data under `directory` and trains into `<directory>/run`; returns {"model_dir",
  "train_files", "validation_files", "seconds"} (the wall time of `t5g train`)."""
  write_arithmetic(os.path.join(directory, "train.jsonl"), 400, seed=1)
  write_arithmetic(os.path.join(directory, "validation.jsonl"), 40, seed=2)
  model_dir = os.path.join(directory, "run")
  start = time.perf_counter()
  assert cli.main(train_arguments(directory, model_dir)) == 0
  return {"model_dir": model_dir, "seconds": time.perf_counter() - start,
          "train_files": os.path.join(directory, "train.jsonl"),
          "validation_files": os.path.join(directory, "validation.jsonl")}

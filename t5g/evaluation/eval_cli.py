"""`t5g eval --gin_file=F [--gin.NAME=VALUE ...] [--gin_bindings="..."]`: evaluates a checkpoint.

The gin files bind `t5g.evaluate` (t5g/evaluation/evaluate.py), usually through
`gin/runs/eval.gin` and its REQUIRED macros `MODEL_DIR` and `MIXTURE_OR_TASK_NAME`. Each task's
metrics are printed as one line and written to TensorBoard and JSON under
`MODEL_DIR/inference_eval`. Bad input (a gin error, a missing checkpoint, an unknown task or
metric) ends the command with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse

HELP = "evaluate a checkpoint on a seqio task or mixture (predict and score metrics)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """Adds --gin_file (repeatable) and --gin_bindings; --gin.NAME=VALUE flags come from t5g.cli."""
  parser.add_argument("--gin_file", action="append", default=[], required=True)
  parser.add_argument("--gin_bindings", action="append", default=[],
                      help="a whole gin line, e.g. \"CHECKPOINT_STEP = 1000\"")


def run(args: argparse.Namespace) -> None:
  """Parses the gin configuration, runs `t5g.evaluate` and prints each task's metrics."""
  from t5g.evaluation import evaluate
  from t5g.evaluation.evaluator import result_lines
  from t5g.train import gin_config
  gin_config.parse(args.gin_file, gin_config.flag_bindings(args.gin_flags, args.gin_bindings))
  step, results = evaluate.evaluate()
  for line in result_lines(results, step):
    print(line, flush=True)

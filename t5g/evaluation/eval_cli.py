"""`t5g eval --gin_file=F [--gin.NAME=VALUE ...] [--gin_bindings="..."]`: evaluates a checkpoint.

    [--coordinator_address=H:P --num_processes=N --process_id=I | --distributed]

The gin files bind `t5g.evaluate` (t5g/evaluation/evaluate.py), usually through
`gin/runs/eval.gin` and its REQUIRED macros `MODEL_DIR` and `MIXTURE_OR_TASK_NAME`. Each task's
metrics are printed as one line and written to TensorBoard and JSON under
`MODEL_DIR/inference_eval`. Bad input (a gin error, a missing checkpoint, an unknown task or
metric) ends the command with one line on stderr and exit status 2.

Several hosts join as for `t5g train` (t5g/train/distributed.py: the flags above, or the
environment `launch/local.py`, Slurm or a TPU pod sets); every process prints the metrics and
process 0 writes the files.
"""

from __future__ import annotations

import argparse

HELP = "evaluate a checkpoint on a seqio task or mixture (predict and score metrics)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """Adds --gin_file (repeatable), --gin_bindings and the distributed flags; --gin.NAME=VALUE
  flags come from t5g.cli."""
  from t5g.runtime import distributed
  parser.add_argument("--gin_file", action="append", default=[], required=True)
  parser.add_argument("--gin_bindings", action="append", default=[],
                      help="a whole gin line, e.g. \"CHECKPOINT_STEP = 1000\"")
  distributed.add_arguments(parser)


def run(args: argparse.Namespace) -> None:
  """Joins the other processes (if any), parses the gin configuration, runs `t5g.evaluate` and
  prints each task's metrics."""
  from t5g.evaluation import evaluate
  from t5g.evaluation.evaluator import result_lines
  from t5g.runtime import distributed, gin_files
  distributed.initialize_from_args(args)
  gin_files.parse(args.gin_file, gin_files.flag_bindings(args.gin_flags, args.gin_bindings))
  step, results = evaluate.evaluate()
  for line in result_lines(results, step):
    print(line, flush=True)

"""`t5g eval` on 2 processes joined by jax.distributed evaluates as 1 process does.

The 2-process run goes through launch/local.py (2 CPU devices in each process), the reference
is one `t5g eval` process on 4 CPU devices; both use the mesh data=2 × fsdp=2, so its rows and
the parameters' fsdp blocks are spread over the 2 processes. The task (6 chat examples, batches
of 4: the second one padded) has a predict metric (greedy decoding, rows split over the mesh)
and a score metric (teacher-forced, batch replicated). Both runs start at once from the same
saved random t5gemma-tiny-tiny (`train_children.write_init`: no process compiles an
initialisation) and compile with XLA's cheaper CPU code generation (`train_children.child_env`).
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest

from tests import eval_fixtures, train_children

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 600


def _command(out: str, name: str) -> list[str]:
  """The `t5g eval` command line writing to OUT/<name>."""
  chat, checkpoint = os.path.join(out, "chat.jsonl"), os.path.join(out, "checkpoint")
  return ["eval", "--gin_file=runs/eval.gin", f"--gin.MODEL_DIR='{checkpoint}'",
          "--gin.MIXTURE_OR_TASK_NAME='chat'", "--gin.BATCH_SIZE=4", "--gin.MAX_NEW_TOKENS=4",
          "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 16}",
          f"--gin.OUTPUT_DIR='{os.path.join(out, name)}'",
          "--gin.t5g.MeshConfig.data=2", "--gin.t5g.MeshConfig.fsdp=2",
          "--gin_bindings=t5g.evaluate.register_tasks = [@t5g.register_instruction_task]",
          "--gin_bindings=t5g.register_instruction_task.name = 'chat'",
          f"--gin_bindings=t5g.register_instruction_task.files = {{'validation': '{chat}'}}"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """(output directory, 1-process output, launcher's output), run together."""
  out = str(tmp_path_factory.mktemp("eval_multihost"))
  train_children.write_init(os.path.join(out, "checkpoint"))
  eval_fixtures.write_chat(os.path.join(out, "chat.jsonl"), 6)
  env = train_children.child_env(4)  # The launcher gives each of its processes 2 devices.
  one = subprocess.Popen([sys.executable, "-m", "t5g", *_command(out, "one")], cwd=ROOT,
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  two = subprocess.run(
      [sys.executable, os.path.join(ROOT, "launch", "local.py"), "--num_processes=2",
       "--devices_per_process=2", f"--timeout_s={TIMEOUT_S}", "--", *_command(out, "two")],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S + 60)
  one_out = one.communicate(timeout=TIMEOUT_S)[0]
  assert one.returncode == 0, one_out[-4000:]
  assert two.returncode == 0, (two.stdout + two.stderr)[-4000:]
  return out, one_out, two.stdout


def _result_line(output: str, prefix: str = "") -> str:
  [line] = [line for line in output.splitlines() if line.startswith(f"{prefix}eval chat step")]
  return line[len(prefix):]


def test_two_processes_equal_one(runs):
  """Both processes print the single process's metrics; its predictions and scores, example
  by example, are the single process's."""
  out, one_out, two_out = runs
  line = _result_line(one_out)
  assert line.startswith("eval chat step 0 | exact_match"), line
  assert _result_line(two_out, "[0] ") == _result_line(two_out, "[1] ") == line
  one, two = (eval_fixtures.metrics_lines(os.path.join(out, name, "chat-000000.jsonl"))
              for name in ("one", "two"))
  assert [r["input"]["inputs"] for r in two] == [r["input"]["inputs"] for r in one]
  assert [r["prediction"] for r in two] == [r["prediction"] for r in one]
  assert len({r["prediction"] for r in one}) > 1  # Rows told apart, not one repeated output.
  assert [r["score"] for r in two] == pytest.approx([r["score"] for r in one], rel=1e-5)


def test_only_process_zero_writes(runs):
  """One metrics line and one TensorBoard file: process 1 logged nothing."""
  out = runs[0]
  for name in ("one", "two"):
    [record] = eval_fixtures.metrics_lines(os.path.join(out, name, "chat-metrics.jsonl"))
    assert record["step"] == 0 and record["log_likelihood"] < 0
    assert len(glob.glob(os.path.join(out, name, "chat", "events.out.tfevents.*"))) == 1
    assert os.path.isfile(os.path.join(out, name, "config.gin"))

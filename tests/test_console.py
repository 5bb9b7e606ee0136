"""The `t5g` console: the libraries' start-up notices are gone, real warnings and a crash's last
words are not (t5g.runtime.console)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

from t5g.runtime import console

# What the libraries print before t5g's first line (the embedded default's console before).
NOISE = ("absl::InitializeLog", "Could not find cuda drivers", "failed call to cuInit",
         "oneDNN", "cpu_feature_guard", "uncached FunctionDataset", "Type handler registry",
         "precompiled_charsmap", "Loading weights")
CHEAP_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _environment() -> dict[str, str]:
  """The environment of a person's shell: none of the console's variables set."""
  env = {k: v for k, v in os.environ.items()
         if k not in console.ENVIRONMENT_DEFAULTS and k != "T5G_QUIET"}
  return {**env, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": CHEAP_XLA_FLAGS}


def _noise_in(output: str) -> list[str]:
  return [line for line in output.splitlines() if any(n in line for n in NOISE)]


def test_train_console_has_progress_and_warnings_only(tmp_path):
  """A real `t5g train`, stopped by Ctrl-C (SIGINT to its whole process group, the console
  filter included) once it prints progress: t5g's progress lines and its warnings about the
  signal, none of the libraries' notices (TensorFlow's import and device probe, seqio,
  tensorflow_text's SentencePiece)."""
  run = subprocess.Popen(
      [sys.executable, "-m", "t5g", "train",
       "--gin_file=experiments/embedded_gemma2_teacher.gin", f"--gin.MODEL_DIR='{tmp_path}/run'",
       "--gin.TRAIN_STEPS=1000", "--gin.WARMUP_STEPS=1", "--gin.BATCH_SIZE=4",
       "--gin.TASK_FEATURE_LENGTHS={'inputs': 16, 'targets': 16}",
       "--gin_bindings=t5g.train.log_every = 1"],
      cwd=tmp_path, env=_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True, start_new_session=True)
  lines = []
  try:
    for line in run.stdout:
      lines.append(line)
      if line.startswith("train step "):
        os.killpg(run.pid, signal.SIGINT)
        break
    lines.extend(run.stdout)
    assert run.wait(timeout=300) == 0, "".join(lines)[-3000:]
  finally:
    if run.poll() is None:
      os.killpg(run.pid, signal.SIGKILL)
  output = "".join(lines)
  assert not _noise_in(output), output
  assert "received signal 2: saving and stopping after this step" in output, output
  assert "stopped by a signal after step" in output, output


def test_python_and_native_noise_dropped_real_lines_kept(tmp_path):
  """The filters in a process of their own: orbax's warning about t5g's type handler and the
  native notices go; a real warning, a real native error and the last words of a process that
  aborts get through, in order."""
  script = textwrap.dedent("""
      import os
      from t5g.runtime import console
      console.quiet()
      from absl import logging
      import t5g.checkpoints.lazy  # registers t5g's orbax type handler (orbax warns)
      logging.warning("Using an uncached FunctionDataset for training is not recommended")
      logging.warning("a real problem")
      os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are "
                  b"written to STDERR\\n")
      os.write(2, b"I0000 00:00:1796408560.718000    6350 cudart_stub.cc:31] Could not find "
                  b"cuda drivers on your machine, GPU will not be used.\\n")
      os.write(2, b"normalizer.cc(51) LOG(INFO) precompiled_charsmap is empty. use identity "
                  b"normalization.\\n")
      os.write(2, b"E0000 00:00:1.0  1 some_op.cc:1] a real native error\\n")
      os.write(2, b"F0000 00:00:1.0  1 check.cc:1] Check failed: last words")
      os.abort()
  """)
  run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=_environment(),
                       capture_output=True, text=True, timeout=300)
  assert run.returncode == -signal.SIGABRT, run.stderr
  assert not _noise_in(run.stderr), run.stderr
  real = ("a real problem", "a real native error", "Check failed: last words")
  assert [next(r for r in real if line.endswith(r)) for line in run.stderr.splitlines()
          if line.endswith(real)] == list(real), run.stderr


def test_copy_without_noise_passes_partial_lines_and_progress_bars():
  read_end, write_end = os.pipe()
  noise = (b"I0101 12:00:00.000001 77 cudart_stub.cc:31] Could not find cuda drivers on your "
           b"machine, GPU will not be used.\n")
  os.write(write_end, b"10%\r50%\r" + noise + b"kept\n" + noise + b"no newline at the end")
  os.close(write_end)
  read_back, sink = os.pipe()
  with os.fdopen(sink, "wb") as out:
    console.copy_without_noise(read_end, out)
  os.close(read_end)
  with os.fdopen(read_back, "rb") as copied:
    assert copied.read() == b"10%\r50%\rkept\nno newline at the end"


def test_t5g_quiet_0_leaves_the_console_alone(tmp_path):
  script = textwrap.dedent("""
      import os
      from t5g.runtime import console
      console.quiet()
      os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are "
                  b"written to STDERR\\n")
  """)
  run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path,
                       env={**_environment(), "T5G_QUIET": "0"}, capture_output=True, text=True,
                       timeout=60)
  assert run.returncode == 0 and "absl::InitializeLog" in run.stderr, run.stderr

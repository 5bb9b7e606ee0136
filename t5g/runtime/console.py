"""The console of the `t5g` command: its own lines and real problems, not its libraries' notices.

Before a command's first line, the libraries under t5g print notices that are not the user's
business: TensorFlow probing for CUDA at import (`Could not find cuda drivers`, `failed call to
cuInit`, oneDNN and CPU-feature notices), seqio's "uncached FunctionDataset" warning (t5g's
pipeline resumes by skipping exactly the batches it consumed, so the reshuffling it warns about
does not happen), orbax's "Type handler registry overriding" for the handler t5g registers on
purpose, tensorflow_text's SentencePiece `precompiled_charsmap is empty`, transformers' weight
loading bar. `quiet()`, called first by `cli.main` when t5g is the program, removes exactly
those, each by its message; every other warning and error gets through.

  * Environment defaults, set before TensorFlow or transformers are imported and never over a
    value already set: TF_CPP_MIN_LOG_LEVEL=1 (TensorFlow's C++ INFO lines; its warnings and
    errors stay) and HF_HUB_DISABLE_PROGRESS_BARS=1.
  * TensorFlow only feeds data, as in T5X: the first `import tensorflow` hides the GPUs and TPUs
    from it, which are JAX's.
  * Python log records whose message starts with one of LOG_NOISE are dropped.
  * The process's stderr (file descriptor 2, where C++ code writes) goes through a child process
    that drops the lines matching NATIVE_NOISE and passes every other byte on as it comes: a
    child rather than a thread, so that what a crashing process writes last still gets out. It
    ignores SIGINT and SIGTERM (Ctrl-C reaches the whole process group; t5g train saves and
    warns on them) and ends when the last writer closes the pipe.

T5G_QUIET=0 leaves the console as the libraries make it (the environment defaults and hiding
the accelerators from TensorFlow stay).

This module imports only the standard library at its top: the filter child runs this file.
"""

from __future__ import annotations

import atexit
import importlib.abc
import importlib.util
import logging
import os
import re
import signal
import subprocess
import sys

ENVIRONMENT_DEFAULTS = {"TF_CPP_MIN_LOG_LEVEL": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}

# Whole lines that C++ code writes straight to stderr.
NATIVE_NOISE = re.compile(rb"|".join([
    # absl, once for each TensorFlow library that logs before its absl::InitializeLog.
    rb"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR",
    # TensorFlow at import, on a machine without the CUDA libraries.
    rb"I\d{4} [\d:.]+ +\d+ cudart_stub\.cc:\d+\] Could not find cuda drivers on your machine, "
    rb"GPU will not be used\.",
    # TensorFlow listing its devices (to be shown none) on a machine without a GPU driver.
    rb"E\d{4} [\d:.]+ +\d+ cuda_platform\.cc:\d+\] failed call to cuInit: .*",
    # tensorflow_text's SentencePiece op, on a vocabulary with identity normalization.
    rb"normalizer\.cc\(\d+\) LOG\(INFO\) precompiled_charsmap is empty\. use identity "
    rb"normalization\.",
]))

# Starts of Python log messages (all logged through absl) that are not the user's business.
LOG_NOISE = (
    "Using an uncached FunctionDataset for training is not recommended",  # seqio
    "Type handler registry overriding type \"<class 't5g.",  # orbax, for t5g's own handler
)


def quiet() -> None:
  """Sets the environment defaults, hides accelerators from TensorFlow and, unless T5G_QUIET=0,
  drops LOG_NOISE records and NATIVE_NOISE lines for the rest of the process. Call it once,
  first thing, in a process whose console belongs to t5g (not in-process from a notebook or a
  test)."""
  for name, value in ENVIRONMENT_DEFAULTS.items():
    os.environ.setdefault(name, value)
  sys.meta_path.insert(0, _HideAcceleratorsFromTensorFlow())
  if os.environ.get("T5G_QUIET", "1") == "0":
    return
  from absl import logging as absl_logging  # Before getLogger("absl"), which absl must create.
  absl_logging.get_absl_logger().addFilter(_DropLogNoise())
  _filter_stderr()


class _HideAcceleratorsFromTensorFlow(importlib.abc.MetaPathFinder, importlib.abc.Loader):
  """Finds `tensorflow` as the other finders do, lets its own loader run it, then hides the
  accelerators from it, before anything can use it."""

  def find_spec(self, fullname, path=None, target=None):  # noqa: ARG002
    """The usual spec of `tensorflow`, with this object as its loader; None for the rest."""
    if fullname != "tensorflow":
      return None
    sys.meta_path.remove(self)
    spec = importlib.util.find_spec(fullname)
    if spec is not None:
      self._loader, spec.loader = spec.loader, self
    return spec

  def create_module(self, spec):
    """The module TensorFlow's loader creates."""
    return self._loader.create_module(spec)

  def exec_module(self, module) -> None:
    """Runs TensorFlow (under its own loader) and hides the accelerators from it."""
    module.__loader__ = module.__spec__.loader = self._loader
    self._loader.exec_module(module)
    for kind in ("GPU", "TPU"):
      module.config.set_visible_devices([], kind)


class _DropLogNoise(logging.Filter):
  """Drops the records whose message starts with one of LOG_NOISE."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(LOG_NOISE)


def _filter_stderr() -> None:
  """Points file descriptor 2 at a pipe to a child that copies it to the real stderr without
  the NATIVE_NOISE lines; at exit, closes the pipe and waits for the child to finish copying."""
  read_end, write_end = os.pipe()
  child = subprocess.Popen([sys.executable, "-I", "-S", os.path.abspath(__file__)],
                           stdin=read_end, stdout=2)
  os.close(read_end)
  sys.stderr.flush()
  real_stderr = os.dup(2)
  os.dup2(write_end, 2)
  os.close(write_end)

  def restore() -> None:
    sys.stderr.flush()
    os.dup2(real_stderr, 2)  # closes this process's end of the pipe
    os.close(real_stderr)
    try:
      child.wait(timeout=30)
    except subprocess.TimeoutExpired:
      pass  # A process t5g started still holds the pipe; the child copies until it closes it.

  atexit.register(restore)


def copy_without_noise(source_fd: int, sink) -> None:
  """Copies `source_fd` to the binary stream `sink` until end of file, line by line (a line
  ends at a newline or a carriage return, so progress bars pass as they come), leaving out the
  lines that match NATIVE_NOISE."""
  pending = b""
  while chunk := os.read(source_fd, 1 << 16):
    *lines, pending = re.split(rb"(?<=[\r\n])", pending + chunk)
    for line in lines:
      if not NATIVE_NOISE.fullmatch(line.rstrip(b"\r\n")):
        sink.write(line)
    sink.flush()
  if pending and not NATIVE_NOISE.fullmatch(pending):
    sink.write(pending)
    sink.flush()


if __name__ == "__main__":  # The filter child: stdin is the pipe, stdout the real stderr.
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  copy_without_noise(sys.stdin.fileno(), sys.stdout.buffer)

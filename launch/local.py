"""Runs one `t5g` command as N processes on this machine, joined by jax.distributed (CPU, gloo).

    python launch/local.py --num_processes=2 [--devices_per_process=4] [--port=P] \
        -- train --gin_file=F --gin.MODEL_DIR="'/tmp/run'" [...]

Everything after `--` is the `t5g` command line, the same for every process. Process i gets
`T5G_COORDINATOR_ADDRESS=localhost:P`, `T5G_NUM_PROCESSES=N` and `T5G_PROCESS_ID=i` in its
environment (which `t5g train` reads, t5g/runtime/distributed.py), `JAX_PLATFORMS=cpu`, and
`devices_per_process` CPU devices (`--xla_force_host_platform_device_count`). P is a free port
unless given. Each output line is printed prefixed with `[i]`. When a process fails the others
are stopped (they would wait for it at the next collective) and the launcher exits with the
first failure's status; it exits 0 when every process does.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import IO, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  """A TCP port that is free now on localhost."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def process_env(base: dict[str, str], port: int, num_processes: int, process_id: int,
                devices_per_process: int) -> dict[str, str]:
  """The environment of process `process_id`: `base` plus the jax.distributed variables and
  `devices_per_process` CPU devices."""
  flags = [f for f in base.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  flags.append(f"--xla_force_host_platform_device_count={devices_per_process}")
  return {**base, "T5G_COORDINATOR_ADDRESS": f"localhost:{port}",
          "T5G_NUM_PROCESSES": str(num_processes), "T5G_PROCESS_ID": str(process_id),
          "JAX_PLATFORMS": "cpu", "XLA_FLAGS": " ".join(flags),
          "PYTHONPATH": os.pathsep.join(p for p in (ROOT, base.get("PYTHONPATH")) if p)}


def _forward(stream: IO[str], prefix: str, out: IO[str], lock: threading.Lock) -> None:
  """Copies `stream` to `out` line by line, each line prefixed."""
  for line in stream:
    with lock:
      out.write(f"{prefix}{line}")
      out.flush()


def launch(command: Sequence[str], num_processes: int, devices_per_process: int = 1,
           port: int | None = None, timeout_s: float | None = None,
           out: IO[str] = sys.stdout) -> int:
  """Runs `python -m t5g COMMAND` as `num_processes` joined processes; returns 0 when all
  succeed, else the first failure's exit status (a timeout counts as 124)."""
  if num_processes < 1 or devices_per_process < 1:
    raise ValueError(f"--num_processes={num_processes} and --devices_per_process="
                     f"{devices_per_process} must be >= 1")
  if not command:
    raise ValueError("no t5g command given after `--` (e.g. -- train --gin_file=F)")
  port = free_port() if port is None else port
  lock = threading.Lock()
  processes, threads = [], []
  for i in range(num_processes):
    process = subprocess.Popen(
        [sys.executable, "-m", "t5g", *command], cwd=os.getcwd(),
        env=process_env(dict(os.environ), port, num_processes, i, devices_per_process),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    thread = threading.Thread(target=_forward, args=(process.stdout, f"[{i}] ", out, lock))
    thread.start()
    processes.append(process)
    threads.append(thread)
  status = _wait(processes, timeout_s, out, lock)
  for thread in threads:
    thread.join()
  return status


def _wait(processes: list[subprocess.Popen], timeout_s: float | None, out: IO[str],
          lock: threading.Lock) -> int:
  """Waits for every process; on the first failure (or the timeout) stops the rest."""
  deadline = None if timeout_s is None else time.monotonic() + timeout_s
  while True:
    codes = [p.poll() for p in processes]
    failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
    timed_out = deadline is not None and time.monotonic() > deadline
    if failed or timed_out or all(c == 0 for c in codes):
      break
    time.sleep(0.1)
  for p in processes:
    if p.poll() is None:
      os.killpg(p.pid, signal.SIGTERM)
  for p in processes:
    try:
      p.wait(timeout=30)
    except subprocess.TimeoutExpired:
      os.killpg(p.pid, signal.SIGKILL)
      p.wait()
  if failed:
    i, code = failed[0]
    with lock:
      out.write(f"launch/local.py: process {i} failed with exit status {code}; stopped the "
                "others\n")
    return code
  if timed_out:
    with lock:
      out.write(f"launch/local.py: timed out after {timeout_s} s; stopped every process\n")
    return 124
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point (see the module docstring)."""
  argv = list(sys.argv[1:] if argv is None else argv)
  split = argv.index("--") if "--" in argv else len(argv)
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--num_processes", type=int, required=True)
  parser.add_argument("--devices_per_process", type=int, default=1,
                      help="CPU devices in each process")
  parser.add_argument("--port", type=int, help="the coordinator's port (default: a free one)")
  parser.add_argument("--timeout_s", type=float, help="stop every process after this long")
  args = parser.parse_args(argv[:split])
  try:
    return launch(argv[split + 1:], args.num_processes, args.devices_per_process, args.port,
                  args.timeout_s)
  except ValueError as e:
    parser.error(str(e))


if __name__ == "__main__":
  sys.exit(main())

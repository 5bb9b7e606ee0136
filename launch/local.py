"""Runs one `t5g` command as N processes on this machine, joined by jax.distributed (CPU, gloo).

    python launch/local.py --num_processes=2 [--devices_per_process=4] [--port=P] \
        -- train --gin_file=F --gin.MODEL_DIR="'/tmp/run'" [...]

Everything after `--` is the `t5g` command line, the same for every process. Process i gets
`T5G_COORDINATOR_ADDRESS=localhost:P`, `T5G_NUM_PROCESSES=N` and `T5G_PROCESS_ID=i` in its
environment (which `t5g train` reads, t5g/runtime/distributed.py), `JAX_PLATFORMS=cpu`, and
`devices_per_process` CPU devices (`--xla_force_host_platform_device_count`). P is a free port
unless given. Each output line is printed prefixed with `[i]`. It exits 0 when every process
does. When a process fails (a non-zero exit status, or a signal such as SIGKILL) the others are
stopped, since they would wait for it at their next collective: SIGTERM, then SIGKILL after
`--grace_s` seconds (a process blocked in a gloo collective does not act on SIGTERM). The
launcher then prints which process failed first and how (`process 1 failed with signal 9
(SIGKILL) (the first to fail)`), what became of the others, and exits with the first failure's
status (128 + N for signal N). Rerunning the same `train` command resumes from the newest
saved step.
"""

from __future__ import annotations

import argparse
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import IO, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRACE_S = 10.0  # Default of --grace_s.


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
           out: IO[str] = sys.stdout, grace_s: float = GRACE_S) -> int:
  """Runs `python -m t5g COMMAND` as `num_processes` joined processes; returns 0 when all
  succeed, else `exit_status` of the first process to fail (a timeout counts as 124).

  grace_s: how long the others get, once one failed, between SIGTERM and SIGKILL.
  """
  if num_processes < 1 or devices_per_process < 1:
    raise ValueError(f"--num_processes={num_processes} and --devices_per_process="
                     f"{devices_per_process} must be >= 1")
  if not command:
    raise ValueError("no t5g command given after `--` (e.g. -- train --gin_file=F)")
  port = free_port() if port is None else port
  lock = threading.Lock()
  exits: queue.Queue[int] = queue.Queue()  # Process indices, in the order they exited.
  processes, threads = [], []
  for i in range(num_processes):
    process = subprocess.Popen(
        [sys.executable, "-m", "t5g", *command], cwd=os.getcwd(),
        env=process_env(dict(os.environ), port, num_processes, i, devices_per_process),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    threads.append(threading.Thread(target=_forward, args=(process.stdout, f"[{i}] ", out, lock)))
    threads.append(threading.Thread(target=_report_exit, args=(process, i, exits), daemon=True))
    processes.append(process)
  with lock:
    out.write("".join(f"launch/local.py: process {i} is pid {p.pid}\n"
                      for i, p in enumerate(processes)))
    out.flush()
  for thread in threads:
    thread.start()
  status = _wait(processes, exits, timeout_s, grace_s, out, lock)
  for thread in threads:
    thread.join()
  return status


def _report_exit(process: subprocess.Popen, index: int, exits: queue.Queue) -> None:
  """Puts `index` on `exits` as soon as `process` ends."""
  process.wait()
  exits.put(index)


def describe(returncode: int) -> str:
  """How a process ended, from its Popen return code: 'exit status 2' or 'signal 9 (SIGKILL)'."""
  if returncode < 0:
    return f"signal {-returncode} ({signal.Signals(-returncode).name})"
  return f"exit status {returncode}"


def exit_status(returncode: int) -> int:
  """The launcher's exit status for a process that ended with `returncode`: the same status,
  or 128 + N for signal N (as a shell reports it)."""
  return 128 - returncode if returncode < 0 else returncode


def _stop(processes: list[subprocess.Popen], running: list[int], grace_s: float) -> None:
  """SIGTERM to the processes `running`, SIGKILL to those still running `grace_s` later (one
  blocked in a collective with a dead peer never returns to Python to act on SIGTERM)."""
  for i in running:
    _signal_group(processes[i], signal.SIGTERM)
  deadline = time.monotonic() + grace_s
  for i in running:
    try:
      processes[i].wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      _signal_group(processes[i], signal.SIGKILL)
      processes[i].wait()


def _signal_group(process: subprocess.Popen, sig: signal.Signals) -> None:
  """Sends `sig` to the process group of `process` (its own session), if it still exists."""
  try:
    os.killpg(process.pid, sig)
  except ProcessLookupError:  # It ended and was reaped since.
    pass


def _wait(processes: list[subprocess.Popen], exits: queue.Queue, timeout_s: float | None,
          grace_s: float, out: IO[str], lock: threading.Lock) -> int:
  """Waits for every process; on the first failure (or the timeout) stops the rest and says
  what happened to each."""
  deadline = None if timeout_s is None else time.monotonic() + timeout_s
  failed, ended = None, []
  while len(ended) < len(processes):
    try:
      index = exits.get(timeout=None if deadline is None
                        else max(0.0, deadline - time.monotonic()))
    except queue.Empty:
      break
    ended.append(index)
    if processes[index].returncode != 0:
      failed = index
      break
  else:
    return 0
  while not exits.empty():  # Those that ended on their own meanwhile.
    ended.append(exits.get())
  stopped = [i for i in range(len(processes)) if i not in ended]
  _stop(processes, stopped, grace_s)
  lines = []
  if failed is None:
    lines.append(f"timed out after {timeout_s} s")
  else:
    lines.append(f"process {failed} failed with {describe(processes[failed].returncode)} (the "
                 "first to fail)")
  for i, p in enumerate(processes):
    if i != failed:
      how = "stopped by the launcher" if i in stopped else "ended"
      lines.append(f"process {i} {how}: {describe(p.returncode)}")
  with lock:
    out.write("".join(f"launch/local.py: {line}\n" for line in lines))
    out.flush()
  return 124 if failed is None else exit_status(processes[failed].returncode)


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
  parser.add_argument("--grace_s", type=float, default=GRACE_S,
                      help="once a process failed, the others' time between SIGTERM and SIGKILL")
  args = parser.parse_args(argv[:split])
  try:
    return launch(argv[split + 1:], args.num_processes, args.devices_per_process, args.port,
                  args.timeout_s, grace_s=args.grace_s)
  except ValueError as e:
    parser.error(str(e))


if __name__ == "__main__":
  sys.exit(main())

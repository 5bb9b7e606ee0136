"""Runs one `t5g` command on every worker of a Cloud TPU VM slice (or of several slices).

    python launch/tpu_pod.py --tpu=NAME --zone=ZONE [--project=P] \
        [--repo=GIT_URL --ref=REF | --no_install] [--env=KEY=VALUE ...] [--dry_run] \
        -- train --gin_file=experiments/t5gemma_2b_2b_ul2.gin --gin.MODEL_DIR="'gs://b/run'" ...

Two steps, each one `gcloud ... ssh --worker=all --command=...` so every worker runs it at once:

1. install (unless --no_install): clone or update the repository (`--repo`, `--ref`) into
   `--workdir` (relative to the home directory), make `WORKDIR/.venv` and `pip install -e .`
   with `jax[tpu]==<this jax's version>` (which pins the matching libtpu).
2. run: `cd WORKDIR`, export the `--env` variables, then `.venv/bin/t5g COMMAND`; for `train`
   and `eval` `--distributed` is added, so that jax.distributed finds the workers itself from the TPU
   metadata (t5g/runtime/distributed.py).

Slices. One `--tpu`: a single slice. Multi-slice (the mesh's `dcn_*` sizes), two ways:
- `--queued_resource=QR`: slices made together by `gcloud compute tpus queued-resources create
  ... --node-count=N`; `gcloud compute tpus queued-resources ssh QR --node=all --worker=all`
  reaches them all, and the TPU service sets the MEGASCALE_* variables itself.
- several `--tpu` (slices made one by one) and `--coordinator_ip`, the internal IP of worker 0 of
  the first slice (`gcloud compute tpus tpu-vm describe NAME --zone=Z
  --format='value(networkEndpoints[0].ipAddress)'`): slice i runs with
  MEGASCALE_COORDINATOR_ADDRESS=IP:PORT, MEGASCALE_NUM_SLICES, MEGASCALE_SLICE_ID=i and
  MEGASCALE_PORT, its ssh started alongside the others'.

`--dry_run` prints every command, one per line, exactly as it would run them, and runs none.
Otherwise the launcher exits with the first failing command's status (0 when all succeed).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import shlex
import subprocess
import sys
from typing import Sequence

MEGASCALE_PORT = 8080
JOINED_COMMANDS = ("train", "eval")  # t5g commands that join the workers (jax.distributed)


def _gcloud_target(args: argparse.Namespace, tpu: str | None) -> list[str]:
  """`gcloud ... ssh TARGET` with the location flags, without --command."""
  location = [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])
  if tpu is None:
    return ["gcloud", "compute", "tpus", "queued-resources", "ssh", args.queued_resource,
            *location, "--node=all", "--worker=all"]
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", tpu, *location, "--worker=all"]


def install_script(repo: str, ref: str, workdir: str, jax_version: str) -> str:
  """The shell run on every worker to install t5g (idempotent: a second run updates)."""
  w, r = shlex.quote(workdir), shlex.quote(ref)
  return " && ".join([
      "set -e",
      f"if [ ! -d {w}/.git ]; then git clone --quiet {shlex.quote(repo)} {w}; fi",
      f"cd {w}",
      f"git fetch --quiet origin {r}",
      "git checkout --quiet --detach FETCH_HEAD",
      "python3 -m venv .venv",
      ".venv/bin/pip install --quiet --upgrade pip",
      f".venv/bin/pip install --quiet -e . {shlex.quote(f'jax[tpu]=={jax_version}')}",
  ])


def run_script(command: Sequence[str], workdir: str, env: Sequence[str]) -> str:
  """The shell run on every worker to run `t5g COMMAND` with `env` (KEY=VALUE) exported."""
  command = list(command)
  if command[:1] and command[0] in JOINED_COMMANDS and "--distributed" not in command:
    command.append("--distributed")
  exports = [f"export {shlex.quote(item)}" for item in env]
  return " && ".join([f"cd {shlex.quote(workdir)}", *exports,
                      shlex.join([".venv/bin/t5g", *command])])


def commands(args: argparse.Namespace, command: Sequence[str]) -> list[list[list[str]]]:
  """The launcher's commands as steps; the commands of one step run at the same time."""
  targets = [None] if args.queued_resource else args.tpu
  steps = []
  if not args.no_install:
    script = install_script(args.repo, args.ref, args.workdir, args.jax_version)
    steps.append([[*_gcloud_target(args, t), f"--command={script}"] for t in targets])
  run = []
  for i, tpu in enumerate(targets):
    env = list(args.env)
    if len(targets) > 1:
      env += [f"MEGASCALE_COORDINATOR_ADDRESS={args.coordinator_ip}:{MEGASCALE_PORT}",
              f"MEGASCALE_NUM_SLICES={len(targets)}", f"MEGASCALE_SLICE_ID={i}",
              f"MEGASCALE_PORT={MEGASCALE_PORT}"]
    run.append([*_gcloud_target(args, tpu),
                f"--command={run_script(command, args.workdir, env)}"])
  steps.append(run)
  return steps


def _execute(steps: list[list[list[str]]]) -> int:
  """Runs each step's commands together; stops at the first step with a failure."""
  for step in steps:
    processes = [subprocess.Popen(c) for c in step]
    codes = [p.wait() for p in processes]
    failed = [c for c in codes if c]
    if failed:
      print(f"launch/tpu_pod.py: {len(failed)} of {len(step)} command(s) failed",
            file=sys.stderr)
      return failed[0]
  return 0


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
  """(launcher flags, the t5g command after `--`); a ValueError names a bad combination."""
  argv = list(argv)
  split = argv.index("--") if "--" in argv else len(argv)
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tpu", action="append", default=[],
                      help="TPU VM name; several for multi-slice with --coordinator_ip")
  parser.add_argument("--queued_resource", help="a queued resource's slices (multi-slice)")
  parser.add_argument("--zone", required=True)
  parser.add_argument("--project")
  parser.add_argument("--coordinator_ip",
                      help="internal IP of worker 0 of the first --tpu (several --tpu)")
  parser.add_argument("--repo", help="git URL of t5g to install on the workers")
  parser.add_argument("--ref", default="main", help="branch, tag or commit of --repo")
  parser.add_argument("--workdir", default="t5g", help="checkout on the workers (from home)")
  parser.add_argument("--jax_version", default=importlib.metadata.version("jax"),
                      help="jax[tpu]==VERSION on the workers (default: this jax)")
  parser.add_argument("--env", action="append", default=[], help="KEY=VALUE, exported")
  parser.add_argument("--no_install", action="store_true", help="skip the install step")
  parser.add_argument("--dry_run", action="store_true", help="print the commands only")
  args = parser.parse_args(argv[:split])
  command = argv[split + 1:]
  if not command:
    raise ValueError("no t5g command after `--` (e.g. -- train --gin_file=F)")
  if bool(args.tpu) == bool(args.queued_resource):
    raise ValueError("give --tpu (one or more) or --queued_resource, not both or neither")
  if len(args.tpu) > 1 and not args.coordinator_ip:
    raise ValueError(f"{len(args.tpu)} --tpu slices need --coordinator_ip (worker 0 of "
                     f"--tpu={args.tpu[0]})")
  if args.coordinator_ip and len(args.tpu) < 2:
    raise ValueError("--coordinator_ip is for several --tpu slices")
  if not args.no_install and not args.repo:
    raise ValueError("the install step needs --repo (or --no_install)")
  for item in args.env:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", item):
      raise ValueError(f"--env={item!r}: expected KEY=VALUE")
  return args, command


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point (see the module docstring)."""
  try:
    args, command = parse_args(sys.argv[1:] if argv is None else argv)
  except ValueError as e:
    print(f"launch/tpu_pod.py: error: {e}", file=sys.stderr)
    return 2
  steps = commands(args, command)
  if args.dry_run:
    for step in steps:
      for c in step:
        print(shlex.join(c))
    return 0
  return _execute(steps)


if __name__ == "__main__":
  sys.exit(main())

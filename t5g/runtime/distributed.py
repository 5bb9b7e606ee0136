"""Joining several processes into one JAX runtime (`jax.distributed`), on TPU, GPU or CPU.

`detect` decides, from the command-line flags and an environment mapping, how this process
joins (and says why); `initialize` does it. In order:

1. `--coordinator_address --num_processes --process_id`: explicit (all three or none).
2. `--distributed`: `jax.distributed.initialize()` detects everything itself (TPU pods, from the
   TPU metadata, multi-slice included through the MEGASCALE_* variables; Slurm; Open MPI).
3. `T5G_COORDINATOR_ADDRESS`, `T5G_NUM_PROCESSES`, `T5G_PROCESS_ID`: set by `launch/local.py`
   (all three or none).
4. A Slurm step with several tasks (`srun`, `launch/slurm_gpu.sbatch`): the coordinator is the
   step's first node, at port `T5G_COORDINATOR_PORT` or one derived from the job id (as JAX
   does); one process per task (`SLURM_STEP_NUM_TASKS`, `SLURM_PROCID`). A task that sees
   several GPUs uses GPU number `SLURM_LOCALID` of them.
5. A multi-host TPU slice on GKE (`TPU_PROCESS_ADDRESSES` or `TPU_WORKER_HOSTNAMES` naming
   several hosts, as GKE's TPU webhook sets them) or several slices (`MEGASCALE_COORDINATOR_ADDRESS`):
   `jax.distributed.initialize()` detects the rest, as with `--distributed`. A TPU VM slice
   created with `gcloud` carries its workers in the GCE metadata, not the environment: there
   `launch/tpu_pod.py` passes `--distributed`.
6. Otherwise a single process: nothing to initialise.

Inconsistent settings (some of a group, two explicit sources, an id out of range) are a
ValueError naming them. CPU processes exchange data through gloo collectives.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
from typing import Mapping, Sequence

from t5g.errors import InputError

ENV_COORDINATOR = "T5G_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "T5G_NUM_PROCESSES"
ENV_PROCESS_ID = "T5G_PROCESS_ID"
ENV_PORT = "T5G_COORDINATOR_PORT"
LAUNCHER_VARIABLES = (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)
TPU_HOST_LIST_VARIABLES = ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES")
SLURM_STEP_VARIABLES = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_STEP_NUM_TASKS",
                        "SLURM_PROCID", "SLURM_LOCALID")


@dataclasses.dataclass(frozen=True)
class Plan:
  """How this process joins: mode 'single' (alone), 'explicit' (the fields below) or 'auto'
  (`jax.distributed.initialize()` detects them); `reason` says where it came from."""

  mode: str
  reason: str
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None


def _int(value: str, name: str) -> int:
  try:
    return int(value)
  except ValueError:
    raise InputError(f"{name}={value!r}: expected an integer") from None


def _checked(plan: Plan) -> Plan:
  """`plan` after checking its process count, id and coordinator address."""
  if plan.mode != "explicit":
    return plan
  if plan.num_processes < 1:
    raise InputError(f"{plan.reason}: num_processes={plan.num_processes} must be >= 1")
  if not 0 <= plan.process_id < plan.num_processes:
    raise InputError(f"{plan.reason}: process_id={plan.process_id} is not in "
                     f"[0, {plan.num_processes})")
  if not re.fullmatch(r"[^\s:]+:\d+|\[[0-9a-fA-F:]+\]:\d+", plan.coordinator_address):
    raise InputError(f"{plan.reason}: coordinator address {plan.coordinator_address!r} is "
                     "not HOST:PORT")
  return plan


def first_slurm_host(node_list: str) -> str:
  """The first host of a Slurm node list: 'a[003-005,9],b' -> 'a003'."""
  match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", node_list.strip())
  if match is None:
    raise InputError(f"SLURM_STEP_NODELIST={node_list!r}: not a Slurm node list")
  prefix, ranges = match.groups()
  if ranges is None:
    return prefix
  return prefix + re.split(r"[,-]", ranges)[0]


def _slurm(env: Mapping[str, str]) -> Plan | None:
  """The plan of a Slurm step with several tasks; None outside one."""
  present = [name for name in SLURM_STEP_VARIABLES if name in env]
  if "SLURM_STEP_NUM_TASKS" not in env:
    return None  # Not inside `srun`: the batch script itself or an allocation's shell.
  missing = [name for name in SLURM_STEP_VARIABLES if name not in env]
  if missing:
    raise InputError(f"a Slurm step sets {', '.join(present)} but not {', '.join(missing)}")
  num_processes = _int(env["SLURM_STEP_NUM_TASKS"], "SLURM_STEP_NUM_TASKS")
  if num_processes == 1:
    return None
  port = (_int(env[ENV_PORT], ENV_PORT) if ENV_PORT in env
          else _int(env["SLURM_JOB_ID"], "SLURM_JOB_ID") % 4096 + 61440)
  visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
  local = (None if len(visible) == 1
           else (_int(env["SLURM_LOCALID"], "SLURM_LOCALID"),))
  return Plan("explicit", f"Slurm step of job {env['SLURM_JOB_ID']}",
              f"{first_slurm_host(env['SLURM_STEP_NODELIST'])}:{port}", num_processes,
              _int(env["SLURM_PROCID"], "SLURM_PROCID"), local)


def _tpu_cluster(env: Mapping[str, str]) -> Plan | None:
  """The plan of a GKE multi-host TPU slice or a multi-slice run; None otherwise."""
  if "MEGASCALE_COORDINATOR_ADDRESS" in env:
    return Plan("auto", "MEGASCALE_COORDINATOR_ADDRESS: a multi-slice TPU run")
  for name in TPU_HOST_LIST_VARIABLES:
    hosts = [host for host in env.get(name, "").split(",") if host.strip()]
    if len(hosts) > 1:
      return Plan("auto", f"{name} names {len(hosts)} TPU hosts")
  return None


def detect(env: Mapping[str, str], coordinator_address: str | None = None,
           num_processes: int | None = None, process_id: int | None = None,
           auto: bool = False) -> Plan:
  """How this process joins, from the flags and `env` (see the module docstring)."""
  flags = {"--coordinator_address": coordinator_address, "--num_processes": num_processes,
           "--process_id": process_id}
  given = [name for name, value in flags.items() if value is not None]
  launcher = [name for name in LAUNCHER_VARIABLES if name in env]
  if given and len(given) < 3:
    missing = [name for name in flags if name not in given]
    raise InputError(f"{', '.join(given)} given without {', '.join(missing)}: the three go "
                     "together (or use --distributed)")
  if given and auto:
    raise InputError("--distributed detects the processes itself: drop --coordinator_address, "
                     "--num_processes and --process_id, or --distributed")
  if (given or auto) and launcher:
    raise InputError(f"{', '.join(launcher)} (set by launch/local.py) conflict with "
                     f"{'the explicit flags' if given else '--distributed'}")
  if given:
    return _checked(Plan("explicit", "the command-line flags", coordinator_address,
                         num_processes, process_id))
  if auto:
    return Plan("auto", "--distributed: jax.distributed.initialize() detects the cluster")
  if launcher:
    if len(launcher) < 3:
      missing = [name for name in LAUNCHER_VARIABLES if name not in env]
      raise InputError(f"{', '.join(launcher)} set without {', '.join(missing)}")
    return _checked(Plan("explicit", "T5G_* variables (launch/local.py)", env[ENV_COORDINATOR],
                         _int(env[ENV_NUM_PROCESSES], ENV_NUM_PROCESSES),
                         _int(env[ENV_PROCESS_ID], ENV_PROCESS_ID)))
  slurm = _slurm(env)
  if slurm is not None:
    return _checked(slurm)
  tpu = _tpu_cluster(env)
  if tpu is not None:
    return tpu
  return Plan("single", "no flags, launcher variables, multi-task Slurm step or TPU host list")


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """Adds the flags `initialize_from_args` reads: --coordinator_address, --num_processes,
  --process_id (all three or none) and --distributed."""
  parser.add_argument("--coordinator_address", help="HOST:PORT of process 0's coordinator")
  parser.add_argument("--num_processes", type=int)
  parser.add_argument("--process_id", type=int)
  parser.add_argument("--distributed", action="store_true",
                      help="jax.distributed.initialize() with auto-detection (TPU pods, Slurm)")


def initialize_from_args(args: argparse.Namespace) -> Plan:
  """`initialize` with the flags of `add_arguments` (and os.environ)."""
  return initialize(args.coordinator_address, args.num_processes, args.process_id,
                    auto=args.distributed)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, auto: bool = False,
               env: Mapping[str, str] | None = None) -> Plan:
  """Initialises `jax.distributed` as `detect` decides (env: default os.environ); returns the
  plan. A single process initialises nothing."""
  import jax  # Here, not at the top: `add_arguments` serves command lines that load JAX later.
  plan = detect(os.environ if env is None else env, coordinator_address, num_processes,
                process_id, auto)
  if plan.mode == "single":
    return plan
  # Used by CPU devices only (accelerator backends have their own collectives). Probing the
  # backend here would initialise it, which jax.distributed forbids before `initialize`.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if plan.mode == "auto":
    jax.distributed.initialize()
  else:
    local: Sequence[int] | None = plan.local_device_ids
    jax.distributed.initialize(plan.coordinator_address, plan.num_processes, plan.process_id,
                               local_device_ids=None if local is None else list(local))
  logging.info("jax.distributed: process %d of %d (%s)", jax.process_index(),
               jax.process_count(), plan.reason)
  return plan

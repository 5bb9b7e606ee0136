"""Cluster launchers without a cluster: the TPU pod launcher's dry run, the Slurm script's srun
line (run against a fake `srun`) and the multi-process detection from flags and environments."""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
import sys

import pytest

from t5g.runtime import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_POD = os.path.join(ROOT, "launch", "tpu_pod.py")
SBATCH = os.path.join(ROOT, "launch", "slurm_gpu.sbatch")
TRAIN = ["train", "--gin_file=experiments/t5gemma_2b_2b_ul2.gin",
         "--gin.MODEL_DIR='gs://bucket/run'"]
SLURM_STEP = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[007-008,012]",
              "SLURM_STEP_NUM_TASKS": "24", "SLURM_PROCID": "9", "SLURM_LOCALID": "1",
              "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}


def _dry_run(*flags: str, command: list[str] = TRAIN) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, TPU_POD, "--dry_run", *flags, "--", *command],
                        capture_output=True, text=True, timeout=60)


def _remote(line: str) -> str:
  """The --command=... of one printed gcloud line."""
  words = shlex.split(line)
  return next(w for w in words if w.startswith("--command="))[len("--command="):]


def test_tpu_pod_dry_run_installs_then_trains_on_all_workers():
  """One install and one train command, both on --worker=all, the same gin on every worker."""
  result = _dry_run("--tpu=pod", "--zone=us-east5-a", "--project=p",
                    "--repo=https://example.com/t5g.git", "--ref=v1", "--env=LIBTPU_INIT_ARGS=-x y")
  assert result.returncode == 0, result.stderr
  install, run = result.stdout.strip().splitlines()
  for line in (install, run):
    assert shlex.split(line)[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod"]
    assert {"--zone=us-east5-a", "--project=p", "--worker=all"} <= set(shlex.split(line))
  script = _remote(install)
  assert "git clone --quiet https://example.com/t5g.git t5g" in script
  assert "git fetch --quiet origin v1" in script
  assert f"'jax[tpu]=={__import__('jax').__version__}'" in script
  assert ".venv/bin/pip install --quiet -e ." in script
  remote = shlex.split(_remote(run).split(" && ")[-1])
  assert remote == [".venv/bin/t5g", *TRAIN, "--distributed"]
  assert "export 'LIBTPU_INIT_ARGS=-x y'" in _remote(run)


def test_tpu_pod_eval_joins_the_workers():
  """`t5g eval` runs on every worker with --distributed, as `t5g train` does."""
  command = ["eval", "--gin_file=runs/eval.gin", "--gin.MODEL_DIR='gs://bucket/run'"]
  result = _dry_run("--tpu=pod", "--zone=z", "--no_install", command=command)
  assert result.returncode == 0, result.stderr
  [run] = result.stdout.strip().splitlines()
  assert shlex.split(_remote(run).split(" && ")[-1]) == [".venv/bin/t5g", *command,
                                                          "--distributed"]


def test_tpu_pod_multislice():
  """Per-slice ssh: slice i gets the MEGASCALE_* variables; queued resources reach every node."""
  result = _dry_run("--tpu=a", "--tpu=b", "--coordinator_ip=10.0.0.2", "--zone=z",
                    "--no_install")
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 2
  for i, line in enumerate(lines):
    assert shlex.split(line)[5] == "ab"[i]
    for variable in ("MEGASCALE_COORDINATOR_ADDRESS=10.0.0.2:8080", "MEGASCALE_NUM_SLICES=2",
                     f"MEGASCALE_SLICE_ID={i}", "MEGASCALE_PORT=8080"):
      assert f"export {variable}" in _remote(line)
  queued = _dry_run("--queued_resource=qr", "--zone=z", "--no_install")
  assert queued.returncode == 0, queued.stderr
  words = shlex.split(queued.stdout)
  assert words[:6] == ["gcloud", "compute", "tpus", "queued-resources", "ssh", "qr"]
  assert {"--node=all", "--worker=all"} <= set(words)
  assert "MEGASCALE" not in queued.stdout


@pytest.mark.parametrize("flags,message", [
    (["--tpu=a", "--tpu=b", "--no_install"], "need --coordinator_ip"),
    (["--tpu=a", "--queued_resource=q", "--no_install"], "not both"),
    (["--tpu=a"], "needs --repo"),
])
def test_tpu_pod_bad_flags(flags, message):
  """Inconsistent flags end with status 2 and a message naming them."""
  result = _dry_run("--zone=z", *flags)
  assert result.returncode == 2
  assert message in result.stderr


def test_slurm_script_runs_one_srun_of_t5g_train(tmp_path):
  """The batch script starts `srun ... t5g train ARGS` with the arguments untouched."""
  srun = tmp_path / "srun"
  srun.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
  srun.chmod(srun.stat().st_mode | stat.S_IEXEC)
  env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}",
         "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "gpu[1-2]", "SLURM_NTASKS": "16"}
  result = subprocess.run(["bash", SBATCH, *TRAIN[1:]], env=env, capture_output=True, text=True,
                          timeout=60)
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines()[-1] == (
      '["--kill-on-bad-exit=1", "--label", "t5g", "train", '
      '"--gin_file=experiments/t5gemma_2b_2b_ul2.gin", "--gin.MODEL_DIR=\'gs://bucket/run\'"]')
  with open(SBATCH) as f:
    directives = [line for line in f if line.startswith("#SBATCH")]
  assert "#SBATCH --ntasks-per-node=8\n" in directives
  assert "#SBATCH --gpus-per-node=8\n" in directives


def test_detect_slurm_step():
  """A Slurm step's task: coordinator on the first node, port from the job id, its GPU."""
  plan = distributed.detect(SLURM_STEP)
  assert (plan.mode, plan.coordinator_address, plan.num_processes, plan.process_id,
          plan.local_device_ids) == ("explicit", "gpu007:61586", 24, 9, (1,))
  bound = distributed.detect({**SLURM_STEP, "CUDA_VISIBLE_DEVICES": "5",
                              "T5G_COORDINATOR_PORT": "1234"})
  assert (bound.coordinator_address, bound.local_device_ids) == ("gpu007:1234", None)
  assert distributed.first_slurm_host("node1,node2") == "node1"
  assert distributed.first_slurm_host("a[3,5-9]") == "a3"
  for single in ({**SLURM_STEP, "SLURM_STEP_NUM_TASKS": "1"},
                 {k: v for k, v in SLURM_STEP.items() if not k.startswith("SLURM_STEP")},
                 {}):
    assert distributed.detect(single).mode == "single"


def test_detect_order_and_launcher_variables():
  """Flags, then --distributed, then launch/local.py's variables, then Slurm."""
  local = {"T5G_COORDINATOR_ADDRESS": "localhost:999", "T5G_NUM_PROCESSES": "2",
           "T5G_PROCESS_ID": "1"}
  plan = distributed.detect({**SLURM_STEP, **local})
  assert (plan.coordinator_address, plan.num_processes, plan.process_id) == ("localhost:999", 2,
                                                                             1)
  flags = distributed.detect(SLURM_STEP, "h:1", 4, 3)
  assert (flags.coordinator_address, flags.num_processes, flags.process_id) == ("h:1", 4, 3)
  assert distributed.detect(SLURM_STEP, auto=True).mode == "auto"


def test_detect_tpu_hosts_from_the_environment():
  """A GKE multi-host TPU slice or a multi-slice run joins through jax's own detection."""
  gke = {"TPU_WORKER_HOSTNAMES": "w-0.svc,w-1.svc,w-2.svc,w-3.svc", "TPU_WORKER_ID": "2"}
  plan = distributed.detect(gke)
  assert (plan.mode, plan.reason) == ("auto", "TPU_WORKER_HOSTNAMES names 4 TPU hosts")
  assert distributed.detect({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2"}).mode == "auto"
  assert distributed.detect({"TPU_WORKER_HOSTNAMES": "localhost"}).mode == "single"
  local = {"T5G_COORDINATOR_ADDRESS": "localhost:999", "T5G_NUM_PROCESSES": "2",
           "T5G_PROCESS_ID": "0"}
  assert distributed.detect({**gke, **local}).mode == "explicit"


@pytest.mark.parametrize("env,kwargs,message", [
    ({}, {"coordinator_address": "h:1"}, "given without --num_processes, --process_id"),
    ({}, {"coordinator_address": "h:1", "num_processes": 2, "process_id": 0, "auto": True},
     "--distributed detects"),
    ({"T5G_NUM_PROCESSES": "2"}, {}, "set without T5G_COORDINATOR_ADDRESS"),
    ({"T5G_COORDINATOR_ADDRESS": "h:1", "T5G_NUM_PROCESSES": "2", "T5G_PROCESS_ID": "0"},
     {"auto": True}, "conflict with --distributed"),
    ({}, {"coordinator_address": "h:1", "num_processes": 2, "process_id": 2}, "not in [0, 2)"),
    ({}, {"coordinator_address": "h", "num_processes": 2, "process_id": 0}, "not HOST:PORT"),
    ({k: v for k, v in SLURM_STEP.items() if k != "SLURM_PROCID"}, {}, "but not SLURM_PROCID"),
    ({**SLURM_STEP, "SLURM_PROCID": "x"}, {}, "SLURM_PROCID='x'"),
])
def test_detect_inconsistent(env, kwargs, message):
  """Inconsistent settings are a ValueError naming them."""
  with pytest.raises(ValueError, match=__import__("re").escape(message)):
    distributed.detect(env, **kwargs)

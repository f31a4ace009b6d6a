"""The launch scripts' dry runs: what each host would run, with its environment, and nothing started."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO

LAUNCH = REPO / "launch"
ARGS = ["--gin_file=gin/train/tiny_cpu.gin", "--gin_param=train.steps='a b'"]
# How a host sees ARGS: the scripts quote them for the shell (printf %q).
QUOTED = "--gin_file=gin/train/tiny_cpu.gin --gin_param=train.steps=\\'a\\ b\\'"


def dry_run(command: list[str], **env: str) -> subprocess.CompletedProcess:
    # No gcloud, srun or kubectl on PATH: a dry run must not need (or call) them.
    full_env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"),
                "LLAMAHOME_DRY_RUN": "1", **env}
    return subprocess.run(command, env=full_env, cwd=REPO, capture_output=True, text=True,
                          timeout=60)


def test_tpu_pod_dry_run_lists_every_worker():
    result = dry_run(["bash", str(LAUNCH / "tpu_pod.sh"), *ARGS], TPU_NAME="my-v5p", ZONE="us-east5-a",
                     ACCELERATOR_TYPE="v5p-32", PROJECT="proj")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == ("dry run: gcloud compute tpus tpu-vm ssh my-v5p --zone us-east5-a "
                        "--project proj --worker=all --command <below>")
    command = f"cd ~/llamahome && source ~/llamahome/.venv/bin/activate && python -m llamahome.launch {QUOTED}"
    # v5p-32: 32 TensorCores = 16 chips = 4 hosts of 4 chips.
    assert lines[1:] == [line for i in range(4) for line in (
        f"worker {i}: env TPU_WORKER_ID={i} (from the TPU VM's metadata; process {i} of 4)",
        f"worker {i}: {command}")]
    assert len(dry_run(["bash", str(LAUNCH / "tpu_pod.sh")], TPU_NAME="t", ZONE="z",
                       ACCELERATOR_TYPE="v6e-256").stdout.splitlines()) == 1 + 2 * 32
    missing = dry_run(["bash", str(LAUNCH / "tpu_pod.sh")], TPU_NAME="t", ZONE="z")
    assert missing.returncode == 2 and "ACCELERATOR_TYPE" in missing.stderr


def test_slurm_dry_run_lists_every_task():
    result = dry_run(["bash", str(LAUNCH / "slurm.sbatch"), *ARGS], NODES="3", REPO_DIR="/repo")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == ("dry run: cd /repo && source /repo/.venv/bin/activate && srun "
                        f"--kill-on-bad-exit=1 --ntasks-per-node=1 python -m llamahome.launch {QUOTED}")
    assert lines[1:] == [line for i in range(3) for line in (
        f"task {i}: env SLURM_PROCID={i} SLURM_NODEID={i} SLURM_NTASKS=3 SLURM_LOCALID=0 (set by srun)",
        f"task {i}: python -m llamahome.launch {QUOTED}")]
    # Without NODES: the script's own #SBATCH --nodes line (2).
    assert len(dry_run(["bash", str(LAUNCH / "slurm.sbatch")]).stdout.splitlines()) == 1 + 2 * 2


def test_local_dry_run_lists_every_process():
    result = dry_run(["bash", str(LAUNCH / "local.sh"), "2", *ARGS], LLAMAHOME_PORT="4321",
                     LLAMAHOME_DEVICES_PER_PROCESS="2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [line for i in range(2) for line in (
        f"process {i}: env LLAMAHOME_COORDINATOR=127.0.0.1:4321 LLAMAHOME_NUM_PROCESSES=2 "
        f"LLAMAHOME_PROCESS_ID={i} LLAMAHOME_LOCAL_DEVICE_IDS={2 * i},{2 * i + 1}",
        f"process {i}: python -m llamahome.launch {QUOTED}")]


def test_k8s_dry_run_lists_every_pod_and_checks_the_counts(tmp_path):
    script = LAUNCH / "k8s_dry_run.py"
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"dry run: kubectl apply -f {LAUNCH / 'k8s_jobset.yaml'}"
    assert lines[1:] == [line for i in range(2) for line in (
        f"pod {i}: env LLAMAHOME_COORDINATOR=llamahome-0.llamahome:1234 "
        f"LLAMAHOME_NUM_PROCESSES=2 JOB_COMPLETION_INDEX={i}",
        f"pod {i}: LLAMAHOME_PROCESS_ID={i} exec python -m llamahome.launch "
        "--gin_file=gin/train/tiny_cpu.gin --gin_param=\"launch.run_dir='/shared/runs/llamahome'\"")]
    # A manifest whose host counts disagree is refused with one line.
    bad = tmp_path / "bad.yaml"
    bad.write_text((LAUNCH / "k8s_jobset.yaml").read_text().replace("completions: 2", "completions: 3"))
    result = subprocess.run([sys.executable, str(script), str(bad)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"error: {bad}: parallelism 2 != completions 3; LLAMAHOME_NUM_PROCESSES 2 != completions 3"]

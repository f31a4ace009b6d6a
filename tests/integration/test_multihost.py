"""Two JAX processes on 127.0.0.1 (gloo collectives, 4 fake CPU devices each, FSDP over the 8)
train the tiny model. The reference is always one process with 8 devices reading the same two
data shards (`train.data_shards=2`): the pair's losses equal it, a checkpoint written by the pair
continues in one process, a killed peer stops the survivor within a bound, and the restarted
pair resumes from the last checkpoint."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, tiny_train_params, write_word_corpus

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STEPS = 10
HEARTBEAT_S, WATCHDOG_S, DEATH_BOUND_S = 10, 30, 60


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost")
    write_word_corpus(root / "txt")
    return root


def flags(workdir: Path, run_dir: Path) -> list[str]:
    gin_params = [*tiny_train_params(workdir / "txt", workdir / "cache", run_dir),
                  f"train.steps={STEPS}", "train.data_shards=2",
                  # Validation shards of 4 and 3 batches: the process with fewer pads the 4th eval step.
                  "data_pipeline.validation_fraction=0.1", "train.eval_every=5", "train.eval_batches=None",
                  "CheckpointConfig.save_steps=5",
                  f"initialize.heartbeat_timeout_seconds={HEARTBEAT_S}", f"Watchdog.timeout_s={WATCHDOG_S}"]
    return ["--gin_file=gin/train/tiny_cpu.gin", *[f"--gin_param={p}" for p in gin_params]]


def env(devices: int, **extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", **extra}


def run_one_process(workdir: Path, run_dir: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "llamahome.launch", *flags(workdir, run_dir)],
                            env=env(8), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def run_two_processes(workdir: Path, run_dir: Path) -> subprocess.CompletedProcess:
    """launch/local.sh 2 ...: both processes of the same command, on loopback."""
    result = subprocess.run(["bash", "launch/local.sh", "2", *flags(workdir, run_dir)],
                            env=env(4, PYTHON=sys.executable), cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def records(run_dir: Path, split: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def losses(run_dir: Path, split: str = "train") -> dict[int, float]:
    """step -> loss of the last record of each step (a restart rewrites steps)."""
    return {r["step"]: r["loss"] for r in records(run_dir, split)}


def assert_losses_equal(run_dir: Path, reference: Path, steps: range) -> None:
    for split in ("train", "eval"):
        got, want = losses(run_dir, split), losses(reference, split)
        keys = [s for s in steps if s in want]
        np.testing.assert_allclose([got[s] for s in keys], [want[s] for s in keys], atol=1e-5,
                                   err_msg=f"{split} losses at steps {keys}")


@pytest.fixture(scope="module")
def reference(workdir):
    run_dir = workdir / "one_process"
    run_one_process(workdir, run_dir)
    assert sorted(losses(run_dir)) == list(range(1, STEPS + 1))
    assert sorted(losses(run_dir, "eval")) == [5, 10]
    return run_dir


@pytest.fixture(scope="module")
def two_process_run(workdir, reference):
    run_dir = workdir / "two_processes"
    run_two_processes(workdir, run_dir)
    return run_dir


def test_two_processes_train_like_one(two_process_run, reference):
    assert_losses_equal(two_process_run, reference, range(1, STEPS + 1))
    # Only process 0 writes metrics, status and configs: one record per step, not two.
    assert [r["step"] for r in records(two_process_run, "train")] == list(range(1, STEPS + 1))
    assert json.loads((two_process_run / "status.json").read_text())["status"] == "finished"
    assert (two_process_run / "config.gin").is_file() and (two_process_run / "operative_config.gin").is_file()
    # Both processes wrote their data shard's iterator state into the same checkpoint.
    data_iter = two_process_run / "checkpoints" / "5" / "data_iter"
    assert {"shard_0-of-2.json", "shard_1-of-2.json"} <= {p.name for p in data_iter.iterdir()}


def test_checkpoint_of_two_processes_continues_in_one(workdir, two_process_run, reference):
    run_dir = workdir / "continued_in_one"
    shutil.copytree(two_process_run / "checkpoints" / "5", run_dir / "checkpoints" / "5")
    run_one_process(workdir, run_dir)
    assert sorted(losses(run_dir)) == list(range(6, STEPS + 1))
    assert_losses_equal(run_dir, reference, range(6, STEPS + 1))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_killed_peer_stops_the_survivor_and_the_restarted_pair_resumes(workdir, reference):
    run_dir = workdir / "killed_peer"
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "llamahome.launch", *flags(workdir, run_dir)],
                              env=env(4, LLAMAHOME_COORDINATOR=f"127.0.0.1:{port}",
                                      LLAMAHOME_NUM_PROCESSES="2", LLAMAHOME_PROCESS_ID=str(i)),
                              cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    try:
        deadline = time.time() + 240
        while not (run_dir / "checkpoints" / "5").is_dir():
            assert all(p.poll() is None for p in procs), procs[0].stderr.read()[-3000:]
            assert time.time() < deadline, "no checkpoint at step 5"
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGKILL)
        killed_at = time.time()
        _, stderr = procs[0].communicate(timeout=DEATH_BOUND_S + 30)
        took = time.time() - killed_at
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert procs[0].returncode != 0
    assert took < DEATH_BOUND_S, f"the survivor took {took:.0f} s to stop"
    assert "another task died" in stderr or "a peer process has probably died" in stderr, stderr[-3000:]
    written = len(records(run_dir, "train"))
    run_two_processes(workdir, run_dir)
    assert records(run_dir, "train")[written]["step"] == 6  # resumed from the checkpoint at step 5
    assert_losses_equal(run_dir, reference, range(1, STEPS + 1))

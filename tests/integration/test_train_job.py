"""The `train` job end to end in subprocesses: exact resume after SIGKILL (also mid-checkpoint-
write), SIGTERM saves and exits 0, and what is kept on disk. The reference is always an
uninterrupted run of the same command."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, tiny_train_command, write_word_corpus

pytestmark = [pytest.mark.integration, pytest.mark.slow]



@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_job")
    write_word_corpus(root / "txt")
    return root


def command(workdir: Path, run_dir: Path, *params: str) -> list[str]:
    return tiny_train_command(workdir, run_dir, "train.steps=20", *params)


ENV = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
       "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def wait_for(predicate, proc: subprocess.Popen, poll_s: float = 0.01, timeout_s: float = 240) -> None:
    deadline = time.time() + timeout_s
    while not predicate():
        assert proc.poll() is None, f"exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}"
        assert time.time() < deadline, "timed out"
        time.sleep(poll_s)


def train_losses(run_dir: Path) -> dict[int, float]:
    """step -> loss of the last record of each step in metrics.jsonl (a restart rewrites steps)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


def steps_on_disk(run_dir: Path) -> list[int]:
    ckpts = run_dir / "checkpoints"
    return sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) if ckpts.exists() else []


def sigkill_at_step_then_rerun(cmd: list[str], run_dir: Path, step: int, rerun) -> dict[int, float]:
    """Starts `cmd`, SIGKILLs it once checkpoint `step` is on disk, runs it again with `rerun`;
    the losses of the run dir after the restart."""
    proc = start(cmd)
    wait_for(lambda: (run_dir / "checkpoints" / str(step)).is_dir(), proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert max(steps_on_disk(run_dir)) == step
    rerun(cmd)
    return train_losses(run_dir)


def partial_writes(run_dir: Path) -> list[str]:
    ckpts = run_dir / "checkpoints"
    return [p.name for p in ckpts.iterdir() if "tmp" in p.name] if ckpts.exists() else []


@pytest.fixture(scope="module")
def straight(workdir):
    run_dir = workdir / "straight"
    run(command(workdir, run_dir))
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, 21))
    return losses


def test_sigkill_then_restart_gives_bit_identical_losses(workdir, straight):
    run_dir = workdir / "killed"
    resumed = sigkill_at_step_then_rerun(command(workdir, run_dir), run_dir, 10, run)
    assert [resumed[s] for s in range(11, 21)] == [straight[s] for s in range(11, 21)]  # bit for bit
    assert json.loads((run_dir / "status.json").read_text())["status"] == "finished"


def test_sigkill_during_checkpoint_write_resumes_from_last_complete(workdir, straight):
    run_dir = workdir / "killed_mid_write"
    cmd = command(workdir, run_dir, "CheckpointConfig.save_steps=1", "CheckpointConfig.keep_last_n=20")
    proc = start(cmd)
    wait_for(lambda: len(steps_on_disk(run_dir)) >= 5 and partial_writes(run_dir), proc, poll_s=0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left_behind = partial_writes(run_dir)
    complete = steps_on_disk(run_dir)
    assert left_behind, "the kill did not land during a write"
    assert all(int(name.split(".")[0]) not in complete for name in left_behind)
    run(cmd)
    resumed = train_losses(run_dir)
    assert [resumed[s] for s in range(max(complete) + 1, 21)] == \
        [straight[s] for s in range(max(complete) + 1, 21)]
    assert not partial_writes(run_dir)


def test_sigterm_saves_exits_zero_and_restart_continues(workdir, straight):
    run_dir = workdir / "preempted"
    cmd = command(workdir, run_dir, "CheckpointConfig.save_steps=5", "train.eval_every=5")
    proc = start(cmd)
    wait_for(lambda: (run_dir / "metrics.jsonl").exists() and 7 in train_losses(run_dir), proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "preempted"
    assert max(steps_on_disk(run_dir)) == status["step"] > 5  # saved where it stopped
    run(cmd)
    resumed = train_losses(run_dir)
    assert [resumed[s] for s in range(1, 21)] == [straight[s] for s in range(1, 21)]
    # Retention: the last 2 steps (tiny_cpu.gin) plus the step with the lowest eval loss.
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["loss"] for r in records if r["split"] == "eval"}
    best = min(evals, key=evals.get)
    assert steps_on_disk(run_dir) == sorted({15, 20, best})

"""Checkpoint faults end to end, in subprocesses of the `train` job: garbled and truncated step
files are named and skipped for the newest step that verifies (whose resumed losses equal the
uninterrupted run's), no good step left exits 2 in one line, a failed background save (ENOSPC)
stops the run at the next step, a changed config needs an explicit yes, and the checkpoint's copy
of the config is redacted. One uninterrupted run is the reference; each test works on a copy."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO, tiny_train_command, write_word_corpus

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SECRET = "sk-live-0123456789abcdef"
MANIFEST = "llamahome_manifest.json"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoint_faults")
    write_word_corpus(root / "txt")
    return root


def command(workdir: Path, run_dir: Path, *params: str) -> list[str]:
    return tiny_train_command(workdir, run_dir, "train.steps=20", "train.eval_every=0",
                              "CheckpointConfig.save_steps=5", "CheckpointConfig.keep_last_n=4",
                              f"WANDB_API_KEY='{SECRET}'", *params)


def run(cmd: list[str], **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
                "XLA_FLAGS": "--xla_force_host_platform_device_count=2", **env}
    return subprocess.run(cmd, env=full_env, cwd=REPO, capture_output=True, text=True, timeout=300)


def train_losses(run_dir: Path) -> dict[int, float]:
    """step -> loss of the last record of each step in metrics.jsonl (a restart rewrites steps)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


def steps_on_disk(run_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


def warnings(result: subprocess.CompletedProcess, text: str) -> list[str]:
    return [line for line in result.stderr.splitlines() if text in line]


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one line the CLI printed for a UserError (no traceback anywhere)."""
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def straight(workdir):
    """The uninterrupted reference run: steps 5, 10, 15, 20 on disk, each sealed."""
    run_dir = workdir / "straight"
    result = run(command(workdir, run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    assert steps_on_disk(run_dir) == [5, 10, 15, 20]
    assert all((run_dir / "checkpoints" / str(s) / MANIFEST).exists() for s in [5, 10, 15, 20])
    return run_dir


def copy_of(straight: Path, name: str) -> Path:
    run_dir = straight.parent / name
    shutil.copytree(straight, run_dir)
    return run_dir


def largest_array_file(step_dir: Path) -> Path:
    return max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def assert_falls_back_to_15(workdir: Path, straight: Path, run_dir: Path, damaged: Path, problem: str):
    result = run(command(workdir, run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    named = warnings(result, "checkpoint step 20 is not usable")
    assert len(named) == 1 and damaged.relative_to(run_dir / "checkpoints" / "20").as_posix() in named[0] \
        and problem in named[0], result.stderr[-3000:]
    assert len(warnings(result, "falling back to checkpoint step 15")) == 1
    want, got = train_losses(straight), train_losses(run_dir)
    assert [got[s] for s in range(16, 21)] == [want[s] for s in range(16, 21)]  # bit for bit
    assert (run_dir / "checkpoints" / "rejected" / "20").is_dir()  # set aside, not deleted
    assert steps_on_disk(run_dir) == [5, 10, 15, 20]


def test_garbled_array_data_falls_back_to_the_previous_step(workdir, straight):
    run_dir = copy_of(straight, "garbled")
    damaged = largest_array_file(run_dir / "checkpoints" / "20")
    size = damaged.stat().st_size
    assert size > 8192
    with damaged.open("r+b") as f:
        f.seek(size // 2 - 2048)
        f.write(os.urandom(4096))
    assert_falls_back_to_15(workdir, straight, run_dir, damaged, "garbled")


def test_truncated_file_falls_back_to_the_previous_step(workdir, straight):
    run_dir = copy_of(straight, "truncated")
    damaged = largest_array_file(run_dir / "checkpoints" / "20")
    os.truncate(damaged, damaged.stat().st_size // 2)
    assert_falls_back_to_15(workdir, straight, run_dir, damaged, "truncated")


def test_no_step_that_verifies_exits_2_in_one_line(workdir, straight):
    run_dir = copy_of(straight, "all_corrupt")
    for step in steps_on_disk(run_dir):
        (run_dir / "checkpoints" / str(step) / "data_iter" / "shard_0-of-1.json").write_text("{garbage")
    result = run(command(workdir, run_dir))
    assert result.returncode == 2
    line = error_line(result)
    assert "no checkpoint in" in line and "verifies" in line
    for step in (5, 10, 15, 20):
        assert f"step {step}: data_iter/shard_0-of-1.json" in line
    assert "model or optimizer" not in line
    assert steps_on_disk(run_dir) == [5, 10, 15, 20]  # nothing deleted or moved


FAIL_SAVE_HOOK = '''
import os
from orbax.checkpoint._src.checkpointers import async_checkpointer

_wait = async_checkpointer._background_wait_for_commit_futures


def _full_disk(directory, *args, **kwargs):  # the background write of one step fails
    if os.path.basename(str(directory)) == os.environ["FAIL_SAVE_STEP"]:
        raise OSError(28, os.strerror(28), str(directory))
    return _wait(directory, *args, **kwargs)


async_checkpointer._background_wait_for_commit_futures = _full_disk
'''


def test_failed_background_save_stops_at_the_next_step(workdir, tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FAIL_SAVE_HOOK)
    run_dir = workdir / "full_disk"
    result = run(command(workdir, run_dir, "CheckpointConfig.keep_last_n=1"),
                 PYTHONPATH=f"{hook}:{REPO}", FAIL_SAVE_STEP="10")
    assert result.returncode == 2
    line = error_line(result)
    assert "saving checkpoint step 10 failed: No space left on device" in line
    assert "the newest good checkpoint is step 5" in line
    assert max(train_losses(run_dir)) <= 11  # stopped at the step after the save, not at step 15
    assert steps_on_disk(run_dir) == [5]
    assert (run_dir / "checkpoints" / "5" / MANIFEST).exists()
    assert json.loads((run_dir / "status.json").read_text())["status"] == "failed"


def test_changed_learning_rate_needs_an_explicit_yes(workdir, straight):
    run_dir = copy_of(straight, "changed_lr")
    cmd = command(workdir, run_dir, "train.steps=22", "train.learning_rate=0.001")
    refused = run(cmd)
    assert refused.returncode == 2
    line = error_line(refused)
    assert "train.learning_rate: 0.003 -> 0.001" in line and "train.resume_with_changed_config=True" in line
    assert "train.steps" not in line and "launch.run_dir" not in line  # run-length settings may change
    accepted = run([*cmd, "--gin_param=train.resume_with_changed_config=True"])
    assert accepted.returncode == 0, accepted.stderr[-3000:]
    assert len(warnings(accepted, "resuming step 20 with a changed config: train.learning_rate")) == 1, \
        accepted.stderr[-3000:]
    assert max(train_losses(run_dir)) == 22


def test_the_checkpoints_config_copy_is_redacted(straight):
    stored = "".join(p.read_text() for p in (straight / "checkpoints" / "20" / "config").rglob("*")
                     if p.is_file())
    assert "WANDB_API_KEY" in stored and SECRET not in stored
    assert SECRET not in (straight / "config.gin").read_text()

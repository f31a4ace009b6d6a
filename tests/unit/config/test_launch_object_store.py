"""launch with a run dir on object storage (both emulators): the access check, the lock, the
staged files uploaded while the job runs and at its end (SIGTERM included), no secret written."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from llamahome import cli, store
from llamahome.files import RunDir, RunDirBusy
from llamahome.jobs import job
from llamahome.parallel import distributed
from tests.conftest import REPO

SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzSECRETkey"


@job
def probe_remote_writer(run_dir: str) -> dict:
    run = RunDir(run_dir)
    with run.metrics.open("a") as f:  # an ordinary append, as MetricsWriter does
        f.write('{"step": 1, "split": "train", "loss": 2.0}\n')
    raw, _ = store.read_versioned(f"{run_dir}/{RunDir.LOCK_FILE}")
    return {"run_dir": run_dir, "lock": raw.decode()}


@pytest.fixture
def in_process(monkeypatch):
    monkeypatch.setattr(distributed, "initialize", lambda: None)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)  # moto accepts any key


def _objects(uri: str) -> dict[str, str]:
    root = store.as_path(uri)
    return {os.path.relpath(os.fspath(p), os.fspath(root)): p.read_text()
            for p in store.files_under(uri)}


def test_launch_writes_a_remote_run_dir_through_staging_and_leaves_no_secret(bucket, in_process):
    cli.bind_all([], ["launch.job=@probe_remote_writer", f"runs_dir.path='{bucket}/runs'",
                      f"probe_remote_writer.run_dir='s3://AKIA:{SECRET}@x/y'"], None, None)
    first = cli.launch()
    second = cli.launch()  # the same second: the name is taken, so the next one is used
    assert first["run_dir"].startswith(f"{bucket}/runs/") and second["run_dir"] != first["run_dir"]
    objects = _objects(first["run_dir"])
    assert sorted(objects) == ["config.gin", "metrics.jsonl", "operative_config.gin"]  # no .lock
    assert json.loads(objects["metrics.jsonl"])["loss"] == 2.0
    assert "launch.job = @probe_remote_writer" in objects["config.gin"]
    lock = json.loads(first["lock"])
    assert lock["pid"] == os.getpid() and lock["host"] == socket.gethostname()
    for text in [*objects.values(), first["lock"]]:
        assert SECRET not in text


def test_an_unreachable_bucket_is_one_line_before_anything_is_written(bucket, in_process):
    missing = bucket + "-missing"
    cli.bind_all([], ["launch.job=@probe_remote_writer", f"launch.run_dir='{missing}/run'"],
                  None, None)
    with pytest.raises(store.StorageError, match=f"{missing}/run: the bucket does not exist"):
        cli.launch()
    assert not RunDir(f"{missing}/run").path.exists()  # not even the staging folder


def test_a_busy_remote_run_dir_is_refused_naming_the_holder(bucket, in_process):
    run_dir = f"{bucket}/run"
    holder = {"pid": 7, "host": "trainer-0", "started": "2026-12-07T10:00:00",
              "command": "launch train", "beat": time.time()}
    store.write_if(f"{run_dir}/{RunDir.LOCK_FILE}", json.dumps(holder).encode(), None)
    cli.bind_all([], ["launch.job=@probe_remote_writer", f"launch.run_dir='{run_dir}'"], None, None)
    with pytest.raises(RunDirBusy, match="pid 7 on host trainer-0"):
        cli.launch()
    assert sorted(_objects(run_dir)) == [".lock"]


JOB_THEN_SLEEP = """
import sys, time
from llamahome import cli, store
from llamahome.files import RunDir
from llamahome.jobs import job

@job
def slow_writer(run_dir, note=""):
    with RunDir(run_dir).metrics.open("a") as f:
        f.write('{"step": 1}\\n')
    lock, _ = store.read_versioned(run_dir + "/.lock")
    print(lock.decode(), flush=True)
    time.sleep(120)

sys.argv = ["launch", "--gin_param=launch.job=@slow_writer",
            "--gin_param=launch.run_dir='{run_dir}'", "--gin_param=RunDirSync.interval_s=3600",
            "--gin_param=slow_writer.note='s3://AKIA:{secret}@x/y'"]
sys.orig_argv = [sys.executable, "-m", "llamahome.launch", *sys.argv[1:]]
cli.run()
"""


@pytest.mark.integration
def test_sigterm_still_uploads_the_staged_files_and_releases_the_lock_and_no_secret_leaks(
        bucket, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    run_dir = f"{bucket}/killed"
    code = JOB_THEN_SLEEP.replace("{run_dir}", run_dir).replace("{secret}", SECRET)
    child = subprocess.Popen([sys.executable, "-c", code], cwd=REPO,
                             env={**os.environ, "PYTHONPATH": str(REPO), "XLA_FLAGS": ""},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()
        assert line.startswith("{"), child.stderr.read()
        lock = json.loads(line)  # the holder record, while the job runs
        assert lock["pid"] == child.pid and "slow_writer.note" in lock["command"]
        assert SECRET not in line
        assert not store.as_path(f"{run_dir}/metrics.jsonl").exists()  # interval: an hour
        child.send_signal(signal.SIGTERM)
        _, stderr = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 128 + signal.SIGTERM, stderr
    objects = _objects(run_dir)
    assert objects["metrics.jsonl"] == '{"step": 1}\n' and ".lock" not in objects
    assert SECRET not in stderr

"""llamahome.files on object storage: path settings as URIs, the staged run dir and its uploader,
the run lock and the locked JSON index, on both emulators (the `bucket` fixture)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

import gin
from llamahome import files, store
from llamahome.files import RunDir, RunDirBusy, RunDirSync


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _lock_record(run_dir: str) -> dict | None:
    raw, _ = store.read_versioned(f"{run_dir}/{RunDir.LOCK_FILE}")
    return None if raw is None else json.loads(raw)


def test_dir_settings_accept_uris():
    gin.bind_parameter("runs_dir.path", "gs://bucket/runs/")
    gin.bind_parameter("cache_dir.path", "s3://bucket/cache")
    gin.bind_parameter("models_dir.path", "s3://bucket/models")
    assert str(files.runs_dir()) == "gs://bucket/runs"
    assert str(files.cache_dir() / "x") == "s3://bucket/cache/x"
    assert str(files.models_dir()) == "s3://bucket/models"
    assert not store.is_remote(files.local_cache_dir())  # this machine's own files stay local


def test_remote_run_dir_stages_small_files_and_writes_checkpoints_remotely():
    run = RunDir("gs://bucket/runs/a/")
    assert run.is_remote and str(run.remote) == "gs://bucket/runs/a"
    assert run.path == files.staging_dir("gs://bucket/runs/a") == RunDir("gs://bucket/runs/a").path
    assert run.metrics == run.path / RunDir.METRICS_FILE and not store.is_remote(run.metrics)
    assert str(run.checkpoints) == "gs://bucket/runs/a/checkpoints"
    assert str(run.lock) == "gs://bucket/runs/a/.lock"
    assert str(RunDir.view("gs://bucket/runs/a").metrics) == "gs://bucket/runs/a/metrics.jsonl"
    assert RunDir("runs/a").metrics == RunDir.view("runs/a").metrics  # local: one and the same


def test_sync_uploads_changed_files_and_resume_continues_metrics(bucket):
    uri = f"{bucket}/runs/r1"
    remote = store.as_path(uri)
    store.put(remote / RunDir.METRICS_FILE, b'{"step": 1}\n')  # a run that ran before
    store.put(remote / "tensorboard" / "events.1", b"old events")
    sync = RunDirSync(uri, interval_s=3600, poll_s=0.05)
    run = RunDir(uri)
    (run.path / "stale-leftover.json").parent.mkdir(parents=True, exist_ok=True)
    (run.path / "stale-leftover.json").write_text("{}")  # an older job's staging on this host
    with sync:
        assert run.metrics.read_text() == '{"step": 1}\n'  # downloaded: appended to, not restarted
        assert not run.tensorboard.exists()  # event files are only added: not downloaded
        assert not (run.path / "stale-leftover.json").exists()
        with run.metrics.open("a") as f:
            f.write('{"step": 2}\n')
        run.tokenizer.mkdir()
        (run.tokenizer / "tokenizer.json").write_text("{}")
        deadline = time.time() + 10  # the tokenizer goes up at once, metrics wait for the interval
        while not (remote / "tokenizer" / "tokenizer.json").exists() and time.time() < deadline:
            time.sleep(0.05)
        assert (remote / "tokenizer" / "tokenizer.json").read_text() == "{}"
        assert (remote / RunDir.METRICS_FILE).read_text() == '{"step": 1}\n'
        (run.path / ".status.json.tmp-1").write_text("half")  # temporary files stay local
    assert (remote / RunDir.METRICS_FILE).read_text() == '{"step": 1}\n{"step": 2}\n'
    assert not (remote / ".status.json.tmp-1").exists()
    assert (remote / "tensorboard" / "events.1").read_text() == "old events"
    uploads = sync.uploads
    assert sync.sync() == 0 and sync.uploads == uploads  # nothing changed: nothing sent


@pytest.mark.parametrize("bucket", ["gs"], indirect=True)  # one store (CI time): the same code runs on the other
def test_remote_tokenizer_is_downloaded_for_a_reader(bucket):
    uri = f"{bucket}/runs/tok"
    store.put(store.as_path(uri) / "tokenizer" / "spec.json", b'{"a": 1}')
    folder = RunDir(uri).tokenizer
    assert not store.is_remote(folder) and (folder / "spec.json").read_text() == '{"a": 1}'


def test_lock_refuses_a_live_holder_and_is_deleted_on_release(bucket):
    uri = f"{bucket}/runs/locked"
    with files.hold(uri):
        record = _lock_record(uri)
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        assert "beat" in record
        with pytest.raises(RunDirBusy, match=f"pid {os.getpid()} on host {socket.gethostname()}"):
            files.acquire(uri)
    assert _lock_record(uri) is None
    files.release(files.acquire(uri))  # free again


@pytest.mark.parametrize("bucket", ["s3"], indirect=True)  # one store (CI time): the same code runs on the other
def test_lock_heartbeat_keeps_the_record_fresh(bucket):
    uri = f"{bucket}/runs/beat"
    gin.bind_parameter("remote_lock.heartbeat_s", 0.1)
    with files.hold(uri):
        first = _lock_record(uri)["beat"]
        time.sleep(0.6)
        assert _lock_record(uri)["beat"] > first


def test_lock_takes_over_a_dead_pid_here_and_a_stale_holder_elsewhere(bucket, caplog):
    uri = f"{bucket}/runs/stale"
    lock = f"{uri}/{RunDir.LOCK_FILE}"
    dead = {"pid": _dead_pid(), "host": socket.gethostname(), "proc_start": "1",
            "started": "then", "command": "train", "beat": time.time()}
    store.write_if(lock, json.dumps(dead).encode(), None)
    files.release(files.acquire(uri))
    assert "taking over the lock" in caplog.text

    elsewhere = {"pid": 1, "host": "other-host", "started": "then", "command": "train",
                 "beat": time.time() - 60}
    store.write_if(lock, json.dumps(elsewhere).encode(), None)
    with pytest.raises(RunDirBusy, match="pid 1 on host other-host.*60 s ago"):
        files.acquire(uri)
    gin.bind_parameter("remote_lock.stale_after_s", 30)
    held = files.acquire(uri)
    assert _lock_record(uri)["pid"] == os.getpid()
    files.release(held)


def test_exactly_one_of_concurrent_acquirers_wins(bucket):
    uri = f"{bucket}/runs/race"
    lock = f"{uri}/{RunDir.LOCK_FILE}"
    dead = {"pid": _dead_pid(), "host": socket.gethostname(), "proc_start": "1", "beat": 0}
    for stale in (None, dead):  # racing for a free lock, then for a dead holder's
        if stale:
            store.write_if(lock, json.dumps(stale).encode(), None)
        barrier, results = threading.Barrier(4), []

        def take(barrier=barrier, results=results):
            barrier.wait()
            try:
                results.append(files.acquire(uri))
            except RunDirBusy:
                results.append(None)

        threads = [threading.Thread(target=take) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [r for r in results if r is not None]
        assert len(winners) == 1, results
        files.release(winners[0])


def test_locked_json_serialises_edits_on_object_storage(bucket):
    path, lock = store.as_path(f"{bucket}/cache/index.json"), store.as_path(f"{bucket}/cache/.lock")

    def bump():
        for _ in range(3):
            with files.locked_json(path, lock) as index:
                count = index.get("n", 0)
                time.sleep(0.01)  # widen the window a lost update would need
                index["n"] = count + 1

    threads = [threading.Thread(target=bump) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert json.loads(path.read_text()) == {"n": 9}
    assert not lock.exists()
    with pytest.raises(RuntimeError), files.locked_json(path, lock) as index:
        index["n"] = -1
        raise RuntimeError("a failed edit writes nothing")
    assert json.loads(path.read_text()) == {"n": 9} and not lock.exists()


@pytest.mark.parametrize("bucket", ["s3"], indirect=True)  # one store (CI time): the same code runs on the other
def test_dir_size_of_a_remote_folder(bucket):
    root = store.as_path(f"{bucket}/models/m")
    store.put(root / "a.bin", b"x" * 100)
    store.put(root / "sub" / "b.bin", b"y" * 23)
    assert files.dir_size(root) == 123
    assert files.dir_size(store.as_path(f"{bucket}/nothing")) == 0

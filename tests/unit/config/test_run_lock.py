"""The run-dir lock: one holder at a time, a record naming it, released on exit (SIGKILL too),
a stale record taken over, and a refusal on a pod reaching every process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from llamahome import cli, files
from tests.conftest import REPO

HOLD = ("import sys, time; from pathlib import Path; from llamahome import files; "
        "files.acquire(Path(sys.argv[1])); print('held', flush=True); time.sleep(600)")


def hold_in_subprocess(run_dir) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline() == "held\n"
    return proc


def test_a_second_holder_is_refused_with_the_first_named(tmp_path):
    proc = hold_in_subprocess(tmp_path / "run")
    try:
        with pytest.raises(files.RunDirBusy) as e:
            files.acquire(tmp_path / "run")
    finally:
        proc.kill()
        proc.wait()
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"run dir {tmp_path / 'run'} is in use by pid {proc.pid} on host "
                              f"{socket.gethostname()} (started ")
    assert "another launch.run_dir" in message


def test_lock_of_a_sigkilled_holder_is_taken_over_and_named(tmp_path, caplog):
    proc = hold_in_subprocess(tmp_path / "run")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with files.hold(tmp_path / "run"):
        record = json.loads((tmp_path / "run" / files.RunDir.LOCK_FILE).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    assert f"taking over the lock of pid {proc.pid} on host" in caplog.text
    assert (tmp_path / "run" / files.RunDir.LOCK_FILE).read_text() == ""  # released cleanly


def test_released_lock_can_be_taken_again_and_is_held_within_the_process(tmp_path):
    with files.hold(tmp_path):
        with pytest.raises(files.RunDirBusy, match=f"pid {os.getpid()} "):
            files.acquire(tmp_path)
    with files.hold(tmp_path):
        pass


def test_a_live_holder_on_this_host_is_refused_even_where_flock_is_not_enforced(tmp_path,
                                                                                monkeypatch):
    proc = hold_in_subprocess(tmp_path)
    monkeypatch.setattr(files.fcntl, "flock", lambda fd, op: None)  # e.g. a FUSE mount
    try:
        with pytest.raises(files.RunDirBusy, match=f"pid {proc.pid} "):
            files.acquire(tmp_path)
    finally:
        proc.kill()
        proc.wait()


def test_without_flock_the_record_guards_and_a_dead_holder_is_taken_over(tmp_path, monkeypatch):
    def no_flock(fd, op):
        raise OSError(files.errno.ENOLCK, "no locks")

    monkeypatch.setattr(files.fcntl, "flock", no_flock)
    (tmp_path / files.RunDir.LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
    with pytest.raises(files.RunDirBusy, match="host elsewhere.*delete .*\\.lock"):
        files.acquire(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (tmp_path / files.RunDir.LOCK_FILE).write_text(json.dumps({"pid": int(dead),
                                                           "host": socket.gethostname()}))
    files.release(files.acquire(tmp_path))


def test_command_in_the_record_has_secret_gin_params_redacted(monkeypatch):
    monkeypatch.setattr(sys, "orig_argv", ["/usr/bin/python3", "-m", "llamahome.launch",
                                           "--gin_param=HF_TOKEN='hf_abcdef'"])
    assert files.holder_record()["command"] == \
        "python3 -m llamahome.launch --gin_param=HF_TOKEN = '<redacted>'"


def test_a_refusal_by_the_coordinator_stops_every_process(tmp_path, monkeypatch):
    from llamahome.parallel import distributed  # noqa: PLC0415

    broadcast = []
    monkeypatch.setattr(distributed, "from_coordinator",
                        lambda text: broadcast.append(text) or "run dir x is in use by pid 7")
    with pytest.raises(files.RunDirBusy, match="pid 7"), cli._locked(tmp_path, take=False):
        pass
    assert broadcast == [""]  # a peer takes no lock and learns the outcome from process 0
    assert not (tmp_path / files.RunDir.LOCK_FILE).exists()

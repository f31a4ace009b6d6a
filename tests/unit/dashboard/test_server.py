"""The `dashboard` job: loopback only unless told, and started by the one launch command."""

from __future__ import annotations

import os
import re
import selectors
import subprocess
import sys
import time

import httpx
import pytest

from llamahome.dashboard.server import bind_socket
from llamahome.net import is_loopback
from llamahome.errors import ConfigError
from tests.conftest import REPO, run_python
from tests.unit.dashboard.fake_runs import write_run


@pytest.mark.parametrize("host,loopback", [("127.0.0.1", True), ("127.8.9.1", True), ("::1", True),
                                           ("localhost", True), ("0.0.0.0", False), ("::", False),
                                           ("192.168.1.10", False), ("example.com", False)])
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_a_public_host_is_refused_with_the_fix_in_the_message():
    with pytest.raises(ConfigError, match="allow_public=True"):
        bind_socket("0.0.0.0", 0)


def test_port_zero_binds_a_free_loopback_port():
    sock = bind_socket("127.0.0.1", 0)
    try:
        host, port = sock.getsockname()
        assert host == "127.0.0.1" and port > 0
    finally:
        sock.close()


def _read_line_matching(proc: subprocess.Popen, pattern: str, timeout_s: float) -> re.Match:
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout_s
    seen = []
    while time.monotonic() < deadline and proc.poll() is None:
        if selector.select(timeout=0.5):
            line = proc.stdout.readline()
            seen.append(line)
            if m := re.search(pattern, line):
                return m
    raise AssertionError(f"no line matching {pattern!r} in {timeout_s}s; stdout: {seen}; "
                         f"exit {proc.poll()}")


@pytest.mark.slow
def test_launch_with_dashboard_gin_serves_the_runs_dir_and_writes_nothing(tmp_path):
    records = write_run(tmp_path, "r1", steps=5)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "LLAMAHOME_RUNS_DIR": str(tmp_path / "elsewhere")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "llamahome.launch", "--gin_file=gin/dashboard.gin",
         f"--gin_param=dashboard.runs_dir='{tmp_path}'", "--gin_param=dashboard.port=0"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        url = _read_line_matching(proc, r"dashboard: (http://127\.0\.0\.1:\d+)", 120).group(1)
        runs = httpx.get(f"{url}/api/runs", timeout=10).json()["runs"]
        assert [r["name"] for r in runs] == ["r1"]
        assert runs[0]["last_loss"] == records[-1]["loss"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.slow
def test_launch_refuses_a_public_host_with_exit_status_2(tmp_path):
    result = run_python(["-m", "llamahome.launch", "--gin_file=gin/dashboard.gin",
                         "--gin_param=dashboard.host='0.0.0.0'",
                         f"--gin_param=dashboard.runs_dir='{tmp_path}'"], timeout=120)
    assert result.returncode == 2
    assert "not a loopback address" in result.stderr and "allow_public" in result.stderr

"""The dashboard over a runs dir on object storage (both emulators): every API answer equals the
one for the same run dirs on a local disk, in a few cached requests per page load."""

from __future__ import annotations

import json

import httpx
import pytest

from llamahome import store
from llamahome.dashboard import run_files
from llamahome.dashboard.app import build_app
from tests.unit.dashboard.fake_runs import serve, write_run

CACHE_STATS = {"hits": 3, "misses": 1}


@pytest.fixture
def runs(bucket, tmp_path, monkeypatch):
    """The same runs on disk and in the bucket; the reader's cache emptied for each test."""
    monkeypatch.setattr(run_files, "REMOTE", run_files.RemoteReader(ttl_s=3600))
    local = tmp_path / "runs"
    write_run(local, "live", steps=30, eval_every=10, checkpoints={10: 2048, 20: 999},
              cache_stats=CACHE_STATS, started=2000.0)
    write_run(local, "dead", steps=12, heartbeat_age_s=3600, started=1000.0)
    (local / "not-a-run").mkdir()
    (local / "not-a-run" / "notes.txt").write_text("hi")
    remote = f"{bucket}/team/runs"
    store.upload_dir(local, remote)
    # Orbax's commit marker on object storage, written last; step 20 is still being written.
    store.put(store.as_path(remote) / "live/checkpoints/10/commit_success.txt", b"")
    return local, remote


def _get(base: str, path: str) -> dict:
    response = httpx.get(base + path, timeout=20)
    assert response.status_code == 200, response.text
    return response.json()


def test_remote_runs_read_as_the_same_runs_on_disk(runs):
    local, remote = runs
    with serve(build_app(local)) as on_disk, serve(build_app(remote)) as on_store:
        listed = _get(on_store, "/api/runs")
        assert listed["runs_dir"] == remote
        assert listed["runs"] == _get(on_disk, "/api/runs")["runs"]
        assert [r["name"] for r in listed["runs"]] == ["live", "dead"]
        assert [r["status"] for r in listed["runs"]] == ["running", "stale"]
        for path in ("/api/runs/live", "/api/runs/live/metrics", "/api/runs/live/metrics?since=100",
                     "/api/runs/live/config", "/api/runs/live/cache_stats", "/api/runs/dead"):
            assert _get(on_store, path) == _get(on_disk, path), path
        checkpoints = _get(on_store, "/api/runs/live/checkpoints")["checkpoints"]
        assert [(c["step"], c["bytes"]) for c in checkpoints] == [(10, 2048)]  # 20: uncommitted
        assert checkpoints[0]["path"] == f"{remote}/live/checkpoints/10"
        assert httpx.get(on_store + "/api/runs/not-a-run", timeout=20).status_code == 404
        assert httpx.get(on_store + "/api/runs/..", timeout=20).status_code == 404


def test_a_page_load_is_served_from_the_cache_until_it_expires(runs):
    _, remote = runs
    with serve(build_app(remote)) as base:
        first = _get(base, "/api/runs")
        sent = run_files.REMOTE.requests
        assert sent <= 1 + 2 * 5  # the runs dir listed, then a few requests per run
        assert _get(base, "/api/runs") == first and run_files.REMOTE.requests == sent
        metrics = _get(base, "/api/runs/live/metrics")
        line = json.dumps({"step": 31, "time": 1.0, "split": "train", "loss": 1.5}) + "\n"
        store.put(store.as_path(remote) / "live/metrics.jsonl",
                  store.as_path(remote).joinpath("live/metrics.jsonl").read_bytes() + line.encode())
        run_files.REMOTE.ttl_s = 0  # expired: the appended record and the new heartbeat show
        more = _get(base, f"/api/runs/live/metrics?since={metrics['next']}")
        assert more["records"] == [json.loads(line)]
        assert _get(base, "/api/runs/live")["last_loss"] == 1.5

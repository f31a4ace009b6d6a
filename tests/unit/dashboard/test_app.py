"""The dashboard over HTTP: real requests (httpx) to a server on 127.0.0.1 over hand-written run dirs."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from llamahome.dashboard.app import STATIC_DIR, build_app
from tests.unit.dashboard.fake_runs import serve, write_run

CACHE_STATS = {"hits": 30, "misses": 10, "bytes": 123456, "evictions": 2}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    written = {
        "live": write_run(root, "live", steps=30, eval_every=10, checkpoints={10: 2048, 30: 4096},
                          cache_stats=CACHE_STATS, started=2000.0),
        "dead": write_run(root, "dead", steps=12, heartbeat_age_s=3600, started=1000.0),
        "done": write_run(root, "done", steps=50, total_steps=50, status="finished", started=3000.0),
    }
    return root, written


@pytest.fixture(scope="module")
def url(runs):
    with serve(build_app(runs[0], stale_after_s=120)) as base:
        yield base


def get(url, path, **kw):
    response = httpx.get(url + path, timeout=10, **kw)
    return response


def test_runs_list_shows_status_model_steps_last_loss_and_tokens_per_sec(url, runs):
    _, written = runs
    body = get(url, "/api/runs").json()
    by_name = {r["name"]: r for r in body["runs"] if r["name"] in written}
    assert [r["name"] for r in body["runs"] if r["name"] in written] == ["done", "live", "dead"]
    assert {n: r["status"] for n, r in by_name.items()} == {
        "live": "running", "dead": "stale", "done": "finished"}
    for name, records in written.items():
        last_train = [r for r in records if r["split"] == "train"][-1]
        row = by_name[name]
        assert row["last_loss"] == last_train["loss"]
        assert row["tokens_per_sec"] == last_train["tokens_per_sec"]
        assert row["step"] == last_train["step"]
        assert row["model"] == "tiny"
    assert by_name["live"]["started"] == 2000.0


def test_metrics_endpoint_pages_incrementally_with_since(url, runs):
    root, _ = runs
    records = write_run(root, "growing", steps=8, eval_every=4)
    first = get(url, "/api/runs/growing/metrics").json()
    assert first["records"] == records
    again = get(url, f"/api/runs/growing/metrics?since={first['next']}").json()
    assert again["records"] == [] and again["next"] == first["next"]
    new = [{"step": 9, "time": 1.0, "split": "train", "loss": 2.5},
           {"step": 9, "time": 2.0, "split": "eval", "loss": 2.75}]
    with (root / "growing" / "metrics.jsonl").open("a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in new))
    assert get(url, f"/api/runs/growing/metrics?since={first['next']}").json()["records"] == new


def test_run_endpoint_carries_the_raw_heartbeat(url, runs):
    root, _ = runs
    body = get(url, "/api/runs/dead").json()
    assert body["status"] == "stale"
    assert body["status_json"] == json.loads((root / "dead" / "status.json").read_text())


def test_config_checkpoints_and_cache_stats_endpoints(url, runs):
    root, _ = runs
    config = get(url, "/api/runs/live/config").json()
    assert config == {"config": (root / "live" / "config.gin").read_text(), "operative_config": None}
    checkpoints = get(url, "/api/runs/live/checkpoints").json()["checkpoints"]
    assert [(c["step"], c["bytes"]) for c in checkpoints] == [(10, 2048), (30, 4096)]
    assert get(url, "/api/runs/live/cache_stats").json() == {"cache_stats": CACHE_STATS}
    assert get(url, "/api/runs/dead/cache_stats").json() == {"cache_stats": None}


@pytest.mark.parametrize("path", ["/api/runs/nope", "/api/runs/nope/metrics", "/api/runs/..%2F..%2Fetc/config",
                                  "/api/runs/../checkpoints", "/runs/nope"])
def test_unknown_runs_and_path_tricks_are_404(url, path):
    assert get(url, path).status_code == 404


def test_a_bad_since_is_a_400_that_says_what_since_is(url):
    response = get(url, "/api/runs/live/metrics?since=abc")
    assert response.status_code == 400 and "byte offset" in response.json()["error"]


def test_a_foreign_host_header_is_refused(url):
    assert get(url, "/api/runs", headers={"Host": "evil.example:80"}).status_code == 403
    assert get(url, "/api/runs", headers={"Host": "localhost:1"}).status_code == 200


@pytest.mark.parametrize("page", ["/", "/runs/live", "/compare?runs=live,done", "/playground?run=live"])
def test_pages_load_only_scripts_and_styles_served_by_the_package(url, page):
    response = get(url, page)
    assert response.status_code == 200 and "text/html" in response.headers["content-type"]
    assets = re.findall(r'(?:src|href)="([^"]+\.(?:js|css))"', response.text)
    assert assets, "a page without its scripts"
    for asset in assets:
        assert asset.startswith("/static/"), f"{asset} is not served by the dashboard"
        served = get(url, asset)
        assert served.status_code == 200
        assert served.content == (STATIC_DIR / asset.removeprefix("/static/")).read_bytes()
    static_text = "".join(p.read_text() for p in STATIC_DIR.iterdir() if p.suffix in (".html", ".js", ".css"))
    assert not re.search(r"https?://(?!www\.w3\.org/2000/svg\b)", static_text)  # no CDN, nothing remote


def test_generate_rejects_a_malformed_body_before_loading_anything(url):
    response = httpx.post(url + "/api/runs/live/generate", json={"prompt": "hi", "max_new_tokens": 0},
                          timeout=10)
    assert response.status_code == 400 and "max_new_tokens" in response.json()["error"]
    response = httpx.post(url + "/api/runs/live/generate", json={"promt": "hi"}, timeout=10)
    assert response.status_code == 400 and "promt" in response.json()["error"]


def _events(response: httpx.Response) -> list[tuple[str, dict]]:
    """(event, data) pairs of a text/event-stream body."""
    events = []
    for block in response.text.split("\n\n"):
        if block.strip():
            fields = dict(line.split(": ", 1) for line in block.split("\n"))
            events.append((fields.get("event", "message"), json.loads(fields["data"])))
    return events


def test_generate_without_a_checkpoint_streams_an_error_event_that_says_why(url):
    response = httpx.post(url + "/api/runs/dead/generate", json={"prompt": "hi"}, timeout=30)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    [(event, data)] = _events(response)
    assert event == "error" and "no checkpoint" in data["message"] and "dead" in data["message"]


def test_config_endpoint_redacts_secret_bindings_as_defence_in_depth(url, runs):
    root, _ = runs
    write_run(root, "leaky", steps=2)
    (root / "leaky" / "operative_config.gin").write_text(
        "LlamaConfig.name = 'tiny'\ndownload.hf_token = 'hf_abcdefghijklmnop'\n")
    config = get(url, "/api/runs/leaky/config").json()
    assert config["operative_config"] == "LlamaConfig.name = 'tiny'\ndownload.hf_token = '<redacted>'\n"
    assert config["config"] == (root / "leaky" / "config.gin").read_text()


def test_generate_needs_a_json_content_type_and_names_the_bad_field(url):
    response = httpx.post(url + "/api/runs/live/generate", content='{"prompt": "hi"}',
                          headers={"Content-Type": "text/plain"}, timeout=10)
    assert response.status_code == 415 and "application/json" in response.json()["error"]
    response = httpx.post(url + "/api/runs/live/generate", json={"temperature": 1e300}, timeout=10)
    assert response.status_code == 400
    assert response.json() == {"error": "temperature must be a number in [0, 100] (0 is greedy)",
                               "field": "temperature"}


def test_downstream_records_reach_their_own_series_and_leave_the_loss_curve_alone(url, runs, tmp_path):
    """The pages' MetricsFeed (common.js, run in Node against this server) files downstream lines
    apart: the train series keeps every step, the downstream one has its task metrics."""
    import shutil  # noqa: PLC0415
    import subprocess  # noqa: PLC0415

    if shutil.which("node") is None:
        pytest.skip("node is not installed")
    root, _ = runs
    write_run(root, "with-tasks", steps=20, eval_every=10, downstream_every=5)
    script = tmp_path / "feed.js"
    script.write_text((STATIC_DIR / "common.js").read_text() + f"""
globalThis.fetch = (u, o) => globalThis.realFetch("{url}" + u, o);
(async () => {{
  const feed = new MetricsFeed("with-tasks");
  await feed.poll();
  console.log(JSON.stringify({{train: feed.train.xs(), eval: feed.eval.xs(),
    downstream: feed.downstream.xs(), keys: downstreamKeys(feed.downstream)}}));
}})();
""".replace("globalThis.realFetch", "fetchOriginal"))
    script.write_text("const fetchOriginal = globalThis.fetch;\n" + script.read_text())
    out = json.loads(subprocess.run(["node", str(script)], capture_output=True, text=True,
                                    check=True, timeout=60).stdout)
    assert out["train"] == list(range(1, 21)) and out["eval"] == [10, 20]
    assert out["downstream"] == [5, 10, 15, 20]
    assert out["keys"] == ["hellaswag/acc", "hellaswag/acc_norm", "wikitext/word_perplexity"]


@pytest.mark.parametrize("page,ids", [("/runs/live", ["downstream-card", "downstream-table",
                                                      "chart-downstream"]),
                                      ("/compare?runs=live", ["downstream-card", "downstream-metric",
                                                              "downstream-table"])])
def test_run_and_compare_pages_have_a_downstream_section(url, page, ids):
    html = get(url, page).text
    for element in ids:
        assert f'id="{element}"' in html

"""The dashboard over a run dir written by a short real training run (the `train` job, tiny
model, 20 steps): every endpoint against the files on disk, the playground against the
inference library called directly, and the run page in headless Chromium."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from llamahome.dashboard.app import build_app
from tests.conftest import REPO, tiny_train_params, write_word_corpus
from tests.integration.headless_chromium import Chromium, find_chromium
from tests.integration.test_dashboard_browser import TRAIN_PATH, assert_plots, vertices
from tests.unit.dashboard.fake_runs import serve

pytestmark = [pytest.mark.integration, pytest.mark.slow]

WORDS = "the king queen crown sword love death night day rose thou art fair sweet heart".split()
RUN = "tiny-run"


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("dashboard_train")
    write_word_corpus(root / "txt", WORDS)
    params = [*tiny_train_params(root / "txt", root / "cache", root / "runs" / RUN), "train.steps=20"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    result = subprocess.run([sys.executable, "-m", "llamahome.launch", "--gin_file=gin/train/tiny_cpu.gin",
                             *[f"--gin_param={p}" for p in params]],
                            env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "runs"


@pytest.fixture(scope="module")
def url(runs_dir):
    with serve(build_app(runs_dir)) as base:
        yield base


def file_records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def test_every_endpoint_matches_the_files_the_training_run_wrote(url, runs_dir):
    run = runs_dir / RUN
    records = file_records(run)
    train = [r for r in records if r["split"] == "train"]
    [row] = httpx.get(f"{url}/api/runs", timeout=10).json()["runs"]
    status = json.loads((run / "status.json").read_text())
    assert (row["name"], row["status"], row["model"], row["step"]) == (RUN, "finished", "tiny", 20)
    assert row["started"] == status["started"]
    assert row["last_loss"] == train[-1]["loss"] and row["tokens_per_sec"] == train[-1]["tokens_per_sec"]

    metrics = httpx.get(f"{url}/api/runs/{RUN}/metrics", timeout=10).json()
    assert metrics["records"] == records and len(train) == 20
    assert [r["step"] for r in records if r["split"] == "eval"] == [10, 20]

    checkpoints = httpx.get(f"{url}/api/runs/{RUN}/checkpoints", timeout=10).json()["checkpoints"]
    on_disk = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert [c["step"] for c in checkpoints] == on_disk == [10, 20]
    assert [c["bytes"] for c in checkpoints] == [du(run / "checkpoints" / str(s)) for s in on_disk]

    config = httpx.get(f"{url}/api/runs/{RUN}/config", timeout=10).json()
    assert config["operative_config"] == (run / "operative_config.gin").read_text()
    assert "LlamaConfig" in config["operative_config"]
    cache_stats = httpx.get(f"{url}/api/runs/{RUN}/cache_stats", timeout=10).json()["cache_stats"]
    assert cache_stats == json.loads((run / "cache_stats.json").read_text())


def test_playground_streams_what_the_inference_library_generates(url, runs_dir):
    from llamahome.infer.generator import load_generator
    from llamahome.infer.samplers import SamplerConfig

    prompt, n = "the king", 8
    body = {"step": 20, "prompt": prompt, "max_new_tokens": n, "temperature": 0}
    with httpx.stream("POST", f"{url}/api/runs/{RUN}/generate", json=body, timeout=120) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        blocks = response.read().decode().split("\n\n")
    events = [dict(line.split(": ", 1) for line in b.split("\n")) for b in blocks if b.strip()]
    assert events[-1]["event"] == "done", events[-1]
    streamed = "".join(json.loads(e["data"])["text"] for e in events if "event" not in e)
    reference = load_generator(runs_dir / RUN, step=20).generate(
        [prompt], max_new_tokens=n, sampler=SamplerConfig(temperature=0.0))[0]
    assert streamed == reference.text and streamed


def test_run_page_of_the_trained_run_draws_its_loss_curve(url, runs_dir, tmp_path):
    binary = find_chromium()
    if binary is None:
        print("skipping the browser check: chromium is not installed")
        pytest.skip("chromium is not installed (apt-get install chromium chromium-driver)")
    train = [r for r in file_records(runs_dir / RUN) if r["split"] == "train"]
    browser = Chromium(binary)
    try:
        browser.goto(f"{url}/runs/{RUN}")
        browser.wait_for(f"{TRAIN_PATH}?.getAttribute('data-points') === '{len(train)}'")
        assert_plots(vertices(browser.evaluate(f"{TRAIN_PATH}.getAttribute('d')")),
                     [r["step"] for r in train], [r["loss"] for r in train])
    finally:
        browser.close()

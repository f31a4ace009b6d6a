"""End to end in headless Chromium: the run page draws the loss curve and follows it as it grows."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from llamahome.dashboard.app import build_app
from tests.integration.headless_chromium import Chromium, find_chromium
from tests.unit.dashboard.fake_runs import serve, train_record, write_run

pytestmark = pytest.mark.integration

TRAIN_PATH = "document.querySelector('#chart-loss path.series[data-series=\"train loss\"]')"
EVAL_PATH = "document.querySelector('#chart-loss path.series[data-series=\"eval loss\"]')"


def vertices(d: str) -> np.ndarray:
    """[n, 2] pixel coordinates of an SVG path made of M/L commands."""
    return np.array([[float(x), float(y)] for x, y in re.findall(r"[ML]([-\d.]+),([-\d.]+)", d)])


def assert_plots(points: np.ndarray, steps: list[int], losses: list[float]) -> None:
    """The vertices are the (step, loss) pairs under one increasing-x, decreasing-y affine map."""
    assert len(points) == len(steps)
    for values, column, sign in ((steps, 0, 1), (losses, 1, -1)):
        slope, intercept = np.polyfit(values, points[:, column], 1)
        assert sign * slope > 0
        np.testing.assert_allclose(points[:, column], slope * np.array(values) + intercept, atol=0.11)


@pytest.fixture
def browser():
    binary = find_chromium()
    if binary is None:
        reason = "chromium is not installed (apt-get install chromium chromium-driver)"
        print(f"skipping the browser test: {reason}")
        pytest.skip(reason)
    chromium = Chromium(binary)
    yield chromium
    chromium.close()


def test_run_page_draws_the_loss_curve_and_live_updates(browser, tmp_path):
    records = write_run(tmp_path, "run1", steps=40, eval_every=10, checkpoints={20: 1000, 40: 2000})
    with serve(build_app(tmp_path)) as url:
        browser.goto(f"{url}/runs/run1")
        train = [r for r in records if r["split"] == "train"]
        evals = [r for r in records if r["split"] == "eval"]
        browser.wait_for(f"{TRAIN_PATH}?.getAttribute('data-points') === '{len(train)}'")
        assert_plots(vertices(browser.evaluate(f"{TRAIN_PATH}.getAttribute('d')")),
                     [r["step"] for r in train], [r["loss"] for r in train])
        assert len(vertices(browser.evaluate(f"{EVAL_PATH}.getAttribute('d')"))) == len(evals)
        assert browser.evaluate("document.querySelectorAll('#checkpoints tbody tr').length") == 2
        assert "LlamaConfig.name" in browser.wait_for(
            "document.querySelector('.tabs button[data-tab=config]').click() || "
            "document.getElementById('config-text').textContent.includes('LlamaConfig') && "
            "document.getElementById('config-text').textContent")

        more = [train_record(step, start=0.0) for step in range(41, 46)]
        with (tmp_path / "run1" / "metrics.jsonl").open("a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in more))
        train += more
        browser.wait_for(f"{TRAIN_PATH}.getAttribute('data-points') === '{len(train)}'", timeout_s=20)
        assert_plots(vertices(browser.evaluate(f"{TRAIN_PATH}.getAttribute('d')")),
                     [r["step"] for r in train], [r["loss"] for r in train])
        browser.screenshot(str(tmp_path / "run_page.png"))
    assert (tmp_path / "run_page.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

"""Metric records, the status heartbeat, the peak table and MFU arithmetic."""

import json
import math

import pytest

from llamahome.monitor import mfu, status, writers


def test_metrics_jsonl_and_tensorboard(tmp_path):
    w = writers.MetricsWriter(tmp_path, total_steps=10, progress_bar=False)
    w.train(1, {"loss": 2.0, "grad_norm": 1.5, "learning_rate": 1e-3, "tokens_per_sec": 100.0,
                "step_time": 0.5, "mfu": 0.2, "tokens_seen": 50})
    w.eval(1, 1.0)
    w.close()
    train, ev = [json.loads(line) for line in (tmp_path / writers.METRICS_FILE).read_text().splitlines()]
    assert train["split"] == "train" and train["step"] == 1
    assert train["perplexity"] == pytest.approx(math.exp(2.0))
    assert ev == {"step": 1, "time": ev["time"], "split": "eval", "loss": 1.0, "perplexity": math.e}
    assert list((tmp_path / writers.TENSORBOARD_DIR).glob("events.out.tfevents.*"))


def test_heartbeat_is_rate_limited_and_atomic(tmp_path):
    hb = status.Heartbeat(tmp_path, total_steps=100, model="tiny", interval_s=3600)
    hb.beat(1)
    hb.beat(2)  # within the interval: not written
    record = json.loads((tmp_path / status.STATUS_FILE).read_text())
    assert (record["step"], record["status"], record["model"]) == (1, "running", "tiny")
    hb.beat(3, "finished")  # a status change is always written
    assert json.loads((tmp_path / status.STATUS_FILE).read_text())["status"] == "finished"
    assert [p.name for p in tmp_path.iterdir()] == [status.STATUS_FILE]


def test_peak_table_prefers_the_most_specific_kind():
    assert mfu.lookup_peak("NVIDIA H100 PCIe", mfu.PEAK_BF16_FLOPS) == 756e12
    assert mfu.lookup_peak("NVIDIA H100 80GB HBM3", mfu.PEAK_BF16_FLOPS) == 989e12
    assert mfu.lookup_peak("TPU v5 lite", mfu.PEAK_BF16_FLOPS) == 197e12
    assert mfu.lookup_peak("cpu", mfu.PEAK_BF16_FLOPS) is None


def test_peak_override_and_mfu():
    assert mfu.peak_flops(per_device=1e12).flops == 1e12 * len(__import__("jax").devices())
    # 6 * N FLOPs/token at 1000 tokens/s on a 1e12 FLOP/s machine, N = 1e6 -> 0.6%
    assert mfu.mfu(6e6, 1000.0, 1e12) == pytest.approx(0.006)

"""Metric records, the status heartbeat, the peak table, the CPU peak measured once per machine
and cached, and MFU arithmetic (at most 100%)."""

from __future__ import annotations

import json
import math

import gin
import jax
import pytest

from llamahome import monitor
from llamahome.files import RunDir


def test_metrics_jsonl_and_tensorboard(tmp_path):
    w = monitor.MetricsWriter(tmp_path, total_steps=10, progress_bar=False)
    w.train(1, {"loss": 2.0, "grad_norm": 1.5, "learning_rate": 1e-3, "tokens_per_sec": 100.0,
                "step_time": 0.5, "mfu": 0.2, "tokens_seen": 50})
    w.eval(1, 1.0)
    w.close()
    train, ev = [json.loads(line) for line in (tmp_path / RunDir.METRICS_FILE).read_text().splitlines()]
    assert train["split"] == "train" and train["step"] == 1
    assert train["perplexity"] == pytest.approx(math.exp(2.0))
    assert ev == {"step": 1, "time": ev["time"], "split": "eval", "loss": 1.0, "perplexity": math.e}
    assert list((tmp_path / RunDir.TENSORBOARD_DIR).glob("events.out.tfevents.*"))


def test_heartbeat_is_rate_limited_and_atomic(tmp_path):
    hb = monitor.Heartbeat(tmp_path, total_steps=100, model="tiny", interval_s=3600)
    hb.beat(1)
    hb.beat(2)  # within the interval: not written
    record = json.loads((tmp_path / RunDir.STATUS_FILE).read_text())
    assert (record["step"], record["status"], record["model"]) == (1, "running", "tiny")
    hb.beat(3, "finished")  # a status change is always written
    assert json.loads((tmp_path / RunDir.STATUS_FILE).read_text())["status"] == "finished"
    assert [p.name for p in tmp_path.iterdir()] == [RunDir.STATUS_FILE]


def test_peak_table_prefers_the_most_specific_kind():
    assert monitor.lookup_peak("NVIDIA H100 PCIe", monitor.PEAK_BF16_FLOPS) == 756e12
    assert monitor.lookup_peak("NVIDIA H100 80GB HBM3", monitor.PEAK_BF16_FLOPS) == 989e12
    assert monitor.lookup_peak("TPU v5 lite", monitor.PEAK_BF16_FLOPS) == 197e12
    assert monitor.lookup_peak("cpu", monitor.PEAK_BF16_FLOPS) is None


def test_peak_override_and_mfu():
    assert monitor.peak_flops(per_device=1e12).flops == 1e12 * len(jax.devices())
    # 6 * N FLOPs/token at 1000 tokens/s on a 1e12 FLOP/s machine, N = 1e6 -> 0.6%
    assert monitor.mfu(6e6, 1000.0, 1e12) == pytest.approx(0.006)


class FakeMeasure:
    """Stands in for the timed matmuls: returns the given figures in turn and counts calls."""

    def __init__(self, *figures: float):
        self.figures, self.calls = list(figures), 0

    def __call__(self, dtype, sizes, repeats):
        self.calls += 1
        return self.figures.pop(0)


def test_cpu_peak_is_measured_once_then_read_from_the_cache(tmp_path, monkeypatch):
    measure = FakeMeasure(300e9, 500e9)
    monkeypatch.setattr(monitor, "measured_matmul_flops", measure)
    assert monitor.cpu_peak_flops("float32", (512,), root=tmp_path) == 300e9
    assert monitor.cpu_peak_flops("float32", (512,), root=tmp_path) == 300e9
    assert measure.calls == 1
    (path,) = (tmp_path / monitor.PEAK_CACHE_DIR).glob("*.json")
    record = json.loads(path.read_text())
    assert record["flops"] == 300e9 and record["key"] == monitor.machine_key("float32", (512,))
    assert record["key"]["jax"] == jax.__version__ and record["key"]["cores"] >= 1
    assert [m["flops"] for m in record["measurements"]] == [300e9]


def test_remeasure_adds_a_measurement_and_the_best_is_the_peak(tmp_path, monkeypatch):
    measure = FakeMeasure(300e9, 500e9, 200e9)
    monkeypatch.setattr(monitor, "measured_matmul_flops", measure)
    assert monitor.cpu_peak_flops("float32", (512,), root=tmp_path) == 300e9
    assert monitor.cpu_peak_flops("float32", (512,), remeasure=True, root=tmp_path) == 500e9
    # A later measurement at a loaded moment (200) does not lower the peak.
    assert monitor.cpu_peak_flops("float32", (512,), remeasure=True, root=tmp_path) == 500e9
    assert monitor.cpu_peak_flops("float32", (512,), root=tmp_path) == 500e9
    assert measure.calls == 3


def test_the_gin_flag_remeasures(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    measure = FakeMeasure(250e9, 500e9)
    monkeypatch.setattr(monitor, "measured_matmul_flops", measure)
    assert monitor.peak_flops("float32") == monitor.Peak(250e9, "measured")
    assert monitor.peak_flops("float32").flops == 250e9
    gin.parse_config("peak_flops.remeasure = True")
    assert monitor.peak_flops("float32").flops == 500e9
    assert measure.calls == 2 and list((tmp_path / "llamahome" / monitor.PEAK_CACHE_DIR).glob("*.json"))


def test_a_cache_for_another_machine_or_dtype_is_not_used(tmp_path, monkeypatch):
    measure = FakeMeasure(300e9, 400e9, 200e9, 600e9)
    monkeypatch.setattr(monitor, "measured_matmul_flops", measure)
    assert monitor.cpu_peak_flops("float32", (512,), root=tmp_path) == 300e9
    assert monitor.cpu_peak_flops("bfloat16", (512,), root=tmp_path) == 400e9
    monkeypatch.setattr(monitor, "_cpu_model", lambda: "Another CPU")
    assert monitor.cpu_peak_flops("float32", (512,), root=tmp_path) == 200e9
    # A file whose recorded key differs from the one it is looked up by is measured again too.
    path = monitor.peak_cache_path(monitor.machine_key("float32", (512,)), tmp_path)
    path.write_text(json.dumps({"key": {"cpu": "else"}, "flops": 1e15,
                                "measurements": [{"flops": 1e15}]}))
    assert monitor.cpu_peak_flops("float32", (512,), root=tmp_path) == 600e9
    assert measure.calls == 4


def test_an_unreadable_cache_is_measured_again(tmp_path, monkeypatch):
    measure = FakeMeasure(300e9, 350e9)
    monkeypatch.setattr(monitor, "measured_matmul_flops", measure)
    monitor.cpu_peak_flops("float32", (512,), root=tmp_path)
    monitor.peak_cache_path(monitor.machine_key("float32", (512,)), tmp_path).write_text("{not json")
    assert monitor.cpu_peak_flops("float32", (512,), root=tmp_path) == 350e9


def test_the_real_measurement_is_cached(tmp_path):
    flops = monitor.cpu_peak_flops("float32", (64,), root=tmp_path)
    assert flops > 0
    assert monitor.cpu_peak_flops("float32", (64,), root=tmp_path) == flops  # read back, not re-timed


def test_mfu_is_never_above_one():
    # 6e6 FLOPs/token at 1e6 tokens/s is 6e12 FLOP/s: six times a 1e12 peak.
    assert monitor.mfu(6e6, 1e6, 1e12) == 1.0
    assert monitor.mfu(6e6, 1e5, 1e12) == pytest.approx(0.6)
    assert monitor.mfu(6e6, 1e5, float("nan")) != monitor.mfu(6e6, 1e5, float("nan"))  # nan stays nan


def test_peak_says_where_it_comes_from():
    n = len(jax.devices())
    assert monitor.peak_flops(per_device=1e12) == monitor.Peak(1e12 * n, "set in gin")
    assert str(monitor.Peak(270e9, "measured")) == "270 GFLOP/s measured"
    assert str(monitor.Peak(7.912e15, "datasheet")) == "7.91 PFLOP/s datasheet"
    assert monitor.format_flops(float("nan")) == "? FLOP/s"


def test_the_progress_bar_names_the_peak(tmp_path, capsys):
    w = monitor.MetricsWriter(tmp_path, total_steps=10, mfu_peak="270 GFLOP/s measured")
    w.train(1, {"loss": 2.0, "grad_norm": 1.5, "learning_rate": 1e-3, "tokens_per_sec": 100.0,
                "step_time": 0.5, "mfu": 0.61, "tokens_seen": 50})
    w.close()
    assert "mfu=61.0% of 270 GFLOP/s measured" in capsys.readouterr().err

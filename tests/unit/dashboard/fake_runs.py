"""Run dirs written by hand in the contract's format, and a dashboard server on a free port."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from tests.conftest import serving


CONFIG = ("# gin bindings\nLlamaConfig.name = 'tiny'\nLlamaConfig.num_layers = 2\n"
          "train.steps = {total}\ntrain.learning_rate = 0.001\n")


def loss_at(step: int) -> float:
    """A decreasing loss curve with some wiggle, so the chart has shape."""
    return 2.0 + 8.0 / math.sqrt(step) + 0.05 * math.sin(step)


def train_record(step: int, start: float) -> dict:
    return {"step": step, "time": start + step, "split": "train", "loss": loss_at(step),
            "perplexity": math.exp(loss_at(step)), "grad_norm": 1.0 / step,
            "learning_rate": 1e-3 * min(1.0, step / 10), "tokens_per_sec": 4000.0 + 10 * step,
            "step_time": 0.25, "mfu": 0.30 + 0.001 * step, "tokens_seen": 1024 * step}


def eval_record(step: int, start: float) -> dict:
    loss = loss_at(step) + 0.15
    return {"step": step, "time": start + step + 0.5, "split": "eval", "loss": loss,
            "perplexity": math.exp(loss)}


def downstream_record(step: int, start: float) -> dict:
    """An lm-eval line as training's downstream evals write it (monitor.MetricsWriter.downstream)."""
    return {"step": step, "time": start + step + 0.7, "split": "downstream",
            "hellaswag/acc": 0.25 + step / 1000, "hellaswag/acc_norm": 0.26 + step / 1000,
            "wikitext/word_perplexity": 900.0 - step}


def write_run(runs_dir: Path, name: str, *, steps: int = 40, total_steps: int = 100,
              status: str = "running", heartbeat_age_s: float = 1.0, eval_every: int = 10,
              downstream_every: int = 0,
              checkpoints: dict[int, int] | None = None, cache_stats: dict | None = None,
              model: str = "tiny", started: float | None = None) -> list[dict]:
    """Writes a run dir as training would; returns the metric records written, in order."""
    run = runs_dir / name
    run.mkdir(parents=True)
    now = time.time()
    start = now - 3600 if started is None else started
    records = []
    for step in range(1, steps + 1):
        records.append(train_record(step, start))
        if step % eval_every == 0:
            records.append(eval_record(step, start))
        if downstream_every and step % downstream_every == 0:
            records.append(downstream_record(step, start))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "status.json").write_text(json.dumps({
        "status": status, "step": steps, "total_steps": total_steps, "model": model,
        "started": start, "updated": now - heartbeat_age_s, "pid": 4242, "host": "testhost"}))
    (run / "config.gin").write_text(CONFIG.format(total=total_steps))
    for step, size in (checkpoints or {}).items():
        for i, part in enumerate((size // 3, size - size // 3)):
            path = run / "checkpoints" / str(step) / f"sub{i}" / "data"
            path.parent.mkdir(parents=True)
            path.write_bytes(b"\0" * part)
    if cache_stats is not None:
        (run / "cache_stats.json").write_text(json.dumps(cache_stats))
    return records


serve = serving  # uvicorn in a thread on a free loopback port (tests/conftest.py)

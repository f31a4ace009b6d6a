"""Where metrics go: `metrics.jsonl` and TensorBoard event files in the run dir, and a tqdm bar.

One JSON object per line, as the dashboard reads it:
    {"step", "time", "split": "train", "loss", "perplexity", "grad_norm", "learning_rate",
     "tokens_per_sec", "step_time", "mfu", "tokens_seen"}
    {"step", "time", "split": "eval", "loss", "perplexity"}
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import tqdm
from tensorboardX import SummaryWriter

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))


class MetricsWriter:
    """Appends train/eval records to metrics.jsonl and TensorBoard; shows a progress bar."""

    def __init__(self, run_dir: str | Path, total_steps: int, initial_step: int = 0,
                 progress_bar: bool = True, mfu_peak: str = ""):
        """`mfu_peak`: what MFU divides by, shown after it in the bar ('270 GFLOP/s measured')."""
        run_dir = Path(run_dir)
        self._mfu_of = f" of {mfu_peak}" if mfu_peak else ""
        run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = (run_dir / METRICS_FILE).open("a", encoding="utf-8")
        self._tb = SummaryWriter(str(run_dir / TENSORBOARD_DIR))
        self._bar = tqdm.tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True,
                              disable=not progress_bar)

    def _write(self, record: dict) -> None:
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for key, value in record.items():
            if key not in ("step", "time", "split") and value is not None and math.isfinite(value):
                self._tb.add_scalar(f"{record['split']}/{key}", value, record["step"])

    def train(self, step: int, metrics: dict[str, float]) -> None:
        """Records the metrics of the step that ended at `step`."""
        record = {"step": step, "time": time.time(), "split": "train", **metrics,
                  "perplexity": perplexity(metrics["loss"])}
        self._write(record)
        self._bar.n = step
        self._bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics.get('tokens_per_sec', 0):,.0f}",
                              mfu=f"{metrics.get('mfu', float('nan')):.1%}{self._mfu_of}", refresh=False)
        self._bar.refresh()

    def eval(self, step: int, loss: float) -> None:
        self._write({"step": step, "time": time.time(), "split": "eval", "loss": loss,
                     "perplexity": perplexity(loss)})
        self._bar.write(f"step {step}: eval loss {loss:.4f}, perplexity {perplexity(loss):.2f}")

    def close(self) -> None:
        self._bar.close()
        self._tb.close()
        self._jsonl.close()

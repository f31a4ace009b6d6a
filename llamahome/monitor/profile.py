"""A `jax.profiler` trace of steps N..M (open it in TensorBoard's profile tab or Perfetto).

    Profiler.start_step = 10
    Profiler.end_step = 15
"""

from __future__ import annotations

from pathlib import Path

import gin
import jax
from absl import logging


@gin.configurable
class Profiler:
    """Starts a trace before step `start_step` and stops it after step `end_step` (both 1-based)."""

    def __init__(self, logdir: str | Path, start_step: int | None = None, end_step: int | None = None):
        self.logdir = str(logdir)
        self.start_step, self.end_step = start_step, end_step if end_step is not None else start_step
        self.active = False

    def before_step(self, step: int) -> None:
        if self.start_step is not None and step == self.start_step and not self.active:
            jax.profiler.start_trace(self.logdir)
            self.active = True
            logging.info("profiling steps %d..%d into %s", self.start_step, self.end_step, self.logdir)

    def after_step(self, step: int, sync: object = None) -> None:
        if self.active and step >= self.end_step:
            jax.block_until_ready(sync)
            jax.profiler.stop_trace()
            self.active = False

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False

"""A watchdog thread that ends a process whose training loop stops making progress.

In a multi-process run every step is a collective: when a peer process dies or hangs, the
others block inside it. JAX's coordination service catches a dead peer after its heartbeat
timeout, but not a peer that is alive and stuck. The train loop calls `kick()` after every
step, eval batch and save; if `timeout_s` passes without a kick, the watchdog logs what
happened and exits the process with status `EXIT_NO_PROGRESS`, so the launcher (SLURM, a
JobSet, launch/local.sh) sees a failure and can restart every process from the last
checkpoint. Bound in gin:

    Watchdog.timeout_s = 600   # longer than the slowest step, eval or checkpoint save
"""

from __future__ import annotations

import os
import sys
import threading
import time

import gin
from absl import logging

EXIT_NO_PROGRESS = 75  # EX_TEMPFAIL: a restart may succeed


@gin.configurable
class Watchdog:
    """Exits the process when `kick()` is not called for `timeout_s` seconds (None: never)."""

    def __init__(self, context: str = "", timeout_s: float | None = 600.0, poll_s: float | None = None):
        self.context, self.timeout_s, self.last_progress = context, timeout_s, "start"
        self.poll_s = poll_s or min(1.0, (timeout_s or 1.0) / 10)
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="llamahome-watchdog", daemon=True)

    def start(self) -> Watchdog:
        self._last = time.monotonic()
        if self.timeout_s is not None:
            self._thread.start()
        return self

    def kick(self, progress: str) -> None:
        """Records progress (e.g. "step 12"): the next `timeout_s` seconds start now."""
        self._last, self.last_progress = time.monotonic(), progress

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            idle = time.monotonic() - self._last
            if idle > self.timeout_s:
                message = (f"{self.context}: no progress for {idle:.0f} s since {self.last_progress} "
                           f"(Watchdog.timeout_s={self.timeout_s:g}): a peer process has probably "
                           "died or hung; see the other processes' logs. Exiting: restart every "
                           "process and training resumes from the last checkpoint")
                logging.error("%s", message)
                print(f"error: {message}", file=sys.stderr, flush=True)
                os._exit(EXIT_NO_PROGRESS)  # the main thread is stuck in a collective: no cleanup

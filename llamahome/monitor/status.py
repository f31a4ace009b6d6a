"""`status.json` in the run dir: a heartbeat the dashboard reads, atomically replaced."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

STATUS_FILE = "status.json"


class Heartbeat:
    """Writes {"status", "step", "total_steps", "model", "started", "updated", "pid", "host"}."""

    def __init__(self, run_dir: str | Path, total_steps: int, model: str, interval_s: float = 5.0):
        self.path = Path(run_dir) / STATUS_FILE
        self.interval_s = interval_s
        self.record = {"status": "running", "step": 0, "total_steps": total_steps, "model": model,
                       "started": time.time(), "updated": 0.0, "pid": os.getpid(),
                       "host": socket.gethostname()}

    def beat(self, step: int, status: str = "running", force: bool = False) -> None:
        """Records `step`; writes at most every `interval_s` unless `force` or the status changes."""
        now = time.time()
        changed = status != self.record["status"]
        self.record.update(step=step, status=status)
        if force or changed or now - self.record["updated"] >= self.interval_s:
            self.record["updated"] = now
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{STATUS_FILE}.tmp-{os.getpid()}")
            tmp.write_text(json.dumps(self.record), encoding="utf-8")
            os.replace(tmp, self.path)

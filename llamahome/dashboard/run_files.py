"""Reading run dirs in the format training writes (the layout: `llamahome.files.RunDir`).

A run dir holds `config.gin`, `operative_config.gin`, `metrics.jsonl` (one JSON object per
line, `split` "train" or "eval"), `status.json` (a heartbeat replaced atomically: status,
step, total_steps, model, started, updated, pid, host), `checkpoints/<step>/` and
`cache_stats.json`. Every reader here tolerates a missing or half-written file: a run that
has just started, or one being written while it is read, is shown with what is there.

Symlinks are followed only while they stay inside: a run dir must resolve inside the runs
dir, and a run's files inside its run dir. One that points out (`config.gin ->
~/.ssh/id_rsa`) reads as missing, so the dashboard never serves a file from elsewhere.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path

from llamahome.files import RunDir, dir_size

STALE = "stale"  # shown for a "running" heartbeat older than the threshold: the process died
MAX_METRICS_BYTES = 4 << 20  # one metrics response reads at most this much; the client pages on
_TAIL_BLOCK = 64 << 10
_MODEL_NAME = re.compile(r"^LlamaConfig\.name\s*=\s*['\"]([^'\"]+)['\"]", re.MULTILINE)


def inside(root: Path, path: Path) -> Path | None:
    """`path` with every symlink resolved, or None unless that lies strictly inside `root` (resolved)."""
    try:
        real, real_root = Path(os.path.realpath(path)), Path(os.path.realpath(root))
        return real if real != real_root and real.is_relative_to(real_root) else None
    except (OSError, ValueError):
        return None


def escaping_symlink(root: Path, tops: list[Path]) -> Path | None:
    """The first of `tops`, or of the files and dirs under them, that resolves outside `root`."""
    for top in tops:
        if os.path.lexists(top) and inside(root, top) is None:
            return top
        for parent, dirs, files in os.walk(top):
            for name in dirs + files:
                path = Path(parent) / name
                if os.path.islink(path) and inside(root, path) is None:
                    return path
    return None


def loads_finite(text: str | bytes) -> object:
    """`json.loads` with NaN, infinities and overflowing numbers (a diverged loss, an unknown
    MFU) read as None, since browsers' JSON has no such numbers; ValueError if not JSON."""
    try:
        return json.loads(text, parse_constant=lambda _: None,
                          parse_float=lambda s: _finite_or_none(float(s)))
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def read_json(path: Path | None) -> dict | None:
    """The JSON object in `path`, or None when it is missing or not (yet) valid JSON."""
    text = read_text(path)
    try:
        value = loads_finite(text) if text is not None else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def read_text(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def run_file(run_dir: Path, name: str) -> Path | None:
    """`run_dir/name` resolved, or None if a symlink takes it outside the run dir."""
    return inside(run_dir, run_dir / name)


def is_run_dir(path: Path) -> bool:
    try:
        return path.is_dir() and any((path / marker).exists() for marker in RunDir.MARKERS)
    except (OSError, ValueError):  # a name too long for the file system
        return False


def run_dir_of(runs_dir: Path, name: str) -> Path | None:
    """The run dir `runs_dir/name`, or None if `name` is not a run directly under `runs_dir`."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        return None
    path = runs_dir / name
    return path if is_run_dir(path) and inside(runs_dir, path) is not None else None


def effective_status(status: dict | None, now: float, stale_after_s: float) -> str:
    """The status to show: a "running" heartbeat older than `stale_after_s` becomes "stale"."""
    if not status:
        return "unknown"
    value = str(status.get("status", "unknown"))
    updated = status.get("updated")
    if value == "running" and isinstance(updated, (int, float)) and now - updated > stale_after_s:
        return STALE
    return value


def _finite_or_none(value: object) -> object:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def parse_records(data: bytes) -> tuple[list[dict], int]:
    """Parses complete JSONL lines of `data`; returns (records, bytes consumed).

    A last line without its newline is still being written and is left for the next read;
    lines that are not JSON objects are skipped. NaN and infinities become None (`loads_finite`).
    """
    end = data.rfind(b"\n") + 1
    records = []
    for line in data[:end].splitlines():
        try:
            record = loads_finite(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records, end


def read_metrics(run_dir: Path, since: int = 0, max_bytes: int = MAX_METRICS_BYTES) -> dict:
    """Records of metrics.jsonl from byte offset `since`: {records, next, size, reset}.

    `next` is the offset to pass as `since` on the next call; `reset` is True when `since`
    lies past the end (the file was replaced), in which case reading restarted at 0.
    """
    path = run_file(run_dir, RunDir.METRICS_FILE)
    try:
        size = path.stat().st_size if path else -1
    except OSError:
        size = -1
    if size < 0:
        return {"records": [], "next": 0, "size": 0, "reset": since > 0}
    reset = since > size or since < 0
    start = 0 if reset else since
    with path.open("rb") as f:
        f.seek(start)
        data = f.read(max_bytes)
    records, consumed = parse_records(data)
    if consumed == 0 and len(data) == max_bytes:  # one line longer than max_bytes: skip it
        consumed = len(data)
    return {"records": records, "next": start + consumed, "size": size, "reset": reset}


def last_train_record(run_dir: Path) -> dict | None:
    """The last complete "train" record of metrics.jsonl, read from the end of the file."""
    if (path := run_file(run_dir, RunDir.METRICS_FILE)) is None:
        return None
    try:
        with path.open("rb") as f:
            end = path.stat().st_size
            pending = b""  # bytes after `end` not yet parsed: a line cut by the block boundary
            while end > 0:
                start = max(0, end - _TAIL_BLOCK)
                f.seek(start)
                data = f.read(end - start) + pending
                end = start
                cut = 0 if start == 0 else data.find(b"\n") + 1  # the first line may be cut
                if start > 0 and cut == 0:
                    pending = data
                    continue
                records, _ = parse_records(data[cut:])
                for record in reversed(records):
                    if record.get("split", "train") == "train":
                        return record
                pending = data[:cut]
    except OSError:
        return None
    return None


def model_name(run_dir: Path, status: dict | None) -> str | None:
    """The model preset: status.json's `model`, else `LlamaConfig.name` in the saved config."""
    if status and status.get("model"):
        return str(status["model"])
    for name in (RunDir.OPERATIVE_CONFIG_FILE, RunDir.CONFIG_FILE):
        text = read_text(run_file(run_dir, name))
        if text and (m := _MODEL_NAME.search(text)):
            return m.group(1)
    return None


def list_checkpoints(run_dir: Path) -> list[dict]:
    """Committed checkpoints `checkpoints/<step>/`, by step: [{step, bytes, path, mtime}].

    Orbax writes a step under a temporary name and renames it when complete, so only
    directories named by an integer are listed.
    """
    root = RunDir(run_dir).checkpoints
    if not root.is_dir() or inside(run_dir, root) is None:
        return []
    checkpoints = []
    for entry in root.iterdir():
        if entry.is_dir() and entry.name.isdigit() and inside(run_dir, entry) is not None:
            checkpoints.append({"step": int(entry.name), "bytes": dir_size(entry),
                                "path": str(entry), "mtime": entry.stat().st_mtime})
    return sorted(checkpoints, key=lambda c: c["step"])


def run_summary(run_dir: Path, stale_after_s: float, now: float | None = None) -> dict:
    """One row of the runs list: name, status, model, steps, last loss, tokens/s, start time."""
    now = time.time() if now is None else now
    status = read_json(run_file(run_dir, RunDir.STATUS_FILE))
    last = last_train_record(run_dir) or {}
    started = (status or {}).get("started")
    if started is None and (config := run_file(run_dir, RunDir.CONFIG_FILE)) and config.exists():
        started = config.stat().st_mtime
    return {
        "name": run_dir.name,
        "status": effective_status(status, now, stale_after_s),
        "reported_status": (status or {}).get("status"),
        "model": model_name(run_dir, status),
        "step": (status or {}).get("step", last.get("step")),
        "total_steps": (status or {}).get("total_steps"),
        "last_loss": last.get("loss"),
        "tokens_per_sec": last.get("tokens_per_sec"),
        "started": started,
        "updated": (status or {}).get("updated"),
        "host": (status or {}).get("host"),
        "pid": (status or {}).get("pid"),
    }


def list_runs(runs_dir: Path, stale_after_s: float) -> list[dict]:
    """Summaries of every run dir directly under `runs_dir`, newest start first."""
    if not runs_dir.is_dir():
        return []
    now = time.time()
    runs = [run_summary(p, stale_after_s, now) for p in runs_dir.iterdir()
            if is_run_dir(p) and inside(runs_dir, p) is not None]
    return sorted(runs, key=lambda r: (r["started"] or 0, r["name"]), reverse=True)

"""Reading run dirs in the format training writes (the layout: `llamahome.files.RunDir`).

A run dir holds `config.gin`, `operative_config.gin`, `metrics.jsonl` (one JSON object per
line, `split` "train" or "eval"), `status.json` (a heartbeat replaced atomically: status,
step, total_steps, model, started, updated, pid, host), `checkpoints/<step>/` and
`cache_stats.json`. Every reader here tolerates a missing or half-written file: a run that
has just started, or one being written while it is read, is shown with what is there.

Symlinks are followed only while they stay inside: a run dir must resolve inside the runs
dir, and a run's files inside its run dir. One that points out (`config.gin ->
~/.ssh/id_rsa`) reads as missing, so the dashboard never serves a file from elsewhere.

A runs dir on object storage (`gs://`, `s3://`; its run dirs are `epath.Path`s) is read
through `RemoteReader`: listings and small objects are kept `RemoteReader.ttl_s` seconds, and
metrics.jsonl is read in byte ranges (its tail for the runs list, `since..` for the curves), so a
page load costs a listing of the runs dir plus a few requests per run, once per TTL.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from llamahome import store
from llamahome.files import RunDir, dir_size

STALE = "stale"  # shown for a "running" heartbeat older than the threshold: the process died
MAX_METRICS_BYTES = 4 << 20  # one metrics response reads at most this much; the client pages on
_TAIL_BLOCK = 64 << 10
_MODEL_NAME = re.compile(r"^LlamaConfig\.name\s*=\s*['\"]([^'\"]+)['\"]", re.MULTILINE)


class RemoteReader:
    """Cached reads of object storage for the dashboard: listings and objects, `ttl_s` each."""

    def __init__(self, ttl_s: float = 5.0):
        self.ttl_s = ttl_s
        self._cache: dict[tuple, tuple[float, object]] = {}
        self._mutex = threading.Lock()
        self.requests = 0  # sent to the store (tests count them)

    def _cached(self, key: tuple, fetch):
        now = time.monotonic()
        with self._mutex:
            hit = self._cache.get(key)
            if hit and now - hit[0] < self.ttl_s:
                return hit[1]
        value = fetch()
        with self._mutex:
            self.requests += 1
            self._cache[key] = (now, value)
            if len(self._cache) > 4096:
                self._cache = {k: v for k, v in self._cache.items() if now - v[0] < self.ttl_s}
        return value

    @staticmethod
    def _fs(path):
        return store.filesystem(path)

    def listing(self, path) -> dict[str, dict]:
        """{name: {"dir": bool, "size": int, "mtime": float | None}} of the entries directly
        under `path` ({} if none or unreadable)."""
        def fetch():
            fs, key = self._fs(path)
            try:
                entries = fs.ls(key, detail=True, refresh=True)
            except (OSError, ValueError):
                return {}
            return {e["name"].rstrip("/").rsplit("/", 1)[-1]: {
                "dir": e.get("type") == "directory", "size": int(e.get("size") or 0),
                "mtime": _mtime(e)} for e in entries if e["name"].rstrip("/") != key}
        return self._cached(("ls", os.fspath(path)), fetch)

    def info(self, path) -> dict | None:
        """The listing entry of the object `path`, or None."""
        parent, _, name = os.fspath(path).rpartition("/")
        return self.listing(parent).get(name)

    def read(self, path, start: int = 0, end: int | None = None) -> bytes | None:
        """Bytes [start, end) of the object `path` (None if it is missing)."""
        def fetch():
            fs, key = self._fs(path)
            try:
                return fs.cat_file(key, start=start or None, end=end)
            except (OSError, ValueError):
                return None
        return self._cached(("read", os.fspath(path), start, end), fetch)

    def find(self, path) -> dict[str, dict]:
        """{relative name: listing entry} of every object under `path`, recursively."""
        def fetch():
            try:
                found = store.find(path)
            except (OSError, ValueError, store.StorageError):
                return {}
            return {name: {"size": int(e.get("size") or 0), "mtime": _mtime(e)}
                    for name, e in found.items()}
        return self._cached(("find", os.fspath(path)), fetch)


def _mtime(entry: dict) -> float | None:
    value = entry.get("mtime") or entry.get("updated") or entry.get("LastModified")
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value)
        except ValueError:
            return None
    if isinstance(value, dt.datetime):
        return value.timestamp()
    return float(value) if isinstance(value, (int, float)) else None


REMOTE = RemoteReader()


def inside(root: Path, path: Path) -> Path | None:
    """`path` with every symlink resolved, or None unless that lies strictly inside `root` (resolved).
    On object storage (no symlinks): `path` if its URI lies under `root`'s."""
    if store.is_remote(path):
        top, text = os.fspath(root).rstrip("/") + "/", os.fspath(path)
        return path if text.startswith(top) and ".." not in text[len(top):].split("/") else None
    try:
        real, real_root = Path(os.path.realpath(path)), Path(os.path.realpath(root))
        return real if real != real_root and real.is_relative_to(real_root) else None
    except (OSError, ValueError):
        return None


def escaping_symlink(root: Path, tops: list[Path]) -> Path | None:
    """The first of `tops`, or of the files and dirs under them, that resolves outside `root`."""
    if store.is_remote(root):
        return None
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
    if store.is_remote(path):
        data = REMOTE.read(path)
        return None if data is None else data.decode("utf-8", errors="replace")
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def run_file(run_dir: Path, name: str) -> Path | None:
    """`run_dir/name` resolved, or None if a symlink takes it outside the run dir."""
    return inside(run_dir, run_dir / name)


def is_run_dir(path: Path) -> bool:
    if store.is_remote(path):
        return any(marker in REMOTE.listing(path) for marker in RunDir.MARKERS)
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
    size = _size(path)
    if size < 0:
        return {"records": [], "next": 0, "size": 0, "reset": since > 0}
    reset = since > size or since < 0
    start = 0 if reset else since
    data = _read_range(path, start, min(size, start + max_bytes))
    records, consumed = parse_records(data)
    if consumed == 0 and len(data) == max_bytes:  # one line longer than max_bytes: skip it
        consumed = len(data)
    return {"records": records, "next": start + consumed, "size": size, "reset": reset}


def _size(path: Path | None) -> int:
    """The size of the file or object `path`; -1 if it is missing."""
    if path is None:
        return -1
    if store.is_remote(path):
        info = REMOTE.info(path)
        return -1 if info is None or info["dir"] else info["size"]
    try:
        return path.stat().st_size
    except OSError:
        return -1


def _read_range(path: Path, start: int, end: int) -> bytes:
    """Bytes [start, end) of `path` (fewer if it shrank)."""
    if store.is_remote(path):
        return (REMOTE.read(path, start, end) or b"") if end > start else b""
    with path.open("rb") as f:
        f.seek(start)
        return f.read(end - start)


def last_train_record(run_dir: Path) -> dict | None:
    """The last complete "train" record of metrics.jsonl, read from the end of the file."""
    if (path := run_file(run_dir, RunDir.METRICS_FILE)) is None:
        return None
    try:
        end = _size(path)
        pending = b""  # bytes after `end` not yet parsed: a line cut by the block boundary
        while end > 0:
            start = max(0, end - _TAIL_BLOCK)
            data = _read_range(path, start, end) + pending
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
    if store.is_remote(run_dir):
        return _remote_checkpoints(root)
    if not root.is_dir() or inside(run_dir, root) is None:
        return []
    checkpoints = []
    for entry in root.iterdir():
        if entry.is_dir() and entry.name.isdigit() and inside(run_dir, entry) is not None:
            checkpoints.append({"step": int(entry.name), "bytes": dir_size(entry),
                                "path": str(entry), "mtime": entry.stat().st_mtime})
    return sorted(checkpoints, key=lambda c: c["step"])


def _remote_checkpoints(root) -> list[dict]:
    """Checkpoints on object storage: steps whose commit marker (Orbax's commit_success.txt,
    written last) is there, from one recursive listing."""
    steps: dict[int, dict] = {}
    for name, entry in REMOTE.find(root).items():
        step, _, rest = name.partition("/")
        if not step.isdigit() or not rest:
            continue
        c = steps.setdefault(int(step), {"step": int(step), "bytes": 0, "path": f"{root}/{step}",
                                         "mtime": 0.0, "committed": False})
        c["bytes"] += entry["size"]
        c["mtime"] = max(c["mtime"], entry["mtime"] or 0.0)
        c["committed"] |= rest == "commit_success.txt"
    return [{k: v for k, v in c.items() if k != "committed"}
            for _, c in sorted(steps.items()) if c["committed"]]


def _started_fallback(run_dir: Path) -> float | None:
    """When the run started, for a run with no heartbeat: its config's mtime."""
    if store.is_remote(run_dir):
        info = REMOTE.info(f"{run_dir}/{RunDir.CONFIG_FILE}")
        return info["mtime"] if info else None
    if (config := run_file(run_dir, RunDir.CONFIG_FILE)) and config.exists():
        return config.stat().st_mtime
    return None


def run_summary(run_dir: Path, stale_after_s: float, now: float | None = None) -> dict:
    """One row of the runs list: name, status, model, steps, last loss, tokens/s, start time."""
    now = time.time() if now is None else now
    status = read_json(run_file(run_dir, RunDir.STATUS_FILE))
    last = last_train_record(run_dir) or {}
    started = (status or {}).get("started")
    if started is None:
        started = _started_fallback(run_dir)
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
    now = time.time()
    if store.is_remote(runs_dir):  # requests in parallel: each run is a few round trips
        names = [n for n, e in REMOTE.listing(runs_dir).items() if e["dir"]]
        with ThreadPoolExecutor(8) as pool:
            runs = [r for r in pool.map(lambda n: _remote_summary(runs_dir / n, stale_after_s, now),
                                        names) if r]
    elif not runs_dir.is_dir():
        return []
    else:
        runs = [run_summary(p, stale_after_s, now) for p in runs_dir.iterdir()
                if is_run_dir(p) and inside(runs_dir, p) is not None]
    return sorted(runs, key=lambda r: (r["started"] or 0, r["name"]), reverse=True)


def _remote_summary(run_dir, stale_after_s: float, now: float) -> dict | None:
    return run_summary(run_dir, stale_after_s, now) if is_run_dir(run_dir) else None

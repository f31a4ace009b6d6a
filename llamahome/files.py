"""Every file thing LlamaHome shares, in one place.

- Where things live: `runs_dir()`, `cache_dir()`, `models_dir()` (each bound in gin or by a
  `LLAMAHOME_*` variable).
- What a run dir holds: `RunDir`, the one definition of every file name in a run dir.
- Writing so that a reader (or a crash) never sees half a file: `write_text_atomic`,
  `write_bytes_atomic` (optionally user-only, mode 0600), `save_config` (a gin config with its
  secrets redacted).
- `dir_size`: bytes under a folder, each hard-linked file counted once.
- `locked_json`: a JSON index edited under an exclusive file lock (the cache index, the model
  registry).
- One job at a time per run dir: `hold`, `acquire`, `release`, `RunDirBusy`.

The run dir lock: `launch` takes it on the run dir it writes (the coordinator process only, on
a pod) before it writes anything there; a second job on the same run dir stops at once with one
line naming the holder. Jobs that only read a run dir (the dashboard, `evaluate`/`generate`
pointed at it with `checkpoint=`) never take it.

The lock is an exclusive `fcntl.flock` on `<run_dir>/.lock`; the kernel releases it when the
holder exits in any way, SIGKILL included, so a crashed run never blocks the next one. The file
also holds a JSON record of the holder (pid, host, start time, command) for the message; a
record left by a holder that did not release (it crashed or was killed) is reported as taken
over. The file is never deleted: unlinking a flock'ed file lets two processes each lock a
different inode.

Shared filesystems: flock works across hosts on local disks, NFSv4 and Lustre/CephFS mounted
with locking. Where flock is refused (ENOLCK, e.g. NFSv3 without lockd), the record alone guards
the run dir: a record naming a live process on this host, or any other host, refuses the start;
delete `<run_dir>/.lock` once that run is known dead. Where a filesystem accepts flock without
sharing it between hosts (some FUSE mounts), two hosts are not stopped from sharing a run dir.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import json
import os
import socket
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import gin
from absl import logging

from llamahome import secrets
from llamahome.errors import UserError

# -- where things live ------------------------------------------------------------------------


def _default_cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llamahome"


@gin.configurable
def runs_dir(path: str = "runs") -> Path:
    """The folder under which each run gets its own run dir (`runs/<timestamp>`)."""
    return Path(path).expanduser()


@gin.configurable
def cache_dir(path: str | None = None) -> Path:
    """The root of token caches, corpora and the JAX compilation cache."""
    return Path(path).expanduser() if path else _default_cache_root()


@gin.configurable
def models_dir(path: str | None = None) -> Path:
    """The root of downloaded and imported models (the model registry lives here)."""
    return Path(path).expanduser() if path else _default_cache_root() / "models"


# -- what a run dir holds ---------------------------------------------------------------------


class RunDir:
    """The files of one run dir:

        <run_dir>/.lock                  the run dir lock and its holder's record (`hold`)
                  config.gin             the config the job was launched with (secrets redacted)
                  operative_config.gin   the values the job actually used
                  metrics.jsonl          one JSON object per line, `split` "train" or "eval"
                  status.json            the heartbeat (status, step, total_steps, model, ...)
                  cache_stats.json       token cache hits, misses, builds
                  checkpoints/<step>/    Orbax checkpoints
                  tokenizer/             the tokenizer the run trains with
                  tensorboard/           TensorBoard event files
                  profile/               a `jax.profiler` trace
                  eval_results.json      the `evaluate` job's result
                  lm_eval_results.json   the `lm_eval` job's lm-eval results (lm-eval's format)
                  lm_eval_samples/       its per-sample logs, <task>.jsonl
                  generations.jsonl      the `generate` job's completions
                  download.json          the `download_model` job's record
                  plan.json              the `plan` job's compiled plan (llamahome/plan/jobs.py)
    """

    LOCK_FILE = ".lock"
    CONFIG_FILE = "config.gin"
    OPERATIVE_CONFIG_FILE = "operative_config.gin"
    METRICS_FILE = "metrics.jsonl"
    STATUS_FILE = "status.json"
    CACHE_STATS_FILE = "cache_stats.json"
    CHECKPOINTS_DIR = "checkpoints"
    TOKENIZER_DIR = "tokenizer"
    TENSORBOARD_DIR = "tensorboard"
    PROFILE_DIR = "profile"
    EVAL_RESULTS_FILE = "eval_results.json"
    LM_EVAL_RESULTS_FILE = "lm_eval_results.json"
    LM_EVAL_SAMPLES_DIR = "lm_eval_samples"
    GENERATIONS_FILE = "generations.jsonl"
    DOWNLOAD_FILE = "download.json"
    PLAN_FILE = "plan.json"
    MARKERS = (STATUS_FILE, METRICS_FILE, CONFIG_FILE)  # any one makes a folder a run dir

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def lock(self) -> Path:
        return self.path / self.LOCK_FILE

    @property
    def config(self) -> Path:
        return self.path / self.CONFIG_FILE

    @property
    def operative_config(self) -> Path:
        return self.path / self.OPERATIVE_CONFIG_FILE

    @property
    def metrics(self) -> Path:
        return self.path / self.METRICS_FILE

    @property
    def status(self) -> Path:
        return self.path / self.STATUS_FILE

    @property
    def cache_stats(self) -> Path:
        return self.path / self.CACHE_STATS_FILE

    @property
    def checkpoints(self) -> Path:
        return self.path / self.CHECKPOINTS_DIR

    @property
    def tokenizer(self) -> Path:
        return self.path / self.TOKENIZER_DIR

    @property
    def tensorboard(self) -> Path:
        return self.path / self.TENSORBOARD_DIR

    @property
    def profile(self) -> Path:
        return self.path / self.PROFILE_DIR

    @property
    def eval_results(self) -> Path:
        return self.path / self.EVAL_RESULTS_FILE

    @property
    def lm_eval_results(self) -> Path:
        return self.path / self.LM_EVAL_RESULTS_FILE

    @property
    def lm_eval_samples(self) -> Path:
        return self.path / self.LM_EVAL_SAMPLES_DIR

    @property
    def generations(self) -> Path:
        return self.path / self.GENERATIONS_FILE

    @property
    def download(self) -> Path:
        return self.path / self.DOWNLOAD_FILE

    @property
    def plan(self) -> Path:
        return self.path / self.PLAN_FILE


# -- atomic writes ----------------------------------------------------------------------------


def write_bytes_atomic(path: Path, data: bytes, mode: int | None = None) -> None:
    """Writes `data` to `path` through a temporary file and a rename, so readers never see half.

    `mode` (e.g. 0o600 for a file that holds secrets) is the file's permissions from the start,
    whatever the permissions of a file it replaces.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666 if mode is None else mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        if mode is not None:
            os.chmod(tmp, mode)  # in case the temporary file existed with other permissions
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str, mode: int | None = None) -> None:
    """`write_bytes_atomic` of `text` in UTF-8."""
    write_bytes_atomic(path, text.encode("utf-8"), mode)


def save_config(run_dir: Path, name: str, config: str) -> Path:
    """Writes a gin config string as `run_dir/name` with secrets redacted; returns its path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / name
    write_text_atomic(path, secrets.redact_gin_config(config))
    return path


# -- sizes and locked indexes -----------------------------------------------------------------


def dir_size(path: Path) -> int:
    """Bytes of the regular files under `path`: each inode counted once, symlinks not followed,
    files that vanish while counted (a checkpoint being deleted) skipped."""
    seen, total = set(), 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


@contextlib.contextmanager
def locked_json(path: Path, lock_file: Path) -> Iterator[dict]:
    """Yields the JSON object in `path` ({} if there is none) under an exclusive flock on
    `lock_file`; when the block ends without an exception, writes it back atomically."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        except ValueError as e:
            raise UserError(f"{path} is not valid JSON ({e}); move it aside and retry") from None
        yield data
        write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


# -- one job at a time per run dir ------------------------------------------------------------

_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class RunDirBusy(UserError):
    """Another job holds the run dir."""


def _process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot), to tell a reused pid apart."""
    try:
        proc_stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return proc_stat.rsplit(")", 1)[-1].split()[19]


def holder_record() -> dict:
    """Who this process is, as the lock file records it."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "proc_start": _process_start(os.getpid()),
            "started": dt.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join(secrets.redact_argv([Path(sys.orig_argv[0]).name,
                                                      *sys.orig_argv[1:]]))[:300]}


def pid_alive(pid: int) -> bool:
    """Whether a process `pid` exists on this host (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _is_alive(record: dict) -> bool:
    """Whether the process a record names is still running (always assumed for another host)."""
    if record.get("host") != socket.gethostname():
        return True
    pid = int(record.get("pid", 0))
    if pid <= 0 or pid == os.getpid() or not pid_alive(pid):
        return False
    start = _process_start(pid)
    return start is None or record.get("proc_start") in (None, start)


def _describe(record: dict) -> str:
    if not record:
        return "another process (its holder record is not written yet)"
    return (f"pid {record.get('pid')} on host {record.get('host')} (started "
            f"{record.get('started')}: {record.get('command')})")


def _read_record(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 1 << 16, 0) or b"{}")
    except (ValueError, OSError):
        return {}


def _write_record(fd: int, record: dict) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    os.fsync(fd)


def _busy(run_dir: Path, record: dict) -> RunDirBusy:
    return RunDirBusy(f"run dir {run_dir} is in use by {_describe(record)}; wait for that job to "
                      "finish or stop it, or give this one another launch.run_dir")


def acquire(run_dir: Path) -> int:
    """Locks `run_dir` (creating it) for this process; returns the lock's file descriptor."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(RunDir(run_dir).lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        previous = _take(fd, run_dir)
        _write_record(fd, holder_record())
    except BaseException:
        os.close(fd)
        raise
    if previous:
        logging.warning("run dir %s: taking over the lock of %s, which ended without releasing it",
                        run_dir, _describe(previous))
    return fd


def _take(fd: int, run_dir: Path) -> dict:
    """Takes the flock (or, where there is none, checks the record); returns the stale record."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        record = _read_record(fd)
        for _ in range(20):  # the holder may be between taking the lock and writing its record
            if record:
                break
            time.sleep(0.05)
            record = _read_record(fd)
        raise _busy(run_dir, record) from None
    except OSError as e:
        if e.errno not in _NO_FLOCK:
            raise
        logging.warning("run dir %s: the filesystem refuses flock (%s); guarding it by the holder "
                        "record alone", run_dir, os.strerror(e.errno))
        record = _read_record(fd)
        if record and _is_alive(record):
            raise RunDirBusy(f"{_busy(run_dir, record)} (no flock on this filesystem: if that job "
                             f"is dead, delete {RunDir(run_dir).lock})") from None
        return record
    record = _read_record(fd)
    if record and record.get("host") == socket.gethostname() and _is_alive(record):
        # flock granted while the holder lives: this filesystem does not enforce locks.
        raise _busy(run_dir, record)
    return record


def release(fd: int) -> None:
    """Clears the holder record and unlocks (closing the descriptor releases the flock)."""
    try:
        os.ftruncate(fd, 0)
    finally:
        os.close(fd)


@contextlib.contextmanager
def hold(run_dir: Path) -> Iterator[None]:
    """Holds the run dir's lock for the `with` block."""
    fd = acquire(run_dir)
    try:
        yield
    finally:
        release(fd)

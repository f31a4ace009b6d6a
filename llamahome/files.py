"""Every file thing LlamaHome shares, in one place.

- Where things live: `runs_dir()`, `cache_dir()`, `models_dir()` (each bound in gin or by a
  `LLAMAHOME_*` variable; a local path or a `gs://` / `s3://` URI, see llamahome/store.py).
- What a run dir holds: `RunDir`, the one definition of every file name in a run dir; a run
  dir on object storage is written through a local staging folder that `RunDirSync` uploads.
- Writing so that a reader (or a crash) never sees half a file: `write_text_atomic`,
  `write_bytes_atomic` (optionally user-only, mode 0600), `save_config` (a gin config with its
  secrets redacted).
- `dir_size`: bytes under a folder, each hard-linked file counted once (objects: their sizes).
- `locked_json`: a JSON index edited under an exclusive file lock (the cache index, the model
  registry); on object storage under a lease object and a conditional write.
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

On object storage (`gs://`, `s3://`), launch first probes write access (`store.check_access`:
one line naming the bucket and the cause), then locks. There is no flock: `<run_dir>/.lock` is
an object created only if absent (`store.write_if(..., version=None)`), holding the holder
record plus `beat`, a time the holder rewrites every `remote_lock.heartbeat_s` (conditioned on
its own version).
Another job is refused while the object exists, except: a record from this host naming a dead
(or reused) pid is taken over at once; a record from another host whose beat is older than
`remote_lock.stale_after_s` (10 min; the holder's clock, so allow for clock skew) is taken
over with a warning. A takeover is a conditional write on the stale version, so of two takers
only one wins. Release deletes the object if it is still at our version. A SIGKILLed holder
on another host therefore blocks the run dir until its beat is stale; delete the object to
start sooner.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import stat
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import gin
from absl import logging

from llamahome import secrets, store
from llamahome.errors import UserError

# -- where things live ------------------------------------------------------------------------


def _default_cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llamahome"


@gin.configurable
def runs_dir(path: str = "runs") -> store.AnyPath:
    """The folder under which each run gets its own run dir (`runs/<timestamp>`); may be a URI."""
    return store.as_path(path)


@gin.configurable
def cache_dir(path: str | None = None) -> store.AnyPath:
    """The root of token caches, corpora and the JAX compilation cache; may be a URI."""
    return store.as_path(path) if path else _default_cache_root()


@gin.configurable
def models_dir(path: str | None = None) -> store.AnyPath:
    """The root of downloaded and imported models (the model registry lives here); may be a URI."""
    return store.as_path(path) if path else _default_cache_root() / "models"


def local_cache_dir() -> Path:
    """`cache_dir()` where it is local, else the default local cache root (for this machine's own
    files: staging folders, the measured CPU peak)."""
    root = cache_dir()
    return root if not store.is_remote(root) else _default_cache_root()


def staging_dir(uri: str) -> Path:
    """The local folder where the small files of the remote run dir `uri` are written."""
    digest = hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:20]
    return _default_cache_root() / "staging" / digest


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

    A run dir on object storage (`RunDir("gs://b/runs/x")`, `is_remote`): its files are
    appended to and rewritten often, which object storage cannot do cheaply, so they are
    STAGED: `path` and every file property except `lock` and `checkpoints` name a local
    staging folder (`staging_dir(uri)`, under the local cache root), and `RunDirSync` (started
    by launch in process 0) uploads what changed every `RunDirSync.interval_s` and once more
    when the job ends. `checkpoints` and `lock` are the remote paths themselves (Orbax writes
    from every host; the lock lives on the store). `remote` is the run dir's `epath.Path`.

    Reading a remote run written elsewhere (the dashboard, a later job): `RunDir.view(uri)`,
    whose `path` and file properties are all the remote objects (`RunDir.view(uri).metrics`).
    One exception: `RunDir(uri).tokenizer`, read where nothing is staged yet, is first
    downloaded from the bucket into the staging folder (tokenizer libraries read local files);
    the writer's copy is uploaded within `RunDirSync.poll_s` of being written.
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

    def __init__(self, path: str | os.PathLike, *, staged: bool = True):
        text = os.fspath(path)
        self.is_remote = store.is_remote(text)
        self.uri = text.rstrip("/") if self.is_remote else text
        self.remote = store.as_path(self.uri) if self.is_remote else None
        self.staging = staging_dir(self.uri) if self.is_remote else None
        if not self.is_remote:
            self.path: store.AnyPath = Path(text)
        else:
            self.path = self.staging if staged else self.remote
        self._root = self.remote if self.is_remote else self.path  # lock and checkpoints

    @classmethod
    def view(cls, path: str | os.PathLike) -> RunDir:
        """The run dir for reading what is stored: remote paths throughout (local: the same)."""
        return cls(path, staged=False)

    def __repr__(self) -> str:
        return f"RunDir({store.show(self.uri)!r})"

    def __fspath__(self) -> str:
        return self.uri if self.is_remote else str(self.path)

    @property
    def lock(self) -> store.AnyPath:
        return self._root / self.LOCK_FILE

    @property
    def config(self) -> store.AnyPath:
        return self.path / self.CONFIG_FILE

    @property
    def operative_config(self) -> store.AnyPath:
        return self.path / self.OPERATIVE_CONFIG_FILE

    @property
    def metrics(self) -> store.AnyPath:
        return self.path / self.METRICS_FILE

    @property
    def status(self) -> store.AnyPath:
        return self.path / self.STATUS_FILE

    @property
    def cache_stats(self) -> store.AnyPath:
        return self.path / self.CACHE_STATS_FILE

    @property
    def checkpoints(self) -> store.AnyPath:
        return self._root / self.CHECKPOINTS_DIR

    @property
    def tokenizer(self) -> store.AnyPath:
        folder = self.path / self.TOKENIZER_DIR
        if self.is_remote and folder == self.staging / self.TOKENIZER_DIR and not folder.is_dir():
            remote = self.remote / self.TOKENIZER_DIR
            try:
                store.refresh(remote)
                if remote.is_dir():
                    store.download_dir(remote, folder)
            except store.StorageError as e:
                logging.warning("could not download the run's tokenizer: %s", e)
        return folder

    @property
    def tensorboard(self) -> store.AnyPath:
        return self.path / self.TENSORBOARD_DIR

    @property
    def profile(self) -> store.AnyPath:
        return self.path / self.PROFILE_DIR

    @property
    def eval_results(self) -> store.AnyPath:
        return self.path / self.EVAL_RESULTS_FILE

    @property
    def lm_eval_results(self) -> store.AnyPath:
        return self.path / self.LM_EVAL_RESULTS_FILE

    @property
    def lm_eval_samples(self) -> store.AnyPath:
        return self.path / self.LM_EVAL_SAMPLES_DIR

    @property
    def generations(self) -> store.AnyPath:
        return self.path / self.GENERATIONS_FILE

    @property
    def download(self) -> store.AnyPath:
        return self.path / self.DOWNLOAD_FILE

    @property
    def plan(self) -> store.AnyPath:
        return self.path / self.PLAN_FILE


# -- staging a remote run dir -----------------------------------------------------------------


@gin.configurable
class RunDirSync:
    """Uploads the staged files of a remote run dir (`RunDir`) from process 0.

    `start()` empties the staging folder and downloads the run's existing files into it (a
    resumed run appends to its metrics.jsonl rather than starting a new one; checkpoints/,
    tensorboard/ and profile/ are not downloaded: their files are only ever added). A thread
    then uploads each staged file whose size or mtime changed, as one whole-object PUT: the
    tokenizer and configs within `poll_s` of being written, the rest at most every `interval_s`.
    `stop()` uploads once more. Names starting with "." (temporary files) and checkpoints/ are
    never uploaded. A job killed with SIGKILL loses at most `interval_s` of metrics; SIGTERM
    (handled by launch, or by train's checkpoint-and-stop) ends with the final upload.
    """

    URGENT = ("tokenizer", "config.gin", "operative_config.gin")
    NOT_DOWNLOADED = ("checkpoints", "tensorboard", "profile")

    def __init__(self, run_dir: str | os.PathLike, interval_s: float = 30.0, poll_s: float = 1.0):
        self.run = RunDir(run_dir)
        if not self.run.is_remote:
            raise ValueError(f"{run_dir} is not a remote run dir")
        self.interval_s, self.poll_s = interval_s, poll_s
        self._uploaded: dict[str, tuple[int, int]] = {}
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.uploads = 0  # PUTs so far (tests and logs)

    def start(self) -> RunDirSync:
        staging = self.run.staging
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        self._download_existing()
        self._uploaded = {name: sig for name, sig in self._staged().items()}
        self._thread = threading.Thread(target=self._run, name="run-dir-sync", daemon=True)
        self._thread.start()
        return self

    def _download_existing(self) -> None:
        remote = self.run.remote
        try:
            store.refresh(remote)
            if not remote.is_dir():
                return
            for entry in remote.iterdir():
                if entry.name.startswith(".") or entry.name in self.NOT_DOWNLOADED:
                    continue
                target = self.run.staging / entry.name
                if entry.is_dir():
                    store.download_dir(entry, target)
                else:
                    target.write_bytes(entry.read_bytes())
        except store.StorageError:
            raise
        except Exception as e:
            raise store.StorageError(f"cannot read {store.show(self.run.uri)}: "
                                     f"{store.describe_error(e)}") from None

    def _staged(self) -> dict[str, tuple[int, int]]:
        """{relative name: (size, mtime_ns)} of every file to upload."""
        found, root = {}, self.run.staging
        for parent, dirs, names in os.walk(root):
            rel_parent = os.path.relpath(parent, root)
            dirs[:] = [d for d in dirs if not d.startswith(".") and not (
                rel_parent == "." and d == RunDir.CHECKPOINTS_DIR)]
            for name in names:
                if name.startswith("."):
                    continue
                try:
                    st = os.stat(os.path.join(parent, name))
                except OSError:
                    continue
                rel = os.path.normpath(os.path.join(rel_parent, name))
                found[rel] = (st.st_size, st.st_mtime_ns)
        return found

    def sync(self, urgent_only: bool = False) -> int:
        """Uploads the staged files that changed (only `URGENT` ones if `urgent_only`); returns
        how many."""
        with self._mutex:
            count = 0
            for rel, sig in sorted(self._staged().items()):
                if self._uploaded.get(rel) == sig:
                    continue
                if urgent_only and rel.split(os.sep)[0] not in self.URGENT:
                    continue
                try:
                    data = (self.run.staging / rel).read_bytes()
                except OSError:  # replaced or removed meanwhile: the next pass sees it
                    continue
                store.put(self.run.remote / Path(rel).as_posix(), data)
                self._uploaded[rel] = sig
                count += 1
            self.uploads += count
            return count

    def _run(self) -> None:
        last_full = time.monotonic()
        while not self._stop.wait(self.poll_s):
            full = time.monotonic() - last_full >= self.interval_s
            try:
                self.sync(urgent_only=not full)
            except store.StorageError as e:
                logging.warning("run dir upload failed (retried in %.0f s): %s", self.interval_s, e)
            if full:
                last_full = time.monotonic()

    def stop(self) -> None:
        """Stops the thread and uploads what is left."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.sync()

    def __enter__(self) -> RunDirSync:
        return self.start()

    def __exit__(self, kind, value, tb) -> None:
        try:
            self.stop()
        except store.StorageError as e:
            if kind is None:
                raise
            logging.error("the final upload of the run dir failed: %s", e)


@contextlib.contextmanager
def sigterm_exits() -> Iterator[None]:
    """Within it, an unhandled SIGTERM raises SystemExit (so `finally` blocks, the final upload
    among them, run) instead of killing the process; a handler already installed is kept."""
    if threading.current_thread() is not threading.main_thread() or (
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        yield
        return

    def _exit(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


# -- atomic writes ----------------------------------------------------------------------------


def write_bytes_atomic(path: Path, data: bytes, mode: int | None = None) -> None:
    """Writes `data` to `path` through a temporary file and a rename, so readers never see half.

    `mode` (e.g. 0o600 for a file that holds secrets) is the file's permissions from the start,
    whatever the permissions of a file it replaces. An object storage URI is written in one
    request (`store.put`), atomic for readers as it is.
    """
    if store.is_remote(path):  # one PUT: readers see the old object or the new one
        store.put(store.as_path(path), data)
        return
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


def save_config(run_dir: str | os.PathLike, name: str, config: str) -> Path:
    """Writes a gin config string as `run_dir/name` with secrets redacted; returns its path
    (for a remote run dir: in its staging folder, see `RunDir`)."""
    run_dir = RunDir(run_dir).path
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / name
    write_text_atomic(path, secrets.redact_gin_config(config))
    return path


# -- sizes and locked indexes -----------------------------------------------------------------


def dir_size(path: store.AnyPath) -> int:
    """Bytes of the regular files under `path`: each inode counted once, symlinks not followed,
    files that vanish while counted (a checkpoint being deleted) skipped. Under a URI: the sum
    of the objects' sizes."""
    if store.is_remote(path):
        return _remote_size(path)
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


def _remote_size(path: store.AnyPath) -> int:
    return sum(int(info.get("size") or 0) for info in store.find(path).values())


@gin.configurable
def index_lease(lease_s: float = 60.0, wait_s: float = 120.0) -> tuple[float, float]:
    """How long a remote index edit may hold its lease object before another process takes it
    over, and how long a process waits for the lease before giving up."""
    return lease_s, wait_s


@contextlib.contextmanager
def locked_json(path: store.AnyPath, lock_file: store.AnyPath) -> Iterator[dict]:
    """Yields the JSON object in `path` ({} if there is none) under an exclusive flock on
    `lock_file`; when the block ends without an exception, writes it back atomically.

    On object storage the lock is a lease: `lock_file` created only if absent (taken over when
    older than `index_lease.lease_s`, its holder presumed dead), and the index is written back
    only if it is still at the version read (`store.write_if`), so an edit that outlived its
    lease fails with a clear error rather than overwriting another's."""
    if store.is_remote(path):
        with _remote_locked_json(path, lock_file) as data:
            yield data
        return
    path, lock_file = Path(path), Path(lock_file)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        except ValueError as e:
            raise UserError(f"{path} is not valid JSON ({e}); move it aside and retry") from None
        yield data
        write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


def _parse_json_object(raw: bytes | None, path: store.AnyPath) -> dict:
    try:
        data = json.loads(raw) if raw else {}
    except ValueError as e:
        raise UserError(f"{store.show(path)} is not valid JSON ({e}); move it aside and retry") from None
    if not isinstance(data, dict):
        raise UserError(f"{store.show(path)} is not a JSON object; move it aside and retry")
    return data


@contextlib.contextmanager
def _remote_locked_json(path: store.AnyPath, lock_file: store.AnyPath) -> Iterator[dict]:
    lease_s, wait_s = index_lease()
    lease_version = _take_lease(lock_file, lease_s, wait_s)
    try:
        raw, version = store.read_versioned(path)
        data = _parse_json_object(raw, path)
        yield data
        try:
            store.write_if(path, json.dumps(data, indent=1, sort_keys=True).encode() + b"\n",
                           version)
        except store.Conflict:
            raise UserError(f"{store.show(path)} was changed by another process while this one "
                            f"held its lease longer than index_lease.lease_s={lease_s:g}; "
                            "retry") from None
    finally:
        with contextlib.suppress(store.Conflict):
            store.delete_if(lock_file, lease_version)


def _take_lease(lock_file: store.AnyPath, lease_s: float, wait_s: float) -> str:
    """Creates the lease object `lock_file`; returns its version (waits while another holds it)."""
    deadline, delay = time.monotonic() + wait_s, 0.05
    while True:
        record = json.dumps({**holder_record(), "beat": time.time()}).encode()
        try:
            return store.write_if(lock_file, record, None)
        except store.Conflict:
            pass
        raw, version = store.read_versioned(lock_file)
        if raw is not None:
            held = _parse_record(raw)
            if time.time() - float(held.get("beat") or 0) > lease_s or (
                    held.get("host") == socket.gethostname() and not _holder_alive(held)):
                with contextlib.suppress(store.Conflict):
                    new_version = store.write_if(lock_file, record, version)
                    logging.warning("%s: took over the lease of %s, which ended without "
                                    "releasing it", store.show(lock_file), _describe(held))
                    return new_version
            if time.monotonic() > deadline:
                raise UserError(f"{store.show(lock_file)} is held by {_describe(held)} for more "
                                f"than {wait_s:g} s; if that process is dead, delete the object")
        time.sleep(delay)
        delay = min(delay * 2, 1.0)


def _parse_record(raw: bytes | None) -> dict:
    try:
        record = json.loads(raw or b"{}")
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


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


def _holder_alive(record: dict) -> bool:
    """Whether the process of a record from this host still runs; unlike `_is_alive`, this
    process counts (on object storage another of its threads may hold the lock)."""
    try:
        pid = int(record.get("pid") or 0)
    except (TypeError, ValueError):
        return False
    return pid > 0 and pid_alive(pid) and record.get("proc_start") in (None, _process_start(pid))


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


def _busy(run_dir: Path | str, record: dict) -> RunDirBusy:
    return RunDirBusy(f"run dir {run_dir} is in use by {_describe(record)}; wait for that job to "
                      "finish or stop it, or give this one another launch.run_dir")


def acquire(run_dir: str | os.PathLike) -> int | RemoteLock:
    """Locks `run_dir` (creating it) for this process; returns the lock's file descriptor (a
    `RemoteLock` for a run dir on object storage)."""
    if store.is_remote(run_dir):
        return RemoteLock(run_dir).acquire()
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


def release(fd: int | RemoteLock) -> None:
    """Clears the holder record and unlocks (closing the descriptor releases the flock)."""
    if isinstance(fd, RemoteLock):
        fd.release()
        return
    try:
        os.ftruncate(fd, 0)
    finally:
        os.close(fd)


@gin.configurable
def remote_lock(heartbeat_s: float = 60.0, stale_after_s: float = 600.0) -> tuple[float, float]:
    """How often the holder of a run dir lock on object storage refreshes its beat, and how old a
    beat from another host must be before that lock is taken over."""
    return heartbeat_s, stale_after_s


class RemoteLock:
    """The run dir lock on object storage (module docstring): `acquire`, then `release`."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = os.fspath(run_dir).rstrip("/")
        self.uri = f"{self.run_dir}/{RunDir.LOCK_FILE}"
        self.heartbeat_s, self.stale_after_s = remote_lock()
        self.record = holder_record()
        self.version: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mutex = threading.Lock()

    def _data(self) -> bytes:
        return json.dumps({**self.record, "beat": time.time()}).encode()

    def acquire(self) -> RemoteLock:
        for _ in range(10):  # each pass ends in a conditional write; retried only when one lost
            raw, version = store.read_versioned(self.uri)
            try:
                if raw is None:
                    self.version = store.write_if(self.uri, self._data(), None)
                    break
                held = _parse_record(raw)
                self._check_stale(held)
                self.version = store.write_if(self.uri, self._data(), version)
                logging.warning("run dir %s: taking over the lock of %s, which ended without "
                                "releasing it", store.show(self.run_dir), _describe(held))
                break
            except store.Conflict:
                continue
        else:
            raise RunDirBusy(f"run dir {store.show(self.run_dir)}: the lock keeps changing hands; "
                             "retry")
        self._thread = threading.Thread(target=self._beat, name="run-dir-lock", daemon=True)
        self._thread.start()
        return self

    def _check_stale(self, held: dict) -> None:
        """Raises RunDirBusy unless `held` (the record found) is stale."""
        if not held:  # not written by a holder (truncated, foreign): nothing alive stands behind it
            return
        if held.get("host") == socket.gethostname():
            if _holder_alive(held):
                raise _busy(store.show(self.run_dir), held)
            return
        age = time.time() - float(held.get("beat") or 0)
        if age <= self.stale_after_s:
            raise RunDirBusy(f"{_busy(store.show(self.run_dir), held)} (its last heartbeat was "
                             f"{age:.0f} s ago; it is taken over once older than "
                             f"remote_lock.stale_after_s={self.stale_after_s:g} s)")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            with self._mutex:
                if self.version is None:
                    return
                try:
                    self.version = store.write_if(self.uri, self._data(), self.version)
                except store.Conflict:
                    logging.error("run dir %s: another job took over this job's lock (its "
                                  "heartbeat was older than remote_lock.stale_after_s)",
                                  store.show(self.run_dir))
                    self.version = None
                    return
                except store.StorageError as e:
                    logging.warning("run dir lock heartbeat failed (retried): %s", e)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._mutex:
            version, self.version = self.version, None
        if version is not None:
            try:
                store.delete_if(self.uri, version)
            except store.Conflict:
                logging.warning("run dir %s: the lock was no longer this job's at release",
                                store.show(self.run_dir))


@contextlib.contextmanager
def hold(run_dir: str | os.PathLike) -> Iterator[None]:
    """Holds the run dir's lock for the `with` block."""
    fd = acquire(run_dir)
    try:
        yield
    finally:
        release(fd)

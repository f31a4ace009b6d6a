"""One job at a time per run dir: a lock the writing process holds for the life of its job.

`launch` takes the lock on the run dir it writes (the coordinator process only, on a pod) before
it writes anything there; a second job on the same run dir stops at once with one line naming
the holder. Jobs that only read a run dir (the dashboard, `evaluate`/`generate` pointed at it
with `checkpoint=`) never take it.

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
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from absl import logging

from llamahome import secrets
from llamahome.errors import UserError

LOCK_FILE = ".lock"
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class RunDirBusy(UserError):
    """Another job holds the run dir."""


def _process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def holder_record() -> dict:
    """Who this process is, as the lock file records it."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "proc_start": _process_start(os.getpid()),
            "started": dt.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join(secrets.redact_argv([Path(sys.orig_argv[0]).name,
                                                      *sys.orig_argv[1:]]))[:300]}


def _is_alive(record: dict) -> bool:
    """Whether the process a record names is still running (always assumed for another host)."""
    if record.get("host") != socket.gethostname():
        return True
    pid = int(record.get("pid", 0))
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
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
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
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
                             f"is dead, delete {run_dir / LOCK_FILE})") from None
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

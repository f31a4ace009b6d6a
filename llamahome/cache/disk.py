"""Cache entries on disk: an index (name, fingerprint, bytes, last use), pins, and eviction.

Layout under `root`: `<namespace>/<fingerprint>/` per entry, `index.json` (replaced atomically
under an flock on `.lock`), and `.pins/<namespace>--<fingerprint>--<pid>` files that mark an
entry as in use by a live process. An entry is only ever made visible by renaming a finished
temporary directory into place, so a reader never sees half of one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

POLICIES = ("lru", "size")


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DiskStore:
    """Named, fingerprinted directories under a byte budget; evicts unpinned entries by policy."""

    def __init__(self, root: Path, budget: int, policy: str = "lru"):
        self.root = root
        self.budget = budget
        self.policy = policy
        self.evictions = 0
        self.invalidations = 0
        (root / ".pins").mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict]:
        """Yields the index under an exclusive lock and writes it back atomically."""
        with open(self.root / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            path = self.root / "index.json"
            index = json.loads(path.read_text()) if path.is_file() else {}
            yield index
            tmp = path.with_name(f".index.json.tmp-{os.getpid()}")
            tmp.write_text(json.dumps(index, indent=1, sort_keys=True))
            os.replace(tmp, path)

    def key(self, namespace: str, fingerprint: str) -> str:
        return f"{namespace}/{fingerprint}"

    def path(self, namespace: str, fingerprint: str) -> Path:
        return self.root / namespace / fingerprint

    def lookup(self, namespace: str, name: str, fingerprint: str) -> Path | None:
        """The entry's path if committed (touching its last use); invalidates older fingerprints of `name`."""
        key = self.key(namespace, fingerprint)
        with self._locked() as index:
            for other, entry in list(index.items()):
                if entry["name"] == name and other != key and other.startswith(namespace + "/"):
                    if not self._pinned(other):
                        self._delete(index, other)
                        self.invalidations += 1
            path = self.path(namespace, fingerprint)
            if key in index and path.is_dir():
                index[key]["last_used"] = time.time()
                return path
            index.pop(key, None)
        return None

    def commit(self, namespace: str, name: str, fingerprint: str, tmp: Path) -> Path:
        """Renames the finished `tmp` dir into place, records it, and evicts down to the budget."""
        path = self.path(namespace, fingerprint)
        path.parent.mkdir(parents=True, exist_ok=True)
        nbytes = dir_bytes(tmp)
        with self._locked() as index:
            if path.exists():  # another process committed the same content first
                shutil.rmtree(tmp)
            else:
                os.replace(tmp, path)
            now = time.time()
            index[self.key(namespace, fingerprint)] = {
                "name": name, "bytes": nbytes, "created": now, "last_used": now}
            self._evict(index, keep=self.key(namespace, fingerprint))
        return path

    def _evict(self, index: dict, keep: str) -> None:
        total = sum(e["bytes"] for e in index.values())
        if total <= self.budget:
            return
        candidates = [k for k in index if k != keep and not self._pinned(k)]
        if self.policy == "lru":
            candidates.sort(key=lambda k: index[k]["last_used"])
        else:
            candidates.sort(key=lambda k: -index[k]["bytes"])
        for victim in candidates:
            if total <= self.budget:
                break
            total -= index[victim]["bytes"]
            self._delete(index, victim)
            self.evictions += 1

    def _delete(self, index: dict, key: str) -> None:
        index.pop(key, None)
        shutil.rmtree(self.root / key, ignore_errors=True)

    def _pin_prefix(self, key: str) -> str:
        return key.replace("/", "--") + "--"

    def _pinned(self, key: str) -> bool:
        """Whether a live process (this one included) holds a pin on `key`."""
        prefix = self._pin_prefix(key)
        for pin in (self.root / ".pins").glob(prefix + "*"):
            pid = int(pin.name[len(prefix):].split(".")[0])
            if _pid_alive(pid):
                return True
            pin.unlink(missing_ok=True)
        return False

    def pin(self, namespace: str, fingerprint: str) -> Path:
        """Marks the entry in use by this process until `unpin`; returns the pin file."""
        pin = self.root / ".pins" / f"{self._pin_prefix(self.key(namespace, fingerprint))}{os.getpid()}"
        pin.touch()
        return pin

    def unpin(self, namespace: str, fingerprint: str) -> None:
        pin = self.root / ".pins" / f"{self._pin_prefix(self.key(namespace, fingerprint))}{os.getpid()}"
        pin.unlink(missing_ok=True)

    def total_bytes(self) -> int:
        path = self.root / "index.json"
        index = json.loads(path.read_text()) if path.is_file() else {}
        return sum(e["bytes"] for e in index.values())

    def entries(self) -> dict:
        path = self.root / "index.json"
        return json.loads(path.read_text()) if path.is_file() else {}

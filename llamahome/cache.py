"""Caches with budgets: token caches on disk, loaded arrays in host RAM, JAX's compiled programs.

- `CacheManager(root=None, memory_size="2GB", disk_size="100GB", policy="lru")` puts a
  `DiskStore` and a `MemoryStore` behind one interface, with `stats() -> dict` (hits, misses,
  bytes, evictions, ...). Sizes are byte ints or strings such as "4GB" ([cache] in TOML maps
  here). Disk entries are keyed by (namespace, fingerprint) and carry a `name`: looking up a
  name with a new fingerprint (its sources or tokenizer changed) deletes the stale entry. When
  a budget is exceeded, least recently used entries ('lru') or the largest ('size') are
  evicted, never a disk entry that a live process has pinned (`use`).
- `MemoryLimits` (gin) holds the host RAM cap and the XLA client's device-memory settings;
  `apply_memory_limits()` sets the latter before JAX initialises its backend. Every in-memory
  store asks `host_ram_budget(requested)`, so the memory budget is
  min(CacheManager.memory_size, MemoryLimits.host_ram_bytes):

      MemoryLimits.device_memory_fraction = 0.8   # XLA_PYTHON_CLIENT_MEM_FRACTION
      MemoryLimits.preallocate = False            # XLA_PYTHON_CLIENT_PREALLOCATE
      MemoryLimits.host_ram_bytes = 16_000_000_000  # cap on what caches hold in RAM

- `enable_compilation_cache()` points JAX's persistent compilation cache at
  `<cache root>/jax_compilation_cache`, so a second run of the same model skips XLA compiles.
  With the root on object storage it stays on this host's disk (see its docstring).

Disk layout under `root`: `<namespace>/<fingerprint>/` per entry, `index.json` (edited through
`files.locked_json`: an flock on `.lock` locally, a conditional write on object storage), and
`.pins/<namespace>--<fingerprint>--<pid>` files that mark an entry as in use by a live process.
A local entry is only ever made visible by renaming a finished temporary directory into place,
so a reader never sees half of one.

`root` may be a `gs://` or `s3://` URI (`store.as_path`), where there is no rename: an entry is
written in place (or uploaded from a local temporary directory) and made visible by its marker
object `<namespace>/<fingerprint>/.committed` ({name, bytes, created}), written LAST; `lookup`
trusts an entry only with its marker (and re-records it in the index if a commit died between
the two), and deleting an entry deletes the marker first. A pin there is
`.pins/<namespace>--<fingerprint>--<pid>@<host>`; a pin of another host counts as live, since its
process cannot be checked from here (delete `.pins/` objects of a pod known dead to let its
entries be evicted).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gin
import jax
from absl import logging

from llamahome import files, store
from llamahome.config.gin_config import parse_byte_size
from llamahome.errors import ConfigError

POLICIES = ("lru", "size")
COMPILATION_CACHE_DIR = "jax_compilation_cache"
COMMIT_MARKER = ".committed"  # an entry on object storage exists once this object does


# ---------------------------------------------------------------------------------------------
# Host and device memory limits


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MemoryLimits:
    """Host and device memory settings; None leaves the environment's or JAX's default."""

    device_memory_fraction: float | None = None  # XLA_PYTHON_CLIENT_MEM_FRACTION
    preallocate: bool | None = None  # XLA_PYTHON_CLIENT_PREALLOCATE
    host_ram_bytes: int | None = None  # a cap on host RAM that in-memory caches may hold

    def env(self) -> dict[str, str]:
        """The XLA client environment variables these limits set."""
        env = {}
        if self.device_memory_fraction is not None:
            if not 0.0 < self.device_memory_fraction <= 1.0:
                raise ConfigError(f"MemoryLimits.device_memory_fraction = "
                                  f"{self.device_memory_fraction}; use a fraction in (0, 1]")
            env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{self.device_memory_fraction:g}"
        if self.preallocate is not None:
            env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "true" if self.preallocate else "false"
        return env


def _jax_backend_initialized() -> bool:
    if "jax" not in sys.modules:
        return False
    from jax._src import xla_bridge  # noqa: PLC0415

    return xla_bridge.backends_are_initialized()


def apply_memory_limits(limits: MemoryLimits | None = None) -> dict[str, str]:
    """Sets the XLA client memory variables; refuses once JAX's backend is up (too late)."""
    limits = limits or MemoryLimits()
    env = limits.env()
    changed = {k: v for k, v in env.items() if os.environ.get(k) != v}
    if changed and _jax_backend_initialized():
        raise ConfigError(f"memory settings {changed} come too late: JAX has already initialised "
                          "its backend. Bind MemoryLimits in gin so that launch applies it first, "
                          "or set the variables in the environment before starting Python.")
    os.environ.update(env)
    if limits.host_ram_bytes is not None and limits.host_ram_bytes > physical_ram_bytes():
        logging.warning("MemoryLimits.host_ram_bytes = %d exceeds this host's RAM (%d bytes)",
                        limits.host_ram_bytes, physical_ram_bytes())
    return env


def physical_ram_bytes() -> int:
    """Total physical memory of this host."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def host_ram_budget(requested_bytes: int, limits: MemoryLimits | None = None) -> int:
    """`requested_bytes` clamped to `MemoryLimits.host_ram_bytes`: what a cache may hold in RAM."""
    cap = (limits or MemoryLimits()).host_ram_bytes
    if cap is not None and requested_bytes > cap:
        logging.info("host RAM budget %d clamped to MemoryLimits.host_ram_bytes = %d",
                     requested_bytes, cap)
        return cap
    return requested_bytes


# ---------------------------------------------------------------------------------------------
# In-memory store


class MemoryStore:
    """Maps key -> value with sizes; evicts by policy ('lru' or 'size': largest first) past `budget`."""

    def __init__(self, budget: int, policy: str = "lru"):
        self.budget = budget
        self.policy = policy
        self._items: collections.OrderedDict[str, tuple[Any, int]] = collections.OrderedDict()
        self.bytes = 0
        self.evictions = 0

    def get(self, key: str) -> Any | None:
        if key not in self._items:
            return None
        self._items.move_to_end(key)
        return self._items[key][0]

    def put(self, key: str, value: Any, nbytes: int) -> bool:
        """Stores `value` unless it alone exceeds the budget; returns whether it was stored."""
        if nbytes > self.budget:
            return False
        self.pop(key)
        while self._items and self.bytes + nbytes > self.budget:
            victim = (next(iter(self._items)) if self.policy == "lru"
                      else max(self._items, key=lambda k: self._items[k][1]))
            self.pop(victim)
            self.evictions += 1
        self._items[key] = (value, nbytes)
        self.bytes += nbytes
        return True

    def pop(self, key: str) -> None:
        if key in self._items:
            self.bytes -= self._items.pop(key)[1]

    def __len__(self) -> int:
        return len(self._items)


# ---------------------------------------------------------------------------------------------
# On-disk store


class DiskStore:
    """Named, fingerprinted directories under a byte budget; evicts unpinned entries by policy.

    `root` is a local folder or an object storage prefix (see the module docstring)."""

    def __init__(self, root: store.AnyPath, budget: int, policy: str = "lru"):
        self.root = root
        self.remote = store.is_remote(root)
        self.budget = budget
        self.policy = policy
        self.evictions = 0
        self.invalidations = 0
        if not self.remote:  # object storage has no folders to make
            (root / ".pins").mkdir(parents=True, exist_ok=True)

    def _locked(self) -> contextlib.AbstractContextManager[dict]:
        """The index under an exclusive lock, written back atomically when the block ends."""
        return files.locked_json(self.root / "index.json", self.root / ".lock")

    def key(self, namespace: str, fingerprint: str) -> str:
        return f"{namespace}/{fingerprint}"

    def path(self, namespace: str, fingerprint: str) -> store.AnyPath:
        return self.root / namespace / fingerprint

    def marker(self, path: store.AnyPath) -> dict | None:
        """The commit marker of a remote entry at `path` ({name, bytes, created}), or None."""
        store.refresh(path)  # another host may have written it since this process listed
        try:
            return json.loads((path / COMMIT_MARKER).read_bytes())
        except FileNotFoundError:
            return None
        except ValueError:  # a marker is one PUT, so this is damage from outside
            return None
        except Exception as e:  # noqa: BLE001  (fsspec raises per-backend types)
            raise store.StorageError(f"cannot read {store.show(path / COMMIT_MARKER)}: "
                                     f"{store.describe_error(e)}") from None

    def committed(self, path: store.AnyPath) -> bool:
        """Whether the entry at `path` is whole: a folder locally, its marker on object storage."""
        return self.marker(path) is not None if self.remote else path.is_dir()

    def lookup(self, namespace: str, name: str, fingerprint: str) -> store.AnyPath | None:
        """The entry's path if committed (touching its last use); invalidates older fingerprints of `name`."""
        key = self.key(namespace, fingerprint)
        path = self.path(namespace, fingerprint)
        marker = self.marker(path) if self.remote else None
        with self._locked() as index:
            for other, entry in list(index.items()):
                if entry["name"] == name and other != key and other.startswith(namespace + "/"):
                    if not self._pinned(other):
                        self._delete(index, other)
                        self.invalidations += 1
            if marker is not None and key not in index:  # committed, index not yet written
                index[key] = {"name": marker["name"], "bytes": marker["bytes"],
                              "created": marker["created"], "last_used": marker["created"]}
            if key in index and (marker is not None if self.remote else path.is_dir()):
                index[key]["last_used"] = time.time()
                return path
            index.pop(key, None)
        return None

    def commit(self, namespace: str, name: str, fingerprint: str,
               tmp: store.AnyPath) -> store.AnyPath:
        """Makes the finished `tmp` dir the entry, records it, and evicts down to the budget.

        Locally `tmp` is renamed into place. On object storage `tmp` is either the entry's own
        path (written in place) or a local folder, uploaded; the marker is written last."""
        path = self.path(namespace, fingerprint)
        if self.remote:
            nbytes = self._commit_remote(name, path, tmp)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            nbytes = files.dir_size(tmp)
        with self._locked() as index:
            if not self.remote:
                if path.exists():  # another process committed the same content first
                    shutil.rmtree(tmp)
                else:
                    os.replace(tmp, path)
            now = time.time()
            index[self.key(namespace, fingerprint)] = {
                "name": name, "bytes": nbytes, "created": now, "last_used": now}
            self._evict(index, keep=self.key(namespace, fingerprint))
        return path

    def _commit_remote(self, name: str, path: store.AnyPath, tmp: store.AnyPath) -> int:
        """Uploads a local `tmp` (unless already committed) or takes `path` as written; writes
        the marker last; returns the entry's bytes."""
        if not store.is_remote(tmp):
            if self.marker(path) is None:  # else another process committed the same content
                store.upload_dir(tmp, path)
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.fspath(tmp) != os.fspath(path):
            raise ValueError(f"commit of {store.show(tmp)}: on object storage an entry is built "
                             f"in place ({store.show(path)}) or in a local folder")
        nbytes = files.dir_size(path)
        store.put(path / COMMIT_MARKER, json.dumps(
            {"name": name, "bytes": nbytes, "created": time.time()}).encode())
        return nbytes

    def remove(self, namespace: str, fingerprint: str) -> None:
        """Deletes the entry's files (its marker first: it stops being committed at once)."""
        remove_tree(self.path(namespace, fingerprint))

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
        remove_tree(self.root / key)

    def _pin_prefix(self, key: str) -> str:
        return key.replace("/", "--") + "--"

    def _pin_name(self, namespace: str, fingerprint: str) -> str:
        owner = f"{os.getpid()}@{socket.gethostname()}" if self.remote else str(os.getpid())
        return self._pin_prefix(self.key(namespace, fingerprint)) + owner

    def _pinned(self, key: str) -> bool:
        """Whether a live process (this one included) holds a pin on `key`."""
        prefix = self._pin_prefix(key)
        for pin in (self.root / ".pins").glob(prefix + "*"):
            owner, _, host = pin.name[len(prefix):].partition("@")
            if (host and host != socket.gethostname()) or files.pid_alive(int(owner.split(".")[0])):
                return True
            pin.unlink(missing_ok=True)
        return False

    def pin(self, namespace: str, fingerprint: str) -> store.AnyPath:
        """Marks the entry in use by this process until `unpin`; returns the pin file."""
        pin = self.root / ".pins" / self._pin_name(namespace, fingerprint)
        if self.remote:
            store.put(pin, b"")
        else:
            pin.touch()
        return pin

    def unpin(self, namespace: str, fingerprint: str) -> None:
        (self.root / ".pins" / self._pin_name(namespace, fingerprint)).unlink(missing_ok=True)

    def total_bytes(self) -> int:
        return sum(e["bytes"] for e in self.entries().values())

    def entries(self) -> dict:
        path = self.root / "index.json"
        return json.loads(path.read_text()) if path.is_file() else {}


def remove_tree(path: store.AnyPath) -> None:
    """Deletes a folder and what it holds, if it exists; on object storage its commit marker
    first, so the entry stops counting as committed before any of its objects goes."""
    if not store.is_remote(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    try:
        (path / COMMIT_MARKER).unlink(missing_ok=True)
        if path.exists():
            path.rmtree()
    except FileNotFoundError:
        pass
    except Exception as e:  # noqa: BLE001
        raise store.StorageError(f"cannot delete {store.show(path)}: {store.describe_error(e)}") from None


# ---------------------------------------------------------------------------------------------
# The manager


@gin.configurable
class CacheManager:
    """Memory and disk stores behind one interface, with hit/miss/eviction counts."""

    def __init__(self, root: str | None = None, memory_size: int | str = "2GB",
                 disk_size: int | str = "100GB", policy: str = "lru"):
        if policy not in POLICIES:
            raise ConfigError(f"CacheManager.policy={policy!r}; use one of {POLICIES}")
        self.root = store.as_path(root) if root else files.cache_dir()
        self.memory = MemoryStore(host_ram_budget(parse_byte_size(memory_size)), policy)
        self.disk = DiskStore(self.root, parse_byte_size(disk_size), policy)
        self.hits = 0
        self.misses = 0
        self._pins: collections.Counter[tuple[str, str]] = collections.Counter()

    @property
    def remote(self) -> bool:
        """Whether the root is on object storage (entries are committed by a marker)."""
        return self.disk.remote

    def lookup(self, namespace: str, name: str, fingerprint: str) -> store.AnyPath | None:
        """The committed entry for (namespace, fingerprint), or None (a miss)."""
        path = self.disk.lookup(namespace, name, fingerprint)
        if path is None:
            self.misses += 1
        else:
            self.hits += 1
        return path

    def entry_path(self, namespace: str, fingerprint: str) -> store.AnyPath:
        """Where the entry lives once committed (build next to it, then `commit`)."""
        return self.disk.path(namespace, fingerprint)

    def commit(self, namespace: str, name: str, fingerprint: str,
               tmp: store.AnyPath) -> store.AnyPath:
        """Makes a finished dir the entry (a rename locally; on object storage the entry's own
        path, or a local dir uploaded, then its marker) and enforces the disk budget."""
        return self.disk.commit(namespace, name, fingerprint, tmp)

    def committed(self, namespace: str, fingerprint: str) -> bool:
        """Whether the entry is committed (without touching the index or counting a hit)."""
        return self.disk.committed(self.entry_path(namespace, fingerprint))

    def remove(self, namespace: str, fingerprint: str) -> None:
        """Deletes the entry's files, its commit marker first."""
        self.disk.remove(namespace, fingerprint)

    @contextlib.contextmanager
    def use(self, namespace: str, fingerprint: str) -> Iterator[None]:
        """Pins the entry (no eviction, no invalidation) for the duration of the block."""
        self.pin(namespace, fingerprint)
        try:
            yield
        finally:
            self.unpin(namespace, fingerprint)

    def pin(self, namespace: str, fingerprint: str) -> None:
        if self._pins[(namespace, fingerprint)] == 0:
            self.disk.pin(namespace, fingerprint)
        self._pins[(namespace, fingerprint)] += 1

    def unpin(self, namespace: str, fingerprint: str) -> None:
        self._pins[(namespace, fingerprint)] -= 1
        if self._pins[(namespace, fingerprint)] <= 0:
            del self._pins[(namespace, fingerprint)]
            self.disk.unpin(namespace, fingerprint)

    def memory_get(self, key: str) -> Any | None:
        value = self.memory.get(key)
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
        return value

    def memory_put(self, key: str, value: Any, nbytes: int) -> bool:
        """Keeps `value` in memory if it fits the memory budget (evicting others by policy)."""
        return self.memory.put(key, value, nbytes)

    def stats(self) -> dict[str, int]:
        """Counts since this manager was made, and the bytes held now."""
        return {
            "hits": self.hits,
            "misses": self.misses,
            "bytes": self.disk.total_bytes() + self.memory.bytes,
            "disk_bytes": self.disk.total_bytes(),
            "memory_bytes": self.memory.bytes,
            "evictions": self.disk.evictions + self.memory.evictions,
            "invalidations": self.disk.invalidations,
        }


# ---------------------------------------------------------------------------------------------
# JAX's persistent compilation cache


@gin.configurable("compilation_cache")
def enable_compilation_cache(root: Path | str | None = None, enabled: bool = True,
                             min_compile_time_secs: float = 0.0) -> Path | None:
    """Points JAX's persistent compilation cache at `<root>/jax_compilation_cache`; returns it.

    `root` defaults to the CacheManager's root. Call it before the first `jax.jit` compile.
    When that root is on object storage (`gs://`, `s3://`) the compilation cache stays on this
    host's disk, under the local default cache root ($XDG_CACHE_HOME/llamahome): JAX can write
    it to GCS, but every compile would then wait on object reads and writes of small files,
    and its eviction of old entries works on local disk only; compiled programs are also
    specific to a host's devices and JAX version, so there is little to share.
    Compiles faster than `min_compile_time_secs` are not written; the default 0 writes all of
    them (the tiny CPU recipe's five programs take ~400 KB), where JAX's own default of 1 s
    would leave the small ones out. Returns None when `compilation_cache.enabled = False`.
    """
    if not enabled:
        return None
    root = store.as_path(root) if root else CacheManager().root  # as gin binds it
    if store.is_remote(root):
        root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llamahome"
        logging.info("the cache root is on object storage; JAX's compilation cache stays in %s",
                     root / COMPILATION_CACHE_DIR)
    path = root / COMPILATION_CACHE_DIR
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_time_secs)
    return path

"""CacheManager: token caches on disk and loaded arrays in memory, each under a byte budget.

Contract: `CacheManager(root=None, memory_size=..., disk_size=..., policy="lru")` with
`stats() -> dict` (hits, misses, bytes, evictions, ...). Sizes are byte ints or strings such as
"4GB" ([cache] in TOML maps here). Disk entries are keyed by (namespace, fingerprint) and carry
a `name`: looking up a name with a new fingerprint (its sources or tokenizer changed) deletes
the stale entry. When the disk budget is exceeded, least recently used entries ('lru') or the
largest ('size') are evicted, never one that a live process has pinned (`use`).
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gin

from llamahome import paths
from llamahome.cache.disk import POLICIES, DiskStore
from llamahome.cache.memory import MemoryStore
from llamahome.config.toml import parse_byte_size
from llamahome.errors import ConfigError


@gin.configurable
class CacheManager:
    """Memory and disk stores behind one interface, with hit/miss/eviction counts."""

    def __init__(self, root: str | None = None, memory_size: int | str = "2GB",
                 disk_size: int | str = "100GB", policy: str = "lru"):
        if policy not in POLICIES:
            raise ConfigError(f"CacheManager.policy={policy!r}; use one of {POLICIES}")
        self.root = Path(root).expanduser() if root else paths.cache_dir()
        self.memory = MemoryStore(parse_byte_size(memory_size), policy)
        self.disk = DiskStore(self.root, parse_byte_size(disk_size), policy)
        self.hits = 0
        self.misses = 0
        self._pins: collections.Counter[tuple[str, str]] = collections.Counter()

    def lookup(self, namespace: str, name: str, fingerprint: str) -> Path | None:
        """The committed entry for (namespace, fingerprint), or None (a miss)."""
        path = self.disk.lookup(namespace, name, fingerprint)
        if path is None:
            self.misses += 1
        else:
            self.hits += 1
        return path

    def entry_path(self, namespace: str, fingerprint: str) -> Path:
        """Where the entry lives once committed (build next to it, then `commit`)."""
        return self.disk.path(namespace, fingerprint)

    def commit(self, namespace: str, name: str, fingerprint: str, tmp: Path) -> Path:
        """Atomically renames a finished temporary dir into the store and enforces the disk budget."""
        return self.disk.commit(namespace, name, fingerprint, tmp)

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

    def configure_jax_compilation_cache(self) -> Path:
        """Points JAX's persistent compilation cache at `<root>/jax` and returns that dir."""
        import jax  # noqa: PLC0415

        path = self.root / "jax"
        path.mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", str(path))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
        return path

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

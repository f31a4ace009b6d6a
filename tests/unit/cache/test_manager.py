"""CacheManager: byte budgets, LRU/size eviction that spares caches in use, invalidation, stats."""

from __future__ import annotations

import os
import time

import pytest

from llamahome.cache import CacheManager
from llamahome.cache.memory import MemoryStore
from llamahome.errors import ConfigError
from tests.conftest import run_python


def add_entry(manager: CacheManager, name: str, fingerprint: str, nbytes: int = 1000):
    tmp = manager.root / f".tmp-{fingerprint}"
    tmp.mkdir(parents=True)
    (tmp / "data").write_bytes(b"x" * nbytes)
    time.sleep(0.01)  # distinct last-use times
    return manager.commit("tokens", name, fingerprint, tmp)


def test_budgets_accept_byte_strings(tmp_path):
    m = CacheManager(root=str(tmp_path), memory_size="4GB", disk_size="512MiB")
    assert (m.memory.budget, m.disk.budget) == (4_000_000_000, 512 * 2**20)
    with pytest.raises(ConfigError, match="policy"):
        CacheManager(root=str(tmp_path), policy="fifo")


def test_lru_evicts_the_oldest_unused_cache(tmp_path):
    m = CacheManager(root=str(tmp_path), disk_size=2500)
    a, b = add_entry(m, "a", "fa"), add_entry(m, "b", "fb")
    assert m.lookup("tokens", "a", "fa") == a  # a is now more recently used than b
    c = add_entry(m, "c", "fc")
    assert a.exists() and not b.exists() and c.exists()
    assert m.stats()["evictions"] == 1 and m.stats()["disk_bytes"] == 2000
    assert m.lookup("tokens", "b", "fb") is None
    assert (m.stats()["hits"], m.stats()["misses"]) == (1, 1)


def test_size_policy_evicts_the_largest(tmp_path):
    m = CacheManager(root=str(tmp_path), disk_size=3000, policy="size")
    big, small = add_entry(m, "big", "f1", 1500), add_entry(m, "small", "f2", 500)
    add_entry(m, "new", "f3", 1200)
    assert not big.exists() and small.exists()


def test_cache_in_use_is_never_evicted(tmp_path):
    m = CacheManager(root=str(tmp_path), disk_size=1500)
    a = add_entry(m, "a", "fa")
    with m.use("tokens", "fa"):
        b = add_entry(m, "b", "fb")
        assert a.exists() and b.exists()  # over budget, but a is pinned and b was just written
    add_entry(m, "c", "fc")
    assert not a.exists() and not b.exists()


def test_pin_of_another_live_process_is_respected_and_a_dead_one_is_not(tmp_path):
    m = CacheManager(root=str(tmp_path), disk_size=1500)
    a = add_entry(m, "a", "fa")
    child = run_python(["-c", "import os; print(os.getpid())"], check=True)
    dead_pid = int(child.stdout)
    (tmp_path / ".pins" / f"tokens--fa--{dead_pid}").touch()
    add_entry(m, "b", "fb")
    assert not a.exists()
    (tmp_path / ".pins" / f"tokens--fb--{os.getppid()}").touch()  # the live parent process
    add_entry(m, "c", "fc")
    assert (tmp_path / "tokens" / "fb").exists()


def test_new_fingerprint_of_a_name_invalidates_the_old(tmp_path):
    m = CacheManager(root=str(tmp_path))
    old = add_entry(m, "shakespeare", "f-old")
    assert m.lookup("tokens", "shakespeare", "f-new") is None
    assert not old.exists() and m.stats()["invalidations"] == 1


def test_memory_store_lru_under_budget():
    store = MemoryStore(budget=100)
    assert store.put("a", 1, 40) and store.put("b", 2, 40)
    store.get("a")
    store.put("c", 3, 40)
    assert (store.get("a"), store.get("b"), store.get("c")) == (1, None, 3)
    assert store.bytes == 80 and store.evictions == 1
    assert not store.put("huge", 4, 101)


def test_jax_compilation_cache_dir(tmp_path):
    import jax  # noqa: PLC0415

    before = jax.config.jax_compilation_cache_dir
    try:
        path = CacheManager(root=str(tmp_path)).configure_jax_compilation_cache()
        assert path == tmp_path / "jax" and jax.config.jax_compilation_cache_dir == str(path)
    finally:
        jax.config.update("jax_compilation_cache_dir", before)

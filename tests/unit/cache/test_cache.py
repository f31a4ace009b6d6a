"""Cache budgets (host RAM cap included), LRU/size eviction, invalidation, memory limits, and
JAX's persistent compilation cache across processes."""

from __future__ import annotations

import os
import textwrap
import time

import gin
import jax
import pytest

from llamahome import cache
from llamahome.cache import CacheManager, MemoryLimits, MemoryStore, enable_compilation_cache
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


def test_host_ram_cap_clamps_the_memory_budget(tmp_path):
    gin.parse_config("MemoryLimits.host_ram_bytes = 1000")
    m = CacheManager(root=str(tmp_path), memory_size="4GB")
    assert m.memory.budget == 1000
    assert not m.memory_put("big", object(), 1001) and m.memory_put("small", object(), 1000)
    assert CacheManager(root=str(tmp_path), memory_size=500).memory.budget == 500


def test_memory_limits_from_gin_set_the_xla_variables(monkeypatch):
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
    monkeypatch.setattr(cache, "_jax_backend_initialized", lambda: False)
    gin.parse_config("MemoryLimits.device_memory_fraction = 0.25\n"
                     "MemoryLimits.preallocate = False\nMemoryLimits.host_ram_bytes = 1000")
    assert cache.apply_memory_limits() == {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.25",
                                           "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    assert os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.25"
    assert os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    assert cache.host_ram_budget(5000) == 1000
    assert cache.host_ram_budget(500) == 500


def test_memory_fraction_out_of_range_is_a_config_error():
    with pytest.raises(ConfigError, match="fraction in \\(0, 1\\]"):
        MemoryLimits(device_memory_fraction=1.5).env()


def test_launch_applies_memory_limits_before_the_backend_and_refuses_after(tmp_path,
                                                                            python_runner):
    probe = f"""
import os, gin
from jax._src import xla_bridge
from llamahome import cache, cli
from llamahome.jobs import job

@job
def probe(run_dir):
    return os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"], os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"]

cli.import_configurables()
gin.parse_config('''
launch.job = @probe
launch.run_dir = '{tmp_path / "run"}'
MemoryLimits.device_memory_fraction = 0.3
MemoryLimits.preallocate = False
''')
assert not xla_bridge.backends_are_initialized()
print(*cli.launch())
try:
    cache.apply_memory_limits(cache.MemoryLimits(device_memory_fraction=0.5))
except Exception as e:
    print(type(e).__name__)
"""
    env = {"XLA_PYTHON_CLIENT_MEM_FRACTION": "", "XLA_PYTHON_CLIENT_PREALLOCATE": ""}
    result = python_runner(["-c", probe], env=env, check=True, timeout=120)
    assert result.stdout.split() == ["0.3", "false", "ConfigError"]


def test_compilation_cache_dir_defaults_under_the_cache_manager_root(tmp_path):
    before = (jax.config.jax_compilation_cache_dir,
              jax.config.jax_persistent_cache_min_compile_time_secs)
    try:
        gin.parse_config(f"CacheManager.root = '{tmp_path}'")
        path = enable_compilation_cache()
        assert path == tmp_path / "jax_compilation_cache" and path.is_dir()
        assert jax.config.jax_compilation_cache_dir == str(path)
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0
        assert enable_compilation_cache(tmp_path / "other") == tmp_path / "other" / "jax_compilation_cache"
        gin.parse_config("compilation_cache.enabled = False")
        assert enable_compilation_cache() is None
    finally:
        jax.config.update("jax_compilation_cache_dir", before[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])


COMPILE_SCRIPT = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp
    from jax import monitoring
    from llamahome.cache import enable_compilation_cache

    events = []
    monitoring.register_event_listener(lambda event, **kw: events.append(event))
    enable_compilation_cache(sys.argv[1])

    @jax.jit
    def step(w, x):  # a small matmul-and-tanh layer stack, like a tiny model's step
        for _ in range(4):
            x = jnp.tanh(x @ w)
        return x.sum()

    jax.block_until_ready(step(jnp.ones((64, 64)), jnp.ones((8, 64))))
    print(events.count("/jax/compilation_cache/cache_hits"))
""")


def test_second_process_hits_the_compilation_cache(tmp_path):
    entries = lambda: sorted(p.name for p in (tmp_path / "jax_compilation_cache").iterdir())  # noqa: E731
    first = run_python(["-c", COMPILE_SCRIPT, str(tmp_path)], check=True)
    written = entries()
    assert first.stdout.split()[-1] == "0" and written  # a miss that wrote the executable
    second = run_python(["-c", COMPILE_SCRIPT, str(tmp_path)], check=True)
    assert int(second.stdout.split()[-1]) >= 1  # read back, not compiled again
    assert entries() == written

"""CacheManager with its root on object storage (S3 and GCS emulators): entries committed by a
marker written last, the index and budgets, pins of other hosts, and JAX's compilation cache
kept on local disk."""

from __future__ import annotations

import json
import os
import socket

import gin
import jax
import pytest

from llamahome import store
from llamahome.cache import COMMIT_MARKER, CacheManager, enable_compilation_cache


def add_entry(manager: CacheManager, tmp_path, name: str, fingerprint: str, nbytes: int = 1000):
    """Commits a local folder holding one file of `nbytes` (uploaded by commit)."""
    local = tmp_path / f"entry-{fingerprint}"
    local.mkdir()
    (local / "data").write_bytes(b"x" * nbytes)
    return manager.commit("tokens", name, fingerprint, local)


def test_entry_is_uploaded_and_visible_only_with_its_marker(bucket, tmp_path):
    m = CacheManager(root=f"{bucket}/cache")
    path = add_entry(m, tmp_path, "a", "fa")
    assert str(path) == f"{bucket}/cache/tokens/fa" and (path / "data").read_bytes() == b"x" * 1000
    marker = json.loads((path / COMMIT_MARKER).read_bytes())
    assert marker["name"] == "a" and marker["bytes"] == 1000
    assert m.lookup("tokens", "a", "fa") == path and m.stats()["disk_bytes"] == 1000
    (path / COMMIT_MARKER).unlink()  # an upload that died before its marker
    assert m.lookup("tokens", "a", "fa") is None and not m.committed("tokens", "fa")


@pytest.mark.parametrize("bucket", ["s3"], indirect=True)  # one store (CI time): the same code runs on the other
def test_marker_without_an_index_entry_is_recorded_by_lookup(bucket, tmp_path):
    m = CacheManager(root=f"{bucket}/cache")
    path = add_entry(m, tmp_path, "a", "fa")
    (m.root / "index.json").unlink()  # as if the committing process died after its marker
    assert m.lookup("tokens", "a", "fa") == path
    assert m.disk.entries()["tokens/fa"]["bytes"] == 1000


def test_lru_eviction_and_invalidation_delete_objects(bucket, tmp_path):
    m = CacheManager(root=f"{bucket}/cache", disk_size=2500)
    a, b = add_entry(m, tmp_path, "a", "fa"), add_entry(m, tmp_path, "b", "fb")
    assert m.lookup("tokens", "a", "fa") == a
    add_entry(m, tmp_path, "c", "fc")
    assert (a / "data").exists() and not b.exists() and m.stats()["evictions"] == 1
    assert m.lookup("tokens", "a", "fa-new") is None  # a new fingerprint of "a"
    assert not a.exists() and m.stats()["invalidations"] == 1


@pytest.mark.parametrize("bucket", ["gs"], indirect=True)  # one store (CI time): the same code runs on the other
def test_pins_of_other_hosts_count_as_live(bucket, tmp_path):
    m = CacheManager(root=f"{bucket}/cache", disk_size=1500)
    a = add_entry(m, tmp_path, "a", "fa")
    store.put(m.root / ".pins" / "tokens--fa--1@another-host", b"")
    add_entry(m, tmp_path, "b", "fb")
    assert (a / "data").exists()  # pinned by a process this host cannot see
    with m.use("tokens", "fb"):
        pin = m.root / ".pins" / f"tokens--fb--{os.getpid()}@{socket.gethostname()}"
        assert pin.exists()
    assert not pin.exists()


@pytest.mark.parametrize("bucket", ["s3"], indirect=True)  # one store (CI time): the same code runs on the other
def test_compilation_cache_stays_local_when_the_root_is_remote(bucket, tmp_path, monkeypatch):
    before = jax.config.jax_compilation_cache_dir
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    try:
        gin.parse_config(f"CacheManager.root = '{bucket}/cache'")
        path = enable_compilation_cache()
        assert path == tmp_path / "xdg" / "llamahome" / "jax_compilation_cache" and path.is_dir()
        assert jax.config.jax_compilation_cache_dir == str(path)
    finally:
        jax.config.update("jax_compilation_cache_dir", before)

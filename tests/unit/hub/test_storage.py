"""The disk budget: warnings before a download, LRU eviction only when allowed, no eviction of
pinned or in-use versions."""

from __future__ import annotations

import logging

import gin
import pytest

from llamahome.errors import UserError
from llamahome.hub import download, storage
from llamahome.hub.storage import StorageBudget
from tests.unit.hub.conftest import add, write_status


@pytest.fixture
def four(registry, tmp_path):
    """a (1000 B, used last), b (2000 B, pinned), c (3000 B, least recently used), d (in use)."""
    for name, size in (("a", 1000), ("b", 2000), ("c", 3000), ("d", 4000)):
        add(registry, tmp_path, name, bytes(size))
    registry.pin("b")
    registry.record_use("d", str(write_status(tmp_path / "runs" / "live", "running")))
    registry.record_use("a", str(write_status(tmp_path / "runs" / "done", "finished")))
    return registry


def budget_over_by(registry, over: int, incoming: int = 1500, **kwargs) -> StorageBudget:
    used = storage.usage(registry, StorageBudget())
    return StorageBudget(max_bytes=used + incoming - over, **kwargs)


def refs(registry) -> list[str]:
    return [v.ref for v in registry.list()]


def test_usage_counts_every_file_under_the_models_dir(four):
    manifest = (four.root / "registry.json").stat().st_size
    assert storage.usage(four, StorageBudget()) == 1000 + 2000 + 3000 + 4000 + manifest


def test_within_budget_nothing_happens(four, caplog):
    assert storage.ensure_room(four, 1500, budget_over_by(four, 0)) == []
    assert "budget" not in caplog.text
    assert refs(four) == ["a@1", "b@1", "c@1", "d@1"]


def test_over_budget_warns_and_keeps_everything_unless_eviction_is_allowed(four, caplog):
    caplog.set_level(logging.WARNING)
    assert storage.ensure_room(four, 1500, budget_over_by(four, 1)) == []
    assert "1 bytes over" in caplog.text and "['c@1']" in caplog.text
    assert "allow_eviction = True" in caplog.text
    assert refs(four) == ["a@1", "b@1", "c@1", "d@1"]
    with pytest.raises(UserError, match="do not fit"):
        storage.ensure_room(four, 1500, budget_over_by(four, 1, hard_limit=True))
    assert refs(four) == ["a@1", "b@1", "c@1", "d@1"]


def test_eviction_is_lru_and_spares_pinned_and_in_use(four):
    assert storage.ensure_room(four, 1500, budget_over_by(four, 1, allow_eviction=True)) == ["c@1"]
    assert refs(four) == ["a@1", "b@1", "d@1"]
    assert not (four.root / "c").exists()
    # 1000 + 1 over: only a (1000 B) is left to evict; b is pinned, d is in use.
    with pytest.raises(UserError, match="1 bytes over after evicting \\['a@1'\\]"):
        storage.ensure_room(four, 1500, budget_over_by(four, 1001, allow_eviction=True,
                                                        hard_limit=True))
    assert refs(four) == ["b@1", "d@1"]
    assert (four.root / "b" / "v1").is_dir() and (four.root / "d" / "v1").is_dir()


def test_checkpoints_count_when_asked(registry, tmp_path):
    ckpt = tmp_path / "runs" / "r1" / "checkpoints" / "10"
    ckpt.mkdir(parents=True)
    (ckpt / "params").write_bytes(bytes(5000))
    gin.bind_parameter("runs_dir.path", str(tmp_path / "runs"))
    assert storage.usage(registry, StorageBudget(count_checkpoints=True)) == 5000
    assert storage.usage(registry, StorageBudget()) == 0


def test_budget_is_checked_before_any_byte_is_downloaded(registry, file_server):
    server = file_server({"w.safetensors": bytes(10_000)})
    with pytest.raises(UserError, match="do not fit"):
        download.install(server.url + "w.safetensors", registry=registry, progress=False,
                         budget=StorageBudget(max_bytes=9_000, hard_limit=True))
    assert [m for m, _, _ in server.requests] == ["HEAD"]
    assert registry.list() == []


def test_more_than_the_free_disk_is_refused(registry):
    with pytest.raises(UserError, match="do not fit on the disk"):
        storage.ensure_room(registry, 10**18)

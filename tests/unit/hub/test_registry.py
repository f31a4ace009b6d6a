"""The registry manifest: refs, pin/unpin, in-use refusal, verification, path traversal."""

from __future__ import annotations

import hashlib
import json
import time

import pytest

from llamahome.errors import ConfigError, UserError
from llamahome.hub.registry import run_is_active, use_model
from llamahome.hub.security import UnsafePathError
from tests.unit.hub.conftest import add, write_status


def test_manifest_records_what_the_issue_lists(registry, tmp_path):
    before = time.time()
    version = add(registry, tmp_path, "tiny", b"abc")
    record = json.loads((registry.root / "registry.json").read_text())["versions"][0]
    assert record["name"] == "tiny" and record["version"] == 1
    assert record["files"] == {"model.safetensors": {"sha256": hashlib.sha256(b"abc").hexdigest(),
                                                     "size": 3}}
    assert record["size"] == 3 and record["pinned"] is False and record["parent"] is None
    assert record["source"] == str(tmp_path / "src-tiny-0") and record["runs"] == []
    assert before <= record["created"] <= time.time()
    assert registry.path("tiny@1") == registry.root / "tiny" / "v1"
    assert version.ref == "tiny@1"


def test_refs_list_show_pin_unpin(registry, tmp_path):
    add(registry, tmp_path, "a", b"1")
    add(registry, tmp_path, "a", b"22")
    add(registry, tmp_path, "b", b"333")
    assert [v.ref for v in registry.list()] == ["a@1", "a@2", "b@1"]
    assert [v.ref for v in registry.list("a")] == ["a@1", "a@2"]
    assert registry.get("a").ref == "a@2" and registry.get("a@1").size == 1
    assert registry.pin("a@1").pinned and registry.get("a@1").pinned
    assert not registry.unpin("a@1").pinned
    with pytest.raises(ConfigError, match="Did you mean 'a@2' or 'a@1'.*: a@1, a@2, b@1$"):
        registry.get("a@3")
    with pytest.raises(ConfigError, match="must be a number"):
        registry.get("a@latest")
    with pytest.raises(ConfigError, match="not valid"):
        registry.get("../a")


def test_remove_refuses_pinned_and_in_use_versions(registry, tmp_path):
    add(registry, tmp_path, "tiny", b"abc")
    registry.pin("tiny@1")
    with pytest.raises(UserError, match="pinned; unpin it first"):
        registry.remove("tiny@1")
    registry.unpin("tiny@1")
    run = write_status(tmp_path / "runs" / "r1", "running")
    assert use_model("tiny", str(run), root=registry.root) == registry.root / "tiny" / "v1"
    assert registry.get("tiny").runs == (str(run.resolve()),)
    with pytest.raises(UserError, match="in use by running run"):
        registry.remove("tiny@1")
    assert (registry.root / "tiny" / "v1" / "model.safetensors").exists()
    write_status(run, "finished")
    assert registry.remove("tiny@1") == 3
    assert registry.list() == [] and not (registry.root / "tiny").exists()


def test_run_activity_from_status_json(tmp_path):
    assert not run_is_active(str(tmp_path / "nothing"))
    assert run_is_active(str(write_status(tmp_path / "a", "running")))
    assert not run_is_active(str(write_status(tmp_path / "b", "failed")))
    dead = write_status(tmp_path / "c", "running", pid=2**22 + 12345)  # above pid_max: not alive
    assert not run_is_active(str(dead))
    other = write_status(tmp_path / "d", "running", host="elsewhere", pid=1)
    assert run_is_active(str(other))
    stale = write_status(tmp_path / "e", "running", host="elsewhere", updated=time.time() - 7200)
    assert not run_is_active(str(stale))


def test_verify_finds_a_tampered_file(registry, tmp_path):
    add(registry, tmp_path, "tiny", b"abc")
    assert registry.verify("tiny") == []
    (registry.path("tiny") / "model.safetensors").write_bytes(b"abd")
    assert registry.verify("tiny") == ["model.safetensors"]


@pytest.mark.parametrize("bad_name", ["../../etc/passwd", "/etc/passwd", "../../outside.txt",
                                      "ok/../../../outside.txt"])
def test_manifest_file_name_escaping_the_models_dir_is_refused(registry, tmp_path, bad_name):
    add(registry, tmp_path, "tiny", b"abc")
    sentinel = registry.root.parent / "outside.txt"
    sentinel.write_text("keep me")
    manifest = registry.root / "registry.json"
    data = json.loads(manifest.read_text())
    data["versions"][0]["files"][bad_name] = {"sha256": "0" * 64, "size": 7}
    manifest.write_text(json.dumps(data))
    for action in (registry.list, lambda: registry.get("tiny"), lambda: registry.verify("tiny"),
                   lambda: registry.remove("tiny")):
        with pytest.raises(UnsafePathError, match="refusing path"):
            action()
    assert sentinel.read_text() == "keep me"
    assert (registry.root / "tiny" / "v1" / "model.safetensors").exists()


def test_manifest_name_escaping_the_models_dir_is_refused(registry, tmp_path):
    add(registry, tmp_path, "tiny", b"abc")
    manifest = registry.root / "registry.json"
    data = json.loads(manifest.read_text())
    data["versions"][0]["name"] = "../.."
    manifest.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="not valid"):
        registry.list()


def test_corrupt_manifest_is_a_clear_error(registry):
    registry.root.mkdir(parents=True)
    (registry.root / "registry.json").write_text("{not json")
    with pytest.raises(UserError, match="not a valid model registry"):
        registry.list()

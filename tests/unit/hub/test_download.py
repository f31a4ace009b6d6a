"""Downloads from a real HTTP server on 127.0.0.1, an offline Hub cache, and local paths."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from llamahome.errors import ConfigError, UserError
from llamahome.hub import download
from llamahome.hub.download import IntegrityError, TransferError
from llamahome.hub.registry import STAGING
from llamahome.hub.security import UnsafePathError
from tests.unit.hub.conftest import COMMIT, make_hub_cache

WEIGHTS = bytes((i * 7 + i // 251) % 256 for i in range(300_001))  # not a multiple of any chunk
CUT_AT = 123_457


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and p.name not in (".registry.lock",)]


def test_cut_connection_is_resumed_with_a_range_request(registry, file_server):
    server = file_server({"model.safetensors": WEIGHTS, "config.json": b'{"a": 1}'})
    server.cut_once["model.safetensors"] = CUT_AT
    version = download.install(server.url, files=["model.safetensors", "config.json"],
                               sha256={"model.safetensors": sha(WEIGHTS)}, registry=registry,
                               progress=False, backoff_s=0.01)
    gets = server.gets("model.safetensors")
    assert [g.get("Range") for g in gets] == [None, f"bytes={CUT_AT}-"]
    stored = registry.path(version.ref) / "model.safetensors"
    assert stored.read_bytes() == WEIGHTS
    assert version.files["model.safetensors"].sha256 == sha(WEIGHTS)
    assert version.files["config.json"].sha256 == sha(b'{"a": 1}')
    assert registry.get("127.0.0.1").ref == version.ref == version.name + "@1"
    assert not (registry.root / STAGING).exists() or not files_under(registry.root / STAGING)


def test_download_run_again_resumes_the_part_file(registry, file_server):
    server = file_server({"w.safetensors": WEIGHTS})
    server.cut_once["w.safetensors"] = CUT_AT
    url = server.url + "w.safetensors"
    with pytest.raises(TransferError, match=f"resume from byte {CUT_AT}"):
        download.install(url, registry=registry, progress=False, retries=0)
    assert registry.list() == []
    [part] = [p for p in files_under(registry.root) if p.name.endswith(".part")]
    assert part.stat().st_size == CUT_AT
    version = download.install(url, registry=registry, progress=False, retries=0)
    assert server.gets("w.safetensors")[-1]["Range"] == f"bytes={CUT_AT}-"
    assert (registry.path(version.ref) / "w.safetensors").read_bytes() == WEIGHTS


def test_server_ignoring_range_restarts_from_zero(registry, file_server):
    server = file_server({"w.safetensors": WEIGHTS})
    server.cut_once["w.safetensors"] = CUT_AT
    server.honor_range = False
    version = download.install(server.url + "w.safetensors", sha256=sha(WEIGHTS), name="w",
                               registry=registry, progress=False, backoff_s=0.01)
    assert (registry.path("w") / "w.safetensors").read_bytes() == WEIGHTS
    assert version.ref == "w@1"


def test_wrong_sha256_is_refused_and_nothing_is_registered(registry, file_server):
    server = file_server({"w.safetensors": WEIGHTS})
    with pytest.raises(IntegrityError, match="sha256 of w.safetensors"):
        download.install(server.url + "w.safetensors", sha256="0" * 64, name="w",
                         registry=registry, progress=False)
    assert registry.list() == []
    assert files_under(registry.root) == []


def test_no_token_is_sent_and_no_query_is_recorded(registry, file_server, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_do_not_send_me_anywhere")
    server = file_server({"w.safetensors": WEIGHTS})
    version = download.install(server.url + "w.safetensors?X-Signature=s3cr3tsig", name="w",
                               registry=registry, progress=False)
    assert all("Authorization" not in h for h in server.gets("w.safetensors"))
    assert "s3cr3tsig" not in (registry.root / "registry.json").read_text()
    assert version.source == server.url + "w.safetensors"


def test_file_names_escaping_staging_are_refused(registry, file_server):
    server = file_server({"w.safetensors": WEIGHTS})
    with pytest.raises(UnsafePathError):
        download.install(server.url, files=["../../escape.safetensors"], name="w",
                         registry=registry, progress=False)
    assert registry.list() == []
    assert not (registry.root.parent / "escape.safetensors").exists()


def _hub_files() -> dict[str, bytes]:
    return {"model.safetensors": WEIGHTS, "config.json": b'{"hidden_size": 8}',
            "tokenizer.json": b'{"model": {}}', "pytorch_model.bin": b"pickle!",
            "modeling_llama.py": b"import os", "README.md": b"# hi"}


def test_hub_offline_fetches_only_safetensors_config_and_tokenizer(registry, tmp_path):
    files = _hub_files()
    make_hub_cache(tmp_path / "hub", "org/tiny", files)
    version = download.install("hf://org/tiny", cache_dir=str(tmp_path / "hub"),
                               local_files_only=True, registry=registry)
    assert version.ref == "org--tiny@1"
    assert version.revision == COMMIT  # "main" resolved through refs/main, recorded pinned
    assert version.source == "hf://org/tiny"
    assert sorted(version.files) == ["config.json", "model.safetensors", "tokenizer.json"]
    for name, entry in version.files.items():
        assert entry.sha256 == sha(files[name])
        assert (registry.path(version.ref) / name).read_bytes() == files[name]


def test_hub_offline_with_hf_hub_offline_env(tmp_path, python_runner):
    make_hub_cache(tmp_path / "hub", "org/tiny", _hub_files())
    code = ("from llamahome.hub import download, registry as r; "
            f"v = download.install('hf://org/tiny', revision='{COMMIT}', "
            f"cache_dir='{tmp_path / 'hub'}', registry=r.Registry('{tmp_path / 'models'}')); "
            "print(v.ref, v.revision)")
    result = python_runner(["-c", code], env={"HF_HUB_OFFLINE": "1"}, check=True, timeout=120)
    assert result.stdout.split() == ["org--tiny@1", COMMIT]


def test_hub_cache_blob_that_does_not_match_its_hash_is_refused(registry, tmp_path):
    repo = make_hub_cache(tmp_path / "hub", "org/tiny", _hub_files())
    blob = repo / "blobs" / sha(WEIGHTS)
    blob.write_bytes(WEIGHTS[:-1] + b"\x00")  # bit rot in the cache
    with pytest.raises(IntegrityError, match="cache is corrupt"):
        download.install("hf://org/tiny", cache_dir=str(tmp_path / "hub"), local_files_only=True,
                         registry=registry)
    assert registry.list() == []
    assert files_under(registry.root) == []


def test_hub_pickle_needs_allow_pickle(registry, tmp_path):
    make_hub_cache(tmp_path / "hub", "org/tiny", _hub_files())
    kwargs = dict(cache_dir=str(tmp_path / "hub"), local_files_only=True, registry=registry,
                  allow_patterns=["*.bin", "config.json"])
    with pytest.raises(UserError, match="refusing pickle-format files \\['\\*.bin'\\]"):
        download.install("hf://org/tiny", **kwargs)
    version = download.install("hf://org/tiny", allow_pickle=True, **kwargs)
    assert sorted(version.files) == ["config.json", "pytorch_model.bin"]


def test_missing_hub_repo_offline_is_a_clear_error(registry, tmp_path):
    (tmp_path / "hub").mkdir()
    with pytest.raises(UserError, match="hf://org/absent"):
        download.install("hf://org/absent", cache_dir=str(tmp_path / "hub"),
                         local_files_only=True, registry=registry)


def test_local_pickle_is_refused_unless_allowed(registry, tmp_path):
    src = tmp_path / "export"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "weights.pt").write_bytes(b"pickle")
    with pytest.raises(UserError, match="refusing pickle-format files \\['weights.pt'\\]"):
        download.install(str(src), registry=registry)
    assert registry.list() == []
    assert sorted(download.install(str(src), allow_pickle=True, registry=registry).files) == [
        "config.json", "weights.pt"]


def test_local_symlink_out_of_the_source_is_refused(registry, tmp_path):
    src = tmp_path / "export"
    src.mkdir()
    (tmp_path / "secret.txt").write_text("outside")
    os.symlink(tmp_path / "secret.txt", src / "config.json")
    with pytest.raises(UnsafePathError):
        download.install(str(src), registry=registry)


def test_fine_tune_is_registered_as_a_new_version_of_its_base(registry, tmp_path):
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    for d, data in ((base, b"base"), (tuned, b"tuned")):
        d.mkdir()
        (d / "model.safetensors").write_bytes(data)
    assert download.install(str(base), name="tiny", registry=registry).ref == "tiny@1"
    version = download.install(str(tuned), parent="tiny", registry=registry)
    assert (version.ref, version.parent) == ("tiny@2", "tiny@1")
    assert version.files["model.safetensors"].sha256 == sha(b"tuned")
    assert registry.get("tiny").ref == "tiny@2"


def test_bare_repo_id_suggests_hf_scheme(registry):
    with pytest.raises(ConfigError, match="hf://meta-llama/Llama-3.2-1B"):
        download.install("meta-llama/Llama-3.2-1B", registry=registry)

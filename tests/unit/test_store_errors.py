"""Models and Hugging Face dirs on object storage, in process, against the emulators: what a
cut-short upload leaves, HF dirs read from a bucket, the registry in a bucket (issue 25).
The jobs' refusals (missing bucket, credentials, denied write) are in
tests/integration/test_object_storage_models.py."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from llamahome import store
from llamahome.errors import CheckpointError
from llamahome.files import local_cache_dir
from llamahome.hub import download
from llamahome.hub.registry import Registry
from llamahome.hub.security import UnsafePathError, safe_join
from llamahome.model import hf, hf_jobs
from llamahome.model.llama import LlamaConfig, init_params

CONFIG = LlamaConfig(name="tiny", vocab_size=64, hidden_size=32, intermediate_size=48,
                     num_layers=2, num_heads=4, num_kv_heads=2)


@pytest.fixture(scope="module")
def params():
    return jax.tree.map(np.asarray, init_params(CONFIG, jax.random.key(0)))


def test_an_upload_cut_short_is_no_hf_dir_and_is_refused_next_time(bucket, params, monkeypatch):
    out = f"{bucket}/export"
    put = store.put

    def dies_on_config(path, data):  # the process dies as the last object goes up
        if path.name == "config.json":
            raise KeyboardInterrupt
        put(path, data)

    monkeypatch.setattr(store, "put", dies_on_config)
    with pytest.raises(KeyboardInterrupt):
        hf.save_hf_checkpoint(out, CONFIG, params)
    monkeypatch.setattr(store, "put", put)
    names = {p.name for p in store.as_path(out).iterdir()}
    assert "model.safetensors" in names and "config.json" not in names
    with pytest.raises(CheckpointError, match=f"{out} is not a Hugging Face model directory"):
        hf.load_hf_checkpoint(out)
    with pytest.raises(CheckpointError, match=f"{out} already exists and is not empty"):
        hf.save_hf_checkpoint(out, CONFIG, params)


def test_an_hf_dir_in_a_bucket_loads_as_the_local_one(bucket, params, tmp_path):
    hf.save_hf_checkpoint(tmp_path / "hf", CONFIG, params)
    hf.save_hf_checkpoint(f"{bucket}/hf", CONFIG, params)
    assert sorted(p.name for p in store.as_path(f"{bucket}/hf").iterdir()) == sorted(
        p.name for p in (tmp_path / "hf").iterdir())
    _, local = hf.load_hf_checkpoint(tmp_path / "hf")
    config, remote = hf.load_hf_checkpoint(f"{bucket}/hf")
    assert config.name == "hf"
    jax.tree.map(np.testing.assert_array_equal, remote, local)


def test_a_killed_import_hf_leaves_no_model_gin(bucket, params, tmp_path, monkeypatch):
    hf.save_hf_checkpoint(tmp_path / "hf", CONFIG, params)
    out = f"{bucket}/imported"
    save = hf_jobs.params_io.save_params

    def dies_after_saving(path, tree):  # killed once the params are up
        save(path, tree)
        raise KeyboardInterrupt

    monkeypatch.setattr(hf_jobs.params_io, "save_params", dies_after_saving)
    with pytest.raises(KeyboardInterrupt):
        hf_jobs.import_hf(run_dir=str(tmp_path / "run"), hf_dir=str(tmp_path / "hf"),
                          output_dir=out)
    assert not store.as_path(f"{out}/model.gin").exists()
    with pytest.raises(CheckpointError, match="unfinished import"):
        hf_jobs.import_hf(run_dir=str(tmp_path / "run"), hf_dir=str(tmp_path / "hf"),
                          output_dir=out)


@pytest.mark.parametrize("bucket", ["s3"], indirect=True)  # one store (CI time): the same code runs on the other
def test_an_import_cut_short_is_refused_not_taken_for_whole(bucket):
    out = store.as_path(f"{bucket}/imported")
    (out / "params" / "_CHECKPOINT_METADATA").write_bytes(b"{}")  # params/, no model.gin yet
    with pytest.raises(CheckpointError, match=r"unfinished import \(params/ but no model.gin"):
        hf_jobs._check_import_output(out)
    (out / "model.gin").write_text("LlamaConfig.name = 'x'\n")
    with pytest.raises(CheckpointError, match="already holds a finished import"):
        hf_jobs._check_import_output(out)


def test_the_registry_in_a_bucket_registers_verifies_and_removes(bucket, tmp_path):
    source = tmp_path / "model"
    source.mkdir()
    (source / "model.safetensors").write_bytes(b"weights")
    (source / "config.json").write_text("{}")
    registry = Registry(f"{bucket}/models")
    version = download.install(str(source), name="tiny", registry=registry, progress=False)
    assert version.ref == "tiny@1" and registry.verify("tiny@1") == []
    folder = registry.path("tiny@1")
    assert store.uri(folder) == f"{bucket}/models/tiny/v1"
    assert (folder / "model.safetensors").read_bytes() == b"weights"
    (folder / "model.safetensors").write_bytes(b"tampered")
    assert registry.verify("tiny@1") == ["model.safetensors"]
    again = download.install(f"{bucket}/models/tiny/v1", name="tiny", registry=registry,
                             progress=False)  # a folder in a bucket is a source too
    assert again.ref == "tiny@2" and again.source == f"{bucket}/models/tiny/v1"
    registry.remove("tiny@1")
    assert [v.ref for v in registry.list()] == ["tiny@2"] and not folder.exists()
    staging = local_cache_dir() / "model-staging"
    assert not staging.exists() or not any(staging.iterdir())  # uploaded, then deleted


@pytest.mark.parametrize("bucket", ["gs"], indirect=True)  # one store (CI time): the same code runs on the other
def test_a_manifest_name_cannot_leave_a_bucket_folder(bucket):
    for name in ("../other/x", "a/../../x", "/abs", "a//b", "./x"):
        with pytest.raises(UnsafePathError, match="refusing path"):
            safe_join(f"{bucket}/models/tiny/v1", name)
    assert store.uri(safe_join(f"{bucket}/m", "sub/f.json")) == f"{bucket}/m/sub/f.json"

"""The path layer (llamahome/store.py) against the S3 and GCS emulators on loopback."""

from __future__ import annotations

import threading
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts

from llamahome import store


def test_local_paths_stay_pathlib(tmp_path):
    assert store.as_path("~/x") == Path.home() / "x"
    assert isinstance(store.as_path(tmp_path), Path)
    assert not store.is_remote(tmp_path)
    assert store.kvstore_spec(tmp_path / "a") == {"driver": "file", "path": f"{tmp_path}/a/"}


def test_uris_split_and_show_without_credentials(monkeypatch):
    assert store.split("gs://bucket/a/b/") == ("gs", "bucket", "a/b")
    assert store.split("s3://bucket") == ("s3", "bucket", "")
    with pytest.raises(store.StorageError, match="names no bucket"):
        store.split("s3:///key")
    shown = store.show("s3://AKIAEXAMPLE:hunter2-secret@bucket/run")
    assert "hunter2" not in shown and "AKIAEXAMPLE" not in shown and "bucket/run" in shown
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    assert store.kvstore_spec("s3://b/run/cache") == {
        "driver": "s3", "bucket": "b", "path": "run/cache/", "aws_region": "eu-west-1",
        "endpoint": "http://127.0.0.1:9"}


def test_files_arrays_and_listing(bucket):
    root = store.as_path(f"{bucket}/run")
    (root / "a" / "x.txt").write_text("hello")
    assert store.is_remote(root) and str(root) == f"{bucket}/run"
    assert (root / "a" / "x.txt").read_text() == "hello"
    assert [p.name for p in (root / "a").iterdir()] == ["x.txt"]
    array = ts.open({"driver": "zarr3", "kvstore": store.kvstore_spec(f"{bucket}/arr"),
                     "metadata": {"shape": [5], "data_type": "int32"}}, create=True).result()
    array.write(np.arange(5, dtype=np.int32)).result()
    assert (store.as_path(f"{bucket}/arr") / "zarr.json").exists()  # on the bucket, not on disk


def test_conditional_writes(bucket):
    lock = f"{bucket}/run/.lock"
    assert store.read_versioned(lock) == (None, None)
    v1 = store.write_if(lock, b"one", None)
    with pytest.raises(store.Conflict):
        store.write_if(lock, b"two", None)  # only if absent
    v2 = store.write_if(lock, b"three", v1)
    with pytest.raises(store.Conflict):
        store.write_if(lock, b"four", v1)  # stale version
    assert store.read_versioned(lock) == (b"three", v2)
    with pytest.raises(store.Conflict):
        store.delete_if(lock, v1)
    store.delete_if(lock, v2)
    assert store.read_versioned(lock) == (None, None)


def test_exactly_one_of_racing_creators_wins(bucket):
    wins, barrier = [], threading.Barrier(6)

    def create(i: int) -> None:
        barrier.wait()
        try:
            store.write_if(f"{bucket}/race", str(i).encode(), None)
            wins.append(i)
        except store.Conflict:
            pass

    threads = [threading.Thread(target=create, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    assert store.read_versioned(f"{bucket}/race")[0] == str(wins[0]).encode()


def test_folders_upload_marker_last_and_download(bucket, tmp_path):
    src = tmp_path / "hf"
    (src / "sub").mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "sub/tok.json"):
        (src / name).write_text(name)
    order = []
    put = store.put
    store.put = lambda path, data: (order.append(path.name), put(path, data))[-1]
    try:
        store.upload_dir(src, f"{bucket}/models/m", last=("config.json",))
    finally:
        store.put = put
    assert order[-1] == "config.json" and len(order) == 3
    out = store.download_dir(f"{bucket}/models/m", tmp_path / "back")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "config.json", "model.safetensors", "sub/tok.json"]
    with pytest.raises(store.StorageError, match="no such folder"):
        store.download_dir(f"{bucket}/models/none", tmp_path / "none")


def test_missing_bucket_is_one_line(bucket):
    with pytest.raises(store.StorageError) as e:
        store.check_access(f"{bucket}-missing/run")
    assert str(e.value) == f"{bucket}-missing/run: the bucket does not exist"
    store.check_access(f"{bucket}/run")  # an existing bucket passes, leaving nothing behind
    assert not list(store.as_path(bucket).iterdir())


def test_missing_s3_credentials_are_one_line(object_stores, monkeypatch, tmp_path):
    uri = object_stores["s3"].bucket()
    monkeypatch.setenv("AWS_ENDPOINT_URL", object_stores["s3"].endpoint)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    store.reset_clients()
    try:
        with pytest.raises(store.StorageError, match="no credentials found"):
            store.write_if(f"{uri}/x", b"", None)
        with pytest.raises(store.StorageError, match="no credentials found"):
            store.check_access(f"{uri}/run")  # not "the bucket does not exist"
    finally:
        store.reset_clients()


def test_orbax_commits_s3_and_gcs_steps_by_a_marker_written_last(bucket):
    tree = {"w": jnp.arange(24.0).reshape(4, 6), "b": jnp.ones(3, jnp.int32)}
    directory = store.as_path(f"{bucket}/ckpt")
    with ocp.CheckpointManager(directory) as manager:
        manager.save(7, args=ocp.args.Composite(state=ocp.args.StandardSave(tree)))
        manager.wait_until_finished()
    assert (directory / "7" / "commit_success.txt").exists()
    with ocp.CheckpointManager(directory) as manager:
        assert manager.all_steps() == [7]
        restored = manager.restore(7, args=ocp.args.Composite(state=ocp.args.StandardRestore(tree)))
    np.testing.assert_array_equal(restored["state"]["w"], tree["w"])
    np.testing.assert_array_equal(restored["state"]["b"], tree["b"])
    (directory / "7" / "commit_success.txt").unlink()  # as if killed before the commit
    with ocp.CheckpointManager(directory) as manager:
        assert manager.all_steps() == []


def test_credentials_in_a_uri_are_refused_before_any_library_sees_them(bucket):
    secret_uri = bucket.replace("://", "://AKIAEXAMPLE:hunter2-secret@") + "/run"
    with pytest.raises(store.StorageError) as e:
        store.as_path(secret_uri)
    assert "credentials in a URI are not used" in str(e.value)
    assert "hunter2" not in str(e.value) and "AKIAEXAMPLE" not in str(e.value)

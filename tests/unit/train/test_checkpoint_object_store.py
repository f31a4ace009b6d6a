"""Checkpoints on object storage (S3 and GCS emulators, the `bucket` fixture): an async save
restores bit-identical with the data iterator's position; a step without its markers is never
restored; a garbled object is caught by its checksum and the restore falls back; retention
deletes old steps there too."""

import hashlib
import json
import logging
import math
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llamahome import store
from llamahome.errors import CheckpointError
from llamahome.train.checkpoint import (
    COMMIT_FILE,
    MANIFEST,
    NO_MANIFEST,
    REJECTED_DIR,
    CheckpointConfig,
    Checkpointer,
    abstract_like,
)
from llamahome.train.loop import restore_newest_good, restore_or_init
from llamahome.train.step import init_train_state
from tests.conftest import run_python

TX = optax.adamw(1e-3)


def make_state(seed=0):
    """A tiny TrainState on one device: params, AdamW moments, step, rng."""
    params = {"w": jax.random.normal(jax.random.key(seed), (16, 8)), "norm": jnp.arange(16.0) + seed}
    return init_train_state(params, TX, seed)


def abstract(state):
    return abstract_like(state, jax.tree.map(lambda x: x.sharding, state))


def data_iter(skip=0):
    it = iter(grain.MapDataset.range(100).shuffle(seed=3).to_iter_dataset())
    for _ in range(skip):
        next(it)
    return it


def objects(path) -> list[str]:
    """The object names under `path`, relative to it (an independent listing through fsspec)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(path))
    fs.invalidate_cache()
    return sorted(name[len(root.rstrip("/")) + 1:] for name in fs.find(root))


def steps_in(path) -> list[int]:
    return sorted({int(name.split("/")[0]) for name in objects(path) if name.split("/")[0].isdigit()})


def assert_bit_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
                          else x), np.asarray(jax.random.key_data(y) if jnp.issubdtype(
                              y.dtype, jax.dtypes.prng_key) else y)
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes()


def save_steps(directory, steps, config=None):
    ckpt = Checkpointer(directory, config or CheckpointConfig(async_save=False))
    for step in steps:
        ckpt.save(step, make_state(seed=step))
    ckpt.close()


def test_async_save_restores_bit_identical_with_the_data_position(bucket):
    directory = f"{bucket}/run/checkpoints"
    state, it = make_state(), data_iter(skip=7)
    ckpt = Checkpointer(directory, CheckpointConfig(async_save=True))
    assert ckpt.strict and store.is_remote(ckpt.directory)
    ckpt.save(7, state, it)
    expected_next = [next(it) for _ in range(5)]
    deadline = time.monotonic() + 30
    while not ckpt.is_sealed(7):  # as the train loop polls: sealed in the background
        assert time.monotonic() < deadline, "step 7 was not sealed by polling"
        ckpt.poll()
        time.sleep(0.05)
    ckpt.close()

    manifest = json.loads((store.as_path(directory) / "7" / MANIFEST).read_text())["files"]
    assert COMMIT_FILE in manifest and "data_iter/shard_0-of-1.json" in manifest
    name, want = next((n, w) for n, w in manifest.items() if n.startswith("state/"))
    data = (store.as_path(directory) / "7" / name).read_bytes()  # an independent re-derivation
    assert hashlib.sha256(data).hexdigest() == want["sha256"] and len(data) == want["size"]

    reader = Checkpointer(directory, CheckpointConfig())
    assert reader.all_steps() == [7] and reader.verify(7) is None
    fresh = data_iter()
    restored = reader.restore(7, abstract(state), fresh)
    assert [next(fresh) for _ in range(5)] == expected_next
    assert_bit_equal(restored, state)


def test_a_step_without_its_markers_is_never_restored(bucket, caplog):
    directory = f"{bucket}/ckpt"
    save_steps(directory, [1, 2, 3])
    root = store.as_path(directory)
    (root / "2" / MANIFEST).unlink()  # committed by Orbax, killed before sealing
    (root / "3" / COMMIT_FILE).unlink()  # killed mid-write: Orbax never committed it
    (root / "3" / MANIFEST).unlink()

    ckpt = Checkpointer(directory, CheckpointConfig())
    assert ckpt.all_steps() == [1, 2]  # never listed, so never restored
    deadline = time.monotonic() + 20  # Orbax deletes it at start, in a background thread
    while steps_in(directory) != [1, 2] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert steps_in(directory) == [1, 2]
    assert ckpt.verify(2) == NO_MANIFEST
    with caplog.at_level(logging.WARNING):
        restored = restore_newest_good(ckpt, abstract(make_state()), None, False)
    assert_bit_equal(restored, make_state(seed=1))
    assert "checkpoint step 2 is not usable: has no checksum manifest" in caplog.text
    assert ckpt.all_steps() == [1] and steps_in(f"{directory}/{REJECTED_DIR}") == [2]

    # a later start: rejected/ survives Orbax's clean-up of uncommitted folders
    assert Checkpointer(directory, CheckpointConfig()).all_steps() == [1]
    assert steps_in(f"{directory}/{REJECTED_DIR}") == [2]


def test_only_unsealed_steps_on_object_storage_start_fresh(bucket, caplog):
    directory = f"{bucket}/ckpt"
    save_steps(directory, [5])
    (store.as_path(directory) / "5" / MANIFEST).unlink()
    ckpt = Checkpointer(directory, CheckpointConfig())
    fresh = make_state(seed=9)
    with caplog.at_level(logging.WARNING):
        state = restore_or_init(ckpt, abstract(fresh), jax.tree.map(lambda x: x.sharding, fresh),
                                None, init_params=lambda key: fresh.params, optimizer=TX, seed=9,
                                init_from=None, load_params=None)
    assert int(state.step) == 0 and "starting fresh" in caplog.text
    assert_bit_equal(state.params, fresh.params)
    assert ckpt.all_steps() == [] and steps_in(f"{directory}/{REJECTED_DIR}") == [5]


def test_a_garbled_object_is_caught_by_its_checksum_and_the_restore_falls_back(bucket, caplog):
    directory = f"{bucket}/ckpt"
    save_steps(directory, [1, 2])
    step2 = store.as_path(directory) / "2"
    manifest = json.loads((step2 / MANIFEST).read_text())["files"]
    chunk = max((n for n in manifest if n.startswith("state/")), key=lambda n: manifest[n]["size"])
    data = bytearray((step2 / chunk).read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the checksum can tell
    (step2 / chunk).write_bytes(bytes(data))

    ckpt = Checkpointer(directory, CheckpointConfig())
    assert ckpt.verify(2) == f"{chunk} does not match its sha256 checksum (garbled)"
    with caplog.at_level(logging.WARNING):
        restored = restore_newest_good(ckpt, abstract(make_state()), None, False)
    assert_bit_equal(restored, make_state(seed=1))
    lines = [r.getMessage() for r in caplog.records if "step 2 is not usable" in r.getMessage()]
    assert lines == [(f"checkpoint step 2 is not usable: {chunk} does not match its sha256 "
                      "checksum (garbled)")]
    rejected = f"{directory}/{REJECTED_DIR}"
    assert ckpt.all_steps() == [1] and steps_in(rejected) == [2]
    assert chunk in [n.split("/", 1)[1] for n in objects(rejected) if n.startswith("2/")]


def test_nothing_verifies_is_one_error_naming_the_uri(bucket):
    directory = f"{bucket}/ckpt"
    save_steps(directory, [1])
    step1 = store.as_path(directory) / "1"
    name = next(n for n in objects(step1) if n.startswith("state/") and "_METADATA" in n)
    (step1 / name).write_bytes(b"{}")
    with pytest.raises(CheckpointError, match=rf"no checkpoint in {directory} verifies \(step 1: "
                                              rf"{name} is 2 bytes"):
        restore_newest_good(Checkpointer(directory, CheckpointConfig()), abstract(make_state()),
                            None, False)


def test_retention_deletes_old_steps_on_object_storage(bucket):
    directory = f"{bucket}/ckpt"
    save_steps(directory, [10, 20, 30, 40],
               CheckpointConfig(keep_last_n=2, save_best=False, async_save=True))
    assert steps_in(directory) == [30, 40]
    assert Checkpointer(directory, CheckpointConfig()).all_steps() == [30, 40]


@pytest.mark.performance
@pytest.mark.slow
def test_checkpoint_benchmark_runs_against_the_s3_emulator(object_stores, monkeypatch):
    """benchmarks/checkpoint.py --dir s3://...: its JSON line, bit-equal restores there, and
    nothing left under --dir."""
    for name, value in object_stores["s3"].env().items():
        monkeypatch.setenv(name, value)
    store.reset_clients()
    bucket = object_stores["s3"].bucket()
    result = run_python(["benchmarks/checkpoint.py", "--config", "d256x4", "--repeats", "1",
                         "--window", "1", "--step_config", "d256x4", "--dir", f"{bucket}/bench"],
                        env={"XLA_FLAGS": ""}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    [line] = [json.loads(x) for x in result.stdout.splitlines() if x.startswith("{")]
    assert line["benchmark"] == "checkpoint" and line["repeats"] == 1
    assert line["restored_equal"] is True  # on local disk
    assert line["dir"] == f"{bucket}/bench" and line["dir_restored_equal"] is True
    for key in ("state_mb", "save_mb_per_s", "restore_mb_per_s", "copy_mb_per_s",
                "dir_save_mb_per_s", "dir_restore_mb_per_s", "step_time_s"):
        assert isinstance(line[key], (int, float)) and math.isfinite(line[key]) and line[key] > 0, key
    assert line["machine"]
    assert objects(bucket) == []

"""Checkpoint round trip with the Grain iterator and data shards, restore onto another mesh, retention on
disk, checksum manifests, failed saves and config diffs."""

import errno
import hashlib
import json
import os

import gin
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from llamahome.data.pipeline import ShardedIterator
from llamahome.errors import CheckpointError
from llamahome.parallel.mesh import axis_rules, build_mesh, follow_params, init_sharded, logical_shardings
from llamahome.train import checkpoint
from llamahome.train.checkpoint import (MANIFEST, NO_MANIFEST, CheckpointConfig, Checkpointer, abstract_like,
                                        config_changes)
from llamahome.train.step import init_train_state

SPECS = {"w": P("embed", "mlp"), "norm": P("norm")}


def make_state(mesh, preset, seed=0):
    shardings = logical_shardings(SPECS, mesh, axis_rules(preset))
    params = {"w": jax.random.normal(jax.random.key(seed), (16, 8)), "norm": jnp.arange(16.0)}
    tx = optax.adamw(1e-3)
    state_shape = jax.eval_shape(lambda p: init_train_state(p, tx, seed), params)
    state_shardings = follow_params(state_shape, params, shardings, mesh)
    return init_sharded(lambda p: init_train_state(p, tx, seed), state_shardings, params), state_shardings


def test_round_trip_with_data_iterator_onto_another_mesh(tmp_path, eight_devices):
    state, _ = make_state(build_mesh(data=1, fsdp=8, tensor=1, devices=eight_devices), "fsdp")
    data_iter = iter(grain.MapDataset.range(100).shuffle(seed=3).to_iter_dataset())
    for _ in range(7):
        next(data_iter)
    ckpt = Checkpointer(tmp_path, CheckpointConfig(save_steps=1, async_save=True))
    ckpt.save(7, state, data_iter)
    expected_next = [next(data_iter) for _ in range(5)]
    ckpt.close()

    other_mesh = build_mesh(data=2, fsdp=2, tensor=2, devices=eight_devices)
    _, other_shardings = make_state(other_mesh, "fsdp_tensor", seed=1)
    fresh_iter = iter(grain.MapDataset.range(100).shuffle(seed=3).to_iter_dataset())
    reader = Checkpointer(tmp_path, CheckpointConfig())
    assert reader.latest_step() == 7
    restored = reader.restore(7, abstract_like(state, other_shardings), fresh_iter)
    assert [next(fresh_iter) for _ in range(5)] == expected_next
    assert restored.params["w"].sharding.spec == P("fsdp", "tensor")
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_gin_config_is_stored_with_each_step(tmp_path, eight_devices):
    gin.parse_config("CheckpointConfig.keep_last_n = 4")
    state, _ = make_state(build_mesh(devices=eight_devices), "fsdp")
    ckpt = Checkpointer(tmp_path, CheckpointConfig())
    ckpt.save(1, state)
    ckpt.close()
    assert "CheckpointConfig.keep_last_n = 4" in Checkpointer(tmp_path, CheckpointConfig()).saved_config(1)


def test_keep_last_n_and_best_on_disk(tmp_path, eight_devices):
    state, _ = make_state(build_mesh(devices=eight_devices), "fsdp")
    ckpt = Checkpointer(tmp_path, CheckpointConfig(keep_last_n=2, save_best=True, async_save=False))
    eval_losses = {10: 5.0, 20: 2.0, 30: 4.0, 40: 3.0, 50: None, 60: None}
    for step, loss in eval_losses.items():
        ckpt.save(step, state, eval_loss=loss)
    ckpt.close()
    on_disk = sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit())
    assert on_disk == [20, 50, 60]  # best (eval loss 2.0) + the last two
    reopened = Checkpointer(tmp_path, CheckpointConfig(keep_last_n=2, async_save=False))
    assert reopened.best_step() == 20
    reopened.save(70, state, eval_loss=None)  # after a restart, the best is still kept
    reopened.close()
    assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [20, 60, 70]


def test_unfinished_write_is_never_restored(tmp_path, eight_devices):
    state, _ = make_state(build_mesh(devices=eight_devices), "fsdp")
    ckpt = Checkpointer(tmp_path, CheckpointConfig(async_save=False))
    ckpt.save(5, state)
    ckpt.close()
    partial = tmp_path / "6.orbax-checkpoint-tmp"  # how Orbax names a step being written
    (partial / "state").mkdir(parents=True)
    reader = Checkpointer(tmp_path, CheckpointConfig())
    assert reader.latest_step() == 5


def test_data_shard_states_restore_per_shard_and_name_a_shard_count_mismatch(tmp_path, eight_devices):
    def shards(count):  # shard k reads k, k + count, ... shuffled
        return ShardedIterator({k: iter(grain.MapDataset.range(k, 100, count).shuffle(seed=k)
                                        .to_iter_dataset()) for k in range(count)}, count)

    state, _ = make_state(build_mesh(data=1, fsdp=8, tensor=1, devices=eight_devices), "fsdp")
    two = shards(2)
    for _ in range(3):
        [next(it) for it in two.iterators.values()]
    ckpt = Checkpointer(tmp_path, CheckpointConfig(async_save=False))
    ckpt.save(3, state, two)
    expected = {k: [next(it) for _ in range(4)] for k, it in two.iterators.items()}
    ckpt.close()
    assert sorted(p.name for p in (tmp_path / "3" / "data_iter").glob("shard_*")) == \
        ["shard_0-of-2.json", "shard_1-of-2.json"]

    fresh = shards(2)
    Checkpointer(tmp_path, CheckpointConfig()).restore(3, state, fresh)
    assert {k: [next(it) for _ in range(4)] for k, it in fresh.iterators.items()} == expected
    with pytest.raises(CheckpointError, match="Set train.data_shards to the K"):
        Checkpointer(tmp_path, CheckpointConfig()).restore(3, state, shards(1))


def corrupt_one_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_each_step_is_sealed_and_verify_names_the_damaged_file(tmp_path, eight_devices):
    state, _ = make_state(build_mesh(devices=eight_devices), "fsdp")
    ckpt = Checkpointer(tmp_path, CheckpointConfig(async_save=True))
    ckpt.save(1, state)
    ckpt.close()  # waits for the background write, then seals
    assert ckpt.verify(1) is None
    files = json.loads((tmp_path / "1" / MANIFEST).read_text())["files"]
    assert "state/_METADATA" in files
    for name, expected in files.items():  # an independent re-derivation of each checksum
        assert hashlib.sha256((tmp_path / "1" / name).read_bytes()).hexdigest() == expected["sha256"]

    corrupt_one_byte(tmp_path / "1" / "state" / "_METADATA")
    assert ckpt.verify(1) == "state/_METADATA does not match its sha256 checksum (garbled)"
    (tmp_path / "1" / "state" / "_METADATA").write_text("")
    assert ckpt.verify(1).startswith("state/_METADATA is 0 bytes")
    (tmp_path / "1" / MANIFEST).unlink()
    assert ckpt.verify(1) == NO_MANIFEST


def test_retention_keeps_the_newest_sealed_step(tmp_path, eight_devices):
    state, _ = make_state(build_mesh(devices=eight_devices), "fsdp")
    ckpt = Checkpointer(tmp_path, CheckpointConfig(keep_last_n=1, save_best=False, async_save=True))
    ckpt.save(1, state)
    ckpt.wait()
    (tmp_path / "1" / MANIFEST).unlink()  # as if the run had died before sealing step 1
    ckpt.save(2, state)
    ckpt.wait()
    ckpt.save(3, state)  # step 2 is the newest sealed until step 3 is sealed
    ckpt.close()
    assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [2, 3]


def test_a_failed_save_is_one_error_naming_step_cause_and_the_newest_good_step(tmp_path, eight_devices,
                                                                               monkeypatch):
    state, _ = make_state(build_mesh(devices=eight_devices), "fsdp")
    ckpt = Checkpointer(tmp_path, CheckpointConfig(async_save=True))
    ckpt.save(1, state)
    ckpt.wait()

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint, "write_manifest", full_disk)
    ckpt.save(2, state)
    with pytest.raises(CheckpointError) as raised:
        ckpt.wait()
    assert str(raised.value).startswith("saving checkpoint step 2 failed: No space left on device "
                                        "[Errno 28]; the newest good checkpoint is step 1 in ")
    ckpt.close()  # the failure is reported once, not again on close
    assert ckpt.verify(1) is None


def test_config_changes_name_bindings_old_and_new_and_ignore_run_length_and_redaction():
    saved = ("train.learning_rate = 0.003\ntrain.steps = 20\nCheckpointConfig.save_steps = 10\n"
             "HF_TOKEN = '<redacted>'\nTextFiles.paths = [\n    'a',\n    'b']\n"
             "scope/train.seed = 0\n")
    current = ("train.learning_rate = 0.001\ntrain.steps = 40\nCheckpointConfig.save_steps = 5\n"
               "HF_TOKEN = 'hf_abcdefghijkl'\nTextFiles.paths = ['a', 'c']\nz_loss = 1\n")
    assert config_changes(saved, current) == [
        "TextFiles.paths: ['a', 'b'] -> ['a', 'c']", "scope/train.seed: 0 -> <unset>",
        "train.learning_rate: 0.003 -> 0.001", "z_loss: <unset> -> 1"]
    assert config_changes(saved, saved) == []


def test_a_garbled_data_iterator_state_names_the_file(tmp_path, eight_devices):
    state, _ = make_state(build_mesh(devices=eight_devices), "fsdp")
    data_iter = iter(grain.MapDataset.range(10).to_iter_dataset())
    ckpt = Checkpointer(tmp_path, CheckpointConfig(async_save=False))
    ckpt.save(1, state, data_iter)
    ckpt.close()
    (tmp_path / "1" / "data_iter" / "shard_0-of-1.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"1/data_iter/shard_0-of-1.json is corrupt: not valid JSON"):
        Checkpointer(tmp_path, CheckpointConfig()).restore(1, state, iter(grain.MapDataset.range(10)
                                                                        .to_iter_dataset()))

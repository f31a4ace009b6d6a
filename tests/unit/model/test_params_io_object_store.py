"""Params checkpoints and training runs on object storage (S3 and GCS emulators, the `bucket`
fixture): save_params / load_params on a URI, and load_model of a remote params dir and of a
remote run dir (its newest sealed step, its tokenizer copied to a local folder)."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import optax
import pytest

import gin
from llamahome import store
from llamahome.errors import CheckpointError
from llamahome.model.checkpoints import load_model, resolve
from llamahome.model.llama import LlamaConfig, param_shapes
from llamahome.model.params_io import load_params, save_params
from llamahome.train.checkpoint import MANIFEST, CheckpointConfig, Checkpointer
from llamahome.train.step import init_train_state

CONFIG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                     num_heads=4, num_kv_heads=2)
MODEL_GIN = "\n".join(f"LlamaConfig.{k} = {v}" for k, v in {
    "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_layers": 2,
    "num_heads": 4, "num_kv_heads": 2}.items())


def make_params(seed: int) -> dict:
    """Random params of CONFIG's shapes (numpy: init_params would compile op by op)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jax.numpy.asarray(rng.standard_normal(s.shape, np.float32)),
                        param_shapes(CONFIG))


def assert_bit_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def test_params_round_trip_on_a_uri_and_an_unfinished_save_is_refused(bucket):
    params = make_params(0)
    uri = f"{bucket}/models/m/params"
    assert store.is_remote(save_params(uri, params))
    assert_bit_equal(load_params(uri, CONFIG), params)
    with pytest.raises(CheckpointError, match=f"{uri} already exists"):
        save_params(uri, params)
    (store.as_path(uri) / "commit_success.txt").unlink()  # as if killed before the commit
    with pytest.raises(CheckpointError, match=f"params checkpoint {uri} has no commit_success.txt"):
        load_params(uri, CONFIG)
    with pytest.raises(CheckpointError, match=f"params checkpoint {bucket}/nowhere does not exist"):
        load_params(f"{bucket}/nowhere", CONFIG)


def test_load_model_of_a_remote_params_dir_with_its_tokenizer(bucket):
    params = make_params(1)
    save_params(f"{bucket}/models/m/params", params)
    store.put(store.as_path(f"{bucket}/models/m/model.gin"), MODEL_GIN.encode())
    store.put(store.as_path(f"{bucket}/models/m/tokenizer.json"), b'{"model": "stand-in"}')
    model = load_model(f"{bucket}/models/m")
    assert model.kind == "params" and model.config.hidden_size == 32
    assert_bit_equal(model.params, params)
    local = model.tokenizer.path  # tokenizer libraries read local files
    assert not store.is_remote(local) and os.path.isfile(os.path.join(local, "tokenizer.json"))


def test_load_model_of_a_remote_run_reads_its_newest_sealed_step(bucket):
    run = f"{bucket}/runs/r1"
    gin.parse_config(MODEL_GIN)  # the saved gin config says which model a step holds
    ckpt = Checkpointer(f"{run}/checkpoints", CheckpointConfig(async_save=False))
    saved = {}
    for step in (1, 2):
        saved[step] = make_params(step)
        ckpt.save(step, init_train_state(saved[step], optax.sgd(0.1), 0))
    ckpt.close()
    tokenizer = store.as_path(f"{run}/tokenizer")
    store.put(tokenizer / "tokenizer.json", b'{"model": "stand-in"}')
    store.put(tokenizer / "spec.json", json.dumps({"bos_token": "<s>"}).encode())

    model = load_model(run)
    assert (model.kind, model.step, model.config.num_layers) == ("train", 2, 2)
    assert_bit_equal(model.params, saved[2])
    assert not store.is_remote(model.tokenizer.path) and model.tokenizer.bos_token == "<s>"

    (store.as_path(f"{run}/checkpoints/2") / MANIFEST).unlink()  # its save never sealed
    assert resolve(run) == ("train", store.as_path(f"{run}/checkpoints/1"))
    with pytest.raises(CheckpointError, match="has no llamahome_manifest.json: its save did not"):
        load_model(f"{run}/checkpoints/2")
    with pytest.raises(CheckpointError, match=r"has no step 2; it has steps \[1\]"):
        load_model(run, step=2)

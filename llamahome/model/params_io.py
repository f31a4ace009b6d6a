"""Params-only Orbax checkpoints: what `import_hf` writes, `train` can `init_from`, `generate` reads.

    save_params("models/llama3_2_1b/params", params)
    params = load_params("models/llama3_2_1b/params", config, shardings)

The directory is an Orbax `StandardCheckpointer` checkpoint of the params pytree
(llama.init_params' structure), committed atomically by Orbax: on local disk by a rename, on
object storage (`path` a `gs://` or `s3://` URI, llamahome/store.py) by `commit_success.txt`
written last; `load_params` refuses a folder there without it (a save that did not finish). `load_params` checks every
tensor's path and shape against the config before reading, restores onto `shardings` (a
pytree of `jax.sharding.Sharding`, e.g. from the logical axis rules; default: the first
device), and casts to `config.param_dtype`.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

from llamahome import store
from llamahome.errors import CheckpointError
from llamahome.model.llama import LlamaConfig, param_shapes

COMMIT_FILE = "commit_success.txt"  # Orbax's commit marker on object storage


def save_params(path: str | os.PathLike, params: dict) -> store.AnyPath:
    """Writes `params` (jax or numpy arrays) as an Orbax checkpoint at `path` (must not exist)."""
    path = store.resolve(path)
    if path.exists():
        raise CheckpointError(f"{store.show(path)} already exists; choose another path or remove it")
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, params)
        checkpointer.wait_until_finished()
    return path


def _keystr(key_path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in key_path)


def load_params(path: str | os.PathLike, config: LlamaConfig,
                shardings: dict | None = None) -> dict:
    """Restores params saved by `save_params`, checked against `config`, onto `shardings`."""
    path = store.resolve(path)
    if not path.is_dir():
        raise CheckpointError(f"params checkpoint {store.show(path)} does not exist (write one "
                              "with the import_hf job or save_params)")
    if store.is_remote(path) and not (path / COMMIT_FILE).exists():
        raise CheckpointError(f"params checkpoint {store.show(path)} has no {COMMIT_FILE}: its "
                              "save did not finish; write it again")
    expected = param_shapes(config)
    with ocp.StandardCheckpointer() as checkpointer:
        stored = checkpointer.metadata(path).item_metadata.tree
        _check_against(stored, expected, path, config)
        if shardings is None:
            device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            shardings = jax.tree.map(lambda _: device, expected)
        target = jax.tree.map(lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                                                       sharding=sharding),
                              expected, shardings)
        return checkpointer.restore(path, target)


def _check_against(stored, expected, path: store.AnyPath, config: LlamaConfig) -> None:
    path = store.show(path)
    stored_shapes = {_keystr(k): tuple(v.shape)
                     for k, v in jax.tree_util.tree_leaves_with_path(stored)}
    for key_path, leaf in jax.tree_util.tree_leaves_with_path(expected):
        name = _keystr(key_path)
        if name not in stored_shapes:
            raise CheckpointError(f"{path} has no parameter {name!r} that model "
                                  f"{config.name!r} needs (tie_embeddings={config.tie_embeddings})")
        if stored_shapes[name] != tuple(leaf.shape):
            raise CheckpointError(f"parameter {name!r} in {path} has shape {stored_shapes[name]}, "
                                  f"model {config.name!r} expects {tuple(leaf.shape)}; bind the "
                                  "LlamaConfig preset the checkpoint was made with")
    extra = set(stored_shapes) - {_keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(expected)}
    if extra:
        raise CheckpointError(f"{path} holds parameters model {config.name!r} does not have: "
                              f"{', '.join(sorted(extra))}")

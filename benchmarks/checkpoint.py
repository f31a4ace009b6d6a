"""Checkpoint save and restore MB/s of a `d512x8` TrainState against a plain file copy; one JSON line.

    python benchmarks/checkpoint.py [--config d512x8] [--repeats 5] [--dir /tmp]

The state is the train job's (params + AdamW moments, float32), saved synchronously through
llamahome.train.checkpoint.Checkpointer and waited on until committed, then restored onto the
same shardings. The reference is `shutil.copyfile` of a file holding as many bytes, fsync'd.
Each figure is the median over `--repeats` fresh steps.
"""

from __future__ import annotations

from llamahome import launch

if __name__ == "__main__":
    launch.reexec_under_allocator()  # mimalloc (from pip), tcmalloc or jemalloc, before JAX or torch load

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from train_step import CONFIGS, config_name, named_config  # noqa: E402

from llamahome.model.llama import init_params, param_logical_axes, param_shapes  # noqa: E402
from llamahome.parallel.mesh import axis_rules, build_mesh, init_sharded  # noqa: E402
from llamahome.train import optim, step as step_lib  # noqa: E402
from llamahome.train.checkpoint import CheckpointConfig, Checkpointer, abstract_like  # noqa: E402
from llamahome.train.step import init_train_state  # noqa: E402


def train_state(name: str):
    """(TrainState, its shardings) of benchmark config `name`, as the train job builds them."""
    config, _, _ = named_config(name)
    mesh, rules = build_mesh(), axis_rules("fsdp")
    specs = param_logical_axes(config)
    optimizer, _ = optim.build_optimizer(1e-4, 1000, decay_mask=optim.decay_mask(specs))
    _, shardings = step_lib.state_shardings(param_shapes(config), specs, optimizer, mesh, rules)
    state = init_sharded(lambda k: init_train_state(init_params(config, k), optimizer, 0),
                                  shardings, jax.random.key(0))
    return state, shardings


def copy_seconds(folder: Path, nbytes: int) -> float:
    """Seconds to shutil.copyfile an `nbytes` file and fsync the copy."""
    source, target = folder / "source.bin", folder / "target.bin"
    with open(source, "wb") as f:
        f.write(np.random.default_rng(0).bytes(nbytes))
        f.flush()
        os.fsync(f.fileno())
    start = time.perf_counter()
    shutil.copyfile(source, target)
    with open(target, "rb+") as f:
        os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    source.unlink()
    target.unlink()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="d512x8", type=config_name, choices=list(CONFIGS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where to write (default: the temp dir)")
    args = parser.parse_args()
    state, shardings = train_state(args.config)
    nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
    abstract = abstract_like(state, shardings)
    save_s, restore_s, copy_s = [], [], []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        ckpt = Checkpointer(Path(tmp) / "checkpoints",
                            CheckpointConfig(keep_last_n=1, save_best=False, async_save=False))
        for step in range(args.repeats):
            copy_s.append(copy_seconds(Path(tmp), nbytes))
            start = time.perf_counter()
            ckpt.save(step, state)
            ckpt.wait()
            save_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            restored = ckpt.restore(step, abstract)
            jax.block_until_ready(restored)
            restore_s.append(time.perf_counter() - start)
        ckpt.close()
        same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(restored),
                                                         jax.tree.leaves(state), strict=True))
    mb = nbytes / 1e6
    save_mbs, restore_mbs = mb / statistics.median(save_s), mb / statistics.median(restore_s)
    copy_mbs = mb / statistics.median(copy_s)
    print(json.dumps({
        "benchmark": "checkpoint", "allocator": launch.allocator_name(), "config": args.config, "state_mb": mb, "repeats": args.repeats,
        "save_mb_per_s": save_mbs, "restore_mb_per_s": restore_mbs, "copy_mb_per_s": copy_mbs,
        "save_vs_copy": save_mbs / copy_mbs, "restore_vs_copy": restore_mbs / copy_mbs,
        "save_s": save_s, "restore_s": restore_s, "copy_s": copy_s, "restored_equal": same}))


if __name__ == "__main__":
    main()

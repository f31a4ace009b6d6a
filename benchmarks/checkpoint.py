"""Checkpoint save and restore MB/s of a `d512x8` TrainState against a plain file copy, and, with
`--dir`, on that dir (local or `gs://` / `s3://`) with the train step's slowdown from async
saves there; one JSON line.

    python benchmarks/checkpoint.py [--config d512x8] [--repeats 5]
    python benchmarks/checkpoint.py --dir s3://bucket/prefix [--save_every 200] [--window 10]

The state is the train job's (params + AdamW moments, float32), saved synchronously through
llamahome.train.checkpoint.Checkpointer and waited on until committed and sealed (checksum
manifest), then restored onto the same shardings. The reference is `shutil.copyfile` of a
file holding as many bytes, fsync'd, in the temp dir. Each figure is the median over
`--repeats` fresh steps.

With `--dir`, the same save / restore runs there (`dir_*` keys, beside the local disk's), and
then the train step (benchmarks/train_step.py's, `--step_config`) runs `--repeats` rounds of
two `--window`-step windows, one plain and one that starts with an async save to `--dir`
(polled every step as the train loop does, and waited on, sealed included, before the window
ends): `save_extra_s` is what a save adds to a window (median of the differences), and
`async_save_slowdown` that cost spread over `--save_every` steps (200: gin/train/quickstart.gin's
CheckpointConfig.save_steps) of the plain step time; the target is < 0.05. Everything written
under `--dir` goes into a fresh `llamahome-bench-<id>/` folder, deleted at the end.
"""

from __future__ import annotations

from llamahome import launch

if __name__ == "__main__":
    launch.reexec_under_allocator()  # mimalloc (from pip), tcmalloc or jemalloc, before JAX or torch load

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from train_step import CONFIGS, build, config_name, named_config  # noqa: E402

from llamahome import store  # noqa: E402
from llamahome.errors import UserError  # noqa: E402
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


def cpu_model() -> str:
    """`lscpu`'s model name (else the platform's processor or machine)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10,
                             check=False).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines()
                    if line.startswith("Model name"))
    except (OSError, StopIteration, subprocess.SubprocessError):
        return platform.processor() or platform.machine()


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


def save_restore(directory, state, abstract, repeats: int, copy_in: Path | None = None) -> dict:
    """Median save and restore seconds of `state` through a Checkpointer at `directory`."""
    ckpt = Checkpointer(directory, CheckpointConfig(keep_last_n=1, save_best=False,
                                                    async_save=False))
    save_s, restore_s, copy_s = [], [], []
    for step in range(repeats):
        if copy_in is not None:
            copy_s.append(copy_seconds(copy_in, sum(x.nbytes for x in jax.tree.leaves(state))))
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
    return {"save_s": save_s, "restore_s": restore_s, "copy_s": copy_s, "restored_equal": same}


def step_windows(directory, config_name_: str, window: int, rounds: int) -> dict:
    """Seconds of `window` train steps without a save and with an async save at their start."""
    config, seq, batch = named_config(config_name_)
    step, state, data, _ = build(config, seq, batch)
    state, metrics = step(state, data)  # warm up
    jax.block_until_ready(metrics)
    ckpt = Checkpointer(directory, CheckpointConfig(keep_last_n=1, save_best=False,
                                                    async_save=True))
    plain, saving, number = [], [], 0
    for _ in range(rounds):
        for times, save in ((plain, False), (saving, True)):
            start = time.perf_counter()
            for i in range(window):
                number += 1
                if save and i == 0:
                    ckpt.save(number, state)
                state, metrics = step(state, data)
                jax.block_until_ready(metrics)
                ckpt.poll()
            ckpt.wait()  # the whole save, sealing included, inside the window
            times.append(time.perf_counter() - start)
    ckpt.close()
    return {"plain": plain, "saving": saving}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="d512x8", type=config_name, choices=list(CONFIGS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default=None,
                        help="also save, restore and time async saves here (local or a URI)")
    parser.add_argument("--save_every", type=int, default=200,
                        help="the save interval the slowdown is projected on")
    parser.add_argument("--window", type=int, default=10, help="train steps per timed window")
    parser.add_argument("--step_config", default="d256x4", type=config_name,
                        choices=list(CONFIGS), help="the model whose train step is timed")
    args = parser.parse_args()
    state, shardings = train_state(args.config)
    nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
    abstract = abstract_like(state, shardings)
    mb = nbytes / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        local = save_restore(Path(tmp) / "checkpoints", state, abstract, args.repeats, Path(tmp))
    save_mbs = mb / statistics.median(local["save_s"])
    restore_mbs = mb / statistics.median(local["restore_s"])
    copy_mbs = mb / statistics.median(local["copy_s"])
    line = {
        "benchmark": "checkpoint", "machine": cpu_model(), "allocator": launch.allocator_name(),
        "config": args.config, "state_mb": mb, "repeats": args.repeats,
        "save_mb_per_s": save_mbs, "restore_mb_per_s": restore_mbs, "copy_mb_per_s": copy_mbs,
        "save_vs_copy": save_mbs / copy_mbs, "restore_vs_copy": restore_mbs / copy_mbs,
        "save_s": local["save_s"], "restore_s": local["restore_s"], "copy_s": local["copy_s"],
        "restored_equal": local["restored_equal"]}
    if args.dir:
        try:
            line.update(on_dir(args, state, abstract, mb, save_mbs, restore_mbs))
        except UserError as e:  # a missing bucket, credentials, endpoint: one line, exit 2
            sys.exit(f"error: {e}")
    print(json.dumps(line))


def on_dir(args: argparse.Namespace, state, abstract, mb: float, local_save_mbs: float,
           local_restore_mbs: float) -> dict:
    """The `dir_*` figures and the async-save slowdown, in a fresh folder under `--dir`."""
    root = store.as_path(args.dir) / f"llamahome-bench-{uuid.uuid4().hex[:8]}"
    store.check_access(root, write=True)
    try:
        there = save_restore(root / "checkpoints", state, abstract, args.repeats)
        windows = step_windows(root / "train", args.step_config, args.window, args.repeats)
    finally:
        if root.exists():
            root.rmtree() if store.is_remote(root) else shutil.rmtree(root)
    save_mbs = mb / statistics.median(there["save_s"])
    restore_mbs = mb / statistics.median(there["restore_s"])
    plain_step = statistics.median(windows["plain"]) / args.window
    extra = statistics.median([s - p for s, p in zip(windows["saving"], windows["plain"],
                                                     strict=True)])
    return {
        "dir": store.show(args.dir), "dir_save_mb_per_s": save_mbs,
        "dir_restore_mb_per_s": restore_mbs, "dir_save_vs_local": save_mbs / local_save_mbs,
        "dir_restore_vs_local": restore_mbs / local_restore_mbs,
        "dir_save_s": there["save_s"], "dir_restore_s": there["restore_s"],
        "dir_restored_equal": there["restored_equal"],
        "step_config": args.step_config, "window": args.window, "save_every": args.save_every,
        "step_time_s": plain_step, "save_extra_s": extra,
        "window_slowdown": extra / (plain_step * args.window),
        "async_save_slowdown": extra / (plain_step * args.save_every),
        "window_plain_s": windows["plain"], "window_saving_s": windows["saving"]}


if __name__ == "__main__":
    main()

"""Training checkpoints: Orbax CheckpointManager steps under `<run_dir>/checkpoints/<step>/`.

Each step holds three items:
- `state`: the TrainState (step, params, opt_state, rng), saved sharded by every process;
- `data_iter`: the data iterator state, one JSON file `shard_<k>-of-<K>.json` per data shard,
  each written by the process that reads that shard (llamahome/parallel/data_shards.py), so a
  step written by 2 processes restores on 1 that reads both shards (`train.data_shards=2`);
- `config`: the gin config the run was started with, as JSON {"gin_config": "..."}.

Saves are asynchronous by default: the arrays are copied to host memory, then written in a
background thread while training continues. Orbax writes each step into a temporary folder
and renames it when complete, so a process killed mid-write leaves a temporary folder that
is never restored (and is deleted at the next start). Retention: the last `keep_last_n`
steps, plus (with `save_best`) the step with the lowest eval loss.

In a multi-process run every process calls `save` and `restore` at the same step; Orbax's
barriers go through JAX's coordination service (with timeouts) rather than device collectives,
which its background save thread could otherwise interleave with the train step's.

Restoring takes an abstract state (ShapeDtypeStructs with shardings), so a checkpoint written
on one mesh restores onto any other.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import gin
import jax
import orbax.checkpoint as ocp
from absl import flags, logging
from etils import epath

from llamahome.errors import CheckpointError
from llamahome.parallel.data_shards import ShardedIterator, as_sharded

EVAL_LOSS = "eval_loss"


@gin.configurable
@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """When to save and what to keep ([checkpoint] in TOML)."""

    save_steps: int = 1000  # save every this many steps (and at the end, and on SIGTERM)
    keep_last_n: int = 3  # keep this many most recent steps
    save_best: bool = True  # also keep the step with the lowest eval loss
    async_save: bool = True  # write in a background thread while training continues


@dataclasses.dataclass(frozen=True)
class _ShardStates:
    """The data shards' iterator states as of the save call (the live iterator moves on)."""

    num_shards: int
    states: dict[int, str]  # shard -> JSON


def _shard_file(shard: int, num_shards: int) -> str:
    return f"shard_{shard}-of-{num_shards}.json"


class DataShardsHandler:
    """Orbax handler: each process writes and reads the state files of its own data shards."""

    def save(self, directory: epath.Path, item: _ShardStates | None = None, args: Any = None) -> None:
        item = item or args.item
        for shard, state in item.states.items():
            (directory / _shard_file(shard, item.num_shards)).write_text(state)

    def restore(self, directory: epath.Path, item: ShardedIterator | None = None,
                args: Any = None) -> ShardedIterator:
        item = item or args.item
        paths = {k: directory / _shard_file(k, item.num_shards) for k in item.shards}
        missing = [str(p.name) for p in paths.values() if not p.exists()]
        if missing:
            found = sorted(p.name for p in directory.iterdir())
            raise CheckpointError(
                f"{directory} has data iterator states {found}, not {missing}: the checkpoint was "
                f"written with another number of data shards than this run's {item.num_shards}. "
                "Set train.data_shards to the K of its shard_*-of-K.json files")
        item.set_state({k: json.loads(p.read_text()) for k, p in paths.items()})
        return item

    def structure(self, directory: epath.Path) -> None:
        del directory

    def metadata(self, directory: epath.Path) -> None:
        del directory

    def finalize(self, directory: epath.Path) -> None:
        del directory

    def close(self) -> None:
        pass

    @classmethod
    def typestr(cls) -> str:
        return f"{cls.__module__}.{cls.__qualname__}"


@ocp.args.register_with_handler(DataShardsHandler, for_save=True)
@dataclasses.dataclass
class DataShardsSave(ocp.args.CheckpointArgs):
    item: _ShardStates


@ocp.args.register_with_handler(DataShardsHandler, for_restore=True)
@dataclasses.dataclass
class DataShardsRestore(ocp.args.CheckpointArgs):
    item: ShardedIterator


def _snapshot(data_iter: Any) -> _ShardStates:
    shards = as_sharded(data_iter)
    return _ShardStates(shards.num_shards, {k: json.dumps(state, indent=1)
                                            for k, state in shards.get_state().items()})


def _use_coordination_barriers() -> None:
    """Orbax barriers through the coordination service: no device collectives off the main thread."""
    if jax.process_count() > 1:
        flags.FLAGS["experimental_orbax_use_distributed_barrier"].value = True


def _eval_loss(metrics: dict[str, float]) -> float:
    return metrics[EVAL_LOSS]


def _policy(config: CheckpointConfig) -> ocp.checkpoint_managers.PreservationPolicy:
    latest = ocp.checkpoint_managers.LatestN(n=config.keep_last_n)
    if not config.save_best:
        return latest
    best = ocp.checkpoint_managers.BestN(get_metric_fn=_eval_loss, reverse=True, n=1,
                                        keep_checkpoints_without_metrics=False)
    return ocp.checkpoint_managers.AnyPreservationPolicy([latest, best])


class Checkpointer:
    """Saves and restores TrainState + data iterator + gin config; one per run dir."""

    def __init__(self, directory: str | Path, config: CheckpointConfig):
        if config.keep_last_n < 1:
            raise CheckpointError(f"CheckpointConfig.keep_last_n={config.keep_last_n}: keep at least 1")
        _use_coordination_barriers()
        self.config = config
        self.directory = Path(directory).absolute()
        # best_fn only makes Orbax write each step's metrics, so retention survives a restart.
        options = ocp.CheckpointManagerOptions(
            preservation_policy=_policy(config), best_fn=_eval_loss if config.save_best else None,
            best_mode="min", enable_async_checkpointing=config.async_save,
            cleanup_tmp_directories=True, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The kept step with the lowest eval loss (None when no kept step has one)."""
        losses = {}
        for step in self._manager.all_steps():
            metrics = self._manager.metrics(step)
            if metrics and EVAL_LOSS in metrics:
                losses[step] = metrics[EVAL_LOSS]
        return min(losses, key=losses.get) if losses else None

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, data_iter: Any = None, eval_loss: float | None = None) -> None:
        """Starts saving `state` as `step` (returns once the arrays are on the host when async)."""
        items = {"state": ocp.args.StandardSave(state),
                 "config": ocp.args.JsonSave({"gin_config": gin.config_str()})}
        if data_iter is not None:
            items["data_iter"] = DataShardsSave(_snapshot(data_iter))
        metrics = {EVAL_LOSS: float(eval_loss)} if eval_loss is not None else None
        self._manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)

    def restore(self, step: int, abstract_state: Any, data_iter: Any = None) -> Any:
        """The state saved at `step`, laid out as `abstract_state` says; resets `data_iter` too."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            items["data_iter"] = DataShardsRestore(as_sharded(data_iter))
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise CheckpointError(f"cannot restore {self.directory / str(step)}: {e}. If the model or "
                                  "optimizer changed since it was written, start a new run dir") from e
        logging.info("restored step %d from %s", step, self.directory)
        return restored["state"]

    def saved_config(self, step: int) -> str:
        """The gin config stored with `step`."""
        return self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))[
            "config"]["gin_config"]

    def wait(self) -> None:
        """Blocks until the last async save is committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree` (arrays or shapes) carrying `shardings`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

"""Training checkpoints: Orbax CheckpointManager steps under `<run_dir>/checkpoints/<step>/`.

Each step holds three items:
- `state`: the TrainState (step, params, opt_state, rng), saved sharded by every process;
- `data_iter`: the data iterator state, one JSON file `shard_<k>-of-<K>.json` per data shard,
  each written by the process that reads that shard (llamahome/data/pipeline.py), so a
  step written by 2 processes restores on 1 that reads both shards (`train.data_shards=2`);
- `config`: the gin config the run was started with, secrets redacted, as JSON {"gin_config": "..."};
  a resume compares it with the new run's (`config_changes`).

A LoRA run's steps also hold `adapter.json` (model/lora.py: which base the adapter was
trained on), written by process 0 after Orbax commits the step and before it is sealed, so
the manifest covers it (`Checkpointer(on_commit=...)`).

Every step is sealed with `llamahome_manifest.json`: the size and sha256 of each of its files,
written atomically by process 0 once Orbax has committed the step (for an async save: in a
second background thread that the first `poll` after the write finished starts, since sealing
reads every file back; `save` and `wait` wait for it). `verify` re-reads a step
against it. A step without a manifest in a local dir is either older than checksums (no older
step has one: restored with a warning) or was committed by a run killed before sealing it (an
older step has one: not trusted, the restore falls back). Retention never deletes the newest
sealed step, so a few steps may briefly outlive `keep_last_n`.

The directory may be a `gs://` or `s3://` URI (llamahome/store.py). Object storage has no
rename, so Orbax writes a step in place and commits it with `commit_success.txt` written last;
a step without it (a save killed mid-write) is never listed as a step and is deleted at the next
start. Then the manifest seals it, as on disk. There is no checkpoint on object storage older
than checksums, so there a step without a manifest is never restored (`strict`): the restore
falls back to the newest sealed step, or starts fresh when there is none. `verify` reads the
objects back (one listing for sizes, then each object's bytes for its sha256). `set_aside`
copies a corrupt step under `rejected/` (server-side copies), then deletes it, markers first,
so a half-deleted step is never taken for a committed one.

Saves are asynchronous by default: the arrays are copied to host memory, then written in a
background thread while training continues; `poll` (every step) reports a failed background
save as a one-line CheckpointError naming the step, the cause and the newest good step. On
local disk Orbax writes each step into a temporary folder and renames it when complete, so a
process killed mid-write leaves a temporary folder that is never restored (and is deleted at
the next start). Retention: the last `keep_last_n`
steps, plus (with `save_best`) the step with the best `best_metric` (the lowest eval loss, or
a downstream task metric such as "downstream/hellaswag/acc_norm", highest kept).

In a multi-process run every process calls `save` and `restore` at the same step; Orbax's
barriers go through JAX's coordination service (with timeouts) rather than device collectives,
which its background save thread could otherwise interleave with the train step's.

Restoring takes an abstract state (ShapeDtypeStructs with shardings), so a checkpoint written
on one mesh restores onto any other.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import logging as std_logging
import os
import re
import threading
from collections.abc import Callable
from typing import Any

import gin
import jax
import orbax.checkpoint as ocp
from absl import flags, logging
from etils import epath

from llamahome import store
from llamahome.config.gin_config import binding_statements
from llamahome.data.pipeline import ShardedIterator, as_sharded
from llamahome.errors import CheckpointError, ConfigError
from llamahome.files import write_text_atomic
from llamahome.parallel import distributed
from llamahome.secrets import REDACTED, redact_gin_config

EVAL_LOSS = "eval_loss"
MANIFEST = "llamahome_manifest.json"
NO_MANIFEST = "has no checksum manifest"
REJECTED_DIR = "rejected"  # corrupt steps set aside by a fallback, under the checkpoints dir
COMMIT_FILE = "commit_success.txt"  # Orbax's commit marker of a step on object storage

# Bindings a resume may change without train.resume_with_changed_config: how long the run goes
# and how it reports, saves and finds its peers, not what it computes.
RESUMABLE_CHANGES = ("train.steps", "train.eval_every", "train.eval_batches", "train.log_every",
                     "train.progress_bar", "train.resume_with_changed_config",
                     "CheckpointConfig.*", "launch.run_dir", "launch.write_config",
                     "CacheManager.root", "cache_dir.path", "models_dir.path", "runs_dir.path",
                     "RunDirSync.*", "remote_lock.*", "index_lease.*", "data_pipeline.build_wait_s",
                     "initialize.*", "Watchdog.*", "Profiler.*",
                     "MetricsWriter.*", "Heartbeat.*", "train.downstream_*", "DownstreamConfig.*",
                     "build_optimizer.horizons")  # the schedule's record of extensions (optim.py)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """When to save and what to keep ([checkpoint] in TOML)."""

    save_steps: int = 1000  # save every this many steps (and at the end, and on SIGTERM)
    keep_last_n: int = 3  # keep this many most recent steps
    save_best: bool = True  # also keep the step with the best `best_metric`
    async_save: bool = True  # write in a background thread while training continues
    # What "best" means: eval_loss, or a downstream task metric "downstream/<task>/<metric>"
    # (train.downstream_tasks); best_mode "min" | "max" | "auto" (min for eval_loss, else max).
    best_metric: str = "eval_loss"
    best_mode: str = "auto"


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
        item.set_state({k: _read_json(p) for k, p in paths.items()})
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


def _read_json(path: epath.Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is corrupt: not valid JSON ({e})") from None


def _snapshot(data_iter: Any) -> _ShardStates:
    shards = as_sharded(data_iter)
    return _ShardStates(shards.num_shards, {k: json.dumps(state, indent=1)
                                            for k, state in shards.get_state().items()})


def _use_coordination_barriers() -> None:
    """Orbax barriers through the coordination service: no device collectives off the main thread."""
    if jax.process_count() > 1:
        flags.FLAGS["experimental_orbax_use_distributed_barrier"].value = True


def _ranked(config: CheckpointConfig):
    """metrics -> a number that is lower for a better step (inf: the step lacks the metric)."""
    sign = -1.0 if (config.best_mode == "max" or (config.best_mode == "auto"
                                                   and config.best_metric != EVAL_LOSS)) else 1.0

    def rank(metrics: dict[str, float] | None) -> float:
        value = (metrics or {}).get(config.best_metric)
        return float("inf") if value is None else sign * float(value)
    return rank


def _policy(config: CheckpointConfig) -> ocp.checkpoint_managers.PreservationPolicy:
    latest = ocp.checkpoint_managers.LatestN(n=config.keep_last_n)
    if not config.save_best:
        return latest
    best = ocp.checkpoint_managers.BestN(get_metric_fn=_ranked(config), reverse=True, n=1,
                                        keep_checkpoints_without_metrics=False)
    return ocp.checkpoint_managers.AnyPreservationPolicy([latest, best])


def _sha256(path: store.AnyPath) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _listing(step_dir: store.AnyPath) -> dict[str, tuple[int, str]]:
    """`relative name -> (size, version)` of each file of a step (its manifest too); the version
    (mtime, GCS generation, S3 ETag) changes when the file is rewritten. One listing request on
    object storage."""
    if not store.is_remote(step_dir):
        return {p.relative_to(step_dir).as_posix(): (st.st_size, str(st.st_mtime_ns))
                for p in sorted(step_dir.rglob("*")) if p.is_file() and (st := p.stat())}
    return {rel: (int(info["size"]), str(info.get("generation") or info.get("ETag")
                                         or info.get("mtime") or ""))
            for rel, info in store.find(step_dir).items() if not rel.endswith("/")}


def _forget_listings(path: store.AnyPath) -> tuple[Any, str]:
    """(fsspec filesystem, its path) of a remote `path`, with the listings it cached under it
    dropped: the filesystem epath itself uses (for gs://, not `fsspec.filesystem("gcs")`)."""
    store.refresh(path)
    return store.filesystem(path)


def write_manifest(step_dir: store.AnyPath) -> None:
    """Seals a committed step: `MANIFEST` with the size and sha256 of each of its files."""
    files = {name: {"size": size, "sha256": _sha256(step_dir / name)}
             for name, (size, _) in _listing(step_dir).items() if name != MANIFEST}
    write_text_atomic(step_dir / MANIFEST, json.dumps({"version": 1, "files": files}, indent=1))


def verify(step_dir: store.AnyPath, listing: dict[str, tuple[int, str]] | None = None) -> str | None:
    """None when every file in `step_dir`'s manifest is intact, else what is wrong (NO_MANIFEST...)."""
    manifest = step_dir / MANIFEST
    if not manifest.exists():
        return NO_MANIFEST
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        return f"{MANIFEST} is corrupt ({e})"
    present = _listing(step_dir) if listing is None else listing
    for name, want in files.items():
        if name not in present:
            return f"{name} is missing"
        size = present[name][0]
        if size != want["size"]:
            return f"{name} is {size} bytes, {want['size']} when written (truncated or overwritten)"
        if _sha256(step_dir / name) != want["sha256"]:
            return f"{name} does not match its sha256 checksum (garbled)"
    return None


def _bindings(config: str) -> dict[str, str]:
    """`name -> value` of a gin config string, values normalized."""
    return {name: _normalize(value) for name, value, _ in binding_statements(config)}


def _normalize(value: str) -> str:
    """One spelling per value, however gin wrapped it: `[\n    'a',\n    'b']` -> `['a', 'b']`."""
    value = re.sub(r"\s*,\s*", ", ", " ".join(value.split()))
    return re.sub(r"\s+([\])}])", r"\1", re.sub(r"([\[({])\s+", r"\1", value))


def config_changes(saved: str, current: str) -> list[str]:
    """'name: old -> new' for each binding that differs, but for RESUMABLE_CHANGES and secrets."""
    old, new = _bindings(redact_gin_config(saved)), _bindings(redact_gin_config(current))
    changes = []
    for name in sorted(old.keys() | new.keys()):
        unscoped = name.rpartition("/")[2]
        values = (old.get(name, ""), new.get(name, ""))
        if values[0] == values[1] or any(REDACTED in v for v in values) or any(
                fnmatch.fnmatchcase(unscoped, p) for p in RESUMABLE_CHANGES):
            continue  # a redacted secret is not compared: the stored copy never holds its value
        changes.append(f"{name}: {old.get(name, '<unset>')} -> {new.get(name, '<unset>')}")
    return changes


@dataclasses.dataclass(frozen=True)
class _KeepNewestSealed:
    """`policy`, but never deletes the newest sealed step (the newer may not be sealed yet)."""

    directory: store.AnyPath
    policy: Any

    def should_preserve(self, checkpoints, *, context) -> list[bool]:
        keep = list(self.policy.should_preserve(checkpoints, context=context))
        sealed = [i for i, c in enumerate(checkpoints) if (self.directory / str(c.step) / MANIFEST).exists()]
        if sealed:
            keep[max(sealed, key=lambda i: checkpoints[i].step)] = True
        return keep


class _QuietOrbax(std_logging.Filter):
    """Drops Orbax log records that Checkpointer reports itself, in one line, or that mislead."""

    NOISE = ("Requested `tracked_metric`; did not provide metrics",  # a save without an eval
             "Failed to run", "Save Finalize thread", "Checkpointer failed")  # a failed save

    def filter(self, record: std_logging.LogRecord) -> bool:
        if "orbax" not in record.pathname:
            return True
        message = str(record.msg)
        return not any(n in message for n in self.NOISE)


_QUIET_ORBAX = _QuietOrbax()


def _cause(e: BaseException) -> str:
    """The root cause of a failed save in a few words: an OSError's strerror, else the first line."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno:
            return f"{os.strerror(seen.errno)} [Errno {seen.errno}]"
        seen = seen.__cause__ or seen.__context__
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


class _Sealing:
    """`seal(step)` in a daemon thread; `result()` joins it and raises what it raised."""

    def __init__(self, seal: Callable[[int], None], step: int):
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(seal, step), daemon=True,
                                        name=f"llamahome-seal-{step}")
        self._thread.start()

    def _run(self, seal: Callable[[int], None], step: int) -> None:
        try:
            seal(step)
        except BaseException as e:  # noqa: BLE001  (re-raised in the caller's thread)
            self._error = e

    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error


class Checkpointer:
    """Saves, seals, verifies and restores TrainState + data iterator + gin config; one per run dir."""

    def __init__(self, directory: str | os.PathLike, config: CheckpointConfig,
                 on_commit: Callable[[store.AnyPath], None] | None = None):
        """`directory`: a local path or a `gs://` / `s3://` URI. `on_commit(step_dir)`: process 0
        adds files to a committed step before sealing it."""
        if config.keep_last_n < 1:
            raise CheckpointError(f"CheckpointConfig.keep_last_n={config.keep_last_n}: keep at least 1")
        if config.best_mode not in ("min", "max", "auto"):
            raise ConfigError(f"CheckpointConfig.best_mode={config.best_mode!r}: use 'min', 'max' "
                              "or 'auto'")
        _use_coordination_barriers()
        std_logging.getLogger("absl").addFilter(_QUIET_ORBAX)
        self.config, self.on_commit = config, on_commit
        self.directory = store.resolve(directory)
        # On object storage no step predates checksums: one without a manifest is never trusted.
        self.strict = store.is_remote(self.directory)
        self._unsealed: int | None = None  # the step saved last, until committed and sealed
        self._sealing: _Sealing | None = None  # process 0 sealing `_unsealed` in the background
        self._failed = False
        self._verified: dict[tuple, str | None] = {}
        # best_fn only makes Orbax write each step's metrics, so retention survives a restart.
        options = ocp.CheckpointManagerOptions(
            preservation_policy=_KeepNewestSealed(self.directory, _policy(config)),
            best_fn=_ranked(config) if config.save_best else None,
            best_mode="min", enable_async_checkpointing=config.async_save,
            cleanup_tmp_directories=True, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def is_sealed(self, step: int) -> bool:
        """Whether `step` has a checksum manifest (not re-read: `verify` does that)."""
        return (self.step_dir(step) / MANIFEST).exists()

    def newest_sealed_step(self) -> int | None:
        sealed = [s for s in self.all_steps() if self.is_sealed(s)]
        return sealed[-1] if sealed else None

    def best_step(self) -> int | None:
        """The kept step with the best `best_metric` (None when no kept step has it)."""
        rank = _ranked(self.config)
        ranks = {step: rank(self._manager.metrics(step)) for step in self._manager.all_steps()}
        ranks = {step: r for step, r in ranks.items() if r != float("inf")}
        return min(ranks, key=ranks.get) if ranks else None

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def step_dir(self, step: int) -> store.AnyPath:
        return self.directory / str(step)

    def save(self, step: int, state: Any, data_iter: Any = None, eval_loss: float | None = None,
             downstream: dict[str, float] | None = None) -> None:
        """Starts saving `state` as `step` (returns once the arrays are on the host when async);
        `eval_loss` and `downstream` task metrics ({"<task>/<metric>": value}) rank it."""
        self.wait()  # the previous step: committed and sealed (retention reads its manifest)
        items = {"state": ocp.args.StandardSave(state),
                 "config": ocp.args.JsonSave({"gin_config": redact_gin_config(gin.config_str())})}
        if data_iter is not None:
            items["data_iter"] = DataShardsSave(_snapshot(data_iter))
        metrics = ({EVAL_LOSS: float(eval_loss)} if eval_loss is not None else {}) | {
            f"downstream/{k}": float(v) for k, v in (downstream or {}).items()}
        self._unsealed = step
        try:
            self._manager.save(step, args=ocp.args.Composite(**items), metrics=metrics or None,
                               force=True)
        except Exception as e:  # noqa: BLE001  (disk, permissions, ...: reported in one line)
            raise self._save_failed(e) from None
        if not self.config.async_save:
            self.wait()

    def poll(self) -> None:
        """Seals the last save once its background write is done, in another background thread
        (sealing reads every file back: on object storage, a download); a failed save or seal
        raises CheckpointError."""
        if self._unsealed is None or self._manager.is_saving_in_progress():
            return
        if self._sealing is None and jax.process_index() == 0:
            self._sealing = _Sealing(self._seal, self._unsealed)
        if self._sealing is None or self._sealing.done():
            self.wait()

    def wait(self) -> None:
        """Blocks until the last save is committed and sealed; raises CheckpointError if it failed."""
        if self._unsealed is None:
            return
        sealing, self._sealing = self._sealing, None
        try:
            self._manager.wait_until_finished()
            if sealing is not None:
                sealing.result()
            elif jax.process_index() == 0:
                self._seal(self._unsealed)
        except Exception as e:  # noqa: BLE001
            raise self._save_failed(e) from None
        self._unsealed = None

    def _seal(self, step: int) -> None:
        """Process 0, once Orbax committed `step`: its extra files (`on_commit`), then the manifest."""
        if self.on_commit is not None:
            self.on_commit(self.step_dir(step))
        write_manifest(self.step_dir(step))

    def _save_failed(self, e: Exception) -> CheckpointError:
        step, self._unsealed, self._failed = self._unsealed, None, True
        good = self.newest_sealed_step()
        where = store.show(self.directory)
        kept = (f"the newest good checkpoint is step {good} in {where}" if good is not None
                else f"no earlier checkpoint is in {where}")
        return CheckpointError(f"saving checkpoint step {step} failed: {_cause(e)}; {kept}. Fix the "
                               "cause (e.g. free disk space) and run the same command to resume")

    def verify(self, step: int) -> str | None:
        """None when `step`'s files match its manifest, else what is wrong (NO_MANIFEST if unsealed).

        Remembered while no file of the step changes (name, size and mtime or object version),
        so the job's look at the resume step and the restore after it hash the files once.
        """
        step_dir = self.step_dir(step)
        listing = _listing(step_dir)
        key = (step, tuple(listing.items()))
        if key not in self._verified:
            self._verified[key] = verify(step_dir, listing)
        return self._verified[key]

    def config_changes(self, step: int) -> list[str]:
        """How this process's gin config differs from `step`'s (RESUMABLE_CHANGES aside)."""
        return config_changes(self.saved_config(step), gin.config_str())

    def restore(self, step: int, abstract_state: Any, data_iter: Any = None) -> Any:
        """The state saved at `step`, laid out as `abstract_state` says; resets `data_iter` too."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            items["data_iter"] = DataShardsRestore(as_sharded(data_iter))
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001  (orbax and tensorstore raise many kinds)
            lines = str(e).strip().splitlines()
            raise CheckpointError(f"cannot restore {store.show(self.step_dir(step))}: {type(e).__name__}: "
                                  f"{lines[0][:300] if lines else ''}") from e
        logging.info("restored step %d from %s", step, store.show(self.directory))
        return restored["state"]

    def set_aside(self, steps: list[int]) -> store.AnyPath:
        """Moves `steps` (found corrupt) under `REJECTED_DIR`, so that new saves can take their numbers.

        On object storage a move is a copy then a delete (`_move_remote`).
        """
        rejected = self.directory / REJECTED_DIR
        if jax.process_index() == 0:
            rejected.mkdir(parents=True, exist_ok=True)
            if self.strict:  # else Orbax takes rejected/ for an uncommitted step and deletes it
                store.put(rejected / COMMIT_FILE, b"")
            for step in steps:
                target = rejected / str(step)
                suffix = 1
                while target.exists():
                    suffix += 1
                    target = rejected / f"{step}-{suffix}"
                if self.strict:
                    try:
                        _move_remote(self.step_dir(step), target)
                    except Exception as e:  # noqa: BLE001  (fsspec raises per-backend types)
                        raise CheckpointError(
                            f"cannot set aside corrupt step {step} of {store.show(self.directory)}"
                            f" under {REJECTED_DIR}/: {store.describe_error(e)}; delete that "
                            "step to resume from the one before it") from None
                else:
                    self.step_dir(step).rename(target)
        distributed.any_process(False)  # every process sees the moves before reloading
        if self.strict:
            _forget_listings(self.directory)
        self._manager.reload()
        self._verified.clear()
        return rejected

    def saved_config(self, step: int) -> str:
        """The gin config stored with `step` (secrets redacted)."""
        return self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))[
            "config"]["gin_config"]

    def close(self) -> None:
        """Waits for (and seals) the last save, then closes; a failed last save raises CheckpointError."""
        try:
            self.wait()
        finally:
            try:
                self._manager.close()
            except Exception:  # noqa: BLE001  (the failure was reported once already)
                if not self._failed:
                    raise


def _move_remote(source: store.AnyPath, target: store.AnyPath) -> None:
    """Copies the objects under `source` to `target` (server-side), then deletes `source`: its
    manifest and commit marker first, so a delete cut short leaves an uncommitted step, which
    Orbax deletes at the next start and never restores."""
    names = list(_listing(source))
    fs, src = _forget_listings(source)
    dst = fs._strip_protocol(os.fspath(target)).rstrip("/")
    for name in names:
        fs.copy(f"{src}/{name}", f"{dst}/{name}")
    logging.info("copied %s to %s; deleting the original", store.show(source), store.show(target))
    names.sort(key=lambda n: n not in (MANIFEST, COMMIT_FILE))
    for name in names:
        fs.rm_file(f"{src}/{name}")
    fs.invalidate_cache(src)


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree` (arrays or shapes) carrying `shardings`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

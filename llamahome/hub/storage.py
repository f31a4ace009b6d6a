"""A disk budget for the models dir (and, optionally, the run dirs' checkpoints).

Before a download, `ensure_room(registry, incoming_bytes)` compares what the models dir (plus
checkpoints under `files.runs_dir()` when `count_checkpoints`) would hold afterwards with
`StorageBudget.max_bytes`:

- within budget: nothing happens;
- over budget: a warning names the shortfall and the versions that could be evicted; when the
  user allows it (`StorageBudget.allow_eviction = True`) unpinned, not-in-use versions are
  removed least recently used first until the download fits;
- still over budget: with `hard_limit = True` the download is refused, otherwise it goes on.

On object storage (a `gs://` / `s3://` models dir) usage is the sum of the registered
versions' sizes, and the free-disk check is of the local staging folder's disk.

Pinned versions and versions used by a running run are never evicted. Checkpoints count
toward usage but are never deleted here (the training job's `keep_last_n` owns them). A
download that would not fit on the disk at all is always refused.

    StorageBudget.max_bytes = 200_000_000_000
    StorageBudget.allow_eviction = True
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

import gin
from absl import logging

from llamahome import store
from llamahome.files import RunDir, dir_size, local_cache_dir, runs_dir
from llamahome.errors import UserError
from llamahome.hub.registry import ModelVersion, Registry


@gin.configurable
@dataclasses.dataclass(frozen=True)
class StorageBudget:
    """How much disk the models dir may use, and what may be done to stay within it."""

    max_bytes: int | None = None  # None: no budget, only the free-disk check
    allow_eviction: bool = False
    hard_limit: bool = False
    count_checkpoints: bool = False


def checkpoints_size(runs: Path) -> int:
    """Bytes of every run's `checkpoints/` folder under the (local) runs dir `runs`."""
    if store.is_remote(runs) or not runs.is_dir():  # a bucket's bytes are not this disk's
        return 0
    return sum(dir_size(c) for c in runs.glob(f"*/{RunDir.CHECKPOINTS_DIR}") if c.is_dir())


def usage(registry: Registry, budget: StorageBudget) -> int:
    """Bytes counted against the budget now."""
    if store.is_remote(registry.root):
        used = sum(v.size for v in registry.versions())
    else:
        used = dir_size(registry.root) if registry.root.is_dir() else 0
    if budget.count_checkpoints:
        used += checkpoints_size(runs_dir())
    return used


def evictable(registry: Registry) -> list[ModelVersion]:
    """Unpinned versions no running run uses and no adapter is based on, LRU first."""
    versions = registry.versions()
    parents = {v.parent for v in versions if v.is_adapter}
    candidates = [v for v in versions
                  if not v.pinned and v.ref not in parents and not registry.active_runs(v)]
    return sorted(candidates, key=lambda v: (v.last_used, v.created))


def plan_eviction(registry: Registry, needed_bytes: int) -> list[ModelVersion]:
    """The least recently used evictable versions whose sizes add up to `needed_bytes` (or all)."""
    plan, freed = [], 0
    for version in evictable(registry):
        if freed >= needed_bytes:
            break
        plan.append(version)
        freed += version.size
    return plan


def ensure_room(registry: Registry, incoming_bytes: int,
                budget: StorageBudget | None = None) -> list[str]:
    """Warns, evicts (if allowed) or refuses so that `incoming_bytes` fit; returns evicted refs."""
    budget = budget or StorageBudget()
    _check_free_disk(registry.root, incoming_bytes)
    if budget.max_bytes is None:
        return []
    used = usage(registry, budget)
    over = used + incoming_bytes - budget.max_bytes
    if over <= 0:
        return []
    plan = plan_eviction(registry, over)
    logging.warning("adding %s to %s would use %s of its %s budget (%s over); least recently used "
                    "unpinned versions: %s", _gb(incoming_bytes), registry.root,
                    _gb(used + incoming_bytes), _gb(budget.max_bytes), _gb(over),
                    [v.ref for v in plan] or "none")
    evicted = []
    if budget.allow_eviction:
        for version in plan:
            over -= registry.remove(version.ref)
            evicted.append(version.ref)
            logging.warning("evicted %s (%s, last used %s)", version.ref, _gb(version.size),
                            _ago(version.last_used))
    elif plan:
        logging.warning("set StorageBudget.allow_eviction = True to evict them, or free space with "
                        "the models job (action='remove')")
    if over > 0 and budget.hard_limit:
        raise UserError(f"{_gb(incoming_bytes)} do not fit in the {_gb(budget.max_bytes)} budget "
                        f"of {registry.root} ({_gb(over)} over after evicting "
                        f"{evicted or 'nothing'}); "
                        "raise StorageBudget.max_bytes, unpin or remove versions, or set "
                        "StorageBudget.allow_eviction = True")
    return evicted


def _check_free_disk(root: Path, incoming_bytes: int) -> None:
    if store.is_remote(root):  # the bytes land in local staging first (download.py)
        root = local_cache_dir()
    existing = root
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if incoming_bytes > free:
        raise UserError(f"{_gb(incoming_bytes)} do not fit on the disk holding {root} "
                        f"({_gb(free)} free); free space or set models_dir.path elsewhere")


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 10**8 else f"{n:,} bytes"


def _ago(t: float) -> str:
    return f"{(time.time() - t) / 3600:.1f} h ago"

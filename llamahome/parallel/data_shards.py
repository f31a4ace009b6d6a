"""The global batch read as `num_shards` data shards, spread evenly over the processes.

A data shard is one reader of the input pipeline: `make_data_iterator(split, ...,
process_index=k, process_count=num_shards)` reads every num_shards-th document and yields rows
[global_batch / num_shards, length]. Process p of P reads shards p*K/P ... (p+1)*K/P - 1 and
stacks their rows (in shard order) into its part of the global batch, which
`sharding.global_batch` assembles with `jax.make_array_from_process_local_data`.

With K fixed, the global batches do not depend on how many processes read them: a run on
2 hosts and a run on 1 host with `train.data_shards=2` see the same batches, and a checkpoint
(one iterator-state file per shard, see llamahome/train/checkpoint.py) restores on any process
count that divides K. K defaults to the process count.

The validation split is finite and shards can run out at different batches: `ShardedIterator`
with `pad_exhausted=True` fills an exhausted shard's rows with blank rows (segment 0,
loss_mask 0) until every local shard is done; `llamahome.train.loop.evaluate` does the same
across processes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np

from llamahome.errors import ConfigError


def local_shards(num_shards: int, process_index: int, process_count: int) -> range:
    """The data shards process `process_index` of `process_count` reads."""
    if num_shards % process_count:
        raise ConfigError(f"train.data_shards={num_shards} cannot be split evenly over {process_count} "
                          "processes; use a multiple of the process count")
    per_process = num_shards // process_count
    return range(process_index * per_process, (process_index + 1) * per_process)


class ShardedIterator:
    """Yields this process's rows of each global batch: its shards' batches stacked on axis 0."""

    def __init__(self, iterators: dict[int, Iterator[dict[str, np.ndarray]]], num_shards: int,
                 pad_exhausted: bool = False):
        self.iterators, self.num_shards, self.pad_exhausted = dict(iterators), num_shards, pad_exhausted

    @property
    def shards(self) -> list[int]:
        return sorted(self.iterators)

    def __iter__(self) -> ShardedIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        parts = [next(self.iterators[k], None) for k in self.shards]
        present = [p for p in parts if p is not None]
        if not present or (len(present) < len(parts) and not self.pad_exhausted):
            raise StopIteration
        blank = {f: np.zeros_like(v) for f, v in present[0].items()}  # segment 0, loss_mask 0
        return {f: np.concatenate([(p if p is not None else blank)[f] for p in parts]) for f in blank}

    def get_state(self) -> dict[int, Any]:
        """{shard: that shard's iterator state}."""
        return {k: self.iterators[k].get_state() for k in self.shards}

    def set_state(self, states: dict[int, Any]) -> None:
        for k in self.shards:
            self.iterators[k].set_state(states[k])


def open_shards(make_iterator: Callable[..., Iterator], split: str, *, global_batch_size: int,
                num_shards: int | None = None, process_index: int | None = None,
                process_count: int | None = None, **kwargs: Any) -> ShardedIterator:
    """`make_iterator(split, ..., process_index=k, process_count=K)` for each local shard k."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    num_shards = num_shards or process_count
    if global_batch_size % num_shards:
        raise ConfigError(f"train.batch_size={global_batch_size} is not divisible by "
                          f"train.data_shards={num_shards}; use a multiple of it")
    shards: Sequence[int] = local_shards(num_shards, process_index, process_count)
    iterators = {k: make_iterator(split, global_batch_size=global_batch_size, process_index=k,
                                  process_count=num_shards, **kwargs) for k in shards}
    return ShardedIterator(iterators, num_shards, pad_exhausted=split != "train")


def as_sharded(iterator: Any) -> ShardedIterator:
    """A per-process iterator seen as data shard `process_index` of `process_count`."""
    if isinstance(iterator, ShardedIterator):
        return iterator
    return ShardedIterator({jax.process_index(): iterator}, jax.process_count())

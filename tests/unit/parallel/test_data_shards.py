"""Data shards: which process reads which shard, stacking their rows, padding exhausted ones."""

import numpy as np
import pytest

from llamahome.errors import ConfigError
from llamahome.parallel.data_shards import ShardedIterator, local_shards, open_shards


def test_local_shards_split_evenly_and_cover_all():
    assert [list(local_shards(4, p, 2)) for p in range(2)] == [[0, 1], [2, 3]]
    assert [list(local_shards(2, p, 2)) for p in range(2)] == [[0], [1]]
    assert list(local_shards(2, 0, 1)) == [0, 1]
    with pytest.raises(ConfigError, match="multiple of the process count"):
        local_shards(3, 0, 2)


class Numbers:
    """Shard k of K: batches [rows, 2] of the numbers n with n % K == k, `batches` of them."""

    def __init__(self, split, *, global_batch_size, process_index, process_count, batches):
        self.rows, self.k, self.count = global_batch_size // process_count, process_index, process_count
        self.position, self.batches = 0, batches[process_index]

    def __next__(self):
        if self.position == self.batches:
            raise StopIteration
        first = self.position * self.rows
        self.position += 1
        n = (np.arange(first, first + self.rows) * self.count + self.k).astype(np.int32)
        return {"inputs": np.stack([n, n], 1), "loss_mask": np.ones((self.rows, 2), np.float32)}

    def get_state(self):
        return {"position": self.position}

    def set_state(self, state):
        self.position = state["position"]


def test_one_process_reading_two_shards_sees_what_two_processes_see():
    batches = {0: 3, 1: 3}
    both = open_shards(Numbers, "train", global_batch_size=4, num_shards=2, process_index=0,
                       process_count=1, batches=batches)
    halves = [open_shards(Numbers, "train", global_batch_size=4, process_index=p, process_count=2,
                          batches=batches) for p in range(2)]
    for _ in range(3):
        stacked = next(both)["inputs"][:, 0]
        assert stacked.tolist() == np.concatenate([next(h)["inputs"][:, 0] for h in halves]).tolist()
    assert both.get_state() == {0: {"position": 3}, 1: {"position": 3}}
    assert halves[1].get_state() == {1: {"position": 3}}


def test_exhausted_validation_shards_give_blank_rows_until_all_are_done():
    shards = open_shards(Numbers, "validation", global_batch_size=4, num_shards=2, process_index=0,
                         process_count=1, batches={0: 2, 1: 1})
    first, second = next(shards), next(shards)
    assert first["loss_mask"].sum() == 8
    np.testing.assert_array_equal(second["loss_mask"], [[1, 1], [1, 1], [0, 0], [0, 0]])
    np.testing.assert_array_equal(second["inputs"][2:], 0)
    with pytest.raises(StopIteration):
        next(shards)


def test_state_round_trip_and_batch_divisibility():
    shards = ShardedIterator({0: Numbers("train", global_batch_size=2, process_index=0, process_count=1,
                                         batches={0: 5})}, 1)
    next(shards)
    state = shards.get_state()
    expected = next(shards)["inputs"]
    shards.set_state(state)
    np.testing.assert_array_equal(next(shards)["inputs"], expected)
    with pytest.raises(ConfigError, match="not divisible by train.data_shards=3"):
        open_shards(Numbers, "train", global_batch_size=4, num_shards=3, batches={})

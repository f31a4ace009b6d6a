"""Packing: every (input, target) pair exactly once, segments never span two documents."""

from __future__ import annotations

import collections

import grain
import numpy as np
import pytest

from llamahome.data.packing import PACKERS, PackIterDataset, to_example


def random_docs(rng, n=40, max_len=90) -> list[np.ndarray]:
    return [rng.integers(3, 1000, size=rng.integers(2, max_len)).astype(np.int32) for _ in range(n)]


def doc_dict(tokens):
    return {"tokens": tokens, "loss_mask": np.ones(len(tokens), np.float32)}


def check_rows(rows, docs, seq_len):
    """Re-derives the pairs of each segment and compares them with the documents (numpy only)."""
    reference = collections.Counter((int(a), int(b)) for d in docs for a, b in zip(d[:-1], d[1:]))
    seen = collections.Counter()
    doc_strings = ["," + ",".join(map(str, d)) + "," for d in docs]
    for r in range(len(rows["inputs"])):
        seg, pos = rows["segment_ids"][r], rows["positions"][r]
        assert np.all(rows["loss_mask"][r][seg == 0] == 0)
        for s in np.unique(seg[seg > 0]):
            where = np.flatnonzero(seg == s)
            assert np.array_equal(where, np.arange(where[0], where[-1] + 1))  # contiguous
            assert np.array_equal(pos[where], np.arange(len(where)))
            inputs, targets = rows["inputs"][r][where], rows["targets"][r][where]
            assert np.array_equal(inputs[1:], targets[:-1])  # one document, no gap
            piece = ",".join(map(str, [",", *inputs, targets[-1], ","]))[1:-1]
            assert any(piece in d for d in doc_strings)  # a contiguous part of one document
            seen.update(zip(inputs.tolist(), targets.tolist()))
    assert seen == reference


@pytest.mark.parametrize("method", sorted(PACKERS))
def test_packers_keep_every_pair_exactly_once(method):
    rng = np.random.default_rng(0)
    docs = random_docs(rng)
    rows = PACKERS[method]([to_example(doc_dict(d)) for d in docs], 32, pad_id=0)
    assert rows["inputs"].shape[1] == 32
    check_rows(rows, docs, 32)


def test_concat_split_has_no_padding_but_the_tail():
    docs = [np.arange(1, 11), np.arange(20, 27), np.arange(40, 60)]  # 9 + 6 + 19 = 34 pairs
    rows = PACKERS["concat_split"]([to_example(doc_dict(d)) for d in docs], 8, pad_id=0)
    assert rows["segment_ids"].shape == (5, 8)
    assert (rows["segment_ids"] > 0).sum() == 34
    assert rows["segment_ids"][1].tolist() == [1, 2, 2, 2, 2, 2, 2, 3]
    assert rows["positions"][1].tolist() == [0, 0, 1, 2, 3, 4, 5, 0]


def test_fit_packers_use_fewer_rows_than_padded():
    rng = np.random.default_rng(1)
    examples = [to_example(doc_dict(d)) for d in random_docs(rng, n=60, max_len=20)]
    counts = {m: len(PACKERS[m](examples, 64, 0)["inputs"]) for m in PACKERS}
    assert counts["first_fit"] < counts["padded"] and counts["best_fit"] <= counts["first_fit"] + 1


@pytest.mark.parametrize("method", ["concat_split", "first_fit"])
def test_pack_iterator_state_restores_mid_window(method):
    rng = np.random.default_rng(2)
    docs = random_docs(rng, n=100)
    ds = PackIterDataset(grain.MapDataset.source(docs).map(doc_dict).to_iter_dataset(),
                         seq_len=16, pad_id=0, method=method, window_rows=4)
    it = iter(ds)
    rows = [next(it) for _ in range(7)]
    state = it.get_state()
    after = [next(it) for _ in range(30)]
    restored = iter(ds)
    restored.set_state(state)
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(after, [next(restored) for _ in range(30)])
               for k in a)
    all_rows = rows + after + list(it)
    check_rows({k: np.stack([r[k] for r in all_rows]) for k in all_rows[0]}, docs, 16)

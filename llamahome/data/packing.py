"""Packing documents into fixed-length rows with segment ids and positions (numpy, vectorised).

A document of n tokens becomes an example of n-1 (input, target) pairs: inputs = tokens[:-1],
targets = tokens[1:], loss_mask = mask[1:], so no target ever crosses a document. Examples
are packed into rows of `seq_len`:
  "concat_split": examples are concatenated and cut into rows; a cut example continues in
                  the next row as a new segment (every pair appears exactly once, no padding
                  except at the end of a window);
  "first_fit" / "best_fit": examples longer than seq_len are cut into seq_len pieces, then
                  placed (longest first) into the first / the tightest row with room;
  "padded":       one piece per row, rows sorted by length inside the window (length buckets).
Each row carries segment_ids (1, 2, ... per piece; 0 = padding) and positions (0-based within
each piece). `PackIterDataset` packs a window of documents at a time; its state is the parent's
state at the window start plus the rows already emitted, so restore is exact and small.
"""

from __future__ import annotations

from collections.abc import Callable

import grain
import numpy as np

from llamahome.errors import ConfigError

Example = dict[str, np.ndarray]  # inputs, targets int32[n]; loss_mask float32[n]
FIELDS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


def to_example(doc: dict) -> Example:
    """A document {tokens[n], loss_mask[n], input_tokens?[n]} -> an example of n-1 pairs."""
    tokens = doc["tokens"]
    inputs = doc.get("input_tokens", tokens)
    return {"inputs": inputs[:-1].astype(np.int32), "targets": tokens[1:].astype(np.int32),
            "loss_mask": doc["loss_mask"][1:].astype(np.float32)}


def _empty_rows(rows: int, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    return {
        "inputs": np.full((rows, seq_len), pad_id, np.int32),
        "targets": np.full((rows, seq_len), pad_id, np.int32),
        "loss_mask": np.zeros((rows, seq_len), np.float32),
        "segment_ids": np.zeros((rows, seq_len), np.int32),
        "positions": np.zeros((rows, seq_len), np.int32),
    }


def pack_concat_split(examples: list[Example], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """Concatenates examples and cuts the stream into rows [rows, seq_len]."""
    lengths = np.array([len(e["inputs"]) for e in examples], np.int64)
    total = int(lengths.sum())
    rows = -(-total // seq_len)
    out = _empty_rows(rows, seq_len, pad_id)
    if total == 0:
        return out
    for key in ("inputs", "targets", "loss_mask"):
        out[key].reshape(-1)[:total] = np.concatenate([e[key] for e in examples])
    starts = np.zeros(rows * seq_len, bool)  # a new segment begins at each example and each row
    starts[np.concatenate([[0], np.cumsum(lengths)[:-1]])] = True
    starts[::seq_len] = True
    starts[total:] = False
    index = np.arange(rows * seq_len)
    last_start = np.maximum.accumulate(np.where(starts, index, 0))
    out["positions"].reshape(-1)[:total] = (index - last_start)[:total]
    segments = np.cumsum(starts.reshape(rows, seq_len), axis=1).astype(np.int32)
    segments.reshape(-1)[total:] = 0
    out["segment_ids"] = segments
    return out


def _pieces(examples: list[Example], seq_len: int) -> list[Example]:
    """Cuts every example into pieces of at most seq_len pairs."""
    pieces = []
    for e in examples:
        n = len(e["inputs"])
        for start in range(0, n, seq_len):
            pieces.append({k: v[start:start + seq_len] for k, v in e.items()})
    return pieces


def _place(pieces: list[Example], bins: list[list[int]], seq_len: int,
           pad_id: int) -> dict[str, np.ndarray]:
    out = _empty_rows(len(bins), seq_len, pad_id)
    for row, members in enumerate(bins):
        at = 0
        for segment, p in enumerate(members, start=1):
            n = len(pieces[p]["inputs"])
            for key in ("inputs", "targets", "loss_mask"):
                out[key][row, at:at + n] = pieces[p][key]
            out["segment_ids"][row, at:at + n] = segment
            out["positions"][row, at:at + n] = np.arange(n)
            at += n
    return out


def _pack_fit(examples: list[Example], seq_len: int, pad_id: int, best: bool) -> dict[str, np.ndarray]:
    pieces = [p for p in _pieces(examples, seq_len) if len(p["inputs"])]
    order = sorted(range(len(pieces)), key=lambda p: -len(pieces[p]["inputs"]))
    free = np.zeros(0, np.int64)  # [bins] room left in each row
    bins: list[list[int]] = []
    for p in order:
        n = len(pieces[p]["inputs"])
        fits = np.flatnonzero(free >= n)
        if len(fits) == 0:
            bins.append([p])
            free = np.append(free, seq_len - n)
            continue
        b = fits[np.argmin(free[fits])] if best else fits[0]
        bins[b].append(p)
        free[b] -= n
    return _place(pieces, bins, seq_len, pad_id)


def pack_first_fit(examples: list[Example], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """First-fit decreasing: each piece goes into the first row with room."""
    return _pack_fit(examples, seq_len, pad_id, best=False)


def pack_best_fit(examples: list[Example], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """Best-fit decreasing: each piece goes into the row it fills most tightly."""
    return _pack_fit(examples, seq_len, pad_id, best=True)


def pack_padded(examples: list[Example], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """One piece per row, rows ordered by length (so a batch holds similar lengths)."""
    pieces = [p for p in _pieces(examples, seq_len) if len(p["inputs"])]
    order = sorted(range(len(pieces)), key=lambda p: len(pieces[p]["inputs"]))
    return _place(pieces, [[p] for p in order], seq_len, pad_id)


PACKERS: dict[str, Callable[[list[Example], int, int], dict[str, np.ndarray]]] = {
    "concat_split": pack_concat_split,
    "first_fit": pack_first_fit,
    "best_fit": pack_best_fit,
    "padded": pack_padded,
}


def packer(name: str) -> Callable[[list[Example], int, int], dict[str, np.ndarray]]:
    if name not in PACKERS:
        raise ConfigError(f"packing={name!r}; use one of {sorted(PACKERS)}")
    return PACKERS[name]


class _PackIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, pack, seq_len: int, pad_id: int,
                 window_rows: int):
        super().__init__(parent)
        self._pack, self._seq_len, self._pad_id = pack, seq_len, pad_id
        self._window_tokens = window_rows * seq_len
        self._window_state = parent.get_state()
        self._rows: dict[str, np.ndarray] | None = None
        self._emitted = 0

    def _fill(self) -> None:
        self._window_state = self._parent.get_state()
        examples, tokens = [], 0
        while tokens < self._window_tokens:
            try:
                example = to_example(next(self._parent))
            except StopIteration:
                break
            examples.append(example)
            tokens += len(example["inputs"])
        self._rows = self._pack(examples, self._seq_len, self._pad_id)
        self._emitted = 0

    def __next__(self) -> dict[str, np.ndarray]:
        if self._rows is None or self._emitted >= len(self._rows["inputs"]):
            self._fill()
            if len(self._rows["inputs"]) == 0:
                raise StopIteration
        row = {k: v[self._emitted] for k, v in self._rows.items()}
        self._emitted += 1
        return row

    def get_state(self) -> dict:
        return {"window": self._window_state, "emitted": self._emitted if self._rows else 0}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["window"])
        self._rows = None
        if state["emitted"]:
            self._fill()
            self._emitted = state["emitted"]


class PackIterDataset(grain.IterDataset):
    """Documents -> packed rows {inputs, targets, loss_mask, segment_ids, positions}[seq_len]."""

    def __init__(self, parent: grain.IterDataset, *, seq_len: int, pad_id: int,
                 method: str = "concat_split", window_rows: int = 64):
        super().__init__(parent)
        self._pack = packer(method)
        self._seq_len, self._pad_id, self._window_rows = seq_len, pad_id, window_rows

    def __iter__(self) -> _PackIterator:
        return _PackIterator(self._parent.__iter__(), self._pack, self._seq_len, self._pad_id,
                             self._window_rows)

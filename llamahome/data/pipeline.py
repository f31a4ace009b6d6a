"""The Grain input pipeline, top to bottom: config, caches, split, windows, packing, batches, shards.

Contract: `make_data_iterator(split, *, global_batch_size, seq_len, seed, config, tokenizer,
cache_manager, process_index=None, process_count=None)` returns a Grain iterator (`get_state()`
/ `set_state()`, checkpointable with grain's Orbax handler) of dicts of numpy arrays
[global_batch_size // process_count, seq_len]: inputs int32, targets int32, segment_ids int32
(0 = padding), positions int32, loss_mask float32. "train" repeats forever (reshuffled each
epoch); "validation" is one pass in a fixed order, its last batch padded with rows of
loss_mask 0. `open_shards` reads the global batch as several data shards (see its section).

Only `data_pipeline` reads gin; a job builds the settings once at its top and passes them:
    config = data_pipeline()            # gin: data_pipeline.* (gin/data/*.gin, [data] in TOML)
    tokenizer = load_tokenizer()        # gin: load_tokenizer.path
    cache_manager = CacheManager()      # gin: CacheManager.* (default root: the cache dir)
The cache root may be on object storage (`CacheManager.root = 'gs://...'`): then process 0
builds each cache and the other processes wait for its commit marker, at most
`data_pipeline.build_wait_s` seconds (see llamahome/data/token_cache.py).
The validation split is either `validation_sources`, or a held-out `validation_fraction` of
documents chosen by a seeded hash of their text; train never contains a validation document.
Each JAX process reads only its own documents (every process_count-th of the split).

Mixtures: with `data_pipeline.mixture_weights = [w_1, ..., w_n]`, one weight per source,
each source is a component with its own token cache, read, shuffled (seed + k) and packed on
its own; the train split interleaves the components' packed rows in the proportions of the
weights (grain's `IterDataset.mix`: a fixed, seed-independent pattern, so of any
sum(weights)-scaled cycle of rows exactly w_k / sum(w) come from component k). A row is
`seq_len` tokens, so with "concat_split" packing the weights are shares of tokens; with
"padded" (one conversation per row) shares of sequences. The iterator's state holds every
component's state and the position in the pattern: a resumed run reads exactly what the
uninterrupted one would. The validation split reads every component's held-out documents,
one component after another; `validation_sources`, when bound, is one unmixed set as
without weights. E.g. 90% chat, 10% plain text to limit forgetting (gin/train/lora_sft.gin):
    data_pipeline.sources = [@chat/JsonlFiles(), @text/TextFiles()]
    data_pipeline.mixture_weights = [0.9, 0.1]

Rewinding: a validation iterator is built once and rewound for each evaluation; its state at
creation is the start of its one pass, so
    start = it.get_state()   # right after building it
    ...                      # read some or all of its batches
    it.set_state(start)      # it now yields exactly what a freshly built iterator would
(the same for `open_shards`' iterator).

Memory is bounded by the settings, not by the longest document: documents are read straight
from the cache in windows of at most window_rows * seq_len (input, target) pairs (a longer
document becomes several windows, overlapping by one token so that every pair is in exactly one,
shuffled like documents; augmenters see each window as a document), and Grain reads at most
`read_prefetch` windows ahead. A split with no document longer than one window reads exactly as
whole documents did.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import gin
import grain
import jax
import numpy as np
from absl import flags, logging

from llamahome.cache import CacheManager
from llamahome.data import augment
from llamahome.data.token_cache import (
    DEFAULT_MAX_RECORD_CHARS,
    DEFAULT_WAIT_S,
    NAMESPACE,
    CacheOptions,
    TokenCache,
    build_token_cache,
)
from llamahome.data.tokenizer import Tokenizer, document_bos
from llamahome.errors import ConfigError

SPLITS = ("train", "validation")


# --- config --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """The data set: everything about the data except batch size, length and seed.

    Bound in gin as `data_pipeline.*` ([data] in TOML); `data_pipeline()` builds it from the
    bindings. Each document is cached as [BOS] + text + [EOS]. BOS follows the tokenizer's own
    rule (`add_bos=None`: its add_bos_token or post-processor, as `transformers` encodes text);
    EOS is appended by default (`add_eos=True`) whatever the tokenizer says, because packed
    pretraining documents need a boundary token for the model to learn to end (as HF's
    run_clm-style pipelines append it). Both are logged when the cache is opened.
    """

    sources: Sequence = gin.REQUIRED
    validation_sources: Sequence = ()
    validation_fraction: float = 0.05
    split_seed: int = 0
    packing: str = "concat_split"
    window_rows: int = 64
    augmenters: Sequence = ()
    cache_name: str | None = None
    add_bos: bool | None = None
    add_eos: bool = True
    build_workers: int = 0
    read_workers: int = 0
    read_prefetch: int = 500
    max_record_chars: int = DEFAULT_MAX_RECORD_CHARS
    mixture_weights: Sequence[float] = ()
    build_wait_s: float = DEFAULT_WAIT_S  # how long other hosts wait for process 0's cache

    def __post_init__(self):
        if self.sources is gin.REQUIRED:
            raise ConfigError("no data sources: bind data_pipeline.sources, e.g. include a "
                              "gin/data/<set>.gin")
        for name in ("sources", "validation_sources", "augmenters", "mixture_weights"):
            object.__setattr__(self, name, tuple(getattr(self, name) or ()))
        weights = self.mixture_weights
        if weights and (len(weights) != len(self.sources) or not all(
                isinstance(w, int | float) and 0 < w < float("inf") for w in weights)):
            raise ConfigError(f"data_pipeline.mixture_weights={list(weights)}: expected one "
                              f"number > 0 per source ({len(self.sources)} sources)")
        packer(self.packing)
        if not 0 <= self.validation_fraction < 1:
            raise ConfigError(f"data_pipeline.validation_fraction={self.validation_fraction}; "
                              "use [0, 1)")
        for name, least in (("window_rows", 1), ("read_prefetch", 0), ("max_record_chars", 1),
                            ("build_workers", 0), ("read_workers", 0), ("build_wait_s", 0)):
            if getattr(self, name) < least:
                raise ConfigError(f"data_pipeline.{name}={getattr(self, name)}; use an integer "
                                  f">= {least}")

    def components(self) -> list[tuple[tuple, str]]:
        """(sources, cache name) of each mixture component; one of all sources if unmixed."""
        if not self.mixture_weights:
            return [(self.sources, cache_name_for(self.sources, self.cache_name))]
        return [((source,), cache_name_for((source,), self.cache_name and f"{self.cache_name}-{k}"))
                for k, source in enumerate(self.sources)]

    @property
    def options(self) -> CacheOptions:
        """What turns this data set's documents into tokens (part of its caches' fingerprint)."""
        return CacheOptions(self.add_bos, self.add_eos, self.max_record_chars)


# The gin configurable `data_pipeline`: PipelineConfig built from the `data_pipeline.*` bindings.
data_pipeline = gin.external_configurable(PipelineConfig, "data_pipeline")


# --- caches --------------------------------------------------------------------------------------

def cache_name_for(sources: Sequence, given: str | None) -> str:
    """A stable name for a set of sources (their settings, not their contents)."""
    return given or "data-" + hashlib.sha256(repr(tuple(sources)).encode()).hexdigest()[:12]


def resolved_options(options: CacheOptions, tokenizer: Tokenizer) -> CacheOptions:
    """`options` with add_bos=None (the tokenizer's rule) resolved, so the fingerprint holds it."""
    return dataclasses.replace(options, add_bos=document_bos(tokenizer, options.add_bos,
                                                             options.add_eos))


def is_cache_builder(manager: CacheManager) -> bool:
    """Whether this process builds token caches: always with a local cache root (each host has
    its own), only process 0 with one on object storage (the others wait for its commit)."""
    return not manager.remote or jax.process_index() == 0


def open_cache(sources: Sequence, config: PipelineConfig, tokenizer: Tokenizer,
               manager: CacheManager, name: str, rebuild: bool = False) -> TokenCache:
    """Builds the cache of `sources` if missing, pins it for this process, and opens it."""
    path = build_token_cache(sources, tokenizer, manager, name=name,
                             options=resolved_options(config.options, tokenizer),
                             num_workers=config.build_workers, rebuild=rebuild,
                             builder=is_cache_builder(manager), wait_s=config.build_wait_s)
    manager.pin(NAMESPACE, path.name)
    return TokenCache(path, manager, vocab_size=tokenizer.vocab_size)


# --- split ---------------------------------------------------------------------------------------

def _unit_interval(hashes: np.ndarray, seed: int) -> np.ndarray:
    """A seeded splitmix64 of each uint64 hash mapped to [0, 1)."""
    with np.errstate(over="ignore"):
        z = hashes.astype(np.uint64) ^ np.uint64((seed * 0x9E3779B97F4A7C15) % (1 << 64))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def split_documents(cache: TokenCache, split: str, fraction: float, seed: int,
                    exclude_hashes: np.ndarray | None = None) -> np.ndarray:
    """Indices of the documents (of >= 2 tokens) in `split`; validation = hash below `fraction`."""
    held_out = _unit_interval(cache.doc_hash, seed) < fraction
    keep = held_out if split == "validation" else ~held_out
    if exclude_hashes is not None and len(exclude_hashes):
        keep &= ~np.isin(cache.doc_hash, exclude_hashes)
    return np.flatnonzero(keep & (cache.lengths >= 2))


def _documents(split: str, config: PipelineConfig, tokenizer: Tokenizer,
               manager: CacheManager, sources: Sequence,
               name: str) -> tuple[TokenCache, np.ndarray]:
    """The cache a split of `sources` (one mixture component) reads and its document indices."""
    train = open_cache(sources, config, tokenizer, manager, name)
    if not config.validation_sources:
        if split == "validation" and config.validation_fraction == 0:
            raise ConfigError("no validation split: bind data_pipeline.validation_sources or a "
                              "data_pipeline.validation_fraction > 0")
        return train, split_documents(train, split, config.validation_fraction, config.split_seed)
    validation = open_cache(config.validation_sources, config, tokenizer, manager,
                            cache_name_for(config.validation_sources, None))
    if split == "validation":
        return validation, np.flatnonzero(validation.lengths >= 2)
    return train, split_documents(train, "train", 0.0, 0, exclude_hashes=validation.doc_hash)


# --- windows: the read units of a split ----------------------------------------------------------

class DocumentWindows:
    """The read units of a split: window i -> (document, first token, stop token).

    A document of n tokens has n - 1 (input, target) pairs, cut into windows of at most `pairs`
    pairs; window k holds tokens [k * pairs, (k + 1) * pairs + 1), one token of overlap, so every
    pair is in exactly one window. A document of at most `pairs` pairs is one window.
    """

    def __init__(self, docs: np.ndarray, lengths: np.ndarray, pairs: int):
        self._docs = np.asarray(docs, np.int64)  # [num_docs] cache indices, each of >= 2 tokens
        self._lengths = np.asarray(lengths, np.int64)[self._docs]  # [num_docs]
        self._pairs = pairs
        self._ends = np.cumsum(-(-(self._lengths - 1) // pairs))  # [num_docs] past each doc's last window

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def __getitem__(self, i: int) -> tuple[int, int, int]:
        k = int(np.searchsorted(self._ends, i, side="right"))
        start = (i - (int(self._ends[k - 1]) if k else 0)) * self._pairs
        return int(self._docs[k]), start, min(start + self._pairs + 1, int(self._lengths[k]))


class _ReadWindow:
    """(document, start, stop) -> {tokens int32[n], loss_mask float32[n]}; pickles as its path.

    Each of `workers` read workers (data_pipeline.read_workers) unpickles its own TokenCache, so
    with the cache in this process's memory there would be workers + 1 copies. A worker holds
    the cache in memory only when all of them fit `budget` (this process's memory budget,
    already capped by MemoryLimits.host_ram_bytes), and is given its share of it; else the
    workers read from disk.
    """

    def __init__(self, cache: TokenCache, workers: int = 0, budget: int = 0):
        self._cache = cache
        self._workers, self._budget = workers, budget

    def worker_budget(self) -> int:
        """The memory budget each read worker opens the cache with (0: reads from disk)."""
        cache = self._cache
        if not cache.in_memory or self._workers == 0:
            return 0
        share = self._budget // (self._workers + 1)
        if cache.nbytes > share:
            logging.info("token cache %s (%d bytes) is read from disk by the %d read workers: "
                         "%d copies in memory would exceed the budget of %d bytes",
                         cache.path, cache.nbytes, self._workers, self._workers + 1, self._budget)
            return 0
        return share

    def __getstate__(self):
        return {"path": os.fspath(self._cache.path), "budget": self.worker_budget()}

    def __setstate__(self, state):
        self._cache = TokenCache(state["path"], memory_budget=state["budget"])

    def __call__(self, window: tuple[int, int, int]) -> dict[str, np.ndarray]:
        d, start, stop = window
        tokens, mask = self._cache.document(d, start, stop)
        mask = np.ones(len(tokens), np.float32) if mask is None else mask.astype(np.float32)
        return {"tokens": tokens, "loss_mask": mask}


# --- packing -------------------------------------------------------------------------------------

# Packing documents into fixed-length rows with segment ids and positions (numpy, vectorised).
# A document of n tokens becomes an example of n-1 (input, target) pairs: inputs = tokens[:-1],
# targets = tokens[1:], loss_mask = mask[1:], so no target ever crosses a document. Examples
# are packed into rows of `seq_len`:
#   "concat_split": examples are concatenated and cut into rows; a cut example continues in
#                   the next row as a new segment (every pair appears exactly once, no padding
#                   except at the end of a window);
#   "first_fit" / "best_fit": examples longer than seq_len are cut into seq_len pieces, then
#                   placed (longest first) into the first / the tightest row with room;
#   "padded":       one piece per row, rows sorted by length inside the window (length buckets).
# Each row carries segment_ids (1, 2, ... per piece; 0 = padding) and positions (0-based within
# each piece). `PackIterDataset` packs a window of documents at a time; its state is the parent's
# state at the window start plus the rows already emitted, so restore is exact and small.

Example = dict[str, np.ndarray]  # inputs, targets int32[n]; loss_mask float32[n]


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
    """The packing function named `name` (data_pipeline.packing)."""
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


# --- batching ------------------------------------------------------------------------------------

def _pad_batch(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Pads a short last batch to `size` rows of segment 0 and loss_mask 0."""
    missing = size - len(batch["inputs"])
    if missing == 0:
        return batch
    return {k: np.concatenate([v, np.zeros((missing, *v.shape[1:]), v.dtype)]) for k, v in batch.items()}


def _windows(cache: TokenCache, docs: np.ndarray, split: str, config: PipelineConfig,
             seq_len: int, seed: int, budget: int) -> grain.MapDataset:
    """The read windows of `docs` as documents {tokens, loss_mask}: shuffled, endless for train."""
    ds = grain.MapDataset.source(DocumentWindows(docs, cache.lengths, config.window_rows * seq_len))
    if split == "train":
        ds = ds.shuffle(seed=seed).repeat()
    return ds.map(_ReadWindow(cache, config.read_workers, budget))


def _packed_rows(ds: grain.MapDataset, *, config: PipelineConfig, seq_len: int, pad_id: int,
                 seed: int) -> PackIterDataset:
    """Documents, augmented, read ahead and packed into rows of `seq_len`."""
    if config.augmenters:
        ds = ds.random_map(functools.partial(augment.apply_all, config.augmenters), seed=seed)
    read = grain.ReadOptions(prefetch_buffer_size=config.read_prefetch)
    return PackIterDataset(ds.to_iter_dataset(read), seq_len=seq_len, pad_id=pad_id,
                           method=config.packing, window_rows=config.window_rows)


def make_data_iterator(split: str, *, global_batch_size: int, seq_len: int, seed: int,
                       config: PipelineConfig, tokenizer: Tokenizer, cache_manager: CacheManager,
                       process_index: int | None = None,
                       process_count: int | None = None) -> grain.DatasetIterator:
    """A checkpointable iterator of packed batches [global_batch_size // process_count, seq_len].

    `process_index` / `process_count` default to this JAX process's. A "validation" iterator
    restarts its one pass on `set_state(start)`, `start` its `get_state()` at creation.
    """
    if split not in SPLITS:
        raise ConfigError(f"split={split!r}; use one of {SPLITS}")
    if process_index is None or process_count is None:
        process_index, process_count = jax.process_index(), jax.process_count()
    if global_batch_size % process_count:
        raise ConfigError(f"global batch size {global_batch_size} is not divisible by "
                          f"{process_count} processes; set the batch size to a multiple of it")
    components = config.components()
    if split == "validation" and config.validation_sources:
        components = components[:1]  # the validation sources are one set, whatever the mixture
    windows = []
    for k, (sources, name) in enumerate(components):
        cache, docs = _documents(split, config, tokenizer, cache_manager, sources, name)
        docs = docs[process_index::process_count]
        if len(docs) == 0:
            raise ConfigError(f"the {split} split of {cache.path} has no documents for process "
                              f"{process_index}/{process_count}; add data or change the "
                              "validation split")
        windows.append(_windows(cache, docs, split, config, seq_len, seed + k,
                                cache_manager.memory.budget))
    packed = functools.partial(_packed_rows, config=config, seq_len=seq_len,
                               pad_id=tokenizer.pad_id)
    if split == "train" and len(windows) > 1:
        rows = grain.IterDataset.mix([packed(w, seed=seed + k) for k, w in enumerate(windows)],
                                     list(config.mixture_weights))
    else:
        rows = packed(windows[0] if len(windows) == 1 else grain.MapDataset.concatenate(windows),
                      seed=seed)
    batch_size = global_batch_size // process_count
    batches = rows.batch(batch_size, drop_remainder=split == "train")
    if split == "validation":
        batches = batches.map(functools.partial(_pad_batch, size=batch_size))
    if config.read_workers:
        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside launch none were parsed
            flags.FLAGS.mark_as_parsed()
        batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.read_workers))
    return iter(batches)


# --- data shards ---------------------------------------------------------------------------------

# The global batch read as `num_shards` data shards, spread evenly over the processes.
#
# A data shard is one reader of the input pipeline: `make_data_iterator(split, ...,
# process_index=k, process_count=num_shards)` reads every num_shards-th document and yields rows
# [global_batch / num_shards, length]. Process p of P reads shards p*K/P ... (p+1)*K/P - 1 and
# stacks their rows (in shard order) into its part of the global batch, which
# `mesh.global_batch` assembles with `jax.make_array_from_process_local_data`.
#
# With K fixed, the global batches do not depend on how many processes read them: a run on
# 2 hosts and a run on 1 host with `train.data_shards=2` see the same batches, and a checkpoint
# (one iterator-state file per shard, see llamahome/train/checkpoint.py) restores on any process
# count that divides K. K defaults to the process count.
#
# The validation split is finite and shards can run out at different batches: `ShardedIterator`
# with `pad_exhausted=True` fills an exhausted shard's rows with blank rows (segment 0,
# loss_mask 0) until every local shard is done; the train loop's evaluation does the same
# across processes.

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
                seq_len: int, seed: int, config: PipelineConfig, tokenizer: Tokenizer,
                cache_manager: CacheManager, num_shards: int | None = None,
                process_index: int | None = None, process_count: int | None = None) -> ShardedIterator:
    """`make_iterator(split, ..., process_index=k, process_count=K)` for each local shard k.

    `make_iterator` is `make_data_iterator` (tests pass a stand-in). Like its shards' iterators,
    the result restarts on `set_state(start)`, `start` its `get_state()` at creation.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    num_shards = num_shards or process_count
    if global_batch_size % num_shards:
        raise ConfigError(f"train.batch_size={global_batch_size} is not divisible by "
                          f"train.data_shards={num_shards}; use a multiple of it")
    iterators = {k: make_iterator(split, global_batch_size=global_batch_size, seq_len=seq_len,
                                  seed=seed, config=config, tokenizer=tokenizer,
                                  cache_manager=cache_manager, process_index=k,
                                  process_count=num_shards)
                 for k in local_shards(num_shards, process_index, process_count)}
    return ShardedIterator(iterators, num_shards, pad_exhausted=split != "train")


def as_sharded(iterator: Any) -> ShardedIterator:
    """A per-process iterator seen as data shard `process_index` of `process_count`."""
    if isinstance(iterator, ShardedIterator):
        return iterator
    return ShardedIterator({jax.process_index(): iterator}, jax.process_count())

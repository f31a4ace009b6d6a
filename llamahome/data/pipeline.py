"""The Grain input pipeline: token cache -> shuffled documents -> packed rows -> batches.

Contract: `make_data_iterator(split, *, global_batch_size, seq_len, seed, process_index=None,
process_count=None)` returns a Grain iterator (`get_state()` / `set_state()`, checkpointable
with grain's Orbax handler) of dicts of numpy arrays [global_batch_size // process_count, seq_len]:
inputs int32, targets int32, segment_ids int32 (0 = padding), positions int32, loss_mask float32.
"train" repeats forever (reshuffled each epoch); "validation" is one pass in a fixed order,
its last batch padded with rows of loss_mask 0.

Sources, tokenizer, cache and packing are bound in gin (see gin/data/*.gin):
    data_pipeline.sources = [@TextFiles()]      # what to read
    load_tokenizer.path = '...'                  # how to tokenize
    CacheManager.root = '...'                    # where caches live (default: paths.cache_dir)
The validation split is either `validation_sources`, or a held-out `validation_fraction` of
documents chosen by a seeded hash of their text; train never contains a validation document.
Each JAX process reads only its own documents (every process_count-th of the split).

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
from collections.abc import Sequence

import gin
import grain
from absl import flags
import numpy as np

from llamahome.cache import CacheManager
from llamahome.data import augment
from llamahome.data.packing import FIELDS, PackIterDataset, packer
from llamahome.data.token_cache import (
    DEFAULT_MAX_RECORD_CHARS,
    NAMESPACE,
    CacheOptions,
    TokenCache,
    build_token_cache,
)
from llamahome.data.tokenizer import Tokenizer, document_bos, load_tokenizer
from llamahome.errors import ConfigError

SPLITS = ("train", "validation")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Everything about the data except batch size, length and seed."""

    sources: tuple
    validation_sources: tuple = ()
    validation_fraction: float = 0.05
    split_seed: int = 0
    packing: str = "concat_split"
    window_rows: int = 64
    augmenters: tuple = ()
    cache_name: str | None = None
    options: CacheOptions = CacheOptions()
    build_workers: int = 0
    read_workers: int = 0
    read_prefetch: int = 500


@gin.configurable
def data_pipeline(sources: Sequence = gin.REQUIRED, validation_sources: Sequence = (),
                  validation_fraction: float = 0.05, split_seed: int = 0,
                  packing: str = "concat_split", window_rows: int = 64,
                  augmenters: Sequence = (), cache_name: str | None = None,
                  add_bos: bool | None = None, add_eos: bool = True, build_workers: int = 0,
                  read_workers: int = 0, read_prefetch: int = 500,
                  max_record_chars: int = DEFAULT_MAX_RECORD_CHARS) -> PipelineConfig:
    """The data set as bound in gin ([data] in TOML).

    Each document is cached as [BOS] + text + [EOS]. BOS follows the tokenizer's own rule
    (`add_bos=None`: its add_bos_token or post-processor, as `transformers` encodes text);
    EOS is appended by default (`add_eos=True`) whatever the tokenizer says, because packed
    pretraining documents need a boundary token for the model to learn to end (as HF's
    run_clm-style pipelines append it). Both are bindable and logged when the cache is opened.
    """
    packer(packing)
    if not 0 <= validation_fraction < 1:
        raise ConfigError(f"data_pipeline.validation_fraction={validation_fraction}; use [0, 1)")
    for name, value, least in (("window_rows", window_rows, 1), ("read_prefetch", read_prefetch, 0),
                               ("max_record_chars", max_record_chars, 1)):
        if value < least:
            raise ConfigError(f"data_pipeline.{name}={value}; use an integer >= {least}")
    return PipelineConfig(tuple(sources), tuple(validation_sources or ()), validation_fraction,
                          split_seed, packing, window_rows, tuple(augmenters), cache_name,
                          CacheOptions(add_bos, add_eos, max_record_chars), build_workers,
                          read_workers, read_prefetch)


def cache_name_for(sources: Sequence, given: str | None) -> str:
    """A stable name for a set of sources (their settings, not their contents)."""
    return given or "data-" + hashlib.sha256(repr(tuple(sources)).encode()).hexdigest()[:12]


def resolved_options(options: CacheOptions, tokenizer: Tokenizer) -> CacheOptions:
    """`options` with add_bos=None (the tokenizer's rule) resolved, so the fingerprint holds it."""
    return dataclasses.replace(options, add_bos=document_bos(tokenizer, options.add_bos,
                                                             options.add_eos))


def open_cache(sources: Sequence, config: PipelineConfig, tokenizer: Tokenizer,
               manager: CacheManager, name: str, rebuild: bool = False) -> TokenCache:
    """Builds the cache of `sources` if missing, pins it for this process, and opens it."""
    path = build_token_cache(sources, tokenizer, manager, name=name,
                             options=resolved_options(config.options, tokenizer),
                             num_workers=config.build_workers, rebuild=rebuild)
    manager.pin(NAMESPACE, path.name)
    return TokenCache(path, manager, vocab_size=tokenizer.vocab_size)


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
    """(document, start, stop) -> {tokens int32[n], loss_mask float32[n]}; pickles as its path."""

    def __init__(self, cache: TokenCache):
        self._cache = cache

    def __getstate__(self):
        # A worker holds the cache in memory only where this process chose to (within its budget).
        return {"path": self._cache.path,
                "budget": self._cache.num_tokens * 5 if self._cache.in_memory else 0}

    def __setstate__(self, state):
        self._cache = TokenCache(state["path"], memory_budget=state["budget"])

    def __call__(self, window: tuple[int, int, int]) -> dict[str, np.ndarray]:
        d, start, stop = window
        tokens, mask = self._cache.document(d, start, stop)
        mask = np.ones(len(tokens), np.float32) if mask is None else mask.astype(np.float32)
        return {"tokens": tokens, "loss_mask": mask}


def _pad_batch(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Pads a short last batch to `size` rows of segment 0 and loss_mask 0."""
    missing = size - len(batch["inputs"])
    if missing == 0:
        return batch
    return {k: np.concatenate([v, np.zeros((missing, *v.shape[1:]), v.dtype)]) for k, v in batch.items()}


def _documents(split: str, config: PipelineConfig, tokenizer: Tokenizer,
               manager: CacheManager) -> tuple[TokenCache, np.ndarray]:
    """The cache a split reads and the document indices it holds."""
    name = cache_name_for(config.sources, config.cache_name)
    train = open_cache(config.sources, config, tokenizer, manager, name)
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


@gin.configurable
def make_data_iterator(split: str, *, global_batch_size: int, seq_len: int, seed: int,
                       process_index: int | None = None, process_count: int | None = None,
                       config: PipelineConfig | None = None, tokenizer: Tokenizer | None = None,
                       cache_manager: CacheManager | None = None) -> grain.DatasetIterator:
    """A checkpointable iterator of packed batches [global_batch_size // process_count, seq_len]."""
    if split not in SPLITS:
        raise ConfigError(f"split={split!r}; use one of {SPLITS}")
    if process_index is None or process_count is None:
        import jax  # noqa: PLC0415

        process_index, process_count = jax.process_index(), jax.process_count()
    if global_batch_size % process_count:
        raise ConfigError(f"global batch size {global_batch_size} is not divisible by "
                          f"{process_count} processes; set the batch size to a multiple of it")
    config = config or data_pipeline()
    tokenizer = tokenizer or load_tokenizer()
    manager = cache_manager or CacheManager()
    cache, docs = _documents(split, config, tokenizer, manager)
    docs = docs[process_index::process_count]
    if len(docs) == 0:
        raise ConfigError(f"the {split} split of {cache.path} has no documents for process "
                          f"{process_index}/{process_count}; add data or change the validation split")
    ds = grain.MapDataset.source(DocumentWindows(docs, cache.lengths, config.window_rows * seq_len))
    if split == "train":
        ds = ds.shuffle(seed=seed).repeat()
    ds = ds.map(_ReadWindow(cache))
    if config.augmenters:
        ds = ds.random_map(functools.partial(augment.apply_all, config.augmenters), seed=seed)
    read = grain.ReadOptions(prefetch_buffer_size=config.read_prefetch)
    rows = PackIterDataset(ds.to_iter_dataset(read), seq_len=seq_len, pad_id=tokenizer.pad_id,
                           method=config.packing, window_rows=config.window_rows)
    batch_size = global_batch_size // process_count
    batches = rows.batch(batch_size, drop_remainder=split == "train")
    if split == "validation":
        batches = batches.map(functools.partial(_pad_batch, size=batch_size))
    if config.read_workers:
        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside launch none were parsed
            flags.FLAGS.mark_as_parsed()
        batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.read_workers))
    return iter(batches)


__all__ = ["FIELDS", "PipelineConfig", "data_pipeline", "make_data_iterator", "split_documents"]

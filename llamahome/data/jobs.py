"""Data jobs: `build_cache` (tokenize the bound data set ahead of training) and `train_tokenizer`."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

from absl import logging

from llamahome import store
from llamahome.cache import CacheManager
from llamahome.data.pipeline import (
    cache_name_for,
    data_pipeline,
    is_cache_builder,
    resolved_options,
)
from llamahome.data.sources import Skipped
from llamahome.data.token_cache import TokenCache, build_token_cache
from llamahome.data.tokenizer import load_tokenizer, train_bpe_tokenizer
from llamahome.files import RunDir, write_text_atomic
from llamahome.jobs import job


@job
def build_cache(run_dir: str, rebuild: bool = False, num_workers: int | None = None) -> dict:
    """Builds the token caches of `data_pipeline` (sources and validation sources); returns their stats.

    With the cache root on object storage and several processes, process 0 builds and the
    others wait for its commit (see llamahome/data/token_cache.py)."""
    config = data_pipeline()
    tokenizer = load_tokenizer()
    manager = CacheManager()
    workers = config.build_workers if num_workers is None else num_workers
    report = {}
    components = config.components()  # one per mixture component (data_pipeline.mixture_weights)
    caches = [("train" if len(components) == 1 else f"train/{k}", sources, name)
              for k, (sources, name) in enumerate(components)]
    if config.validation_sources:
        caches.append(("validation", config.validation_sources,
                       cache_name_for(config.validation_sources, None)))
    for split, sources, name in caches:
        start = time.perf_counter()
        path = build_token_cache(sources, tokenizer, manager, name=name,
                                 options=resolved_options(config.options, tokenizer),
                                 num_workers=workers, rebuild=rebuild,
                                 progress=lambda done, total: logging.info("shards %d/%d", done, total),
                                 builder=is_cache_builder(manager), wait_s=config.build_wait_s)
        seconds = time.perf_counter() - start
        cache = TokenCache(path, vocab_size=tokenizer.vocab_size)
        report[split] = {"path": store.show(path), "documents": cache.num_docs, "tokens": cache.num_tokens,
                         "skipped": cache.meta["skipped"], "seconds": round(seconds, 3)}
        logging.info("%s cache %s: %d documents, %d tokens, %d skipped records (%.1fs)", split,
                     store.show(path), cache.num_docs, cache.num_tokens, cache.meta["skipped"], seconds)
    if not store.is_remote(run_dir):
        Path(run_dir).mkdir(parents=True, exist_ok=True)
    write_text_atomic(store.as_path(run_dir) / RunDir.CACHE_STATS_FILE,
                      json.dumps(manager.stats(), indent=1))
    return report


def source_texts(sources: Sequence):
    """Every document's text (chat records contribute each message) from `sources`."""
    for source in sources:
        for shard in source.shards():
            for doc in source.read(shard):
                if isinstance(doc, Skipped):
                    continue
                if doc.text is not None:
                    yield doc.text
                else:
                    yield from (m["content"] for m in doc.messages)


@job
def train_tokenizer(run_dir: str, sources: Sequence | None = None, vocab_size: int = 8192,
                    output: str | None = None, min_frequency: int = 2,
                    special_tokens: Sequence[str] = ("<s>", "</s>", "<pad>")) -> str:
    """Trains a byte-level BPE tokenizer.json on `sources` (default: data_pipeline's); returns its dir."""
    out = Path(output).expanduser() if output else RunDir(run_dir).tokenizer
    train_bpe_tokenizer(source_texts(sources or data_pipeline().sources), out, vocab_size,
                        min_frequency, special_tokens)
    logging.info("tokenizer written to %s", out)
    return str(out)

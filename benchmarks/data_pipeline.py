"""Token cache build and pipeline read throughput; prints one JSON line.

    python benchmarks/data_pipeline.py [--mb 8] [--seq_len 512] [--batch 4] [--workers 2]

The corpus is synthetic English-like text (paragraphs of random words) written to a temporary
folder; the tokenizer is Mistral v1's 32k SentencePiece from the mistral-common package.
"""

from __future__ import annotations

from llamahome import launch

if __name__ == "__main__":
    launch.reexec_under_allocator()  # mimalloc (from pip), tcmalloc or jemalloc, before JAX or torch load

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from llamahome.cache import CacheManager
from llamahome.data.pipeline import PipelineConfig, make_data_iterator
from llamahome.data.sources import TextFiles
from llamahome.data.token_cache import TokenCache, build_token_cache
from llamahome.data.tokenizer import load_tokenizer

WORDS = ("the of and to in that is was he for it with as his on be at by had not are but from or "
         "have an they which one you were her all she there would their we him been has when who "
         "will more no if out so said what up its about into than them can only other new some "
         "could time these two may then do first any my now such like our over man me even most "
         "shakespeare king queen lord thou thee thy hath doth wherefore").split()


def write_corpus(folder: Path, megabytes: float, files: int = 16) -> None:
    rng = np.random.default_rng(0)
    words = np.array(WORDS)
    per_file = int(megabytes * 1e6 / files)
    for i in range(files):
        paragraphs, size = [], 0
        while size < per_file:
            text = " ".join(words[rng.integers(0, len(words), rng.integers(20, 400))])
            paragraphs.append(text)
            size += len(text) + 2
        (folder / f"{i:03d}.txt").write_text("\n\n".join(paragraphs))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=float, default=8.0)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--read_seconds", type=float, default=5.0)
    args = parser.parse_args()
    import mistral_common  # noqa: PLC0415

    tokenizer = load_tokenizer(str(Path(mistral_common.__file__).parent / "data/tokenizer.model.v1"))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "txt"
        folder.mkdir()
        write_corpus(folder, args.mb)
        sources = [TextFiles(paths=str(folder), split="paragraph")]
        manager = CacheManager(root=str(Path(tmp) / "cache"))
        start = time.perf_counter()
        path = build_token_cache(sources, tokenizer, manager, name="bench", num_workers=args.workers)
        build_seconds = time.perf_counter() - start
        num_tokens = TokenCache(path).num_tokens

        config = PipelineConfig(sources=sources, cache_name="bench")
        it = make_data_iterator("train", global_batch_size=args.batch, seq_len=args.seq_len, seed=0,
                                process_index=0, process_count=1, config=config,
                                tokenizer=tokenizer, cache_manager=manager)
        next(it)
        read, batches, start = 0, 0, time.perf_counter()
        while time.perf_counter() - start < args.read_seconds:
            read += int(next(it)["inputs"].size)
            batches += 1
        read_seconds = time.perf_counter() - start
    print(json.dumps({
        "benchmark": "data_pipeline",
        "allocator": launch.allocator_name(),
        "corpus_mb": args.mb,
        "cache_tokens": num_tokens,
        "build_workers": args.workers,
        "cache_build_tokens_per_sec": round(num_tokens / build_seconds),
        "seq_len": args.seq_len,
        "batch_size": args.batch,
        "packing": "concat_split",
        "pipeline_read_tokens_per_sec": round(read / read_seconds),
        "pipeline_batches_per_sec": round(batches / read_seconds, 1),
    }))


if __name__ == "__main__":
    main()

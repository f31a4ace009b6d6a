"""The build_cache and train_tokenizer jobs, bound through gin as launch binds them."""

from __future__ import annotations

import json

from llamahome.config import gin_config
from llamahome.data.jobs import build_cache, train_tokenizer
from llamahome.data.token_cache import TokenCache
from llamahome.data.tokenizer import load_tokenizer


def test_train_tokenizer_then_build_cache(tmp_path, text_corpus):
    folder, paragraphs = text_corpus
    gin_config.parse_config(["gin/data/shakespeare.gin"], gin_params=[
        f"DATA_DIR='{folder}'", f"TOKENIZER='{tmp_path / 'tok'}'", f"CacheManager.root='{tmp_path}'",
        f"train_tokenizer.output='{tmp_path / 'tok'}'", "train_tokenizer.vocab_size=320"])
    train_tokenizer(run_dir=str(tmp_path / "run"))
    tokenizer = load_tokenizer()
    assert tokenizer.vocab_size == 320 and (tokenizer.bos_id, tokenizer.eos_id) == (0, 1)
    assert tokenizer.decode(tokenizer.encode(paragraphs[0], add_bos=False)) == paragraphs[0]

    report = build_cache(run_dir=str(tmp_path / "run"))
    cache = TokenCache(report["train"]["path"])
    assert cache.num_docs == len(paragraphs)
    assert cache.document(3)[0].tolist() == tokenizer.encode(paragraphs[3], add_eos=True)
    stats = json.loads((tmp_path / "run" / "cache_stats.json").read_text())
    assert stats["misses"] == 1 and stats["disk_bytes"] > 0
    assert build_cache(run_dir=str(tmp_path / "run"))["train"]["path"] == report["train"]["path"]

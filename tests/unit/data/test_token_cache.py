"""Token cache: contents against direct tokenization, resume after SIGKILL, invalidation, validation."""

from __future__ import annotations

import json
import shutil
import signal
import textwrap

import gin
import numpy as np
import pytest
import sentencepiece
import tensorstore as ts

from llamahome.cache import CacheManager
from llamahome.data.sources import JsonlFiles, TextFiles
from llamahome.data.token_cache import CacheOptions, TokenCache, build_token_cache, cache_fingerprint
from llamahome.errors import DataError
from tests.conftest import run_python


def read_cache(path) -> dict[str, np.ndarray]:
    out = {}
    for name in ("tokens", "offsets", "doc_hash", "loss_mask"):
        if (path / name).exists():
            spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path / name)}}
            out[name] = ts.open(spec).result().read().result()
    return out


def test_cache_holds_each_paragraph_tokenized(tmp_path, text_corpus, sp_model_path, sp_tokenizer):
    folder, paragraphs = text_corpus
    manager = CacheManager(root=str(tmp_path / "cache"))
    path = build_token_cache([TextFiles(paths=str(folder), split="paragraph")], sp_tokenizer,
                             manager, name="t")
    sp = sentencepiece.SentencePieceProcessor(model_file=sp_model_path)
    expected = [[1, *sp.encode(p), 2] for p in paragraphs]
    arrays = read_cache(path)
    assert arrays["tokens"].dtype == np.uint16  # a 32k vocabulary fits 16 bits
    docs = np.split(arrays["tokens"], arrays["offsets"][1:-1])
    assert [d.tolist() for d in docs] == expected
    cache = TokenCache(path, manager, vocab_size=32000)
    assert cache.document(7)[0].tolist() == expected[7]
    assert manager.lookup("tokens", "t", path.name) == path  # a second lookup hits
    assert manager.stats()["hits"] >= 1


def test_chat_records_store_assistant_loss_mask(tmp_path, sp_tokenizer):
    path = tmp_path / "chat.jsonl"
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello you"}]
    path.write_text(json.dumps({"messages": conversation}) + "\n")
    cache_path = build_token_cache([JsonlFiles(paths=str(path), messages_field="messages")],
                                   sp_tokenizer, CacheManager(root=str(tmp_path / "c")), name="chat")
    ids, mask = sp_tokenizer.apply_chat_template(conversation)
    tokens, loss_mask = TokenCache(cache_path).document(0)
    assert tokens.tolist() == ids and loss_mask.tolist() == mask


def test_skipped_records_are_counted_in_meta(tmp_path, sp_tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "a"}\n{bad\n{"x": 1}\n{"text": "b"}\n')
    cache_path = build_token_cache([JsonlFiles(paths=str(path), on_error="skip")], sp_tokenizer,
                                   CacheManager(root=str(tmp_path / "c")), name="s")
    meta = json.loads((cache_path / "meta.json").read_text())
    assert (meta["num_docs"], meta["skipped"]) == (2, 2)
    assert meta["skipped_examples"][0].startswith(f"{path}:2: malformed JSON")


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from llamahome.cache import CacheManager
    from llamahome.data.sources import TextFiles
    from llamahome.data.tokenizer import load_tokenizer
    from llamahome.data.token_cache import build_token_cache
    folder, root, tok, kill_at = sys.argv[1:5]
    def progress(done, total):
        if done == int(kill_at):
            os.kill(os.getpid(), signal.SIGKILL)
    build_token_cache([TextFiles(paths=folder, split="paragraph")], load_tokenizer(tok),
                      CacheManager(root=root), name="k", progress=progress)
""")


def many_files(tmp_path, n=12, words=20, paragraphs=30):
    """`n` text files of `paragraphs` random paragraphs of `words` words, in `tmp_path`/many."""
    folder = tmp_path / "many"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(n):
        (folder / f"{i:02d}.txt").write_text("\n\n".join(
            " ".join(rng.choice(["a", "bb", "ccc", "to", "be"], words)) for _ in range(paragraphs)))
    return folder


def test_killed_build_resumes_to_identical_cache(tmp_path, sp_model_path, sp_tokenizer):
    folder = many_files(tmp_path)
    (tmp_path / "kill.py").write_text(KILL_SCRIPT)
    killed = run_python([str(tmp_path / "kill.py"), str(folder), str(tmp_path / "resumed"),
                         sp_model_path, "5"], timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    builds = list((tmp_path / "resumed" / "tokens").glob(".build-*"))
    assert len(builds) == 1 and not list((tmp_path / "resumed" / "tokens").glob("[0-9a-f]*"))
    assert len((builds[0] / "ledger.jsonl").read_text().splitlines()) == 5

    shards_done = []
    sources = [TextFiles(paths=str(folder), split="paragraph")]
    resumed = build_token_cache(sources, sp_tokenizer, CacheManager(root=str(tmp_path / "resumed")),
                                name="k", progress=lambda done, total: shards_done.append(done))
    assert shards_done == list(range(6, 13))  # only the 7 unfinished shards were tokenized
    whole = build_token_cache(sources, sp_tokenizer, CacheManager(root=str(tmp_path / "whole")), name="k")
    a, b = read_cache(resumed), read_cache(whole)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert not builds[0].exists()


def test_parallel_build_equals_serial_build(tmp_path, sp_tokenizer):
    folder = many_files(tmp_path, n=4)
    sources = [TextFiles(paths=str(folder), split="paragraph")]
    serial = build_token_cache(sources, sp_tokenizer, CacheManager(root=str(tmp_path / "s")), name="p")
    parallel = build_token_cache(sources, sp_tokenizer, CacheManager(root=str(tmp_path / "p")),
                                 name="p", num_workers=2)
    a, b = read_cache(serial), read_cache(parallel)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_source_or_tokenizer_change_invalidates(tmp_path, text_corpus, sp_tokenizer):
    from llamahome.data.tokenizer import load_tokenizer  # noqa: PLC0415
    from tests.unit.data.test_tokenizer import _train_bpe  # noqa: PLC0415

    folder, _ = text_corpus
    manager = CacheManager(root=str(tmp_path / "cache"))
    sources = [TextFiles(paths=str(folder), split="paragraph")]
    first = build_token_cache(sources, sp_tokenizer, manager, name="d")
    assert build_token_cache(sources, sp_tokenizer, manager, name="d") == first

    with open(folder / "0.txt", "a") as f:
        f.write("\nan appended paragraph\n")
    second = build_token_cache(sources, sp_tokenizer, manager, name="d")
    assert second != first and not first.exists()
    rebuilt = TokenCache(second)
    assert rebuilt.num_docs == 241
    assert rebuilt.document(60)[0].tolist() == sp_tokenizer.encode("an appended paragraph", add_eos=True)

    _train_bpe(tmp_path / "bpe")
    third = build_token_cache(sources, load_tokenizer(str(tmp_path / "bpe")), manager, name="d")
    assert third != second and not second.exists()
    assert manager.stats()["invalidations"] == 2


def test_fingerprint_depends_on_options(text_corpus, sp_tokenizer):
    folder, _ = text_corpus
    sources = [TextFiles(paths=str(folder), split="paragraph")]
    assert cache_fingerprint(sources, sp_tokenizer, CacheOptions()) != \
        cache_fingerprint(sources, sp_tokenizer, CacheOptions(add_eos=False))
    assert cache_fingerprint(sources, sp_tokenizer, CacheOptions()) != \
        cache_fingerprint([TextFiles(paths=str(folder), split="line")], sp_tokenizer, CacheOptions())


def test_open_validates_and_names_the_fix(tmp_path, text_corpus, sp_tokenizer):
    folder, _ = text_corpus
    path = build_token_cache([TextFiles(paths=str(folder))], sp_tokenizer,
                             CacheManager(root=str(tmp_path / "c")), name="v")
    with pytest.raises(DataError, match="vocab size 1000.*rebuild"):
        TokenCache(path, vocab_size=1000)
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps({**meta, "num_tokens": meta["num_tokens"] + 1}))
    with pytest.raises(DataError, match="corrupt"):
        TokenCache(path)
    (path / "meta.json").write_text(json.dumps(meta))
    shutil.rmtree(path / "offsets")
    with pytest.raises(DataError, match="corrupt.*cannot open"):
        TokenCache(path)


def test_default_record_cap_keeps_existing_fingerprints(text_corpus, sp_tokenizer):
    """Caches built before max_record_chars existed (format 1) keep their fingerprint."""
    import hashlib  # noqa: PLC0415

    folder, _ = text_corpus
    source = TextFiles(paths=str(folder), split="paragraph")
    format_1 = {"format": 1, "sources": [{"kind": "TextFiles", "config": repr(source),
                                          "shards": [source.describe(s) for s in source.shards()]}],
                "tokenizer": sp_tokenizer.fingerprint, "options": {"add_bos": True, "add_eos": True}}
    expected = hashlib.sha256(json.dumps(format_1, sort_keys=True).encode()).hexdigest()[:20]
    assert cache_fingerprint([source], sp_tokenizer, CacheOptions()) == expected
    assert cache_fingerprint([source], sp_tokenizer, CacheOptions(max_record_chars=4096)) != expected


class _RecordingTokenizer:
    """Wraps a tokenizer and records the length of every text it is asked to encode."""

    def __init__(self, inner, seen: list[int]):
        self._inner, self.seen = inner, seen

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def encode(self, text, add_bos=True, add_eos=False):
        self.seen.append(len(text))
        return self._inner.encode(text, add_bos, add_eos)

    def encode_batch(self, texts, add_bos=True, add_eos=False):
        self.seen.extend(len(t) for t in texts)
        return self._inner.encode_batch(texts, add_bos, add_eos)


def test_long_record_is_tokenized_in_bounded_pieces_as_one_document(tmp_path, sp_model_path,
                                                                    sp_tokenizer, monkeypatch, caplog):
    import llamahome.data.token_cache as token_cache  # noqa: PLC0415

    rng = np.random.default_rng(3)
    words = ["the", "king", "queen", "crown", "sword", "love", "night"]
    long_line = " ".join(rng.choice(words, 1500))  # ~8,000 characters, no newline
    path = tmp_path / "txt" / "long.txt"
    path.parent.mkdir()
    path.write_text(f"a short line\n{long_line}\nanother short line\n")
    seen: list[int] = []
    monkeypatch.setattr(token_cache, "tokenizer_from_spec",
                        lambda spec: _RecordingTokenizer(sp_tokenizer, seen))
    caplog.set_level("WARNING")
    cache_path = build_token_cache([TextFiles(paths=str(path), split="line")], sp_tokenizer,
                                   CacheManager(root=str(tmp_path / "c")), name="long",
                                   options=CacheOptions(max_record_chars=1000))
    assert max(seen) <= 1000 and sum(seen) >= len(long_line)  # never more than the cap at once
    cache = TokenCache(cache_path)
    assert cache.num_docs == 3  # the long line is still one document, between its neighbours
    sp = sentencepiece.SentencePieceProcessor(model_file=sp_model_path)
    tokens = cache.document(1)[0].tolist()
    assert tokens[0] == 1 and tokens[-1] == 2 and 1 not in tokens[1:-1] and 2 not in tokens[1:-1]
    assert sp.decode(tokens[1:-1]).split() == long_line.split()  # every word, none cut in two
    whole = sp.encode(long_line)
    cuts = len(long_line) // 500  # each piece but the last holds over half the cap
    assert 0 <= len(tokens) - 2 - len(whole) <= cuts  # at most one extra '▁' at each cut
    assert cache.document(0)[0].tolist() == [1, *sp.encode("a short line"), 2]
    assert cache.document(2)[0].tolist() == [1, *sp.encode("another short line"), 2]
    meta = json.loads((cache_path / "meta.json").read_text())
    assert meta["split_records"] == 1
    assert meta["split_examples"] == [f"{path}:2 ({len(long_line)} characters)"]
    assert f"{path}:2" in caplog.text and "max_record_chars=1000" in caplog.text


def test_long_chat_record_is_an_error_naming_file_and_line(tmp_path, sp_tokenizer):
    path = tmp_path / "chat.jsonl"
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    long = [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "ok"}]
    path.write_text("\n".join(json.dumps({"messages": m}) for m in (short, long, short)) + "\n")
    options = CacheOptions(max_record_chars=1000)
    with pytest.raises(DataError, match=rf"{path}:2: chat record of 2002 characters is longer than "
                                        r"data_pipeline.max_record_chars=1000"):
        build_token_cache([JsonlFiles(paths=str(path), messages_field="messages")], sp_tokenizer,
                          CacheManager(root=str(tmp_path / "c")), name="chat", options=options)
    skipping = build_token_cache([JsonlFiles(paths=str(path), messages_field="messages", on_error="skip")],
                                 sp_tokenizer, CacheManager(root=str(tmp_path / "s")), name="chat",
                                 options=options)
    meta = json.loads((skipping / "meta.json").read_text())
    assert (meta["num_docs"], meta["skipped"]) == (2, 1)


def test_host_ram_cap_keeps_a_larger_cache_out_of_memory(tmp_path, text_corpus, sp_tokenizer):
    folder, _ = text_corpus
    path = build_token_cache([TextFiles(paths=str(folder), split="paragraph")], sp_tokenizer,
                             CacheManager(root=str(tmp_path / "c")), name="t")
    nbytes = TokenCache(path).num_tokens * 2  # uint16 tokens, no loss mask
    assert TokenCache(path, CacheManager(root=str(tmp_path / "c"))).in_memory  # fits 2GB
    assert TokenCache(path, memory_budget=nbytes).in_memory
    gin.parse_config(f"MemoryLimits.host_ram_bytes = {nbytes - 1}")
    manager = CacheManager(root=str(tmp_path / "c"), memory_size="2GB")
    capped = TokenCache(path, manager)
    assert not capped.in_memory and manager.stats()["memory_bytes"] == 0
    arrays = read_cache(path)
    expected = arrays["tokens"][arrays["offsets"][3]:arrays["offsets"][4]]
    assert capped.document(3)[0].tolist() == expected.tolist()  # read from disk instead
    assert not TokenCache(path, memory_budget=nbytes).in_memory  # a grain worker's copy is capped too

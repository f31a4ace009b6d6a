"""Sources of raw documents: text files, JSONL (.gz/.zst), Parquet, ArrayRecord, HF datasets on disk.

A source is a frozen dataclass with three methods the token cache uses:
  `shards() -> list[str]`         the units of parallel, resumable work (usually one per file);
  `describe(shard) -> dict`       what identifies the shard's content (path, size, mtime) for the
                                  cache fingerprint;
  `read(shard) -> Iterator[Document | Skipped]`  its documents, in a fixed order.
A document carries either `text` or chat `messages` ([{role, content}]) and `where` ("file:line").
Malformed records raise `DataError` naming file and line, or, with `on_error="skip"`, come out
as `Skipped` markers that the cache build counts.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import io
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import gin

from llamahome.errors import ConfigError, DataError

ON_ERROR = ("raise", "skip")


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
        pattern = os.path.expanduser(str(pattern))
        if os.path.isdir(pattern):
            pattern = os.path.join(pattern, "**", "*")
        matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not matches:
            raise DataError(f"{what}: no files match {pattern!r}; check the path in your data gin file")
        files.extend(os.path.abspath(m) for m in matches)
    return sorted(dict.fromkeys(files))


def describe_file(path: str) -> dict:
    stat = os.stat(path)
    return {"path": path, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


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
        data = Path(shard).read_bytes()
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
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        import zstandard  # noqa: PLC0415

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")))
    return open(path, "rb")


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
            file = pq.ParquetFile(shard)
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
        from array_record.python.array_record_module import ArrayRecordReader  # noqa: PLC0415

        try:
            reader = ArrayRecordReader(shard)
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

"""Each source on small files written here; malformed records are reported with file and line."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import zstandard

from llamahome.cache import CacheManager
from llamahome.config import gin_config
from llamahome.data.sources import (CORPORA, CORPORA_NAMESPACE, ArrayRecordFiles, Document,
                                    HFDiskDataset, JsonlFiles, ParquetFiles, Skipped, TextFiles,
                                    corpus_dir, corpus_files)
from llamahome.errors import DataError

TEXTS = ["first document", "second one\nwith two lines", "third: ünïcödé ✓"]


def read_all(source) -> list:
    return [item for shard in source.shards() for item in source.read(shard)]


def texts(items) -> list[str]:
    return [d.text for d in items if isinstance(d, Document)]


@pytest.mark.parametrize("split,expected", [
    ("file", ["a b\nc\n\nd e\n"]),
    ("paragraph", ["a b\nc", "d e"]),
    ("line", ["a b", "c", "d e"]),
])
def test_text_files_split_modes(tmp_path, split, expected):
    (tmp_path / "x.txt").write_text("a b\nc\n\nd e\n")
    assert texts(read_all(TextFiles(paths=str(tmp_path / "*.txt"), split=split))) == expected


def test_text_files_glob_and_directory_are_sorted(tmp_path):
    (tmp_path / "sub").mkdir()
    for name, text in [("b.txt", "B"), ("a.txt", "A"), ("sub/c.txt", "C")]:
        (tmp_path / name).write_text(text)
    assert texts(read_all(TextFiles(paths=str(tmp_path)))) == ["A", "B", "C"]
    assert texts(read_all(TextFiles(paths=[str(tmp_path / "b.txt"), str(tmp_path / "a.txt")]))) == ["A", "B"]


def test_text_files_non_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"good\n\nalso good\nbad \xff\xfe here\n\nfine")
    with pytest.raises(DataError, match=rf"{path}:3: .*not UTF-8"):
        read_all(TextFiles(paths=str(path), split="paragraph"))
    items = read_all(TextFiles(paths=str(path), split="paragraph", on_error="skip"))
    assert texts(items) == ["good", "fine"]
    assert [s.where for s in items if isinstance(s, Skipped)] == [f"{path}:3"]


def test_no_matching_files_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no files match"):
        TextFiles(paths=str(tmp_path / "missing*.txt")).shards()


@pytest.mark.parametrize("suffix", ["", ".gz", ".zst"])
def test_jsonl_plain_and_compressed(tmp_path, suffix):
    data = "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(TEXTS)).encode()
    path = tmp_path / f"d.jsonl{suffix}"
    if suffix == ".gz":
        data = gzip.compress(data)
    elif suffix == ".zst":
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    assert texts(read_all(JsonlFiles(paths=str(path)))) == TEXTS


def test_jsonl_custom_field_and_messages(tmp_path):
    path = tmp_path / "d.jsonl"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    path.write_text(json.dumps({"body": "x", "messages": messages}) + "\n")
    assert texts(read_all(JsonlFiles(paths=str(path), text_field="body"))) == ["x"]
    (doc,) = read_all(JsonlFiles(paths=str(path), messages_field="messages"))
    assert doc.messages == tuple(messages)


def _bad_jsonl(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "ok"}\n'
                     b'{"text": "broken\n'
                     b'{"other": "no text field"}\n'
                     b'{"text": "bad bytes \xff"}\n'
                     b'{"text": 5}\n'
                     b'{"text": "ok again"}\n')
    return path




def test_jsonl_malformed_line_names_file_and_line(tmp_path):
    path = _bad_jsonl(tmp_path)
    with pytest.raises(DataError, match=rf"{path}:2: malformed JSON"):
        read_all(JsonlFiles(paths=str(path)))


def test_jsonl_missing_field_and_bad_bytes_name_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n{"other": 1}\n')
    with pytest.raises(DataError, match=rf"{path}:2: record has no field 'text'"):
        read_all(JsonlFiles(paths=str(path)))
    path.write_bytes(b'{"text": "a"}\n{"text": "a"}\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match=rf"{path}:3: .*not UTF-8"):
        read_all(JsonlFiles(paths=str(path)))


def test_jsonl_skip_counts_every_bad_record(tmp_path):
    path = _bad_jsonl(tmp_path)
    items = read_all(JsonlFiles(paths=str(path), on_error="skip"))
    assert texts(items) == ["ok", "ok again"]
    assert [s.where for s in items if isinstance(s, Skipped)] == [f"{path}:{i}" for i in (2, 3, 4, 5)]


def test_parquet(tmp_path):
    import pyarrow as pa  # noqa: PLC0415
    import pyarrow.parquet as pq  # noqa: PLC0415

    pq.write_table(pa.table({"text": TEXTS, "n": [1, 2, 3]}), tmp_path / "d.parquet", row_group_size=2)
    assert texts(read_all(ParquetFiles(paths=str(tmp_path / "*.parquet")))) == TEXTS
    with pytest.raises(DataError, match="no column 'body'"):
        read_all(ParquetFiles(paths=str(tmp_path / "d.parquet"), text_field="body"))


def test_array_record_text_and_json(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter  # noqa: PLC0415

    for name, records in [("t.array_record", [t.encode() for t in TEXTS]),
                          ("j.array_record", [json.dumps({"text": t}).encode() for t in TEXTS])]:
        writer = ArrayRecordWriter(str(tmp_path / name), "group_size:1")
        for r in records:
            writer.write(r)
        writer.close()
    assert texts(read_all(ArrayRecordFiles(paths=str(tmp_path / "t.array_record")))) == TEXTS
    assert texts(read_all(ArrayRecordFiles(paths=str(tmp_path / "j.array_record"),
                                           text_field="text"))) == TEXTS


def test_hf_dataset_saved_to_disk(tmp_path):
    import datasets  # noqa: PLC0415

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": TEXTS})}).save_to_disk(
        str(tmp_path / "ds"))
    source = HFDiskDataset(path=str(tmp_path / "ds"), split="train", rows_per_shard=2)
    assert source.shards() == ["0:2", "2:3"]
    assert texts(read_all(source)) == TEXTS
    with pytest.raises(DataError, match="bind split"):
        HFDiskDataset(path=str(tmp_path / "ds"), split="nope").shards()


def test_corpus_files_without_a_manager_use_the_gin_bound_cache(tmp_path):
    """The gin files bind no manager (a run dir of the previous version resumes unchanged): the
    corpus functions, gin references evaluated at the edge, build CacheManager() themselves."""
    corpus = CORPORA["shakespeare"]
    folder = tmp_path / "fetched"
    folder.mkdir()
    for name in ("a_gut.txt", *corpus.validation):
        (folder / name).write_text("text")
    gin_config.parse_config(gin_params=[f"CacheManager.root = '{tmp_path / 'cache'}'"])
    CacheManager().commit(CORPORA_NAMESPACE, "shakespeare", corpus.fingerprint, folder)
    assert [Path(f).name for f in corpus_files("shakespeare")] == ["a_gut.txt"]
    assert sorted(Path(f).name for f in corpus_files("shakespeare", "validation")) == sorted(
        corpus.validation)
    assert corpus_dir("shakespeare").parent == tmp_path / "cache" / CORPORA_NAMESPACE

"""The run-dir layout, atomic writes (private ones too), directory sizes with hard links counted
once, and the file-locked JSON index. The run-dir lock is tested in tests/unit/config/test_run_lock.py."""

from __future__ import annotations

import json
import multiprocessing
import os
import stat

import pytest

from llamahome import files
from llamahome.errors import UserError
from llamahome.files import RunDir


def test_run_dir_names_the_files_every_version_wrote(tmp_path):
    run = RunDir(tmp_path / "r")
    named = {p.relative_to(run.path).as_posix() for p in (
        run.lock, run.config, run.operative_config, run.metrics, run.status, run.cache_stats,
        run.checkpoints, run.tokenizer, run.tensorboard, run.profile, run.eval_results,
        run.generations, run.download)}
    assert named == {".lock", "config.gin", "operative_config.gin", "metrics.jsonl", "status.json",
                     "cache_stats.json", "checkpoints", "tokenizer", "tensorboard", "profile",
                     "eval_results.json", "generations.jsonl", "download.json"}
    assert RunDir.MARKERS == ("status.json", "metrics.jsonl", "config.gin")
    assert os.fspath(run) == str(tmp_path / "r")


def test_atomic_write_replaces_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "a.json"
    files.write_text_atomic(path, "old")
    files.write_text_atomic(path, "néw")
    assert path.read_text(encoding="utf-8") == "néw"
    files.write_bytes_atomic(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_a_private_write_is_user_only_even_over_a_wider_file(tmp_path):
    path = tmp_path / "secret.env"
    path.write_text("old")
    os.chmod(path, 0o644)
    files.write_text_atomic(path, "HF_TOKEN=x", mode=0o600)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == "HF_TOKEN=x"


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")
    with pytest.raises(TypeError):
        files.write_bytes_atomic(path, "not bytes")  # type: ignore[arg-type]
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_save_config_redacts_secrets(tmp_path):
    path = files.save_config(tmp_path / "run", RunDir.CONFIG_FILE, "HF_TOKEN = 'hf_abcdefghijklmnop'\n")
    assert path == RunDir(tmp_path / "run").config
    assert "hf_abcdefghijklmnop" not in path.read_text()


def test_dir_size_counts_each_hard_link_once_and_no_symlink(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a").write_bytes(b"x" * 100)
    (tmp_path / "d" / "sub" / "b").write_bytes(b"y" * 30)
    os.link(tmp_path / "d" / "a", tmp_path / "d" / "sub" / "a_again")  # same inode: counted once
    (tmp_path / "outside").write_bytes(b"z" * 1000)
    (tmp_path / "d" / "link").symlink_to(tmp_path / "outside")  # not followed
    assert files.dir_size(tmp_path / "d") == 130
    assert files.dir_size(tmp_path / "missing") == 0


def _add_one(path, lock, n):
    for _ in range(n):
        with files.locked_json(path, lock) as index:
            index["count"] = index.get("count", 0) + 1


def test_locked_json_updates_from_many_processes_are_never_lost(tmp_path):
    path, lock = tmp_path / "index.json", tmp_path / ".lock"
    procs = [multiprocessing.get_context("fork").Process(target=_add_one, args=(path, lock, 25))
             for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert json.loads(path.read_text()) == {"count": 75}


def test_locked_json_writes_nothing_when_the_block_fails(tmp_path):
    path, lock = tmp_path / "index.json", tmp_path / ".lock"
    with files.locked_json(path, lock) as index:
        index["a"] = 1
    with pytest.raises(RuntimeError), files.locked_json(path, lock) as index:
        index["a"] = 2
        raise RuntimeError
    assert json.loads(path.read_text()) == {"a": 1}
    path.write_text("{not json")
    with pytest.raises(UserError, match="index.json is not valid JSON"), files.locked_json(path, lock):
        pass

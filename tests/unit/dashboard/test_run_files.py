"""Reading run dirs: metrics paging from a byte offset, the tail reader, heartbeats, checkpoints."""

from __future__ import annotations

import json

import pytest

from llamahome.dashboard import run_files
from tests.unit.dashboard.fake_runs import CONFIG, loss_at, write_run


def _lines(records):
    return "".join(json.dumps(r) + "\n" for r in records)


def test_read_metrics_returns_every_record_written_and_the_file_size_as_next(tmp_path):
    records = write_run(tmp_path, "r", steps=25, eval_every=5)
    got = run_files.read_metrics(tmp_path / "r")
    assert got["records"] == records
    assert got["next"] == got["size"] == (tmp_path / "r" / "metrics.jsonl").stat().st_size
    assert not got["reset"]


def test_polling_from_next_returns_only_appended_lines_and_waits_for_a_half_written_one(tmp_path):
    write_run(tmp_path, "r", steps=3)
    run = tmp_path / "r"
    first = run_files.read_metrics(run)
    new = [{"step": 4, "split": "train", "loss": 1.5}, {"step": 4, "split": "eval", "loss": 1.75}]
    with (run / "metrics.jsonl").open("a") as f:
        f.write(_lines(new) + '{"step": 5, "split": "tr')  # the writer is mid-line
    second = run_files.read_metrics(run, first["next"])
    assert second["records"] == new
    assert second["next"] == second["size"] - len('{"step": 5, "split": "tr')
    with (run / "metrics.jsonl").open("a") as f:
        f.write('ain", "loss": 1.25}\n')
    third = run_files.read_metrics(run, second["next"])
    assert third["records"] == [{"step": 5, "split": "train", "loss": 1.25}]
    assert run_files.read_metrics(run, third["next"])["records"] == []


def test_an_offset_past_the_end_restarts_from_zero(tmp_path):
    records = write_run(tmp_path, "r", steps=4)
    got = run_files.read_metrics(tmp_path / "r", since=10**9)
    assert got["reset"] and got["records"] == records


def test_paging_with_a_small_byte_budget_yields_each_record_exactly_once(tmp_path):
    records = write_run(tmp_path, "r", steps=30, eval_every=7)
    seen, since = [], 0
    for _ in range(1000):  # bounded: 30 records need ~30 pages
        page = run_files.read_metrics(tmp_path / "r", since, max_bytes=400)
        seen += page["records"]
        since = page["next"]
        if since >= page["size"]:
            break
    assert seen == records


def test_nan_and_infinite_values_become_null_so_the_response_is_valid_json(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": NaN, "mfu": Infinity}\n')
    records = run_files.read_metrics(run)["records"]
    assert records == [{"step": 1, "split": "train", "loss": None, "mfu": None}]
    json.dumps(records, allow_nan=False)


@pytest.mark.parametrize("block", [7, 64, 1000])
def test_last_train_record_matches_a_full_parse_for_every_file_prefix(tmp_path, monkeypatch, block):
    monkeypatch.setattr(run_files, "_TAIL_BLOCK", block)
    text = _lines(write_run(tmp_path, "r", steps=12, eval_every=3))
    text += '{"step": 13, "split": "eval", "loss": 9.0}\n'
    path = tmp_path / "r" / "metrics.jsonl"
    for cut in range(0, len(text), 13):
        prefix = text[:cut]
        path.write_text(prefix)
        complete = [json.loads(line) for line in prefix.split("\n")[:-1]]
        expected = [r for r in complete if r["split"] == "train"]
        assert run_files.last_train_record(tmp_path / "r") == (expected[-1] if expected else None)


def test_a_running_heartbeat_older_than_the_threshold_is_stale():
    status = {"status": "running", "updated": 1000.0}
    assert run_files.effective_status(status, now=1050.0, stale_after_s=60) == "running"
    assert run_files.effective_status(status, now=1061.0, stale_after_s=60) == "stale"
    finished = {"status": "finished", "updated": 1000.0}
    assert run_files.effective_status(finished, now=10**6, stale_after_s=60) == "finished"
    assert run_files.effective_status(None, now=0, stale_after_s=60) == "unknown"


def test_run_summary_reports_the_last_train_loss_steps_model_and_status(tmp_path):
    records = write_run(tmp_path, "old", steps=20, eval_every=10, heartbeat_age_s=600, total_steps=50)
    assert records[-1]["split"] == "eval"  # the last line is an eval line: not the last train loss
    summary = run_files.run_summary(tmp_path / "old", stale_after_s=120)
    assert summary["status"] == "stale" and summary["reported_status"] == "running"
    assert summary["last_loss"] == records[-2]["loss"] == loss_at(20)
    assert (summary["step"], summary["total_steps"], summary["model"]) == (20, 50, "tiny")
    assert summary["tokens_per_sec"] == 4000.0 + 10 * 20


def test_model_name_falls_back_to_the_saved_gin_config(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.gin").write_text(CONFIG.format(total=10).replace("'tiny'", '"small"'))
    assert run_files.model_name(run, status=None) == "small"


def test_checkpoints_are_committed_integer_steps_with_their_sizes_on_disk(tmp_path):
    write_run(tmp_path, "r", checkpoints={100: 3001, 20: 517})
    (tmp_path / "r" / "checkpoints" / "140.orbax-checkpoint-tmp-3").mkdir()  # being written
    got = run_files.list_checkpoints(tmp_path / "r")
    assert [(c["step"], c["bytes"]) for c in got] == [(20, 517), (100, 3001)]


def test_list_runs_finds_run_dirs_newest_first_and_ignores_other_folders(tmp_path):
    write_run(tmp_path, "a", started=1000.0)
    write_run(tmp_path, "b", started=3000.0)
    write_run(tmp_path, "c", started=2000.0)
    (tmp_path / "not_a_run").mkdir()
    (tmp_path / "stray.txt").write_text("x")
    assert [r["name"] for r in run_files.list_runs(tmp_path, 120)] == ["b", "c", "a"]


@pytest.mark.parametrize("name", ["..", ".", "", "a/b", "missing", "not_a_run"])
def test_run_dir_of_rejects_names_that_are_not_runs_directly_under_runs_dir(tmp_path, name):
    (tmp_path / "not_a_run").mkdir()
    write_run(tmp_path / "a", "b")
    assert run_files.run_dir_of(tmp_path, name) is None

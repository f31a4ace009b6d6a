"""Faults around the run dir and secrets, in subprocesses: a second job on a busy run dir is
refused and the first runs on untouched; a lock left by a SIGKILLed holder is taken over; signed
URLs, userinfo and tokens never reach config.gin, operative_config.gin, logs or errors; a
malformed .env line is not echoed; and a run dir's config.gin re-runs its run. The reference for
the re-run is the first run's own losses."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llamahome import files
from tests.conftest import REPO, tiny_train_command, write_word_corpus

pytestmark = [pytest.mark.integration]

STEPS = 6
HF_TOKEN = "hf_FAKE0123456789abcdefSECRET"
SIGNED_URL = ("https://alice:pa55word@data.example.com/corpus.txt?X-Amz-Credential=AKIAFAKE%2F2026"
              "&X-Amz-Signature=5ca1ab1e0ddba11&sig=S1GSECRET&token=TOK3NSECRET&part=1")
SECRET_PARTS = ("alice", "pa55word", "AKIAFAKE", "5ca1ab1e0ddba11", "S1GSECRET", "TOK3NSECRET",
                HF_TOKEN)
ENV = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
       "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    write_word_corpus(root / "txt")
    return root


def train_command(workdir: Path, run_dir: Path, gin_file: str = "gin/train/tiny_cpu.gin",
                  *params: str) -> list[str]:
    return tiny_train_command(workdir, run_dir, f"train.steps={STEPS}", "train.eval_every=0",
                              *params, gin_file=gin_file)


def launch(args: list[str], cwd: Path = REPO, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, env={**ENV, **env}, cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def first_run(workdir):
    """A training with a wrapped tokenizer path, vocabulary-token bindings, a token and a signed
    URL in its config; while it holds the run dir (paused), a second training on it is started."""
    run_dir = workdir / "first"
    cmd = train_command(workdir, run_dir, "gin/train/tiny_cpu.gin",
                        "load_tokenizer.bos_token='<s>'", "load_tokenizer.eos_token='</s>'",
                        f"HF_TOKEN='{HF_TOKEN}'", f"MIRROR_URL='{SIGNED_URL}'")
    first = subprocess.Popen(cmd, env=ENV, cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    lock = run_dir / files.RunDir.LOCK_FILE
    deadline = time.time() + 240
    while not (lock.exists() and lock.read_text() and (run_dir / "config.gin").exists()):
        assert first.poll() is None, first.stderr.read()[-3000:]
        assert time.time() < deadline, "the first run never took the lock"
        time.sleep(0.05)
    first.send_signal(signal.SIGSTOP)  # holds the lock, whatever the second's start-up takes
    try:
        config_before = (run_dir / "config.gin").read_text()
        second = launch([*cmd, "--gin_param=train.seed=1"])  # a config.gin of its own
    finally:
        first.send_signal(signal.SIGCONT)
    _, first_stderr = first.communicate(timeout=300)
    assert first.returncode == 0, first_stderr[-3000:]
    return {"run_dir": run_dir, "pid": first.pid, "config_before": config_before,
            "second": second, "stderr": first_stderr}


def test_second_training_on_a_busy_run_dir_exits_2_naming_the_holder(first_run):
    second = first_run["second"]
    assert second.returncode == 2, second.stderr[-3000:]
    assert "Traceback" not in second.stderr
    (line,) = error_lines(second.stderr)
    assert f"run dir {first_run['run_dir']} is in use by pid {first_run['pid']} " \
           f"on host {socket.gethostname()}" in line
    assert "llamahome.launch" in line and "another launch.run_dir" in line


def test_the_first_training_is_unaffected(first_run):
    run_dir = first_run["run_dir"]
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["split"] == "train"]
    assert steps == list(range(1, STEPS + 1))  # each step once
    assert (run_dir / "config.gin").read_text() == first_run["config_before"]
    assert json.loads((run_dir / "status.json").read_text())["status"] == "finished"
    assert (run_dir / files.RunDir.LOCK_FILE).read_text() == ""  # released


def test_configs_and_logs_hold_no_token_or_url_credential(first_run):
    run_dir = first_run["run_dir"]
    texts = {name: (run_dir / name).read_text() for name in ("config.gin", "operative_config.gin")}
    texts["first run's log"] = first_run["stderr"]
    texts["second run's log"] = first_run["second"].stderr
    for name, text in texts.items():
        leaked = [part for part in SECRET_PARTS if part in text]
        assert not leaked, f"{name} holds {leaked}"
    config = texts["config.gin"]
    assert "HF_TOKEN = '<redacted>'" in config
    assert "data.example.com/corpus.txt?X-Amz-Credential=<redacted>" in config
    assert "load_tokenizer.bos_token = '<s>'" in config and "TOKENIZER = " in config


def test_config_gin_of_a_run_dir_reruns_the_run(workdir, first_run):
    """With a fresh run dir whose lock a SIGKILLed holder left behind, to be taken over."""
    config = first_run["run_dir"] / "config.gin"
    rerun_dir = workdir / "rerun"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from llamahome import files; files.acquire(Path(sys.argv[1])); print(flush=True); "
         "time.sleep(600)", str(rerun_dir)], env=ENV, cwd=REPO, stdout=subprocess.PIPE, text=True)
    holder.stdout.readline()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert json.loads((rerun_dir / files.RunDir.LOCK_FILE).read_text())["pid"] == holder.pid
    result = launch([sys.executable, "-m", "llamahome.launch", f"--gin_file={config}",
                     f"--gin_param=launch.run_dir='{rerun_dir}'"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"taking over the lock of pid {holder.pid} on host {socket.gethostname()}" in result.stderr
    assert "HF_TOKEN holds '<redacted>'" in result.stderr  # says a secret must be given again
    rerun, first = losses(rerun_dir), losses(first_run["run_dir"])
    assert sorted(rerun) == list(range(1, STEPS + 1))
    assert [rerun[s] for s in range(1, STEPS + 1)] == [first[s] for s in range(1, STEPS + 1)]


PROBE = """
import sys
from absl import logging
from llamahome import cli
from llamahome.errors import DataError
from llamahome.jobs import job

@job
def fetch_probe(run_dir, url='', fail=False):
    logging.info("fetching %s", url)
    if fail:
        raise DataError(f"cannot read {url}: 403")
    return url

cli.run()
"""


def test_signed_url_is_redacted_in_operative_config_log_lines_and_errors(tmp_path):
    common = ["-c", PROBE, "--gin_param=launch.job=@fetch_probe",
              f"--gin_param=fetch_probe.url='{SIGNED_URL}'"]
    ok = launch([sys.executable, *common, f"--gin_param=launch.run_dir='{tmp_path / 'ok'}'"],
                HF_TOKEN=HF_TOKEN)
    assert ok.returncode == 0, ok.stderr[-3000:]
    failed = launch([sys.executable, *common, "--gin_param=fetch_probe.fail=True",
                     f"--gin_param=launch.run_dir='{tmp_path / 'failed'}'"])
    assert failed.returncode == 2, failed.stderr[-3000:]
    redacted_url = "https://<redacted>@data.example.com/corpus.txt?X-Amz-Credential=<redacted>" \
                   "&X-Amz-Signature=<redacted>&sig=<redacted>&token=<redacted>&part=1"
    operative = (tmp_path / "ok" / "operative_config.gin").read_text()
    assert f"fetch_probe.url = \\\n    '{redacted_url}'" in operative \
        or f"fetch_probe.url = '{redacted_url}'" in operative
    assert f"fetching {redacted_url}" in ok.stderr
    assert error_lines(failed.stderr) == [f"error: cannot read {redacted_url}: 403"]
    for text in (operative, (tmp_path / "ok" / "config.gin").read_text(), ok.stderr, failed.stderr):
        assert not [part for part in SECRET_PARTS if part in text]


def test_malformed_dotenv_line_is_not_echoed(tmp_path):
    (tmp_path / ".env").write_text(f"LLAMAHOME_RUNS_DIR={tmp_path / 'runs'}\nHF_TOKEN {HF_TOKEN}\n")
    result = launch([sys.executable, "-m", "llamahome.launch", "--gin_file=gin/jobs/env_info.gin"],
                    cwd=tmp_path)
    assert result.returncode == 2
    assert error_lines(result.stderr) == [
        "error: .env:2: expected KEY=VALUE but the line has no '=' "
        "(line not shown: it may hold a secret)"]
    assert HF_TOKEN not in result.stderr and "hf_" not in result.stderr
    assert not (tmp_path / "runs").exists()

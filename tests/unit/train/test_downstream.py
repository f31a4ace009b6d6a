"""Downstream (lm-eval) evals inside training: logged at the configured steps, once each across
a resume, ranked as checkpoint metrics; bad settings stop the run before it trains."""

from __future__ import annotations

import json

import gin
import pytest

import llamahome.cli  # noqa: F401  (registers launch, which the train gin files bind)
from llamahome.config import gin_config
from llamahome.data.tokenizer import train_bpe_tokenizer
from llamahome.errors import ConfigError
from llamahome.files import RunDir
from llamahome.train.checkpoint import CheckpointConfig, Checkpointer
from llamahome.train.loop import train
from tests.conftest import tiny_train_params, write_word_corpus
from tests.unit.infer.lm_eval_fixtures import MC_TASK, write_tasks

BEST = f"downstream/{MC_TASK}/acc"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("downstream")
    corpus = write_word_corpus(root / "txt", paragraphs=120)
    tokenizer = train_bpe_tokenizer([(corpus / "corpus.txt").read_text()], root / "bpe",
                                    vocab_size=300)
    return root, corpus, tokenizer, write_tasks(root / "tasks")


def _params(setup, run_dir, steps: int, *extra: str) -> list[str]:
    root, corpus, tokenizer, tasks = setup
    return [*tiny_train_params(corpus, root / "cache", run_dir), f"TOKENIZER='{tokenizer}'",
            f"train.steps={steps}", "train.eval_every=0", "train.downstream_eval_every=2",
            f"train.downstream_tasks=['{MC_TASK}']", "train.downstream_limit=3",
            f"DownstreamConfig.include_path='{tasks}'", "DownstreamConfig.include_defaults=False",
            "CheckpointConfig.save_steps=2", "CheckpointConfig.async_save=False",
            f"CheckpointConfig.best_metric='{BEST}'", *extra]


def _train(params: list[str], run_dir) -> dict:
    gin.clear_config()
    gin_config.parse_config(["gin/train/tiny_cpu.gin"], gin_params=params)
    return train(run_dir=str(run_dir))


@pytest.mark.slow
def test_evals_at_every_nth_step_once_across_a_resume(setup, tmp_path):
    run_dir = tmp_path / "run"
    _train(_params(setup, run_dir, 3), run_dir)  # evals at 2; checkpoints at 2 and 3
    _train(_params(setup, run_dir, 6), run_dir)  # resumes at 3: evals at 4 and 6
    records = [json.loads(line) for line in RunDir(run_dir).metrics.read_text().splitlines()]
    downstream = [r for r in records if r["split"] == "downstream"]
    assert [r["step"] for r in downstream] == [2, 4, 6]
    assert all(0.0 <= r[f"{MC_TASK}/acc"] <= 1.0 and f"{MC_TASK}/acc_norm" in r for r in downstream)
    assert any(r["split"] == "train" and r["step"] == 6 for r in records)
    tags = "".join(p.read_bytes().decode("latin-1") for p in RunDir(run_dir).tensorboard.iterdir())
    assert f"downstream/{MC_TASK}/acc" in tags
    # Each eval is a checkpoint metric, and retention keeps the step of the best accuracy.
    ckpt = Checkpointer(RunDir(run_dir).checkpoints, CheckpointConfig(best_metric=BEST))
    accuracy = {r["step"]: r[f"{MC_TASK}/acc"] for r in downstream}
    best = ckpt.best_step()
    ckpt.close()
    assert accuracy[best] == max(accuracy.values())


def test_best_metric_must_name_a_task_that_runs(setup, tmp_path):
    params = _params(setup, tmp_path / "run", 2, "CheckpointConfig.best_metric='downstream/arc/acc'")
    with pytest.raises(ConfigError, match="names task 'arc'"):
        _train(params, tmp_path / "run")


def test_generative_tasks_are_refused_in_training(setup, tmp_path):
    params = _params(setup, tmp_path / "run", 2, "train.downstream_tasks=['tiny_gen']",
                     "CheckpointConfig.best_metric='eval_loss'")
    with pytest.raises(ConfigError, match="generate text"):
        _train(params, tmp_path / "run")

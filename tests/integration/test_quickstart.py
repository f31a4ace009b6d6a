"""The README's first command, end to end with fewer steps: corpus, tokenizer, train, eval, generate."""

from __future__ import annotations

import json
import math

import pytest

from llamahome.data import corpora
from llamahome.errors import ConfigError
from tests.conftest import run_python


def test_unknown_corpus_names_the_known_ones():
    with pytest.raises(ConfigError, match="unknown corpus 'shakespear'.*Did you mean 'shakespeare'"):
        corpora.corpus_files("shakespear")


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

    out = result.stdout
    assert f"run dir:      {run_dir}" in out and "tensorboard --logdir" in out
    assert "generate.checkpoint=" in out and "launch.run_dir=" in out

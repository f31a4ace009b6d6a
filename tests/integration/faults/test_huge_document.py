"""A huge document (a 50 MB text file with no newline) in a `train` job subprocess: the run's
peak RSS stays under a bound set by the settings, not by the document. Before windowed reads
and the record cap, this run passed 4 GB within a minute (OOM-killed at 21.9 GB on a 24 GB host):
the build tokenized the 50 MB string in one call, and Grain read ahead up to 500 copies of the
whole document. A fast word-level tokenizer (47-character words) keeps the build to seconds."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DOCUMENT_CHARS = 50_000_000
SEQ_LEN, WINDOW_ROWS, READ_PREFETCH = 32, 64, 500  # tiny_cpu.gin and data_pipeline's defaults
# The bound: python + JAX + the tiny model's compile (~0.8 GB measured), the build holding the
# file's bytes, its text and its tokens (a few x 50 MB), one tokenizer call on at most
# max_record_chars (1M) characters (~0.1 GB), and Grain reading ahead READ_PREFETCH windows of
# WINDOW_ROWS * SEQ_LEN tokens (int32 tokens + float32 mask: 8 MB), with room to spare.
BOUND_BYTES = int(2.5e9)


def write_word_tokenizer(directory: Path, words: list[str]) -> Path:
    """A tokenizer.json with one token per word (split at whitespace) and <s> </s> <pad>."""
    from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: PLC0415

    vocab = {token: i for i, token in enumerate(["<unk>", "<s>", "</s>", "<pad>", *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    directory.mkdir(parents=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}))
    return directory


def peak_rss_of(cmd: list[str], env: dict, kill_above: int) -> tuple[int, int, bool, str]:
    """Runs `cmd`; returns (exit code, peak RSS bytes, whether it was killed above the bound, stderr)."""
    with open(os.devnull, "wb") as devnull, subprocess.Popen(
            cmd, env=env, cwd=REPO, stdout=devnull, stderr=subprocess.PIPE) as proc:
        os.set_blocking(proc.stderr.fileno(), False)
        stderr, killed = b"", False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            stderr += proc.stderr.read() or b""
            if pid:
                break
            try:
                rss = int(next(line for line in open(f"/proc/{proc.pid}/status")
                               if line.startswith("VmRSS")).split()[1]) * 1024
            except (OSError, StopIteration):
                rss = 0
            if rss > kill_above and not killed:  # never let a regression take the host down
                proc.kill()
                killed = True
            time.sleep(0.02)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss * 1024, killed, stderr.decode(errors="replace")


def test_train_over_a_50mb_single_line_file_stays_within_the_memory_bound(tmp_path):
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghij"), 47)) for _ in range(16)]
    tokenizer = write_word_tokenizer(tmp_path / "tokenizer", words)
    text = " ".join(rng.choice(words, DOCUMENT_CHARS // 48 + 1))[:DOCUMENT_CHARS]
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "big.txt").write_text(text)  # one line, one paragraph: one document
    del text
    run_dir = tmp_path / "run"
    params = [f"DATA_DIR='{tmp_path / 'txt'}'", f"TOKENIZER='{tokenizer}'",
              f"CacheManager.root='{tmp_path / 'cache'}'", f"launch.run_dir='{run_dir}'",
              "train.progress_bar=False", "train.steps=2", "train.eval_every=0",
              "CheckpointConfig.save_steps=1000", "LlamaConfig.vocab_size=32",
              f"train.seq_len={SEQ_LEN}", f"data_pipeline.window_rows={WINDOW_ROWS}",
              f"data_pipeline.read_prefetch={READ_PREFETCH}",
              "data_pipeline.validation_fraction=0.0"]  # the one document must be in train
    cmd = [sys.executable, "-m", "llamahome.launch", "--gin_file=gin/train/tiny_cpu.gin",
           *[f"--gin_param={p}" for p in params]]
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}

    code, peak, killed, stderr = peak_rss_of(cmd, env, kill_above=BOUND_BYTES)

    assert not killed, f"peak RSS passed {BOUND_BYTES / 1e9:.1f} GB; killed\n{stderr[-3000:]}"
    assert code == 0, stderr[-3000:]
    assert peak < BOUND_BYTES, f"peak RSS {peak / 1e9:.2f} GB"
    assert f"{tmp_path / 'txt' / 'big.txt'}:1 ({DOCUMENT_CHARS} characters)" in stderr  # the warning
    assert json.loads((run_dir / "status.json").read_text())["status"] == "finished"

"""The train job sizes the model vocabulary to the tokenizer and keeps it when resuming."""

from __future__ import annotations

import json

import gin
import numpy as np
import pytest

import llamahome.cli  # noqa: F401  (registers launch, which the train gin files bind)
from llamahome.config import gin_config
from llamahome.data.tokenizer import load_tokenizer, train_bpe_tokenizer
from llamahome.errors import ConfigError
from llamahome.model.checkpoints import load_model
from llamahome.train.loop import train
from tests.conftest import sp_tokenizer_path, tiny_train_params, write_word_corpus


@pytest.mark.slow
def test_train_sizes_the_embedding_to_the_tokenizer_and_resume_keeps_it(tmp_path, eight_devices):
    """tiny_cpu.gin with a small BPE: 384 embedding rows, not the preset's; a resume keeps them."""
    corpus = write_word_corpus(tmp_path / "txt", paragraphs=120)
    tokenizer_dir = train_bpe_tokenizer([(corpus / "corpus.txt").read_text()], tmp_path / "bpe",
                                        vocab_size=300)
    size = load_tokenizer(str(tokenizer_dir)).vocab_size
    assert 256 < size <= 300
    run_dir = tmp_path / "run"
    params = [*tiny_train_params(corpus, tmp_path / "cache", run_dir), f"TOKENIZER='{tokenizer_dir}'",
              "train.steps=2", "train.eval_every=0", "CheckpointConfig.async_save=False"]

    gin_config.parse_config(["gin/train/tiny_cpu.gin"], gin_params=params)
    train(run_dir=str(run_dir))
    embed = _saved_embedding_shape(run_dir, 2)
    assert embed[0] == 384 and json.loads((run_dir / "tokenizer" / "spec.json").read_text())

    # Resumed with a preset that binds another size: the checkpoint's 384 rows are kept.
    gin.clear_config()
    gin_config.parse_config(["gin/train/tiny_cpu.gin"], gin_params=params[:-3] + [
        "train.steps=3", "train.eval_every=0", "CheckpointConfig.async_save=False",
        "LlamaConfig.vocab_size=1024"])
    train(run_dir=str(run_dir))
    assert _saved_embedding_shape(run_dir, 3)[0] == 384


def test_train_refuses_a_tokenizer_larger_than_the_models_vocabulary(tmp_path):
    corpus = write_word_corpus(tmp_path / "txt", paragraphs=40)
    gin_config.parse_config(["gin/train/tiny_cpu.gin"], gin_params=[
        *tiny_train_params(corpus, tmp_path / "cache", tmp_path / "run"), "LlamaConfig.vocab_size=4096"])
    assert str(sp_tokenizer_path())  # the 32k SentencePiece model of the tests
    with pytest.raises(ConfigError, match="the tokenizer has 32000 tokens but the model's vocabulary is 4096"):
        train(run_dir=str(tmp_path / "run"))


def _saved_embedding_shape(run_dir, step) -> tuple[int, ...]:
    """The embedding shape of the checkpoint at `step`, read with the config saved with it."""
    return tuple(np.shape(load_model(run_dir, step=step).params["embedding"]))

"""The model vocabulary follows the tokenizer; the run dir keeps the tokenizer it trained with."""

from __future__ import annotations

import json

import gin
import numpy as np
import pytest

from llamahome.config import gin_config
from llamahome.data.tokenizer import load_tokenizer, tokenizer_from_spec, train_bpe_tokenizer
from llamahome.errors import ConfigError
from llamahome.infer.checkpoints import load_model
from llamahome.model.config import LlamaConfig
from llamahome.train import run_tokenizer
from llamahome.train.job import train
from tests.conftest import sp_tokenizer_path, tiny_train_params, write_word_corpus


def test_unset_vocab_is_the_tokenizer_size_rounded_up_and_recorded():
    config = run_tokenizer.fit_vocab(LlamaConfig(vocab_size=None), 4000)
    assert config.vocab_size == 4096
    assert gin.query_parameter("LlamaConfig.vocab_size") == 4096  # checkpoints record it
    assert run_tokenizer.fit_vocab(LlamaConfig(vocab_size=None), 4096).vocab_size == 4096
    assert run_tokenizer.fit_vocab(LlamaConfig(vocab_size=None), 130).vocab_size == 256


def test_a_bound_vocab_is_kept_and_a_larger_tokenizer_refused():
    assert run_tokenizer.fit_vocab(LlamaConfig(vocab_size=32000), 31000).vocab_size == 32000
    with pytest.raises(ConfigError, match=r"the tokenizer has 4096 tokens but the model's "
                                          r"vocabulary is 256 \(bound\).*vocab_size=None"):
        run_tokenizer.fit_vocab(LlamaConfig(vocab_size=256), 4096)


def test_a_resumed_run_keeps_its_checkpoints_vocab():
    saved = "LlamaConfig.vocab_size = 32000\nLlamaConfig.hidden_size = 64\n"
    vocab = run_tokenizer.checkpoint_vocab(saved)
    assert vocab == 32000
    assert run_tokenizer.fit_vocab(LlamaConfig(vocab_size=None), 4096, vocab).vocab_size == 32000
    with pytest.raises(ConfigError, match=r"vocabulary is 32000 \(the checkpoint's\)"):
        run_tokenizer.fit_vocab(LlamaConfig(vocab_size=None), 50000, vocab)


def test_the_run_dir_copy_loads_the_same_tokenizer(tmp_path):
    folder = train_bpe_tokenizer(["to be or not to be that is the question"] * 50,
                                 tmp_path / "cache-entry", vocab_size=300)
    original = load_tokenizer(str(folder), pad_token="<pad>")
    run_tokenizer.save_run_tokenizer(tmp_path / "run", original)
    (folder / "tokenizer.json").unlink()  # the cache entry is gone: the run still has its copy
    spec = run_tokenizer.run_tokenizer(tmp_path / "run")
    assert spec.pad_token == "<pad>"
    copy = tokenizer_from_spec(spec)
    text = "to be, or not to be"
    assert (copy.vocab_size, copy.encode(text), copy.pad_id) == (
        original.vocab_size, original.encode(text), original.pad_id)
    assert run_tokenizer.run_tokenizer(tmp_path / "elsewhere") is None


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

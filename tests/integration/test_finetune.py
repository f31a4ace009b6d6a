"""Fine-tuning starts from a registered Hugging Face model (`train.init_from='model:base'`):
the run is recorded as a user of that version, and with a zero learning rate the checkpoint
holds exactly the Hugging Face weights (logits equal transformers' within 1e-4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from llamahome.hub import download
from llamahome.hub.registry import Registry
from llamahome.model.checkpoints import load_model
from llamahome.model.llama import Llama
from tests.conftest import run_python, tiny_train_params, write_word_corpus

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def tiny_hf_llama() -> transformers.LlamaForCausalLM:
    """The architecture of gin/train/tiny_cpu.gin (tiny preset with the 32k vocab)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config).eval()


def test_train_init_from_a_registered_hf_model(tmp_path):
    hf_model = tiny_hf_llama()
    hf_model.save_pretrained(tmp_path / "hf")
    models_dir = tmp_path / "models"
    download.install(str(tmp_path / "hf"), name="base", registry=Registry(models_dir), progress=False)
    write_word_corpus(tmp_path / "txt")

    run_dir = tmp_path / "run"
    result = run_python(
        ["-m", "llamahome.launch", "--gin_file=gin/train/tiny_cpu.gin",
         *[f"--gin_param={p}" for p in (
             *tiny_train_params(tmp_path / "txt", tmp_path / "cache", run_dir),
             "train.init_from='model:base'", "train.steps=1", "train.learning_rate=0.0",
             "train.eval_every=0")]],
        env={"XLA_FLAGS": "", "LLAMAHOME_MODELS_DIR": str(models_dir)}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "starting from the weights of model:base" in result.stderr
    assert "from scratch" not in result.stderr

    assert list(Registry(models_dir).get("base").runs) == [str(run_dir)]
    loaded = load_model(run_dir)
    tokens = np.random.default_rng(1).integers(0, 32000, (2, 48))
    ours = np.asarray(Llama(loaded.config).apply({"params": loaded.params}, tokens))
    with torch.no_grad():
        theirs = hf_model(torch.tensor(tokens)).logits.numpy()
    assert np.abs(ours - theirs).max() <= 1e-4

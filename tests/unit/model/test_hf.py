"""HF interop: logit parity with transformers' LlamaForCausalLM, export round trip, bad dirs."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from llamahome.errors import CheckpointError
from llamahome.model import hf
from llamahome.model.llama import Llama
from tests.unit.model.hf_reference import LLAMA3_ROPE, hf_logits, random_hf_llama

CASES = {  # (num_kv_heads, tied, rope_scaling): GQA 4:1 and 1:1, tied and untied, llama3 RoPE
    "gqa4_untied_default": (2, False, None),
    "mha_tied_llama3": (8, True, LLAMA3_ROPE),
    "gqa4_tied_llama3": (2, True, LLAMA3_ROPE),
}
SEQ_LEN = 160


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, 128, (2, SEQ_LEN)).astype(np.int32)


@pytest.mark.parametrize("case", sorted(CASES))
def test_import_matches_hf_logits_and_export_reloads(case, tokens, tmp_path):
    model = random_hf_llama(*CASES[case])
    model.save_pretrained(tmp_path / "hf")
    expected = hf_logits(model, tokens)

    config, params = hf.load_hf_checkpoint(tmp_path / "hf")
    assert config.tie_embeddings == CASES[case][1]
    assert sum(np.size(x) for x in jax.tree.leaves(params)) == config.num_params() \
        == sum(p.numel() for p in model.parameters())
    logits = np.asarray(Llama(config).apply({"params": params}, tokens))
    assert np.abs(logits - expected).max() <= 1e-4

    hf.save_hf_checkpoint(tmp_path / "exported", config, params)
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "exported").eval()
    assert np.abs(hf_logits(reloaded, tokens) - expected).max() <= 1e-5


def test_sharded_checkpoints_read_and_write(tokens, tmp_path):
    model = random_hf_llama(2, False, None, seed=1)
    model.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    expected = hf_logits(model, tokens[:, :16])
    config, params = hf.load_hf_checkpoint(tmp_path / "hf")
    hf.save_hf_checkpoint(tmp_path / "out", config, params, max_shard_bytes=100_000)
    assert len(list((tmp_path / "out").glob("model-*-of-*.safetensors"))) > 1
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert np.abs(hf_logits(reloaded, tokens[:, :16]) - expected).max() <= 1e-5


@pytest.fixture
def hf_dir(tmp_path):
    random_hf_llama(2, False, None).save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def _rewrite_tensors(hf_dir, edit):
    tensors = load_file(hf_dir / "model.safetensors")
    edit(tensors)
    save_file(tensors, hf_dir / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_named(hf_dir):
    _rewrite_tensors(hf_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*missing"):
        hf.load_hf_checkpoint(hf_dir)


def test_wrong_shape_is_named(hf_dir):
    def shrink(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:8]
    _rewrite_tensors(hf_dir, shrink)
    with pytest.raises(CheckpointError, match=r"k_proj\.weight.*shape \(8, 64\), expected \(16, 64\)"):
        hf.load_hf_checkpoint(hf_dir)


def test_unknown_rope_type_is_named(hf_dir):
    config = json.loads((hf_dir / "config.json").read_text())
    config.pop("rope_scaling", None)
    config["rope_parameters"] = {"rope_type": "mystery", "rope_theta": 10000.0, "factor": 2.0}
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"rope_parameters.*rope_type 'mystery'"):
        hf.load_hf_checkpoint(hf_dir)


def test_missing_config_key_is_named(hf_dir):
    config = json.loads((hf_dir / "config.json").read_text())
    del config["num_hidden_layers"]
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="num_hidden_layers"):
        hf.load_hf_checkpoint(hf_dir)


def test_pickle_weights_are_refused_unless_allowed(hf_dir, tokens):
    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir).eval()
    torch.save(model.state_dict(), hf_dir / "pytorch_model.bin")
    (hf_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="pickle.*allow_pickle=True"):
        hf.load_hf_checkpoint(hf_dir)
    config, params = hf.load_hf_checkpoint(hf_dir, allow_pickle=True)
    logits = np.asarray(Llama(config).apply({"params": params}, tokens[:, :16]))
    assert np.abs(logits - hf_logits(model, tokens[:, :16])).max() <= 1e-4


def test_no_config_json_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        hf.load_hf_checkpoint(tmp_path)

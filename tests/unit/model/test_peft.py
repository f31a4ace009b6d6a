"""PEFT LoRA adapters in and out: logits equal `peft`'s own, bad adapters refused in one line."""

from __future__ import annotations

import json

import numpy as np
import peft
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from llamahome.errors import CheckpointError
from llamahome.model import hf, lora
from llamahome.model import peft as lh_peft
from llamahome.model.llama import Llama
from tests.unit.model.hf_reference import hf_logits, random_hf_llama

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def make_peft(tmp_path, name="adapter", seed=0, **options):
    """(base dir, adapter dir, PEFT logits on TOKENS) of a tiny HF Llama with non-zero B."""
    base = random_hf_llama(2, False, None, seed=seed)
    base.save_pretrained(tmp_path / "base")
    config = peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ALL,
                                "init_lora_weights": False, **options})
    torch.manual_seed(seed + 1)
    model = peft.get_peft_model(base, config).eval()
    model.save_pretrained(tmp_path / name)
    return tmp_path / "base", tmp_path / name, hf_logits(model, TOKENS)


TOKENS = np.random.default_rng(0).integers(0, 128, (2, 24)).astype(np.int32)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return make_peft(tmp_path_factory.mktemp("peft"))


def merged_logits(base_dir, adapter_dir):
    config, params = hf.load_hf_checkpoint(base_dir)
    lc, adapters = lh_peft.load_peft_adapter(adapter_dir, config)
    return lc, np.asarray(Llama(config).apply({"params": lora.merge(params, adapters, lc)}, TOKENS))


def test_import_matches_peft_logits(adapter):
    base_dir, adapter_dir, expected = adapter
    lc, logits = merged_logits(base_dir, adapter_dir)
    assert lc.targets == tuple(ALL) and (lc.rank, lc.alpha) == (4, 8.0)
    assert np.abs(logits - expected).max() <= 1e-4
    base_logits = hf_logits(transformers.LlamaForCausalLM.from_pretrained(base_dir), TOKENS)
    assert np.abs(base_logits - expected).max() > 1e-2  # the adapter matters


def test_rslora_and_some_layers_import(tmp_path):
    base_dir, adapter_dir, expected = make_peft(
        tmp_path, seed=3, use_rslora=True, target_modules=["q_proj", "o_proj"],
        layers_to_transform=[1])
    lc, logits = merged_logits(base_dir, adapter_dir)
    assert lc.rslora and lc.targets == ("q_proj", "o_proj")
    assert np.abs(logits - expected).max() <= 1e-4


def test_export_loads_in_peft(adapter, tmp_path):
    base_dir, adapter_dir, expected = adapter
    config, _ = hf.load_hf_checkpoint(base_dir)
    lc, adapters = lh_peft.load_peft_adapter(adapter_dir, config)
    lh_peft.save_peft_adapter(tmp_path / "out", config, adapters, lc, base_name="tiny")
    saved = json.loads((tmp_path / "out" / lh_peft.CONFIG_FILE).read_text())
    assert saved["base_model_name_or_path"] == "tiny" and saved["r"] == 4
    base = transformers.LlamaForCausalLM.from_pretrained(base_dir)
    model = peft.PeftModel.from_pretrained(base, tmp_path / "out").eval()
    assert np.abs(hf_logits(model, TOKENS) - expected).max() <= 1e-5


def _edit_config(adapter_dir, tmp_path, **changes):
    out = tmp_path / "edited"
    out.mkdir()
    data = json.loads((adapter_dir / lh_peft.CONFIG_FILE).read_text())
    (out / lh_peft.CONFIG_FILE).write_text(json.dumps({**data, **changes}))
    (out / lh_peft.WEIGHTS_FILE).write_bytes((adapter_dir / lh_peft.WEIGHTS_FILE).read_bytes())
    return out


@pytest.mark.parametrize("changes, match", [
    ({"use_dora": True}, "DoRA"), ({"bias": "all"}, "bias='all'"),
    ({"modules_to_save": ["embed_tokens"]}, "modules_to_save"),
    ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"), ({"peft_type": "IA3"}, "IA3"),
])
def test_unsupported_features_are_refused(adapter, tmp_path, changes, match):
    config, _ = hf.load_hf_checkpoint(adapter[0])
    with pytest.raises(CheckpointError, match=match):
        lh_peft.load_peft_adapter(_edit_config(adapter[1], tmp_path, **changes), config)


def test_other_architecture_and_unknown_modules_are_refused(adapter, tmp_path):
    base_dir, adapter_dir, _ = adapter
    config, _ = hf.load_hf_checkpoint(base_dir)
    wider = config.replace(hidden_size=96, head_dim=12)
    with pytest.raises(CheckpointError, match="different architecture"):
        lh_peft.load_peft_adapter(adapter_dir, wider)
    with pytest.raises(CheckpointError, match="layer this base does not have.*different arch"):
        lh_peft.load_peft_adapter(adapter_dir, config.replace(num_layers=1))
    edited = _edit_config(adapter_dir, tmp_path)
    tensors = load_file(edited / lh_peft.WEIGHTS_FILE)
    tensors["base_model.model.model.embed_tokens.lora_embedding_A"] = np.zeros((4, 128), np.float32)
    save_file(tensors, edited / lh_peft.WEIGHTS_FILE)
    with pytest.raises(CheckpointError, match="embed_tokens.*not a LoRA A/B matrix"):
        lh_peft.load_peft_adapter(edited, config)

"""The LoRA SFT recipe end to end: gin/train/lora_sft.gin trains adapters on an HF base (chat
JSONL + plain text mixture); the run exported as a PEFT adapter gives the same logits in
`peft`, merged in `transformers`; generate and evaluate on base + adapter (unmerged) equal the
merged model's."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import peft
import pytest
import torch
import transformers

from llamahome.infer.evaluate import evaluate_params
from llamahome.infer.generate import generate
from llamahome.model import lora
from llamahome.model.checkpoints import load_model
from llamahome.model.hf_jobs import export_hf
from llamahome.model.llama import Llama, param_logical_axes
from llamahome.parallel.mesh import axis_rules, build_mesh, logical_shardings
from tests.conftest import run_python, sp_tokenizer_path
from tests.integration.test_finetune import tiny_hf_llama

pytestmark = [pytest.mark.integration, pytest.mark.slow]
WORDS = "the king queen lord shall thou art be not to and of my good night sweet prince".split()
TARGETS = "('q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj', 'lm_head')"


def write_data(root):
    rng = np.random.default_rng(0)
    (root / "chat").mkdir()
    (root / "text").mkdir()
    lines = [json.dumps({"messages": [
        {"role": "user", "content": " ".join(rng.choice(WORDS, 6))},
        {"role": "assistant", "content": " ".join(rng.choice(WORDS, 8))}]}) for _ in range(200)]
    (root / "chat" / "a.jsonl").write_text("\n".join(lines) + "\n")
    (root / "text" / "t.txt").write_text("\n\n".join(" ".join(rng.choice(WORDS, 20))
                                                     for _ in range(100)))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 3-step LoRA SFT run of the recipe on a tiny HF Llama (the tokenizer beside it)."""
    root = tmp_path_factory.mktemp("sft")
    tiny_hf_llama().save_pretrained(root / "base")
    shutil.copy(sp_tokenizer_path(), root / "base" / "tokenizer.model")
    write_data(root)
    params = [f"BASE='{root / 'base'}'", f"CHAT_DATA=['{root / 'chat'}/*.jsonl']",
              f"TEXT_DATA=['{root / 'text'}']", "LlamaConfig.vocab_size=32000",
              "train.steps=3", "train.seq_len=64", "train.batch_size=4", "train.eval_every=0",
              "train.learning_rate=0.01", f"CacheManager.root='{root / 'cache'}'",
              f"launch.run_dir='{root / 'run'}'", "train.progress_bar=False",
              f"LoraConfig.targets={TARGETS}"]
    result = run_python(["-m", "llamahome.launch", "--gin_file=gin/train/lora_sft.gin",
                         "--gin_file=gin/models/tiny.gin", *(f"--gin_param={p}" for p in params)],
                        env={"XLA_FLAGS": ""}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return root


TOKENS = np.random.default_rng(1).integers(0, 32000, (2, 20))


def torch_logits(model):
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.numpy()


def test_trained_adapter_exports_to_peft_and_merged(run):
    model = load_model(run / "run")
    assert model.kind == "train" and model.lora.targets[-1] == "lm_head"
    ours = np.asarray(Llama(model.config, model.lora).apply(
        {"params": model.params, "lora": model.adapters}, TOKENS))
    base = transformers.LlamaForCausalLM.from_pretrained(run / "base")
    assert np.abs(torch_logits(base) - ours).max() > 1e-2  # the adapters were trained
    out = export_hf(str(run / "x"), checkpoint=str(run / "run"), output_dir=str(run / "peft"))
    peft_model = peft.PeftModel.from_pretrained(base, out).eval()
    assert np.abs(torch_logits(peft_model) - ours).max() <= 1e-4
    merged = export_hf(str(run / "x"), checkpoint=str(run / "run"),
                       output_dir=str(run / "merged"), merged=True)
    plain = transformers.LlamaForCausalLM.from_pretrained(merged)
    assert np.abs(torch_logits(plain) - ours).max() <= 1e-4


def test_generate_and_evaluate_unmerged_equal_merged(run):
    model = load_model(run / "run")
    merged = lora.merge(model.params, model.adapters, model.lora)
    prompts = [[1, 306, 1023, 290], [1, 77, 5]]
    on_base = generate(model.params, model.config, prompts, max_new_tokens=8, keep_logits=True,
                       lora=model.lora, adapters=model.adapters)
    folded = generate(merged, model.config, prompts, max_new_tokens=8, keep_logits=True)
    assert on_base.tokens == folded.tokens
    assert np.abs(on_base.logits - folded.logits).max() <= 1e-4

    rng = np.random.default_rng(2)
    batch = {"inputs": rng.integers(0, 32000, (8, 16)), "targets": rng.integers(0, 32000, (8, 16)),
             "positions": np.tile(np.arange(16), (8, 1)), "segment_ids": np.ones((8, 16)),
             "loss_mask": np.ones((8, 16))}
    mesh, rules = build_mesh(), axis_rules()
    model = load_model(run / "run", mesh=mesh, rules=rules)  # laid out as the evaluate job does
    unmerged = evaluate_params(model.params, model.config, [batch], mesh=mesh, rules=rules,
                               lora=model.lora, adapters=model.adapters)
    shardings = logical_shardings(param_logical_axes(model.config), mesh, rules)
    folded = evaluate_params(jax.device_put(merged, shardings), model.config, [batch],
                             mesh=mesh, rules=rules)
    assert abs(unmerged.loss - folded.loss) <= 1e-5

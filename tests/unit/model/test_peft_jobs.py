"""PEFT adapters through the jobs: import_peft onto a registered base, load_model (base +
adapters, unmerged), export_hf as PEFT and merged, the registry's adapter versions."""

from __future__ import annotations

import dataclasses
import json

import gin
import numpy as np
import peft
import pytest
import transformers

from llamahome.errors import CheckpointError, UserError
from llamahome.hub import download
from llamahome.hub.jobs import models
from llamahome.hub.registry import Registry, model_files, resolve_model_path
from llamahome.model import lora
from llamahome.model.checkpoints import load_model
from llamahome.model.hf_jobs import export_hf, import_peft
from llamahome.model.llama import Llama
from tests.conftest import assert_refused_in_one_line, launch_job
from tests.unit.model.hf_reference import hf_logits, random_hf_llama
from tests.unit.model.test_peft import TOKENS, make_peft


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A registered HF base `base@1` and a PEFT adapter imported onto it as `ad@1`."""
    root = tmp_path_factory.mktemp("jobs")
    base_dir, adapter_dir, expected = make_peft(root)
    gin.bind_parameter("models_dir.path", str(root / "models"))
    download.install(str(base_dir), name="base", progress=False)
    out = import_peft(str(root / "run"), adapter_dir=str(adapter_dir), base="model:base",
                      register_as="ad")
    return root, base_dir, expected, out


@pytest.fixture(autouse=True)
def registry_root(setup):
    gin.bind_parameter("models_dir.path", str(setup[0] / "models"))  # conftest clears gin


def ours(model):
    variables = {"params": model.params, "lora": model.adapters}
    return np.asarray(Llama(model.config, model.lora).apply(variables, TOKENS))


def test_imported_adapter_gives_peft_logits_unmerged(setup):
    root, _, expected, out = setup
    model = load_model(resolve_model_path("model:ad@1", str(root / "run")))
    assert model.kind == "adapter" and model.lora.rank == 4
    assert model.adapter_meta.base_ref == "model:base"
    assert np.abs(ours(model) - expected).max() <= 1e-4
    assert json.loads((root / "models" / "ad" / "v1" / "adapter.json").read_text())["base"][
        "digest"].startswith("sha256:")


def test_registry_lists_adapter_with_its_base_as_parent(setup):
    root = setup[0]
    assert model_files("model:ad@1") == str(root / "models" / "ad" / "v1")  # lora_sft.gin's
    assert model_files("/some/dir") == "/some/dir"
    listed = {v["ref"]: v for v in models(None, action="list")}
    assert listed["ad@1"]["parent"] == "base@1" and listed["ad@1"]["adapter"]
    assert listed["base@1"]["parent"] is None and not listed["base@1"]["adapter"]
    with pytest.raises(UserError, match="base of adapter.*ad@1"):
        Registry(root / "models").remove("base@1")


def test_export_as_peft_and_merged(setup):
    root, base_dir, expected, _ = setup
    out = export_hf(str(root / "run"), checkpoint="model:ad", output_dir=str(root / "peft_out"))
    base = transformers.LlamaForCausalLM.from_pretrained(base_dir)
    model = peft.PeftModel.from_pretrained(base, out).eval()
    assert np.abs(hf_logits(model, TOKENS) - expected).max() <= 1e-4
    assert load_model(out).kind == "adapter"  # the export is itself a checkpoint
    merged = export_hf(str(root / "run"), checkpoint="model:ad", output_dir=str(root / "merged"),
                       merged=True)
    plain = transformers.LlamaForCausalLM.from_pretrained(merged)
    assert np.abs(hf_logits(plain, TOKENS) - expected).max() <= 1e-4


def test_adapter_on_changed_base_is_refused(setup, tmp_path):
    root = setup[0]
    meta = lora.read_meta(setup[3])
    edited = tmp_path / "edited"
    edited.mkdir()
    source = root / "models" / "ad" / "v1"
    for f in source.iterdir():
        (edited / f.name).write_bytes(f.read_bytes())
    lora.write_meta(edited, dataclasses.replace(meta, base_digest="sha256:0"))
    with pytest.raises(CheckpointError, match="digest"):
        load_model(edited)


def test_adapter_for_another_architecture_exits_2_with_one_line(setup, tmp_path):
    """Through launch: an adapter made for 2 kv heads, loaded onto a base with 8."""
    root = setup[0]
    random_hf_llama(num_kv_heads=8).save_pretrained(tmp_path / "other")
    result = launch_job("gin/jobs/import_peft.gin", f"import_peft.adapter_dir='{root / 'adapter'}'",
                        f"import_peft.base='{tmp_path / 'other'}'",
                        f"launch.run_dir='{tmp_path / 'run'}'",
                        f"import_peft.output_dir='{tmp_path / 'out'}'")
    assert_refused_in_one_line(result, "different architecture")
    assert not (tmp_path / "out").exists()

"""Params-only Orbax checkpoints and the import_hf / export_hf jobs run through launch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from llamahome.errors import CheckpointError
from llamahome.hub.registry import Registry
from llamahome.model.llama import LlamaConfig, init_params
from llamahome.model.params_io import load_params, save_params
from tests.unit.model.hf_reference import LLAMA3_ROPE, hf_logits, random_hf_llama

CONFIG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                     num_heads=4, num_kv_heads=2)


def test_save_load_round_trip_with_sharding_and_cast(tmp_path):
    params = init_params(CONFIG, jax.random.key(0))
    save_params(tmp_path / "params", params)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("x",))
    shardings = jax.tree.map(lambda _: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
                             params)
    shardings["embedding"] = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
    loaded = load_params(tmp_path / "params", CONFIG, shardings)
    jax.tree.map(np.testing.assert_array_equal, loaded, params)
    assert loaded["embedding"].sharding == shardings["embedding"]
    as_bf16 = load_params(tmp_path / "params", CONFIG.replace(param_dtype="bfloat16"))
    assert as_bf16["lm_head"].dtype == jnp.bfloat16
    with pytest.raises(CheckpointError, match="already exists"):
        save_params(tmp_path / "params", params)


def test_mismatched_config_names_the_parameter(tmp_path):
    save_params(tmp_path / "params", init_params(CONFIG, jax.random.key(0)))
    with pytest.raises(CheckpointError, match=r"'layers/mlp/down_proj'.*\(2, 48, 32\).*\(2, 40, 32\)"):
        load_params(tmp_path / "params", CONFIG.replace(intermediate_size=40))
    with pytest.raises(CheckpointError, match="has no parameter 'lm_head'"):
        tied = tmp_path / "tied"
        save_params(tied, init_params(CONFIG.replace(tie_embeddings=True), jax.random.key(0)))
        load_params(tied, CONFIG)
    with pytest.raises(CheckpointError, match="does not have: lm_head"):
        load_params(tmp_path / "params", CONFIG.replace(tie_embeddings=True))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_params(tmp_path / "nowhere", CONFIG)


@pytest.mark.slow
def test_import_then_export_jobs_round_trip_through_launch(tmp_path, python_runner):
    model = random_hf_llama(num_kv_heads=2, tied=True, rope_scaling=LLAMA3_ROPE, seed=5)
    model.save_pretrained(tmp_path / "hf")
    out = tmp_path / "imported"
    python_runner(["-m", "llamahome.launch", "--gin_file=gin/jobs/import_hf.gin",
                   f"--gin_param=import_hf.hf_dir='{tmp_path / 'hf'}'",
                   f"--gin_param=import_hf.output_dir='{out}'",
                   f"--gin_param=launch.run_dir='{tmp_path / 'run1'}'"], check=True)
    assert "LlamaConfig.tie_embeddings = True" in (out / "model.gin").read_text()
    models_dir = tmp_path / "models"
    python_runner(["-m", "llamahome.launch", "--gin_file=gin/jobs/models.gin",
                   "--gin_param=models.action='register'", f"--gin_param=models.path='{tmp_path / 'hf'}'",
                   "--gin_param=models.name='base'", f"--gin_param=launch.run_dir='{tmp_path / 'run0'}'"],
                  env={"LLAMAHOME_MODELS_DIR": str(models_dir)}, check=True)
    python_runner(["-m", "llamahome.launch", "--gin_file=gin/jobs/export_hf.gin",
                   f"--gin_param=export_hf.checkpoint='{out / 'params'}'",
                   f"--gin_param=export_hf.output_dir='{tmp_path / 'exported'}'",
                   "--gin_param=export_hf.register_as='base'", "--gin_param=export_hf.parent='base@1'",
                   f"--gin_param=launch.run_dir='{tmp_path / 'run2'}'"],
                  env={"LLAMAHOME_MODELS_DIR": str(models_dir)}, check=True)
    registered = Registry(models_dir).get("base@2")
    assert registered.parent == "base@1" and "model.safetensors" in registered.files
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "exported").eval()
    tokens = np.random.default_rng(0).integers(0, 128, (2, 40))
    assert np.abs(hf_logits(reloaded, tokens) - hf_logits(model, tokens)).max() <= 1e-5

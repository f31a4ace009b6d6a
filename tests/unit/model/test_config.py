"""LlamaConfig and the gin presets: parameter counts against the published figures."""

from __future__ import annotations

import gin
import jax
import pytest

from llamahome.config.gin_config import REPO_GIN_DIR
from llamahome.errors import ConfigError
from llamahome.model.config import LlamaConfig
from llamahome.model.llama import param_shapes

PUBLISHED = {  # from the model cards / HF safetensors metadata
    "llama2_7b": 6_738_415_616, "llama2_13b": 13_015_864_320, "llama2_70b": 68_976_648_192,
    "llama3_1_8b": 8_030_261_248, "llama3_1_70b": 70_553_706_496,
    "llama3_1_405b": 405_853_388_800, "llama3_2_1b": 1_235_814_400,
    "llama3_2_3b": 3_212_749_824, "tinyllama_1_1b": 1_100_048_384,
    "smollm2_135m": 134_515_008, "smollm2_360m": 361_821_120,
}


def _preset(name: str) -> LlamaConfig:
    gin.parse_config_file(str(REPO_GIN_DIR / "models" / f"{name}.gin"))
    return LlamaConfig()


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_param_count_matches_published(name):
    config = _preset(name)
    assert config.name == name
    shapes = param_shapes(config)  # jax.eval_shape: no memory
    assert sum(x.size for x in jax.tree.leaves(shapes)) == PUBLISHED[name]
    assert config.num_params() == PUBLISHED[name]


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_test_presets_parse(name):
    config = _preset(name)
    assert config.name == name and config.num_params() < 50_000_000


def test_flops_per_token_llama2_7b():
    config = _preset("llama2_7b")
    # Matmul weights: all parameters but the embedding table and the 65 RMSNorm scales.
    matmul = PUBLISHED["llama2_7b"] - 32000 * 4096 - 65 * 4096
    assert config.flops_per_token(4096) == 6 * matmul + 12 * 32 * 4096 * 4096


def test_config_is_hashable_and_validated():
    scaled = LlamaConfig(rope_scaling={"rope_type": "llama3", "factor": 8.0})
    assert hash(scaled) == hash(LlamaConfig(rope_scaling={"factor": 8.0, "rope_type": "llama3"}))
    with pytest.raises(ConfigError, match="num_kv_heads"):
        LlamaConfig(num_heads=4, num_kv_heads=3)
    with pytest.raises(ConfigError, match="dtype 'float64'"):
        LlamaConfig(dtype="float64")

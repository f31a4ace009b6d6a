"""The fit search's candidate space and the gin lines it prints (no compiling here; the
search itself runs in tests/integration/test_plan.py)."""

from __future__ import annotations

import gin

from llamahome.model.llama import LlamaConfig
from llamahome.parallel.mesh import axis_rules, build_mesh
from llamahome.train.plan import Candidate, accum_splits, tensor_splits
from llamahome.train.loop import train


def test_tensor_splits_divide_kv_heads_and_the_slice():
    config = LlamaConfig(hidden_size=64, num_heads=8, num_kv_heads=4)
    assert tensor_splits(config, 16) == [1, 2, 4]
    assert tensor_splits(config, 2) == [1, 2]
    assert tensor_splits(LlamaConfig(num_heads=4, num_kv_heads=1), 8) == [1]


def test_accum_splits_keep_microbatches_whole_on_every_shard():
    assert accum_splits(32, 4, 8) == [1, 2, 4, 8]
    assert accum_splits(32, 8, 8) == [1, 2, 4]  # 32/8 = 4 rows cannot split over 8 shards
    assert accum_splits(12, 2, 8) == [1, 2]
    assert accum_splits(4, 8, 8) == []


def test_candidate_gin_lines_parse_as_the_training_settings():
    lines = Candidate("save_dots", 4, 2).gin_lines()
    assert lines == ["LlamaConfig.remat_policy = 'save_dots'",
                     "train.gradient_accumulation_steps = 4", "build_mesh.data = 1",
                     "build_mesh.fsdp = -1", "build_mesh.tensor = 2",
                     "axis_rules.preset = 'fsdp_tensor'"]
    assert Candidate("none", 1, 1).preset == "fsdp"
    gin.parse_config(lines)  # what a user pastes binds the configurables a train run reads
    assert LlamaConfig().remat_policy == "save_dots"
    assert gin.get_bindings(train)["gradient_accumulation_steps"] == 4
    assert gin.get_bindings(build_mesh) == {"data": 1, "fsdp": -1, "tensor": 2}
    assert axis_rules() == axis_rules("fsdp_tensor")

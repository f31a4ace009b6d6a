"""Golden sharding tables: for a small matrix of model preset x parallel preset, the sharding of
every parameter and optimizer-state leaf (llamahome/plan/shardings.py) must equal the JSON in
tests/unit/plan/goldens/. A change to the axis rules, the mesh presets or the model's logical
axes shows up here as a diff to review. After reviewing it, regenerate the goldens with

    LLAMAHOME_REGENERATE_GOLDENS=1 python -m pytest -q tests/unit/plan/test_golden_shardings.py

and commit the changed files with the change that caused them.

The tables are computed on an AbstractMesh of the preset's sizes for the chip count (no
devices, no libtpu): the plan job computes the same table on a topology's devices.
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path

import gin
import pytest
from jax.sharding import AbstractMesh

from llamahome.config.gin_config import parse_config
from llamahome.model.llama import LlamaConfig
from llamahome.parallel.mesh import MESH_AXES, axis_rules, resolve_axis_sizes
from llamahome.train.plan import TrainSettings, state_layout
from llamahome.train.optim import build_optimizer

GOLDENS = Path(__file__).parent / "goldens"
REGENERATE = os.environ.get("LLAMAHOME_REGENERATE_GOLDENS") == "1"
# (model preset, parallel preset, chips)
MATRIX = [("tiny", "data_parallel", 4), ("tiny", "fsdp", 4), ("tiny", "fsdp_tensor", 4),
          ("llama3_1_8b", "fsdp", 4), ("llama3_1_8b", "fsdp_tensor", 8),
          ("llama3_1_70b", "fsdp_tensor", 32)]


def golden_table(model: str, parallel: str, chips: int) -> dict:
    """The sharding table of `model` under `parallel` on `chips` devices, as the plan job builds it."""
    gin.clear_config()
    parse_config([f"models/{model}.gin", f"train/parallel/{parallel}.gin"])
    bound = gin.get_bindings("build_mesh")
    sizes = resolve_axis_sizes(tuple(bound.get(a, d) for a, d in zip(MESH_AXES, (1, -1, 1))), chips)
    mesh = AbstractMesh(sizes, MESH_AXES)
    rules = axis_rules()
    layout = state_layout(LlamaConfig(), TrainSettings(), mesh, rules, build_optimizer)
    return {"model": model, "parallel": parallel, "chips": chips,
            "mesh": dict(zip(MESH_AXES, sizes)), "rules": [list(r) for r in rules],
            **layout.table()}


def _dump(table: dict) -> str:
    """JSON with one line per leaf, so that a diff names the leaves that changed."""
    parts = []
    for key, value in sorted(table.items()):
        if isinstance(value, dict) and key in ("params", "opt_state", "by_logical_axis"):
            rows = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v, sort_keys=True)}"
                              for k, v in sorted(value.items()))
            parts.append(f" {json.dumps(key)}: {{\n{rows}\n }}")
        else:
            parts.append(f" {json.dumps(key)}: {json.dumps(value, sort_keys=True)}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


@pytest.mark.parametrize("model, parallel, chips", MATRIX)
def test_sharding_table_matches_golden(model, parallel, chips):
    path = GOLDENS / f"{model}__{parallel}__{chips}.json"
    table = golden_table(model, parallel, chips)
    actual = _dump(table)
    assert json.loads(actual) == json.loads(json.dumps(table))  # the file is plain JSON
    if REGENERATE:
        path.write_text(actual)
    assert path.exists(), f"no golden {path}; regenerate (see the module doc)"
    expected = path.read_text()
    if actual != expected:
        diff = "".join(difflib.unified_diff(expected.splitlines(True), actual.splitlines(True),
                                            f"golden {path.name}", "now", n=2))
        pytest.fail(f"the sharding table of {model} x {parallel} on {chips} chips changed; review "
                    f"the diff and regenerate the goldens (module doc) if it is intended:\n{diff}")


def test_goldens_shard_as_the_presets_say():
    """Independent of the goldens: what each preset promises, checked on the tables themselves."""
    dp = golden_table("tiny", "data_parallel", 4)
    assert all(set(r["mesh"]) == {None} for r in dp["params"].values())  # replicated
    fsdp = golden_table("llama3_1_8b", "fsdp", 4)
    q = fsdp["params"]["layers/attention/q_proj"]
    assert q["shape"] == [32, 4096, 32, 128] and q["mesh"] == [None, "fsdp", None, None]
    # 4-way FSDP: each device holds a quarter of the f32 weight.
    assert q["bytes_per_device"] == 32 * 4096 * 32 * 128 * 4 // 4
    # Adam's moments follow their parameter; the step count is replicated.
    mu = [r for p, r in fsdp["opt_state"].items() if p.endswith("mu/layers/attention/q_proj")]
    assert len(mu) == 1 and mu[0]["mesh"] == q["mesh"] and mu[0]["logical"] == q["logical"]
    tp = golden_table("llama3_1_8b", "fsdp_tensor", 8)
    assert tp["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2}
    assert tp["params"]["layers/mlp/up_proj"]["mesh"] == [None, "fsdp", "tensor"]
    assert tp["by_logical_axis"]["heads"]["mesh"] == ["tensor"]

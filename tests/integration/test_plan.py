"""The `plan` job end to end: the tiny model's train and decode steps compiled for a 4-chip
TPU v5p topology on this CPU host (libtpu), its plan.json checked against independent
figures; two slices; the fit search; and the bad inputs that must stop it with one line.

Skipped, with the reason printed, only when libtpu cannot be imported (pip install -e '.[tpu]').
"""

from __future__ import annotations

import dataclasses
import json
import sys

import gin
import pytest

from llamahome.cli import import_configurables
from llamahome.config.gin_config import parse_config
from llamahome.errors import ConfigError
from llamahome.model.llama import LlamaConfig
from llamahome.parallel.mesh import PRESETS, build_mesh
from llamahome.plan import jobs as plan_jobs
from llamahome.plan import topology as topology_lib
from llamahome.plan.topology import GiB, compile_devices, libtpu_problem, parse_topology
from llamahome.train.optim import build_optimizer
from llamahome.train.plan import TrainSettings, plan_train_step, search
from tests.conftest import REPO, run_python

pytestmark = pytest.mark.integration
if libtpu_problem():
    print(f"tests/integration/test_plan.py skipped: {libtpu_problem()}", file=sys.stderr)
    pytestmark = [pytestmark, pytest.mark.skip(reason=libtpu_problem())]

GOLDENS = REPO / "tests" / "unit" / "plan" / "goldens"
TINY = ["models/tiny.gin", "train/parallel/fsdp.gin", "jobs/plan.gin"]
TINY_PARAMS = ["LlamaConfig.dtype='bfloat16'", "train.batch_size=8", "train.seq_len=64"]


def tiny_flops_per_token(seq_len: int) -> float:
    """6 x matmul weights + 12 x layers x heads x head_dim x seq (PaLM), by hand for tiny:
    hidden 64, mlp 176, 2 layers, 4 heads (2 KV) of 16, vocab 256, untied head."""
    attention = 64 * 16 * (2 * 4 + 2 * 2)  # q, o: 4 heads; k, v: 2 heads
    matmul = 2 * (attention + 3 * 64 * 176) + 256 * 64
    return 6.0 * matmul + 12 * 2 * 4 * 16 * seq_len


def test_plan_job_tiny_on_v5p_8(tmp_path):
    run_dir = tmp_path / "run"
    result = run_python(["-m", "llamahome.launch", *[f"--gin_file=gin/{f}" for f in TINY],
                         *[f"--gin_param={p}" for p in TINY_PARAMS],
                         "--gin_param=plan.topology='v5p-8'", f"--gin_param=launch.run_dir='{run_dir}'"],
                        env={"LLAMAHOME_MALLOC": "system"}, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "train step: fits" in result.stdout and "embed      -> fsdp" in result.stdout
    plan = json.loads((run_dir / "plan.json").read_text())

    assert plan["topology"] == {"name": "v5p-8", "chip": "v5p", "grid": "2x2x1", "slices": 1,
                                "chips": 4, "hbm_bytes_per_chip": 95 * GiB,
                                "peak_bf16_flops_per_chip": 459e12}
    assert plan["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    step = plan["train_step"]
    memory = step["memory"]
    assert memory["total_bytes"] == (memory["argument_bytes"] + memory["output_bytes"]
                                     - memory["alias_bytes"] + memory["temp_bytes"])
    assert memory["fits"] and memory["hbm_bytes"] == 95 * GiB
    # The arguments are one device's shard of the state (the table's bytes) plus its rows of
    # the batch: 5 arrays of [8 / 4, 64] 4-byte values; the donated state is aliased.
    table = step["shardings"]
    state = sum(r["bytes_per_device"] for part in ("params", "opt_state") for r in table[part].values())
    # (at least: TPU layouts pad small minor dimensions to whole (8, 128) tiles).
    assert memory["argument_bytes"] >= state + 5 * 2 * 64 * 4
    assert state <= memory["alias_bytes"] < memory["argument_bytes"]
    # FLOPs: the step's matmuls counted on its jaxpr are exactly the model's 6N + attention
    # per token (no remat: nothing recomputed), computed by hand; XLA's own count of the
    # compiled program, over 4 devices, adds the elementwise work (norms, softmax, AdamW).
    model_flops = tiny_flops_per_token(64) * 8 * 64
    flops = step["flops"]
    assert flops["model_per_step"] == pytest.approx(model_flops)
    assert flops["per_step"] == pytest.approx(model_flops) and flops["while_loops_counted_once"] == 0
    assert 1.0 <= flops["xla_flops_per_device"] * 4 / model_flops < 1.5
    predicted = step["predicted"]
    assert predicted["step_time_s"] == pytest.approx(model_flops / 4 / (459e12 * 0.5))
    assert predicted["model_mfu"] == pytest.approx(0.5)
    assert step["compile_s"] > 0
    # The sharding table on the topology's devices equals the golden on an abstract mesh.
    golden = json.loads((GOLDENS / "tiny__fsdp__4.json").read_text())
    assert table["params"] == golden["params"] and table["opt_state"] == golden["opt_state"]

    decode = plan["decode_step"]
    assert decode["batch"] == 4 and decode["max_len"] == 64 and decode["memory"]["fits"]
    # One token per slot: 2 FLOPs per matmul weight, plus attention over the cache.
    assert decode["flops"]["per_step"] >= decode["flops"]["model_per_step"] == pytest.approx(
        2 * (tiny_flops_per_token(0) / 6) * 4)
    assert decode["predicted"]["roofline_s"] > 0 and decode["compile_s"] > 0


def _bind(*params: str, gin_files: tuple[str, ...] = tuple(TINY)) -> None:
    """Binds gin as `python -m llamahome.launch` does (every configurable registered first)."""
    import_configurables()
    gin.clear_config()
    parse_config(gin_files, gin_params=[*TINY_PARAMS, *params] if gin_files == tuple(TINY) else params)


def test_two_slices_split_data_across_them_and_a_plan_that_does_not_fit(tmp_path, monkeypatch):
    devices = compile_devices(parse_topology("2xv5p-8"))
    mesh = build_mesh(devices=devices)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    for i in range(2):  # each data row of the mesh is one slice: only `data` crosses the DCN
        assert {d.slice_index for d in mesh.devices[i].flat} == {i}
    # Compiled for the 2 slices, on a v5p whose HBM is 1 MiB: the step does not fit; the plan is
    # written, then the job stops with one line.
    small = dataclasses.replace(topology_lib.CHIPS["v5p"], hbm_bytes=1 << 20)
    monkeypatch.setitem(topology_lib.CHIPS, "v5p", small)
    _bind("plan.topology='2xv5p-8'", "plan.decode=False", "plan.show_shardings=False")
    with pytest.raises(ConfigError) as error:
        plan_jobs.plan(run_dir=str(tmp_path))
    assert _first(error.value).startswith(
        "the train step does not fit on 2xv5p-8: ") and "set plan.search=True" in str(error.value)
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1} and plan["topology"]["slices"] == 2
    memory = plan["train_step"]["memory"]
    assert not memory["fits"] and memory["total_bytes"] > memory["hbm_bytes"] == 1 << 20


def test_search_finds_the_fastest_that_fits():
    topology = parse_topology("v5p-8")
    devices = compile_devices(topology)
    # 4 scanned layers at 256 positions: activations outweigh the weights, so remat matters.
    config = LlamaConfig(dtype="bfloat16", num_layers=4, scan_layers=True, max_seq_len=256)
    settings = TrainSettings(batch_size=8, seq_len=256)
    full = plan_train_step(config.replace(remat_policy="full"), settings, build_mesh(devices=devices),
                           PRESETS["fsdp"], build_optimizer, topology.chip, 0.5)
    # A chip whose HBM holds exactly the step with full remat:
    small = dataclasses.replace(topology, chip=dataclasses.replace(
        topology.chip, hbm_bytes=full["memory"]["total_bytes"]))
    found = search(config, settings, small, devices, build_optimizer, 0.5,
                   remat_policies=("none", "full"), max_accum=1, tensor_sizes=(1,))
    none_row, full_row = found["tried"]
    assert (none_row["remat_policy"], none_row["fits"]) == ("none", False)
    assert none_row["total_bytes"] > small.chip.hbm_bytes  # keeping every activation overflows
    assert (full_row["remat_policy"], full_row["fits"]) == ("full", True)
    # Recomputing costs FLOPs: the slower setting is chosen only because it is the one that fits.
    assert full_row["step_time_s"] > none_row["step_time_s"]
    assert found["choice"] == full_row and found["compiles"] == 2
    assert found["gin"][:2] == ["LlamaConfig.remat_policy = 'full'",
                                "train.gradient_accumulation_steps = 1"]
    # A chip smaller than the parameters alone: every split is skipped uncompiled; no choice.
    tiny_chip = dataclasses.replace(topology, chip=dataclasses.replace(topology.chip, hbm_bytes=1))
    nothing = search(config, settings, tiny_chip, devices, build_optimizer, 0.5)
    assert nothing["choice"] is None and nothing["compiles"] == 0


def test_unknown_topology_exits_2_with_one_line(tmp_path):
    result = run_python(["-m", "llamahome.launch", *[f"--gin_file=gin/{f}" for f in TINY],
                         "--gin_param=plan.topology='v7x-8'", f"--gin_param=launch.run_dir='{tmp_path}'"],
                        env={"LLAMAHOME_MALLOC": "system"}, timeout=300)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert errors == result.stderr.strip().splitlines()[-1:] == [
        "error: plan.topology='v7x-8': unknown TPU generation 'v7x'. Known: v4, v5p, v5e, v6e"]


def _first(error: Exception) -> str:
    """The message launch prints: without the "In call to configurable" lines gin appends."""
    return str(error).split("\n  In call to configurable")[0]


def test_mesh_that_does_not_multiply_to_the_chips(tmp_path):
    _bind("plan.topology='v5p-8'", "build_mesh.fsdp=8")
    with pytest.raises(ConfigError) as error:
        plan_jobs.plan(run_dir=str(tmp_path))
    message = _first(error.value)
    assert message.startswith("plan.topology='v5p-8' has 4 chips") and "use 8 devices" in message
    assert "\n" not in message


def test_a_model_that_cannot_fit_at_any_setting(tmp_path):
    _bind("plan.topology='v5p-8'", gin_files=("models/llama3_1_405b.gin", "jobs/plan.gin"))
    with pytest.raises(ConfigError) as error:
        plan_jobs.plan(run_dir=str(tmp_path))
    message = _first(error.value)
    assert message.startswith("model 'llama3_1_405b' cannot fit on v5p-8 at any setting")
    assert "\n" not in message and not (tmp_path / "plan.json").exists()

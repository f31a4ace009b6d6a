"""Each benchmark script runs on tiny settings and prints its JSON line with the documented
figures (finite, positive). No timing is asserted: figures live in benchmarks/README.md."""

from __future__ import annotations

import json
import math

import pytest

from tests.conftest import run_python

pytestmark = [pytest.mark.performance, pytest.mark.slow]

# benchmarks/checkpoint.py runs in tests/unit/train/test_checkpoint_object_store.py, with --dir
# on the S3 emulator (its line has the local-disk figures too).
CASES = {
    "peak": (["benchmarks/peak.py", "--sizes", "256", "--repeats", "2"], ["measured_f32_flops", "measured_bf16_flops"]),
    "train_step": (["benchmarks/train_step.py", "--config", "d256x4", "--dtype", "float32",
                    "--seq", "64", "--batch", "2", "--steps", "1", "--warmup", "1"],
                   ["tokens_per_sec", "mfu", "step_time_s"]),
    "data_pipeline": (["benchmarks/data_pipeline.py", "--mb", "0.5", "--workers", "1",
                       "--read_seconds", "0.5"],
                      ["cache_build_tokens_per_sec", "pipeline_read_tokens_per_sec"]),
    "compare_torch": (["benchmarks/compare_torch.py", "--config", "d256x4", "--seq", "64",
                       "--batch", "2", "--rounds", "1", "--warmup", "1"], ["ratio"]),
    "generate": (["benchmarks/generate.py", "--model", "gin/models/tiny.gin", "--prompt_len", "8",
                  "--new_tokens", "4", "--batches", "1", "--repeats", "1"], []),
    "lora": (["benchmarks/lora.py", "--quick"], ["tokens_per_sec", "trainable_state_bytes",
                                                 "trainable_state_ratio", "step_bytes"]),
    "serve": (["benchmarks/serve.py", "--quick"], ["transformers_tokens_per_sec"]),
    "plan": (["benchmarks/plan.py", "--quick"], ["bytes_per_device", "flops_per_step", "compile_s"]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_benchmark_prints_its_json_line(name):
    args, keys = CASES[name]
    result = run_python(args, env={"XLA_FLAGS": ""}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines, result.stdout[-2000:]
    for key in keys:
        values = [line[key] for line in lines if key in line]
        assert values, f"{name}: no {key!r} in {lines}"
        assert all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values)


@pytest.mark.parametrize("old,new", [("small", "d256x4"), ("medium", "d512x8")])
def test_old_benchmark_config_name_fails_naming_the_new_one(old, new):
    """The configs were renamed (issue 16): gin/models/small.gin is a different shape."""
    result = run_python(["benchmarks/train_step.py", "--config", old], env={"XLA_FLAGS": ""},
                        timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"config {old!r} was renamed {new!r}" in result.stderr.splitlines()[-1]

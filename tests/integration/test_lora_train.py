"""The train job with LoRA (gin/train/lora.gin) end to end: on an int8-quantized frozen base, the
checkpoints hold only the adapters and record the base's digest; a SIGKILL + restart gives
bit-identical losses; a resume on other base weights and bad LoRA settings exit 2 in one line."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import jax
import numpy as np
import pytest

from llamahome.model import lora as lora_lib
from llamahome.model import params_io
from llamahome.model.checkpoints import load_params_for
from llamahome.model.llama import LlamaConfig, architecture_gin, init_params
from tests.conftest import REPO, tiny_train_command, write_word_corpus
from tests.integration.test_train_job import (
    sigkill_at_step_then_rerun,
    steps_on_disk,
    train_losses,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BASE_CONFIG = LlamaConfig(vocab_size=32000)  # gin/train/tiny_cpu.gin's model with its tokenizer
ENV = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
       "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}


def write_base(folder: Path, seed: int) -> Path:
    """An import_hf-style base: params/ + model.gin."""
    params_io.save_params(folder / "params", init_params(BASE_CONFIG, jax.random.key(seed)))
    (folder / "model.gin").write_text(architecture_gin(BASE_CONFIG))
    return folder


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_train")
    write_word_corpus(root / "txt")
    write_base(root / "base", seed=0)
    write_base(root / "other_base", seed=1)
    return root


def command(workdir: Path, run_dir: Path, *params: str) -> list[str]:
    cmd = tiny_train_command(workdir, run_dir, "train.steps=12", f"train.init_from='{workdir / 'base'}'",
                             "train.base_quant='int8'", "train.learning_rate=1e-2", *params)
    return cmd[:3] + ["--gin_file=gin/train/lora.gin"] + cmd[3:]


def run(cmd: list[str], expect: int = 0) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == expect, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def straight(workdir):
    run_dir = workdir / "straight"
    result = run(command(workdir, run_dir))
    assert "LoRA: 37376 trainable params" in result.stderr  # rank 16 on 7 projections x 2 layers
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, 13)) and losses[12] < losses[1]
    return run_dir, losses


def test_steps_hold_the_adapters_and_the_base_digest(workdir, straight):
    run_dir, _ = straight
    step_dir = run_dir / "checkpoints" / "12"
    manifest = json.loads((step_dir / "llamahome_manifest.json").read_text())["files"]
    assert lora_lib.META_FILE in manifest
    meta = lora_lib.read_meta(step_dir)
    base = load_params_for(workdir / "base", BASE_CONFIG, None)
    assert meta.base_digest == lora_lib.params_digest(base) and meta.base_quant == "int8"
    assert meta.lora.rank == 16 and meta.base_ref == str(workdir / "base")
    # The state's arrays are the adapters and their AdamW moments: no base weight anywhere.
    stored = [p.name for p in (step_dir / "state").rglob("*") if p.is_dir()]
    assert not any(name in {"embedding", "q_proj", "lm_head"} for name in stored), stored
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(r["split"] == "eval" and np.isfinite(r["loss"]) for r in records)


def test_sigkill_then_restart_gives_bit_identical_losses(workdir, straight):
    run_dir = workdir / "killed"
    resumed = sigkill_at_step_then_rerun(command(workdir, run_dir), run_dir, 10, run)
    reference = straight[1]
    assert [resumed[s] for s in (11, 12)] == [reference[s] for s in (11, 12)]  # bit for bit


def test_resume_on_another_base_is_refused_in_one_line(workdir, straight):
    run_dir = workdir / "moved_base"
    shutil.copytree(straight[0], run_dir)
    result = run(command(workdir, run_dir, f"train.init_from='{workdir / 'other_base'}'",
                         "train.resume_with_changed_config=True"), expect=2)
    last = result.stderr.strip().splitlines()[-1]
    assert "the adapter was trained on base" in last and "but the base given has digest" in last
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("param,expected", [
    ("LoraConfig.targets=('q_proj', 'v_prj')", "'v_prj' matches no projection"),
    ("LoraConfig.rank=0", "LoraConfig.rank=0: expected an integer >= 1"),
    ("LoraConfig.rank=100", "LoraConfig.rank=100 is larger than q_proj (64 x 64)"),
])
def test_bad_lora_settings_exit_2_in_one_line(workdir, param, expected):
    result = run(command(workdir, workdir / "bad", param), expect=2)
    lines = result.stderr.strip().splitlines()
    assert expected in lines[-1] and "Traceback" not in result.stderr
    assert not steps_on_disk(workdir / "bad")

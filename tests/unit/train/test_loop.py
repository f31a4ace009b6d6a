"""The train job's gin surface: the TOML [training] keys and the argument checks."""

from pathlib import Path

import pytest

from llamahome.config import gin_config
from llamahome.config.gin_config import toml_to_bindings
from llamahome.errors import UserError
from llamahome.parallel.mesh import axis_rules, batch_sharding, build_mesh
from llamahome.train import loop, step as step_lib


def test_toml_training_section_binds_the_train_job(tmp_path: Path):
    toml = tmp_path / "run.toml"
    toml.write_text("[training]\nbatch_size = 16\nlearning_rate = 1e-4\ngradient_accumulation_steps = 2\n"
                    "[checkpoint]\nsave_steps = 50\nkeep_last_n = 5\n")
    gin_config.parse_config(toml_bindings=toml_to_bindings(toml))
    import gin

    assert gin.query_parameter("train.batch_size") == 16
    assert gin.query_parameter("train.gradient_accumulation_steps") == 2
    assert loop.CheckpointConfig().keep_last_n == 5


def test_microbatches_must_split_over_the_batch_devices(eight_devices):
    sharding = batch_sharding(build_mesh(devices=eight_devices), axis_rules("fsdp"))
    step_lib.check_batch_divisible(32, 4, sharding)
    with pytest.raises(UserError, match="microbatches of 2 rows"):
        step_lib.check_batch_divisible(16, 8, sharding)


def test_bad_nan_policy_is_a_config_error():
    with pytest.raises(UserError, match="nan_policy"):
        loop.train(run_dir="unused", nan_policy="ignore")


def test_loss_chunk_length_must_divide_seq_len():
    with pytest.raises(UserError, match="loss_chunk_length=48 does not divide train.seq_len=128"):
        loop.train(run_dir="unused", seq_len=128, loss_chunk_length=48)

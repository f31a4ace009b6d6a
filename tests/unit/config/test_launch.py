"""The launch command: precedence of gin files, TOML, environment and --gin_param; run dirs; errors."""

from __future__ import annotations

import os
from pathlib import Path

import gin
import pytest

from llamahome import cli, files, secrets
from llamahome.config import gin_config
from llamahome.config.gin_config import (env_bindings, load_dotenv, parse_byte_size, parse_dotenv,
                                         toml_to_bindings)
from llamahome.errors import ConfigError
from llamahome.jobs import JOBS, job
from llamahome.parallel import distributed
from tests.conftest import run_python


@gin.configurable
def probe(steps: int = 1, name: str = "default", batch_size: int = 1,
          learning_rate: float = 0.0, gradient_accumulation_steps: int = 1) -> dict:
    return dict(steps=steps, name=name, batch_size=batch_size, learning_rate=learning_rate,
                gradient_accumulation_steps=gradient_accumulation_steps)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_later_gin_file_and_gin_param_override_earlier(tmp_path):
    a = _write(tmp_path / "a.gin", "probe.steps = 1\nprobe.name = 'a'\n")
    b = _write(tmp_path / "b.gin", "probe.steps = 2\n")
    gin_config.parse_config([str(a), str(b)], gin_params=["probe.name = 'cli'"])
    assert probe()["steps"] == 2 and probe()["name"] == "cli"


def test_precedence_gin_file_lt_toml_lt_env_lt_gin_param(tmp_path):
    gin_file = _write(tmp_path / "a.gin", "probe.steps = 1\nprobe.name = 'file'\n"
                      "probe.batch_size = 1\nprobe.learning_rate = 0.1\n")
    toml = _write(tmp_path / "s.toml", "[probe]\nname = 'toml'\nbatch_size = 2\nlearning_rate = 0.2\n")
    env = {"LLAMAHOME_GIN_PARAMS": "probe.batch_size = 3; probe.learning_rate = 0.3"}
    gin_config.parse_config([str(gin_file)], toml_to_bindings(toml), env_bindings(env),
                            ["probe.learning_rate = 0.4"])
    got = probe()
    assert (got["steps"], got["name"], got["batch_size"], got["learning_rate"]) == (1, "toml", 3, 0.4)


def test_dotenv_does_not_override_the_process_environment(tmp_path, monkeypatch):
    dotenv = _write(tmp_path / ".env", "# comment\nexport LLAMAHOME_RUNS_DIR='/from/dotenv'\n"
                    "LLAMAHOME_CACHE_DIR=/cache/dotenv  # trailing comment\nHF_TOKEN=\"hf_abc123456\"\n")
    assert parse_dotenv(dotenv) == {"LLAMAHOME_RUNS_DIR": "/from/dotenv",
                                   "LLAMAHOME_CACHE_DIR": "/cache/dotenv",
                                   "HF_TOKEN": "hf_abc123456"}
    monkeypatch.setenv("LLAMAHOME_RUNS_DIR", "/from/process")
    monkeypatch.delenv("LLAMAHOME_CACHE_DIR", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    loaded = load_dotenv(dotenv)
    assert "LLAMAHOME_RUNS_DIR" not in loaded
    assert os.environ["LLAMAHOME_RUNS_DIR"] == "/from/process"
    assert os.environ["LLAMAHOME_CACHE_DIR"] == "/cache/dotenv"
    monkeypatch.delenv("LLAMAHOME_CACHE_DIR")  # load_dotenv set it outside monkeypatch
    monkeypatch.delenv("HF_TOKEN")


def test_env_variables_become_bindings_and_unknown_ones_are_refused():
    assert env_bindings({"LLAMAHOME_RUNS_DIR": "/r", "PATH": "/bin"}) == ["runs_dir.path = '/r'"]
    with pytest.raises(ConfigError, match="LLAMAHOME_RUNSDIR.*Did you mean 'LLAMAHOME_RUNS_DIR'"):
        env_bindings({"LLAMAHOME_RUNSDIR": "/r"})


@pytest.mark.parametrize("text,expected", [
    ("4GB", 4 * 10**9), ("100GB", 100 * 10**9), ("512MiB", 512 * 2**20), ("1.5KB", 1500),
    ("10 B", 10), (2048, 2048),
])
def test_byte_sizes(text, expected):
    assert parse_byte_size(text) == expected


def test_byte_size_error():
    with pytest.raises(ConfigError, match="'four GB' is not a byte size"):
        parse_byte_size("four GB")


def test_toml_translation_of_the_documented_example(tmp_path):
    toml = _write(tmp_path / "c.toml", """
[training]
batch_size = 32
learning_rate = 1e-4
gradient_accumulation_steps = 4
[cache]
memory_size = "4GB"
disk_size = "100GB"
policy = "lru"
[checkpoint]
save_steps = 1000
keep_last_n = 5
save_best = true
""")
    bindings = [b for b, _ in toml_to_bindings(toml)]
    assert bindings == [
        "train.batch_size = 32", "train.learning_rate = 0.0001",
        "train.gradient_accumulation_steps = 4",
        "CacheManager.memory_size = 4000000000", "CacheManager.disk_size = 100000000000",
        "CacheManager.policy = 'lru'",
        "CheckpointConfig.save_steps = 1000", "CheckpointConfig.keep_last_n = 5",
        "CheckpointConfig.save_best = True",
    ]


def test_toml_key_that_maps_to_nothing_names_file_section_key_and_suggestion(tmp_path):
    toml = _write(tmp_path / "bad.toml", "[probe]\nbatch_sise = 3\n")
    with pytest.raises(ConfigError) as e:
        gin_config.parse_config(toml_bindings=toml_to_bindings(toml))
    message = str(e.value)
    assert "bad.toml: [probe] batch_sise" in message and "Did you mean 'batch_size'" in message


def test_unknown_configurable_in_gin_file_names_file_line_and_suggestion(tmp_path):
    gin_file = _write(tmp_path / "a.gin", "probe.steps = 1\nprobe_.steps = 2\n")
    with pytest.raises(ConfigError) as e:
        gin_config.parse_config([str(gin_file)])
    message = str(e.value)
    assert "a.gin" in message and "line 2" in message and "Did you mean 'probe'" in message


def test_unknown_parameter_suggests_the_nearest(tmp_path):
    with pytest.raises(ConfigError, match="(?s)parameter named 'stpes'.*Did you mean 'steps'"):
        gin_config.parse_config(gin_params=["probe.stpes = 3"])


def test_missing_gin_file_is_named():
    with pytest.raises(ConfigError, match="gin file 'gin/jobs/env_inf.gin' does not exist.*"
                                          "Did you mean 'gin/jobs/env_info.gin'"):
        gin_config.parse_config(["gin/jobs/env_inf.gin"])


def test_secrets_are_redacted_from_saved_configs(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_supersecret_value")
    config = "download.hf_token = 'abc'\nprobe.name = 'hf_supersecret_value'\nprobe.steps = 1\n"
    path = files.save_config(tmp_path, "config.gin", config)
    text = path.read_text()
    assert "hf_supersecret_value" not in text and "abc" not in text
    assert "probe.steps = 1" in text and secrets.REDACTED in text


@pytest.mark.integration
def test_launch_runs_a_job_and_writes_the_config_into_the_run_dir(tmp_path):
    result = run_python(["-m", "llamahome.launch", "--gin_file=gin/jobs/env_info.gin",
                         f"--gin_param=launch.run_dir='{tmp_path / 'run'}'"],
                        env={"XLA_FLAGS": ""}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "launch.job = @env_info" in (tmp_path / "run" / "config.gin").read_text()
    assert "launch.run_dir" in (tmp_path / "run" / "operative_config.gin").read_text()


@job
def probe_with_outputs(run_dir: str) -> str:
    (Path(run_dir) / "out.txt").write_text("written")
    return run_dir


def test_only_jobs_with_outputs_get_a_run_dir_under_the_dotenv_runs_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMAHOME_RUNS_DIR", "")  # so that the undo removes what .env sets
    monkeypatch.delenv("LLAMAHOME_RUNS_DIR")
    monkeypatch.setattr(distributed, "initialize", lambda: None)
    env_file = _write(tmp_path / ".env", f"LLAMAHOME_RUNS_DIR={tmp_path / 'runs'}\n")
    for gin_file in ("gin/jobs/env_info.gin", "gin/jobs/models.gin"):
        gin.clear_config()
        cli.bind_all([gin_file], [f"models_dir.path='{tmp_path / 'models'}'"], None, str(env_file))
        cli.launch()
    assert not (tmp_path / "runs").exists()  # printing jobs leave nothing behind
    gin.clear_config()
    cli.bind_all([], ["launch.job=@probe_with_outputs"], None, str(env_file))
    run_dir = Path(cli.launch())
    assert run_dir.parent == tmp_path / "runs"
    assert sorted(p.name for p in run_dir.iterdir()) == [
        ".lock", "config.gin", "operative_config.gin", "out.txt"]


@job
def probe_that_fails(run_dir: str, steps: int = 1) -> None:
    probe(steps=steps)
    raise RuntimeError("the job broke")


def test_the_operative_config_is_written_also_when_the_job_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "initialize", lambda: None)
    cli.bind_all([], ["launch.job=@probe_that_fails", "probe.name='used'",
                      f"launch.run_dir='{tmp_path / 'run'}'"], None, None)
    with pytest.raises(RuntimeError, match="the job broke"):
        cli.launch()
    assert "probe.name = 'used'" in (tmp_path / "run" / "operative_config.gin").read_text()


def test_a_bound_run_dir_is_used_even_by_a_job_without_outputs(tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "initialize", lambda: None)
    cli.bind_all(["gin/jobs/env_info.gin"], [f"launch.run_dir='{tmp_path / 'run'}'"], None, None)
    cli.launch()
    assert (tmp_path / "run" / "config.gin").exists()


def test_help_lists_the_flags_jobs_and_gin_files():
    text = cli.usage()
    for expected in ("--gin_file", "--gin_param", "--config_toml", "--env_file", "--verbosity",
                     "gin/train/quickstart.gin", "models/<size>.gin"):
        assert expected in text
    for name in JOBS:
        assert f"\n  {name} " in text


@pytest.mark.integration
def test_help_and_user_errors_exit_cleanly_without_traceback(tmp_path):
    helped = run_python(["-m", "llamahome.launch", "--help"], cwd=tmp_path)
    assert helped.returncode == 0 and "jobs (launch.job = @<job>):" in helped.stdout
    assert "  train " in helped.stdout
    bad = run_python(["-m", "llamahome.launch", "--gin_file=gin/jobs/env_info.gin",
                      "--gin_param=launch.jobb=1"], cwd=tmp_path)
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr and "Did you mean 'job'" in bad.stderr
    assert not list(tmp_path.iterdir())  # nothing written, not even a runs/ folder

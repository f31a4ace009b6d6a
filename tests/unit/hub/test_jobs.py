"""The download_model and models jobs, end to end through `python -m llamahome.launch`."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import gin
import pytest

from llamahome.errors import ConfigError, UserError
from llamahome.hub.jobs import models
from tests.unit.hub.conftest import COMMIT, make_hub_cache

TOKEN = "hf_TestTokenThatMustNeverBeWritten42"
FILES = {"model.safetensors": bytes(range(256)) * 40, "config.json": b'{"hidden_size": 8}',
         "tokenizer.json": b'{"model": {}}'}


def launch(python_runner, cwd: Path, *params: str):
    args = ["-m", "llamahome.launch", "--gin_file=gin/jobs/download_model.gin", "--verbosity=1",
            *(f"--gin_param={p}" for p in params)]
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_VERBOSITY": "debug"}
    return python_runner(args, env=env, cwd=cwd, timeout=180)


def all_text(*roots: Path) -> str:
    return "".join(p.read_bytes().decode("latin-1") for r in roots for p in r.rglob("*")
                   if p.is_file())


def test_download_job_never_writes_or_logs_the_token(tmp_path, python_runner, monkeypatch):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "LLAMAHOME_HF_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    make_hub_cache(tmp_path / "hub", "org/tiny", FILES)
    (tmp_path / ".env").write_text(f"HF_TOKEN={TOKEN}\n")  # the token comes from .env
    os.chmod(tmp_path / ".env", 0o644)
    models_dir, run_dir = tmp_path / "models", tmp_path / "run"
    common = [f"models_dir.path='{models_dir}'", f"download_model.cache_dir='{tmp_path / 'hub'}'"]
    ok = launch(python_runner, tmp_path, *common, "download_model.source='hf://org/tiny'",
                f"launch.run_dir='{run_dir}'")
    assert ok.returncode == 0, ok.stderr
    # a token pasted where a repo name goes: the job logs it, raises it and saves it in config.gin
    failed = launch(python_runner, tmp_path, *common, f"download_model.source='hf://org/{TOKEN}'",
                    f"launch.run_dir='{tmp_path / 'run2'}'")
    assert failed.returncode == 2
    # the job ran with the token in its environment, read from .env ...
    assert "Hugging Face token set" in ok.stderr
    assert "holds secrets but has permissions 644" in ok.stderr
    # ... and it is nowhere: run dirs, models dir, stdout and stderr of both runs.
    written = all_text(run_dir, tmp_path / "run2", models_dir)
    logs = ok.stdout + ok.stderr + failed.stdout + failed.stderr
    assert TOKEN not in written and TOKEN not in logs
    # ... though the failed run did log it, raise it and save it, each time redacted:
    assert "hf://org/<redacted>: Hugging Face token set" in failed.stderr
    assert "error: hf://org/<redacted>@main: " in failed.stderr
    saved = (tmp_path / "run2" / "config.gin").read_text()
    assert "download_model.source = 'hf://org/<redacted>'" in saved
    assert {p.name for p in run_dir.iterdir()} == {".lock", "config.gin", "operative_config.gin",
                                                    "download.json"}  # .lock: files.hold
    record = json.loads((run_dir / "download.json").read_text())
    assert record["ref"] == "org--tiny@1" and record["revision"] == COMMIT
    assert record["files"] == {n: hashlib.sha256(d).hexdigest() for n, d in FILES.items()}


@pytest.fixture
def tiny_models(tmp_path):
    gin.bind_parameter("models_dir.path", str(tmp_path / "models"))
    for name, data in (("base", b"base"), ("tuned", b"tuned")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(data)
    return tmp_path


def test_models_job_actions(tiny_models):
    run = str(tiny_models / "run")
    first = models(run, action="register", path=str(tiny_models / "base"), name="tiny")
    second = models(run, action="register", path=str(tiny_models / "tuned"), parent="tiny@1")
    assert (first["ref"], second["ref"], second["parent"]) == ("tiny@1", "tiny@2", "tiny@1")
    assert [v["ref"] for v in models(run, action="list")] == ["tiny@1", "tiny@2"]
    assert models(run, action="show", ref="tiny")["files"]["model.safetensors"]["sha256"] == \
        hashlib.sha256(b"tuned").hexdigest()
    assert models(run, action="pin", ref="tiny@1")["pinned"]
    with pytest.raises(UserError, match="pinned"):
        models(run, action="remove", ref="tiny@1")
    assert not models(run, action="unpin", ref="tiny@1")["pinned"]
    assert models(run, action="verify", ref="tiny@1") == []
    assert models(run, action="remove", ref="tiny@1") == len(b"base")
    assert [v["ref"] for v in models(run, action="list")] == ["tiny@2"]
    with pytest.raises(ConfigError, match="choose one of"):
        models(run, action="delete", ref="tiny@2")
    with pytest.raises(ConfigError, match="needs models.ref"):
        models(run, action="pin")

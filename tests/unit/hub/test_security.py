"""Safe paths, pickle refusal, private files and memory limits."""

from __future__ import annotations

import logging
import os
import stat

import gin
import pytest

from llamahome.errors import ConfigError, UserError
from llamahome.hub import security
from llamahome.hub.security import MemoryLimits, UnsafePathError, safe_join


def test_safe_join_keeps_names_inside_the_base(tmp_path):
    assert safe_join(tmp_path, "a/b.json") == tmp_path.resolve() / "a" / "b.json"
    assert safe_join(tmp_path, "a/../b.json") == tmp_path.resolve() / "b.json"
    for bad in ("../../etc/passwd", "/etc/passwd", "a/../../x", "", "a\x00b"):
        with pytest.raises(UnsafePathError):
            safe_join(tmp_path, bad)


def test_safe_join_refuses_a_symlink_that_leads_out(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "link").symlink_to(tmp_path)
    with pytest.raises(UnsafePathError, match="outside"):
        safe_join(base, "link/secret")


def test_pickle_and_code_refusal():
    security.refuse_pickle(["model.safetensors", "config.json"])
    with pytest.raises(UserError, match="\\['a.bin', 'b.PT'\\]"):
        security.refuse_pickle(["b.PT", "model.safetensors", "a.bin"])
    security.refuse_pickle(["a.bin"], allow_pickle=True)
    with pytest.raises(UserError, match="never runs remote code"):
        security.refuse_code(["modeling_llama.py"])


def test_write_private_is_user_only_even_over_a_wider_file(tmp_path):
    path = tmp_path / "secret.env"
    path.write_text("old")
    os.chmod(path, 0o644)
    security.write_private(path, "HF_TOKEN=x")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == "HF_TOKEN=x"


def test_check_private_warns_about_readable_secret_files(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    path = tmp_path / ".env"
    path.write_text("HF_TOKEN=x")
    os.chmod(path, 0o644)
    assert not security.check_private(path)
    assert "chmod 600" in caplog.text
    os.chmod(path, 0o600)
    assert security.check_private(path)


def test_memory_limits_from_gin_set_the_xla_variables(monkeypatch):
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
    monkeypatch.setattr(security, "_jax_backend_initialized", lambda: False)
    gin.parse_config("MemoryLimits.device_memory_fraction = 0.25\n"
                     "MemoryLimits.preallocate = False\nMemoryLimits.host_ram_bytes = 1000")
    assert security.apply_memory_limits() == {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.25",
                                              "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    assert os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.25"
    assert os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    assert security.host_ram_budget(5000) == 1000
    assert security.host_ram_budget(500) == 500


def test_memory_fraction_out_of_range_is_a_config_error():
    with pytest.raises(ConfigError, match="fraction in \\(0, 1\\]"):
        MemoryLimits(device_memory_fraction=1.5).env()


def test_launch_applies_memory_limits_before_the_backend_and_refuses_after(tmp_path,
                                                                            python_runner):
    probe = f"""
import os, gin
from jax._src import xla_bridge
from llamahome import cli
from llamahome.hub import security
from llamahome.jobs import job

@job
def probe(run_dir):
    return os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"], os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"]

cli.import_configurables()
gin.parse_config('''
launch.job = @probe
launch.run_dir = '{tmp_path / "run"}'
MemoryLimits.device_memory_fraction = 0.3
MemoryLimits.preallocate = False
''')
assert not xla_bridge.backends_are_initialized()
print(*cli.launch())
try:
    security.apply_memory_limits(security.MemoryLimits(device_memory_fraction=0.5))
except Exception as e:
    print(type(e).__name__)
"""
    env = {"XLA_PYTHON_CLIENT_MEM_FRACTION": "", "XLA_PYTHON_CLIENT_PREALLOCATE": ""}
    result = python_runner(["-c", probe], env=env, check=True, timeout=120)
    assert result.stdout.split() == ["0.3", "false", "ConfigError"]

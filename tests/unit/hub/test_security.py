"""Safe paths, pickle and code refusal, private files."""

from __future__ import annotations

import logging
import os

import pytest

from llamahome.errors import UserError
from llamahome.hub import security
from llamahome.hub.security import UnsafePathError, safe_join


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


def test_check_private_warns_about_readable_secret_files(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    path = tmp_path / ".env"
    path.write_text("HF_TOKEN=x")
    os.chmod(path, 0o644)
    assert not security.check_private(path)
    assert "chmod 600" in caplog.text
    os.chmod(path, 0o600)
    assert security.check_private(path)

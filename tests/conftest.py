"""Shared fixtures. XLA_FLAGS must be set before jax initialises its backend, so the device
count for the whole session is chosen here: 8 fake CPU devices unless the caller set XLA_FLAGS.
Tests that need a specific count can run a subprocess (see `run_python`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import gin  # noqa: E402
import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _clean_gin():
    """Each test starts and ends with no gin bindings."""
    gin.clear_config()
    yield
    gin.clear_config()


@pytest.fixture
def eight_devices():
    """The 8 fake CPU devices of this session (skips if XLA_FLAGS was overridden)."""
    import jax  # noqa: PLC0415

    devices = jax.devices()
    if len(devices) < 8:
        pytest.skip(f"needs 8 devices, have {len(devices)}; run with "
                    "XLA_FLAGS=--xla_force_host_platform_device_count=8")
    return devices[:8]


def run_python(args: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None,
               timeout: float = 600, check: bool = False) -> subprocess.CompletedProcess:
    """Runs `python args...` in a subprocess with the repo importable; returns the result."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    result = subprocess.run([sys.executable, *args], env=full_env, cwd=cwd or REPO,
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\nstdout:\n{result.stdout}\n"
                             f"stderr:\n{result.stderr}")
    return result


@pytest.fixture
def python_runner():
    return run_python

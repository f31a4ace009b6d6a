"""The watchdog ends a process that stops making progress, and leaves a progressing one alone."""

import glob
import importlib.util
from pathlib import Path

import pytest

from llamahome.parallel.distributed import EXIT_NO_PROGRESS, GOOGLE_PCI_VENDOR

STALLS = """
import time
from llamahome.parallel.distributed import Watchdog
dog = Watchdog("process 1 of 2", timeout_s=1.0, poll_s=0.05).start()
for step in range(1, 6):
    time.sleep(0.2)
    dog.kick(f"step {step}")
time.sleep(30)  # stuck, as in a collective with a dead peer
"""

PROGRESSES = """
import time
from llamahome.parallel.distributed import Watchdog
dog = Watchdog("process 0 of 2", timeout_s=1.0, poll_s=0.05).start()
for step in range(1, 11):
    time.sleep(0.3)
    dog.kick(f"step {step}")
dog.stop()
time.sleep(1.5)
"""


def test_a_stalled_process_exits_with_a_clear_error(python_runner):
    result = python_runner(["-c", STALLS], timeout=20)
    assert result.returncode == EXIT_NO_PROGRESS
    assert "process 1 of 2: no progress for 1 s since step 5" in result.stderr
    assert "a peer process has probably died or hung" in result.stderr


def test_a_progressing_process_is_left_alone(python_runner):
    assert python_runner(["-c", PROGRESSES], timeout=20).returncode == 0


LIBTPU_ON_A_CPU_HOST = """
from llamahome.parallel import distributed
print(distributed.cpu_only_despite_libtpu())
import jax
print(jax.default_backend())
"""


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")
@pytest.mark.skipif(any(Path(p).read_text().strip() == GOOGLE_PCI_VENDOR
                        for p in glob.glob("/sys/bus/pci/devices/*/vendor")), reason="a TPU host")
def test_libtpu_on_a_host_without_a_tpu_runs_on_the_cpu_without_its_errors(python_runner):
    """libtpu (the `tpu` and `test` extras, for `plan`) installed, JAX_PLATFORMS unset, no TPU:
    without the switch JAX's start-up probes for a TPU and libtpu prints errors."""
    result = python_runner(["-c", LIBTPU_ON_A_CPU_HOST], env={"JAX_PLATFORMS": ""}, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["True", "cpu"]
    assert "TPU" not in result.stderr and "libtpu" not in result.stderr, result.stderr[-2000:]

"""The watchdog ends a process that stops making progress, and leaves a progressing one alone."""

from llamahome.parallel.distributed import EXIT_NO_PROGRESS

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

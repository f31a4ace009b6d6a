"""The job registry: every function `launch.job` can name (`launch.job = @train`).

A job is a gin-configurable function taking `run_dir` as keyword argument. Decorate it with
`@job` in the module that owns it; `llamahome.launch` imports every module, so the job is
registered before gin parses the config. A job that writes nothing of its own (it prints, or
serves, or changes the model registry) is declared `@job(run_dir=False)`: launch makes it no
run dir and passes `run_dir=None`, unless the user bound `launch.run_dir`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import gin


F = TypeVar("F", bound=Callable[..., object])
JOBS: dict[str, Callable[..., object]] = {}
NO_RUN_DIR: set[str] = set()  # jobs declared @job(run_dir=False)


def job(fn: F | None = None, *, run_dir: bool = True):
    """Registers `fn` as a job and makes it gin-configurable under its own name."""

    def register(fn: F) -> F:
        configurable = gin.configurable(fn)
        JOBS[fn.__name__] = configurable
        if not run_dir:
            NO_RUN_DIR.add(fn.__name__)
        return configurable

    return register(fn) if fn is not None else register


def needs_run_dir(job_fn: Callable[..., object]) -> bool:
    """Whether launch makes a run dir for `job_fn` (a job's outputs and config go there)."""
    return getattr(job_fn, "__name__", "") not in NO_RUN_DIR


def describe_jobs() -> list[tuple[str, str]]:
    """(name, first docstring line) of every registered job, sorted by name."""
    return [(name, (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else "")
            for name, fn in sorted(JOBS.items())]

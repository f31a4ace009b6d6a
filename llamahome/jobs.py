"""The job registry: every function `launch.job` can name (`launch.job = @train`).

A job is a gin-configurable function taking `run_dir` (a str) as keyword argument. Decorate
it with `@job` in the module that owns it; `llamahome.launch` imports every module, so the
job is registered before gin parses the config.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import gin

F = TypeVar("F", bound=Callable[..., object])
JOBS: dict[str, Callable[..., object]] = {}


def job(fn: F) -> F:
    """Registers `fn` as a job and makes it gin-configurable under its own name."""
    configurable = gin.configurable(fn)
    JOBS[fn.__name__] = configurable
    return configurable


@job
def env_info(run_dir: str) -> dict[str, object]:
    """Prints the JAX backend, devices and library versions: the first thing to run on a new machine."""
    import jax  # noqa: PLC0415
    from absl import logging  # noqa: PLC0415

    import llamahome  # noqa: PLC0415
    from llamahome import allocator  # noqa: PLC0415

    info = {
        "llamahome": llamahome.__version__,
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "process": f"{jax.process_index()}/{jax.process_count()}",
        "devices": [str(d) for d in jax.devices()],
        "host_allocator": allocator.name(),
        "run_dir": run_dir,
    }
    for key, value in info.items():
        logging.info("%s: %s", key, value)
    return info

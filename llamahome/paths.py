"""Where LlamaHome keeps runs, caches and models; each bound in gin or by LLAMAHOME_* vars."""

from __future__ import annotations

import os
from pathlib import Path

import gin


def _default_cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llamahome"


@gin.configurable
def runs_dir(path: str = "runs") -> Path:
    """The folder under which each run gets its own run dir (`runs/<timestamp>`)."""
    return Path(path).expanduser()


@gin.configurable
def cache_dir(path: str | None = None) -> Path:
    """The root of token caches, corpora and the JAX compilation cache."""
    return Path(path).expanduser() if path else _default_cache_root()


@gin.configurable
def models_dir(path: str | None = None) -> Path:
    """The root of downloaded and imported models (the model registry lives here)."""
    return Path(path).expanduser() if path else _default_cache_root() / "models"

"""Guards for files LlamaHome did not write: path escapes, pickle formats, secrets, memory limits.

- `safe_join(base, name)` resolves `name` under `base` and refuses it if the result escapes
  `base` (`../../etc/passwd`, absolute paths, symlinks pointing outside). Every file name that
  comes from a config, a manifest, a URL or a Hub listing goes through it.
- Pickle formats (`.bin`, `.pt`, `.pth`, `.ckpt`, `.pkl`) can run code when loaded; they are
  refused unless a job is explicitly told `allow_pickle=True`. `trust_remote_code` is never set
  and `.py` files are never downloaded.
- `write_private` writes files that hold secrets readable by the user only (mode 0600);
  `check_private` warns when such a file (`.env`, the Hugging Face token file) is readable by
  others.
- `MemoryLimits` (gin) holds the host RAM cap for caches and the XLA client's device-memory
  settings; `llamahome.launch` applies it before JAX initialises its backend:

      MemoryLimits.device_memory_fraction = 0.8   # XLA_PYTHON_CLIENT_MEM_FRACTION
      MemoryLimits.preallocate = False            # XLA_PYTHON_CLIENT_PREALLOCATE
      MemoryLimits.host_ram_bytes = 16_000_000_000  # caches ask `host_ram_budget(requested)`
"""

from __future__ import annotations

import dataclasses
import os
import stat
from collections.abc import Iterable
from pathlib import Path

import gin
from absl import logging

from llamahome.errors import ConfigError, UserError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib")
CODE_SUFFIXES = (".py",)
PRIVATE_MODE = 0o600


class UnsafePathError(UserError):
    """A path from a config, manifest or download escapes the directory it must stay in."""


def safe_join(base: Path | str, name: str | os.PathLike) -> Path:
    """`base / name` resolved, or UnsafePathError if it is absolute or leaves `base`."""
    base_path = Path(base).resolve()
    text = os.fspath(name)
    if not text or "\x00" in text or Path(text).is_absolute():
        raise UnsafePathError(f"refusing path {text!r}: must be a relative path inside {base_path}")
    joined = (base_path / text).resolve()
    if not joined.is_relative_to(base_path):
        raise UnsafePathError(f"refusing path {text!r}: it resolves to {joined}, outside "
                              f"{base_path}; file names must stay inside their base directory "
                              "(no '..', no symlinks out)")
    return joined


def is_pickle_file(name: str) -> bool:
    """True for file names in a pickle-based format (loading them can run arbitrary code)."""
    return name.lower().endswith(PICKLE_SUFFIXES)


def refuse_pickle(names: Iterable[str], allow_pickle: bool = False, where: str = "") -> None:
    """Raises UserError naming the pickle files in `names` unless `allow_pickle`."""
    pickles = sorted(n for n in names if is_pickle_file(n))
    if pickles and not allow_pickle:
        raise UserError(f"{where or 'model'}: refusing pickle-format files {pickles}: loading "
                        "them can run arbitrary code. Use the model's safetensors files, or set "
                        "allow_pickle=True if you trust the source.")


def refuse_code(names: Iterable[str], where: str = "") -> None:
    """Raises UserError for Python files: LlamaHome never runs a model's remote code."""
    code = sorted(n for n in names if n.lower().endswith(CODE_SUFFIXES))
    if code:
        raise UserError(f"{where or 'model'}: refusing code files {code}; LlamaHome never runs "
                        "remote code (trust_remote_code is never set)")


def write_private(path: Path, data: str | bytes) -> None:
    """Writes `data` to `path` atomically with user-only permissions (0600) from the start."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_MODE)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
    os.chmod(tmp, PRIVATE_MODE)  # in case the file existed with wider permissions
    os.replace(tmp, path)


def check_private(path: Path) -> bool:
    """Warns and returns False when a secret-holding file is readable or writable by others."""
    if not path.is_file():
        return True
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        logging.warning("%s holds secrets but has permissions %o; run `chmod 600 %s`", path, mode,
                        path)
        return False
    return True


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MemoryLimits:
    """Host and device memory settings; None leaves the environment's or JAX's default."""

    device_memory_fraction: float | None = None  # XLA_PYTHON_CLIENT_MEM_FRACTION
    preallocate: bool | None = None  # XLA_PYTHON_CLIENT_PREALLOCATE
    host_ram_bytes: int | None = None  # a cap on host RAM that caches may use

    def env(self) -> dict[str, str]:
        """The XLA client environment variables these limits set."""
        env = {}
        if self.device_memory_fraction is not None:
            if not 0.0 < self.device_memory_fraction <= 1.0:
                raise ConfigError(f"MemoryLimits.device_memory_fraction = "
                                  f"{self.device_memory_fraction}; use a fraction in (0, 1]")
            env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{self.device_memory_fraction:g}"
        if self.preallocate is not None:
            env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "true" if self.preallocate else "false"
        return env


def _jax_backend_initialized() -> bool:
    import sys  # noqa: PLC0415

    if "jax" not in sys.modules:
        return False
    from jax._src import xla_bridge  # noqa: PLC0415

    return xla_bridge.backends_are_initialized()


def apply_memory_limits(limits: MemoryLimits | None = None) -> dict[str, str]:
    """Sets the XLA client memory variables; refuses once JAX's backend is up (too late)."""
    limits = limits or MemoryLimits()
    env = limits.env()
    changed = {k: v for k, v in env.items() if os.environ.get(k) != v}
    if changed and _jax_backend_initialized():
        raise ConfigError(f"memory settings {changed} come too late: JAX has already initialised "
                          "its backend. Bind MemoryLimits in gin so that launch applies it first, "
                          "or set the variables in the environment before starting Python.")
    os.environ.update(env)
    if limits.host_ram_bytes is not None and limits.host_ram_bytes > physical_ram_bytes():
        logging.warning("MemoryLimits.host_ram_bytes = %d exceeds this host's RAM (%d bytes)",
                        limits.host_ram_bytes, physical_ram_bytes())
    return env


def physical_ram_bytes() -> int:
    """Total physical memory of this host."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def host_ram_budget(requested_bytes: int, limits: MemoryLimits | None = None) -> int:
    """`requested_bytes` clamped to `MemoryLimits.host_ram_bytes`: what a cache may hold in RAM."""
    cap = (limits or MemoryLimits()).host_ram_bytes
    if cap is not None and requested_bytes > cap:
        logging.info("host RAM budget %d clamped to MemoryLimits.host_ram_bytes = %d",
                     requested_bytes, cap)
        return cap
    return requested_bytes

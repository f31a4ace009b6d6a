"""Guards for files LlamaHome did not write: path escapes, pickle formats, code, secrets.

- `safe_join(base, name)` resolves `name` under `base` and refuses it if the result escapes
  `base` (`../../etc/passwd`, absolute paths, symlinks pointing outside). Every file name that
  comes from a config, a manifest, a URL or a Hub listing goes through it.
- Pickle formats (`.bin`, `.pt`, `.pth`, `.ckpt`, `.pkl`) can run code when loaded; they are
  refused unless a job is explicitly told `allow_pickle=True`. `trust_remote_code` is never set
  and `.py` files are never downloaded.
- `check_private` warns when a file that holds secrets (`.env`, the Hugging Face token file)
  is readable by others.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

from absl import logging

from llamahome import store
from llamahome.errors import UserError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib")
CODE_SUFFIXES = (".py",)


class UnsafePathError(UserError):
    """A path from a config, manifest or download escapes the directory it must stay in."""


def safe_join(base: Path | str, name: str | os.PathLike) -> Path:
    """`base / name` resolved, or UnsafePathError if it is absolute or leaves `base`.

    Under a `gs://` / `s3://` base (no symlinks, no `..` resolution) the check is on the name's
    parts: no `..`, `.` or empty part."""
    if store.is_remote(base):
        return _safe_join_remote(base, os.fspath(name))
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


def _safe_join_remote(base, text: str):
    parts = text.split("/")
    if not text or "\x00" in text or text.startswith("/") or any(
            p in ("", ".", "..") for p in parts):
        raise UnsafePathError(f"refusing path {text!r}: must be a relative path inside "
                              f"{store.show(base)} (no '..', '.' or empty parts)")
    return store.as_path(base) / text


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

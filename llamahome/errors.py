"""User-facing errors: bad configs, missing files, malformed data, corrupt checkpoints.

`llamahome.launch` prints a `UserError` as one clear message (no traceback) and exits with
status 2. Raise it, or a subclass, wherever the fix is on the user's side; raise ordinary
exceptions for bugs.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """An error the user can fix; its message says what, where, and how."""


class ConfigError(UserError):
    """A gin file, gin binding, TOML key or environment variable is wrong."""


class DataError(UserError):
    """A source file, record, tokenizer or token cache is missing or malformed."""


class CheckpointError(UserError):
    """A checkpoint or model directory is missing, incomplete or does not match the model."""


def did_you_mean(name: str, candidates: Iterable[str], n: int = 3) -> str:
    """Returns ' Did you mean X?' naming the closest candidates, or '' when none is close."""
    matches = difflib.get_close_matches(name, sorted(set(candidates)), n=n, cutoff=0.6)
    if not matches:
        return ""
    return " Did you mean " + " or ".join(repr(m) for m in matches) + "?"

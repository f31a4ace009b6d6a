"""A TOML settings file translated into gin bindings (`--config_toml`).

Each `[section]` names a gin configurable, either directly (`[train]`) or through the aliases
below (`[training]` -> `train`). Each key is a parameter of that configurable. Strings that
look like byte sizes ("4GB", "512MiB") become integers of bytes.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

from llamahome.errors import ConfigError

SECTION_ALIASES = {
    "training": "train",
    "cache": "CacheManager",
    "checkpoint": "CheckpointConfig",
    "checkpointing": "CheckpointConfig",
    "model": "LlamaConfig",
    "data": "data_pipeline",
    "generation": "generate",
    "evaluation": "evaluate",
}

_UNITS = {
    "": 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)\s*$", re.I)


def parse_byte_size(value: str | int) -> int:
    """'4GB' -> 4_000_000_000, '512MiB' -> 536_870_912, 1024 -> 1024."""
    if isinstance(value, int):
        return value
    match = _SIZE.match(str(value))
    if not match:
        raise ConfigError(f"{value!r} is not a byte size; write e.g. '4GB', '512MiB' or 1024")
    number, unit = match.groups()
    return int(float(number) * _UNITS[unit.upper()])


def _gin_literal(value: Any) -> str:
    if isinstance(value, str):
        if _SIZE.match(value):
            return str(parse_byte_size(value))
        return repr(value)
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, list):
        return "[" + ", ".join(_gin_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {_gin_literal(v)}" for k, v in value.items()) + "}"
    return repr(value)


def toml_to_bindings(path: Path) -> list[tuple[str, str]]:
    """Reads `path` and returns (binding, where) pairs such as ('train.batch_size = 32', 'f:[training] batch_size')."""
    if not path.is_file():
        raise ConfigError(f"--config_toml {path}: no such file")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    bindings = []
    for section, table in data.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: top-level key {section!r} must be inside a [section]")
        target = SECTION_ALIASES.get(section, section)
        for key, value in table.items():
            bindings.append((f"{target}.{key} = {_gin_literal(value)}", f"{path}: [{section}] {key}"))
    return bindings

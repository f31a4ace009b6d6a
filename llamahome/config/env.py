"""The environment as a source of settings: a `.env` file and `LLAMAHOME_*` variables.

Precedence, lowest first: gin files < `--config_toml` < environment < `--gin_param`.
A variable already set in the process environment wins over the same name in `.env`.

Variables understood (each becomes one gin binding):

| variable | binding |
| --- | --- |
| LLAMAHOME_RUNS_DIR | runs_dir.path |
| LLAMAHOME_CACHE_DIR | cache_dir.path |
| LLAMAHOME_MODELS_DIR | models_dir.path |
| LLAMAHOME_RUN_DIR | launch.run_dir |
| LLAMAHOME_GIN_PARAMS | any bindings, separated by newlines or ';' |

`LLAMAHOME_MALLOC` (auto | mimalloc | tcmalloc | jemalloc | system | a library path) picks
the host memory allocator before anything else starts; see llamahome/allocator.py.
Secrets (HF_TOKEN) are read from the environment by `llamahome.secrets`, never bound in gin.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from llamahome.errors import ConfigError, did_you_mean

ENV_TO_BINDING = {
    "LLAMAHOME_RUNS_DIR": "runs_dir.path",
    "LLAMAHOME_CACHE_DIR": "cache_dir.path",
    "LLAMAHOME_MODELS_DIR": "models_dir.path",
    "LLAMAHOME_RUN_DIR": "launch.run_dir",
}
GIN_PARAMS_VAR = "LLAMAHOME_GIN_PARAMS"
# Read by other parts (distributed start, secrets), not bound in gin.
OTHER_KNOWN_VARS = {
    GIN_PARAMS_VAR,
    "LLAMAHOME_HF_TOKEN",
    "LLAMAHOME_COORDINATOR",
    "LLAMAHOME_NUM_PROCESSES",
    "LLAMAHOME_PROCESS_ID",
    "LLAMAHOME_LOCAL_DEVICE_IDS",
    "LLAMAHOME_MALLOC",  # llamahome/allocator.py, read before the process re-executes
    "LLAMAHOME_MALLOC_ACTIVE",
}


def parse_dotenv(path: Path) -> dict[str, str]:
    """Parses KEY=VALUE lines (optional `export `, quotes, # comments) of a .env file."""
    values: dict[str, str] = {}
    for lineno, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        # The line is never echoed: `HF_TOKEN hf_...` with the '=' missing holds a secret.
        if not sep:
            raise ConfigError(f"{path}:{lineno}: expected KEY=VALUE but the line has no '=' "
                              "(line not shown: it may hold a secret)")
        if not key.replace("_", "").isalnum():
            raise ConfigError(f"{path}:{lineno}: expected KEY=VALUE but the name before '=' is "
                              "not letters, digits and '_' (line not shown: it may hold a secret)")
        value = value.strip()
        if value[:1] in ("'", '"'):
            try:
                parts = shlex.split(value)
            except ValueError as e:
                raise ConfigError(f"{path}:{lineno}: bad quoting in value of {key} ({e})") from None
            value = parts[0] if parts else ""
        else:
            value = value.split(" #", 1)[0].strip()
        values[key] = value
    return values


def load_dotenv(path: Path = Path(".env")) -> dict[str, str]:
    """Loads `path` into os.environ without overriding variables already set; returns what it set."""
    if not path.is_file():
        return {}
    loaded = {k: v for k, v in parse_dotenv(path).items() if k not in os.environ}
    os.environ.update(loaded)
    return loaded


def env_bindings(environ: dict[str, str] | None = None) -> list[str]:
    """gin binding strings for the LLAMAHOME_* variables set in `environ` (default os.environ)."""
    environ = os.environ if environ is None else environ
    bindings = []
    for name in sorted(environ):
        if not name.startswith("LLAMAHOME_"):
            continue
        value = environ[name]
        if name in ENV_TO_BINDING:
            bindings.append(f"{ENV_TO_BINDING[name]} = {value!r}")
        elif name == GIN_PARAMS_VAR:
            bindings.extend(b.strip() for b in value.replace(";", "\n").splitlines() if b.strip())
        elif name not in OTHER_KNOWN_VARS:
            known = [*ENV_TO_BINDING, *OTHER_KNOWN_VARS]
            raise ConfigError(f"unknown environment variable {name}.{did_you_mean(name, known)} "
                              f"Known: {', '.join(sorted(known))}")
    return bindings

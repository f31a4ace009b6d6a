"""Parsing gin files and bindings in LlamaHome's precedence order, with errors that name the fix."""

from __future__ import annotations

import importlib.util  # noqa: F401  (gin's include handling needs it imported)
import inspect
import re
from collections.abc import Sequence
from pathlib import Path

import gin

from llamahome.errors import ConfigError, did_you_mean

REPO_GIN_DIR = Path(__file__).resolve().parents[2] / "gin"


def search_path() -> list[Path]:
    """Where gin files and `include`s are looked up: the working dir, then the repo's gin/."""
    return [Path.cwd(), REPO_GIN_DIR, REPO_GIN_DIR.parent]


def register_search_path() -> None:
    for path in search_path():
        if path.is_dir():
            gin.add_config_file_search_path(str(path))


def resolve_gin_file(name: str) -> Path:
    """Finds a gin file as given, or relative to the search path; a clear error otherwise."""
    candidates = [Path(name)] + [base / name for base in search_path()]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    known = [str(p.relative_to(REPO_GIN_DIR.parent)) for p in REPO_GIN_DIR.rglob("*.gin")]
    raise ConfigError(f"gin file {name!r} does not exist (searched: "
                      f"{', '.join(str(p) for p in search_path())}).{did_you_mean(name, known)}")


def configurable_names() -> list[str]:
    """Short names of every registered gin configurable."""
    return sorted({sel.rsplit(".", 1)[-1] for sel in gin.config._REGISTRY._selector_map})


def parameter_names(configurable: str) -> list[str]:
    """Parameter names of a registered configurable ([] when unknown)."""
    try:
        match = gin.config._REGISTRY.get_match(configurable)
    except (ValueError, KeyError):
        return []
    if match is None:
        return []
    fn = match.wrapped
    if inspect.isclass(fn):
        fn = fn.__init__
    return [p for p in inspect.signature(fn).parameters if p != "self"]


_NO_CONFIGURABLE = re.compile(r"No configurable matching '([^']+)'")
_NO_PARAMETER = re.compile(r"Configurable '([^']+)' doesn't have a parameter named '([^']+)'")


def explain_gin_error(error: Exception, where: str = "") -> ConfigError:
    """Turns a gin parse error into a ConfigError that suggests the nearest valid name."""
    message = str(error).strip()
    hint = ""
    if (m := _NO_CONFIGURABLE.search(message)):
        name = m.group(1).rsplit(".", 1)[-1].split("/")[-1]
        hint = did_you_mean(name, configurable_names())
    elif (m := _NO_PARAMETER.search(message)):
        configurable, param = m.groups()
        params = parameter_names(configurable)
        hint = did_you_mean(param, params) or (
            f" Its parameters: {', '.join(params)}." if params else "")
    if where and where not in message:
        message = f"{where}: {message}"
    return ConfigError(message + (f"\n {hint}" if hint else ""))


def _parse_bindings(bindings: Sequence[str], where: str) -> None:
    for binding in bindings:
        try:
            gin.parse_config(binding)
        except (ValueError, SyntaxError) as e:
            raise explain_gin_error(e, f"{where} {binding!r}") from None


def parse_config(gin_files: Sequence[str] = (),
                 toml_bindings: Sequence[tuple[str, str]] = (),
                 env_bindings: Sequence[str] = (),
                 gin_params: Sequence[str] = ()) -> None:
    """Binds, in increasing precedence: gin files, TOML, environment, --gin_param."""
    register_search_path()
    for name in gin_files:
        path = resolve_gin_file(name)
        try:
            gin.parse_config_file(str(path))
        except (ValueError, SyntaxError) as e:
            raise explain_gin_error(e, str(path)) from None
        except OSError as e:  # a missing `include` inside the file
            raise ConfigError(f"{path}: {e}") from None
    for binding, where in toml_bindings:
        _parse_bindings([binding], where)
    _parse_bindings(env_bindings, "environment variable binding")
    _parse_bindings(gin_params, "--gin_param")
    gin.finalize()

"""Parsing gin files and bindings in LlamaHome's precedence order, with errors that name the fix."""

from __future__ import annotations

import ast
import importlib.util  # noqa: F401  (gin's include handling needs it imported)
import inspect
import re
from collections.abc import Sequence
from pathlib import Path

import gin

from llamahome.errors import ConfigError, did_you_mean
from llamahome.secrets import redact_gin_config

REPO_GIN_DIR = Path(__file__).resolve().parents[2] / "gin"


def search_path() -> list[Path]:
    """Where gin files and `include`s are looked up: the working dir, then the repo's gin/."""
    return [Path.cwd(), REPO_GIN_DIR, REPO_GIN_DIR.parent]


def register_search_path() -> None:
    for path in search_path():
        if path.is_dir() and str(path) not in gin.config._LOCATION_PREFIXES:
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


_NO_CONFIGURABLE = re.compile(r"No configurable matching (?:reference )?'@?([^']+)'")
_NO_PARAMETER = re.compile(r"Configurable '([^']+)' doesn't have a parameter named '([^']+)'")
_AMBIGUOUS = re.compile(r"Ambiguous selector '([^']+)', matches (\[[^\]]*\])")
_BAD_TOKEN = re.compile(r"Failed to parse token '([^']*)'")
_UNBOUND_MACRO = re.compile(r"No bindings specified for '([^'/]+)/gin.macro'")
_IN_FILE = re.compile(r'In file "([^"]+)", line (\d+)')
# Errors gin raises while parsing or binding: a bad value, name, include or import.
GIN_ERRORS = (ValueError, SyntaxError, KeyError, TypeError, ImportError, OSError)


def _ambiguity_hint(name: str, selectors: list[str]) -> str:
    """Names the full selectors (llamahome's first) and the shortest ones that are unambiguous."""
    selectors = sorted(selectors, key=lambda s: (not s.startswith("llamahome."), s))
    shortest = [gin.config._REGISTRY.minimal_selector(s) for s in selectors]
    return (f"{name!r} is ambiguous: it names {' and '.join(selectors)}; write the full name "
            f"or the shortest unambiguous one: {' or '.join(shortest)}")


def explain_gin_error(error: Exception, where: str = "") -> ConfigError:
    """Turns a gin parse error into a one-line ConfigError that names where and suggests the fix."""
    text = str(error).strip()
    if (m := _IN_FILE.search(text)):  # the innermost file, when the error is in an `include`
        where = f"{m.group(1)}, line {m.group(2)}"
    message = text.splitlines()[0] if text else type(error).__name__
    if isinstance(error, KeyError):  # str() of a KeyError quotes its message
        message = message.strip("\"")
    if (m := _AMBIGUOUS.search(text)):
        message = _ambiguity_hint(m.group(1), ast.literal_eval(m.group(2)))
    elif (m := _UNBOUND_MACRO.search(text)):
        macro = m.group(1)
        message = f"%{macro} is used but never bound; bind it, e.g. --gin_param=\"{macro}=...\""
    elif (m := _BAD_TOKEN.search(text)):
        token = m.group(1)
        message = (f"cannot parse the value {token}: quote a string ('{token}'), "
                   f"reference a configurable (@{token}) or a macro (%{token})")
    elif (m := _NO_CONFIGURABLE.search(text)):
        name = m.group(1).rsplit(".", 1)[-1].split("/")[-1]
        message += did_you_mean(name, configurable_names())
    elif (m := _NO_PARAMETER.search(text)):
        configurable, param = m.groups()
        params = parameter_names(configurable)
        message += did_you_mean(param, params) or (
            f" Its parameters: {', '.join(params)}." if params else "")
    return ConfigError(f"{where}: {message}" if where else message)


def _parse_bindings(bindings: Sequence[str], where: str) -> None:
    for binding in bindings:
        try:
            gin.parse_config(binding)
        except GIN_ERRORS as e:
            raise explain_gin_error(e, f"{where} {redact_gin_config(binding)!r}") from None


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
        except GIN_ERRORS as e:
            raise explain_gin_error(e, str(path)) from None
    for binding, where in toml_bindings:
        _parse_bindings([binding], where)
    _parse_bindings(env_bindings, "environment variable binding")
    _parse_bindings(gin_params, "--gin_param")
    try:
        gin.finalize()
    except GIN_ERRORS as e:  # e.g. a %MACRO that nothing binds
        raise explain_gin_error(e) from None

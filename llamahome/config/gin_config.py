"""Settings into gin bindings, in LlamaHome's precedence order, and gin config text read back.

Precedence, lowest first: gin files < `--config_toml` < environment < `--gin_param`
(`parse_config`). Errors are one-line `ConfigError`s that say where and name the fix.

The environment: a `.env` file and `LLAMAHOME_*` variables. A variable already set in the
process environment wins over the same name in `.env`. Each variable becomes one gin binding:

| variable | binding |
| --- | --- |
| LLAMAHOME_RUNS_DIR | runs_dir.path |
| LLAMAHOME_CACHE_DIR | cache_dir.path |
| LLAMAHOME_MODELS_DIR | models_dir.path |
| LLAMAHOME_RUN_DIR | launch.run_dir |
| LLAMAHOME_GIN_PARAMS | any bindings, separated by newlines or ';' |

`LLAMAHOME_MALLOC` (auto | mimalloc | tcmalloc | jemalloc | system | a library path) picks
the host memory allocator before anything else starts; see llamahome/launch.py.
Secrets (HF_TOKEN) are read from the environment by `llamahome.secrets`, never bound in gin.

A TOML settings file (`--config_toml`): each `[section]` names a gin configurable, either
directly (`[train]`) or through `SECTION_ALIASES` (`[training]` -> `train`); each key is a
parameter of it. Strings that look like byte sizes ("4GB", "512MiB") become integers of bytes.

A saved gin config text (a checkpoint's, a run dir's config.gin) is read without binding it:
`gin_bindings`, `gin_statements`, `binding_statements`.
"""

from __future__ import annotations

import ast
import importlib.util  # noqa: F401  (gin's include handling needs it imported)
import inspect
import io
import os
import re
import shlex
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gin
from absl import logging
from gin import config_parser

from llamahome.errors import ConfigError, did_you_mean


# --- gin files -----------------------------------------------------------------------------------

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


# --- modules that moved ---------------------------------------------------------------------------

# Modules this version merged or renamed (issue 16), and names that changed module. Configurable
# names did not change, so a gin file written for the previous version (a user's own, or a run
# dir's saved config.gin passed as --gin_file) that imports one of these modules, or names a
# configurable by its full module path, is read with the new path, one warning per line.
MOVED_MODULES = {
    "llamahome.paths": "llamahome.files",
    "llamahome.run_lock": "llamahome.files",
    "llamahome.allocator": "llamahome.launch",
    "llamahome.monitor.writers": "llamahome.monitor",
    "llamahome.monitor.status": "llamahome.monitor",
    "llamahome.monitor.mfu": "llamahome.monitor",
    "llamahome.monitor.profile": "llamahome.monitor",
    "llamahome.cache.manager": "llamahome.cache",
    "llamahome.cache.memory": "llamahome.cache",
    "llamahome.cache.disk": "llamahome.cache",
    "llamahome.parallel.rules": "llamahome.parallel.mesh",
    "llamahome.parallel.sharding": "llamahome.parallel.mesh",
    "llamahome.parallel.watchdog": "llamahome.parallel.distributed",
    "llamahome.parallel.data_shards": "llamahome.data.pipeline",
    "llamahome.model.config": "llamahome.model.llama",
    "llamahome.model.rope": "llamahome.model.attention",
    "llamahome.infer.checkpoints": "llamahome.model.checkpoints",
    "llamahome.train.run_tokenizer": "llamahome.data.tokenizer",  # (its vocab helpers: model.llama)
    "llamahome.train.job": "llamahome.train.loop",
    "llamahome.train.state": "llamahome.train.step",
    "llamahome.train.loss": "llamahome.train.step",
    "llamahome.config.env": "llamahome.config.gin_config",
    "llamahome.config.toml": "llamahome.config.gin_config",
    "llamahome.config.gin_text": "llamahome.config.gin_config",
    "llamahome.data.packing": "llamahome.data.pipeline",
    "llamahome.data.corpora": "llamahome.data.sources",
    "llamahome.hub.security.MemoryLimits": "llamahome.cache.MemoryLimits",
}
# A quoted string or a comment (left as written), or a dotted llamahome path.
_PATH_TOKEN = re.compile(r"""('(?:[^'\\\n]|\\.)*'|"(?:[^"\\\n]|\\.)*"|#[^\n]*)"""
                         r"|(?<![\w.])(llamahome(?:\.\w+)+)")
_FROM_IMPORT = re.compile(r"^(\s*from\s+)(llamahome[\w.]*)(\s+import\s+)(\w+)")


def moved_path(dotted: str) -> tuple[str, str] | None:
    """(old, new) of the MOVED_MODULES entry `dotted` is or lies under, longest first; else None."""
    for old in sorted(MOVED_MODULES, key=len, reverse=True):
        if dotted == old or dotted.startswith(old + "."):
            return old, MOVED_MODULES[old]
    return None


def update_moved_paths(text: str) -> tuple[str, list[tuple[int, str, str]]]:
    """`text` with each moved module path (MOVED_MODULES) replaced by its new one, outside strings
    and comments, and the (line number, old, new) of each replacement."""
    changes: list[tuple[int, str, str]] = []
    lines = text.splitlines(keepends=True)
    for number, line in enumerate(lines, start=1):
        if (m := _FROM_IMPORT.match(line)) and (moved := moved_path(f"{m[2]}.{m[4]}")):
            new_module, _, new_name = (m[2] + "." + m[4]).replace(*moved, 1).rpartition(".")
            changes.append((number, *moved))
            line = f"{m[1]}{new_module}{m[3]}{new_name}{line[m.end():]}"

        def replace(match: re.Match, number: int = number) -> str:
            if match[1] or not (moved := moved_path(match[2])):
                return match[0]
            changes.append((number, *moved))
            return match[2].replace(*moved, 1)

        lines[number - 1] = _PATH_TOKEN.sub(replace, line)
    return "".join(lines), changes


def _warn_moved(where: str, changes: list[tuple[int, str, str]]) -> None:
    for number, old, new in changes:
        line = f", line {number}" if where.endswith(".gin") else ""
        logging.warning("%s%s: %s moved to %s in this version; read as %s (update the file to "
                        "silence this)", where, line, old, new, new)


class _GinText(io.StringIO):
    """Gin text with the file name gin's parser reports in its error locations."""

    def __init__(self, text: str, name: str):
        super().__init__(text)
        self.name = name


def _read_gin_file(path: str) -> io.StringIO:
    """gin's file reader for every gin file it opens (`--gin_file`s and their `include`s): the
    file with moved module paths updated (see MOVED_MODULES)."""
    text, changes = update_moved_paths(Path(path).read_text(encoding="utf-8"))
    _warn_moved(path, changes)
    return _GinText(text, path)


def register_moved_paths_reader() -> None:
    """Makes gin open gin files with `_read_gin_file`, ahead of its plain `open`.

    gin's `register_file_reader` appends readers after `open`, which reads every file that
    exists; so the reader goes first in gin's list directly.
    """
    readers = gin.config._FILE_READERS
    if not any(reader is _read_gin_file for reader, _ in readers):
        readers.insert(0, (_read_gin_file, os.path.isfile))


# --- the environment -----------------------------------------------------------------------------

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
    "LLAMAHOME_API_KEY",  # the serve job's API key (llamahome.secrets.api_key)
    "LLAMAHOME_COORDINATOR",
    "LLAMAHOME_NUM_PROCESSES",
    "LLAMAHOME_PROCESS_ID",
    "LLAMAHOME_LOCAL_DEVICE_IDS",
    "LLAMAHOME_MALLOC",  # llamahome/launch.py, read before the process re-executes
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


# --- TOML ----------------------------------------------------------------------------------------

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


# --- errors --------------------------------------------------------------------------------------

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
_NO_MODULE = re.compile(r"No module named '([\w.]+)'")
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
    if (m := _NO_MODULE.search(text)) and (moved := moved_path(m.group(1))):
        message = (f"imports {moved[0]}, which moved to {moved[1]} in this version; change the "
                   "import line")
    elif (m := _AMBIGUOUS.search(text)):
        message = _ambiguity_hint(m.group(1), ast.literal_eval(m.group(2)))
    elif (m := _UNBOUND_MACRO.search(text)):
        macro = m.group(1)
        message = f"%{macro} is used but never bound; bind it, e.g. --gin_param=\"{macro}=...\""
    elif (m := _BAD_TOKEN.search(text)):
        token = m.group(1)
        message = (f"cannot parse the value {token}: quote a string ('{token}'), "
                   f"reference a configurable (@{token}) or a macro (%{token})")
    elif (m := _NO_CONFIGURABLE.search(text)):
        if moved := moved_path(m.group(1).split("/")[-1]):
            message += f" ({moved[0]} moved to {moved[1]} in this version)"
        name = m.group(1).rsplit(".", 1)[-1].split("/")[-1]
        message += did_you_mean(name, configurable_names())
    elif (m := _NO_PARAMETER.search(text)):
        configurable, param = m.groups()
        params = parameter_names(configurable)
        message += did_you_mean(param, params) or (
            f" Its parameters: {', '.join(params)}." if params else "")
    return ConfigError(f"{where}: {message}" if where else message)


# --- binding, in precedence order ----------------------------------------------------------------

def _binding_name(binding: str) -> str:
    """The name a binding binds (`train.steps`), not its value: the value may be a secret."""
    match = _BINDING.match(binding)
    return match.group(1) if match else ""


def _parse_binding(binding: str, where: str) -> None:
    binding, changes = update_moved_paths(binding)
    _warn_moved(where, changes)
    try:
        gin.parse_config(binding)
    except GIN_ERRORS as e:
        raise explain_gin_error(e, where) from None


def parse_config(gin_files: Sequence[str] = (),
                 toml_bindings: Sequence[tuple[str, str]] = (),
                 env_bindings: Sequence[str] = (),
                 gin_params: Sequence[str] = ()) -> None:
    """Binds, in increasing precedence: gin files, TOML, environment, --gin_param.

    Module paths that moved in this version (MOVED_MODULES) are read as their new ones.
    """
    register_search_path()
    register_moved_paths_reader()
    for name in gin_files:
        path = resolve_gin_file(name)
        try:
            gin.parse_config_file(str(path))
        except GIN_ERRORS as e:
            raise explain_gin_error(e, str(path)) from None
    for binding, where in toml_bindings:
        _parse_binding(binding, where)
    for binding in env_bindings:
        _parse_binding(binding, f"environment variable binding {_binding_name(binding)}".rstrip())
    for binding in gin_params:
        _parse_binding(binding, f"--gin_param {_binding_name(binding)}".rstrip())
    try:
        gin.finalize()
    except GIN_ERRORS as e:  # e.g. a %MACRO that nothing binds
        raise explain_gin_error(e) from None


# --- reading saved gin config text ---------------------------------------------------------------

def gin_bindings(text: str, configurable: str) -> dict[str, Any]:
    """The unscoped bindings `configurable.<arg> = value` in a gin config text, macros resolved.

    Read with gin's parser without touching the global gin config, so a saved run config can
    be inspected while another is bound.
    """
    class Delegate(config_parser.ParserDelegate):
        def configurable_reference(self, scoped_name, evaluate):
            return ("@", scoped_name)

        def macro(self, name):
            return ("%", name)

    macros, bindings = {}, {}
    for statement in config_parser.ConfigParser(text, Delegate()):
        if not isinstance(statement, config_parser.BindingStatement) or statement.scope:
            continue
        if not statement.arg_name:
            macros[statement.selector] = statement.value
        elif statement.selector.rsplit(".", 1)[-1] == configurable:
            bindings[statement.arg_name] = statement.value

    def resolve_macro(value, depth=0):
        while isinstance(value, tuple) and len(value) == 2 and value[0] == "%" and depth < 16:
            value, depth = macros.get(value[1]), depth + 1
        return value

    return {arg: resolve_macro(value) for arg, value in bindings.items()}


def gin_statements(config: str) -> list[str]:
    """Splits gin text into statements, each with its line ends: a statement spans lines while a
    bracket, a string or a `\\` continuation is open; a comment or blank line is one of its own."""
    statements, current = [], []
    depth, quote = 0, ""
    for line in config.splitlines(keepends=True):
        current.append(line)
        continued, i = False, 0
        while i < len(line):
            char = line[i]
            if quote:
                if char == "\\":
                    i += 1
                elif line.startswith(quote, i):
                    i += len(quote) - 1
                    quote = ""
            elif char == "#":
                break
            elif char in "'\"":
                quote = char * 3 if line.startswith(char * 3, i) else char
                i += len(quote) - 1
            elif char in "([{":
                depth += 1
            elif char in ")]}":
                depth = max(depth - 1, 0)
            elif char == "\\" and not line[i + 1:].strip():
                continued = True
            i += 1
        if len(quote) == 1:  # a one-quote string cannot span lines unless escaped
            quote = "" if not line.rstrip("\r\n").endswith("\\") else quote
        if depth == 0 and not quote and not continued:
            statements.append("".join(current))
            current = []
    if current:
        statements.append("".join(current))
    return statements


_BINDING = re.compile(r"\s*([A-Za-z_][\w./]*)\s*=(.*)", re.S)


def binding_statements(text: str) -> list[tuple[str, str, str]]:
    """(name, value text, whole statement) of each `name = value` in gin text, in order.

    Textual, like `gin_statements`: a value is as written (wrapped over lines as gin wrapped
    it); imports, includes, comments and blank lines are left out.
    """
    found = []
    for statement in gin_statements(text):
        match = _BINDING.match(statement)
        if match and not statement.lstrip().startswith("#"):
            found.append((match.group(1), match.group(2), statement))
    return found

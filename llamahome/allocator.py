"""The host memory allocator: run under tcmalloc (or jemalloc) when the machine has one.

XLA:CPU gives each execution one block for all its temporaries (1.97 GB for the `medium`
train step in benchmarks/). glibc serves a block that size with `mmap` and hands it back with
`munmap` when the step ends, so every step faults every page in again: ~500,000 page faults and
~0.8 s of system time in a 2.1 s step. tcmalloc keeps freed memory for reuse and jemalloc does
with `oversize_threshold:0`, which makes the same step ~1.65 s (benchmarks/README.md). glibc's own
knobs do not get there: `M_MMAP_MAX=0` needs a single arena, and then the heap fragments (RSS grew
to 9 GB with 4 s steps).

A process's allocator is fixed when it starts (`LD_PRELOAD`), so `reexec()` runs the
interpreter again, once, with the allocator preloaded; `python -m llamahome.launch` and the
benchmark scripts call it before importing JAX. `LLAMAHOME_MALLOC` (environment or `.env`)
chooses: `auto` (default: tcmalloc, else jemalloc, else glibc), `tcmalloc`, `jemalloc`, `system`
(glibc, no re-exec), or the path of a malloc library. Debian/Ubuntu: `apt install
libtcmalloc-minimal4`.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from collections.abc import Mapping
from pathlib import Path

from llamahome.config.env import parse_dotenv
from llamahome.errors import ConfigError

VAR = "LLAMAHOME_MALLOC"
# Set in the re-executed process: the library it runs under (or "system"); stops a second re-exec.
ACTIVE_VAR = "LLAMAHOME_MALLOC_ACTIVE"

LIBRARIES = {
    "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4"),
    "jemalloc": ("libjemalloc.so.2",),
}
CHOICES = ("auto", *LIBRARIES, "system")
# Settings each library needs in its environment (a value already set by the user wins).
LIBRARY_ENV = {
    # tcmalloc prints a stack trace for every allocation over 1 GiB by default.
    "tcmalloc": {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 42)},
    # Without oversize_threshold:0 jemalloc purges large blocks at once, like glibc.
    "jemalloc": {"MALLOC_CONF": "oversize_threshold:0,dirty_decay_ms:30000,muzzy_decay_ms:30000"},
}


def search_dirs() -> list[Path]:
    """Where shared libraries are looked for: the interpreter's prefix, then the system's."""
    dirs = [Path(sys.prefix) / "lib", Path(sysconfig.get_config_var("LIBDIR") or "/usr/lib")]
    multiarch = sysconfig.get_config_var("MULTIARCH")
    for root in ("/usr/local/lib", "/usr/lib", "/lib", "/usr/lib64"):
        if multiarch:
            dirs.append(Path(root) / multiarch)
        dirs.append(Path(root))
    return list(dict.fromkeys(dirs))


def find_library(kind: str, dirs: list[Path] | None = None) -> Path | None:
    """The first `kind` ("tcmalloc" or "jemalloc") library file in `dirs`, or None."""
    for directory in search_dirs() if dirs is None else dirs:
        for name in LIBRARIES[kind]:
            if (directory / name).is_file():
                return directory / name
    return None


def kind_of(library: Path) -> str:
    """"tcmalloc", "jemalloc" or "other", from a library's file name."""
    return next((kind for kind in LIBRARIES if kind in library.name), "other")


def choice(environ: Mapping[str, str], dotenv: Path = Path(".env")) -> str:
    """LLAMAHOME_MALLOC from the environment, else from `.env`, else "auto"."""
    if VAR in environ:
        return environ[VAR].strip()
    try:
        return parse_dotenv(dotenv).get(VAR, "auto").strip() if dotenv.is_file() else "auto"
    except (OSError, ConfigError):
        return "auto"  # launch reads .env again and reports what is wrong with it


def resolve(value: str, dirs: list[Path] | None = None) -> Path | None:
    """The library that LLAMAHOME_MALLOC=`value` asks for; None for glibc."""
    if value == "system" or (value == "auto" and not sys.platform.startswith("linux")):
        return None
    if not sys.platform.startswith("linux"):
        raise ConfigError(f"{VAR}={value}: preloading an allocator (LD_PRELOAD) works on Linux "
                          f"only; use {VAR}=system or auto on {sys.platform}")
    if value == "auto":
        found = find_library("tcmalloc", dirs) or find_library("jemalloc", dirs)
        return found and found.resolve()  # the file /proc/<pid>/maps will name, not a symlink
    if value in LIBRARIES:
        found = find_library(value, dirs)
        if found is None:
            looked = ", ".join(str(d) for d in (search_dirs() if dirs is None else dirs))
            raise ConfigError(f"{VAR}={value}: no {' or '.join(LIBRARIES[value])} in {looked}; "
                              f"install it (Debian/Ubuntu: apt install "
                              f"{'libtcmalloc-minimal4' if value == 'tcmalloc' else 'libjemalloc2'}) "
                              f"or set {VAR}=system")
        return found.resolve()
    path = Path(value).expanduser()
    if "/" in value or path.suffix == ".so" or ".so." in path.name:
        if not path.is_file():
            raise ConfigError(f"{VAR}={value}: no such file")
        return path.resolve()
    raise ConfigError(f"{VAR}={value!r} is not one of {', '.join(CHOICES)} or a library path")


def reexec_env(library: Path, environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` with `library` first in LD_PRELOAD and the settings it needs."""
    env = dict(environ)
    preload = [p for p in env.get("LD_PRELOAD", "").replace(":", " ").split() if p]
    env["LD_PRELOAD"] = " ".join([str(library), *preload])
    for key, value in LIBRARY_ENV.get(kind_of(library), {}).items():
        env.setdefault(key, value)
    env[ACTIVE_VAR] = str(library)
    return env


def active() -> str:
    """The allocator this process runs under: a library path, or "system".

    A library the dynamic loader could not preload (wrong architecture, say: it prints a
    warning and goes on) is not mapped into the process, so it reads as "system".
    """
    library = os.environ.get(ACTIVE_VAR, "system")
    if library == "system":
        return library
    try:
        maps = Path(f"/proc/{os.getpid()}/maps").read_text()
    except OSError:
        return library
    return library if os.path.realpath(library) in maps else "system"


def name() -> str:
    """"tcmalloc", "jemalloc", "other" (a library path) or "system": what this process runs under."""
    library = active()
    return "system" if library == "system" else kind_of(Path(library))


def describe() -> str:
    """One line for the run's log: the allocator in use, with a hint where glibc was the fallback."""
    library = active()
    if library != "system":
        return f"{kind_of(Path(library))} ({library})"
    if sys.platform.startswith("linux") and choice(os.environ) == "auto":
        return ("glibc malloc; CPU train steps take up to a third less time under tcmalloc "
                "(apt install libtcmalloc-minimal4), see README 'The host allocator'")
    return "system malloc"


def reexec() -> None:
    """Runs this interpreter again under the chosen allocator, or returns if there is none to use.

    Call it first thing in a `__main__`, before JAX (or anything else) is imported: the process
    is replaced with the same command line (`sys.orig_argv`), environment and pid.
    """
    if ACTIVE_VAR in os.environ:
        return
    library = resolve(choice(os.environ))
    if library is None:
        os.environ[ACTIVE_VAR] = "system"
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, reexec_env(library, os.environ))

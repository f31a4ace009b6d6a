"""The host memory allocator: run under mimalloc (from pip), tcmalloc or jemalloc.

XLA:CPU gives each execution one block for all its temporaries (1.97 GB for the `medium`
train step in benchmarks/). glibc serves a block that size with `mmap` and hands it back with
`munmap` when the step ends, so every step faults every page in again: ~500,000 page faults and
~0.8 s of system time in a 2.1 s step. mimalloc with `MIMALLOC_PURGE_DELAY=-1`, tcmalloc, and
jemalloc with `oversize_threshold:0` keep freed memory for reuse, which makes the same step
~1.65 s (benchmarks/README.md). glibc's own knobs do not get there: a block that size from a
worker thread's arena is always mmap'd, and `M_MMAP_MAX=0` with a single arena fragments the heap
(RSS grew to 9 GB with 4 s steps).

A process's allocator is fixed when it starts (`LD_PRELOAD`), so `reexec()` runs the
interpreter again, once, with the allocator preloaded; `python -m llamahome.launch` and the
benchmark scripts call it before importing JAX. `LLAMAHOME_MALLOC` (environment or `.env`)
chooses: `auto` (default: the first of AUTO_ORDER found), `mimalloc`, `tcmalloc`, `jemalloc`,
`system` (glibc, no re-exec), or the path of a malloc library. mimalloc comes with
`pip install` (the `cmeel-mimalloc` wheel, a dependency on Linux x86-64 and aarch64), so no
system package is needed.
"""

from __future__ import annotations

import os
import site
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
    # The cmeel-mimalloc wheel installs libmimalloc.so* under site-packages/cmeel.prefix/lib.
    "mimalloc": ("libmimalloc.so.3", "libmimalloc.so.2", "libmimalloc.so"),
    "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4"),
    "jemalloc": ("libjemalloc.so.2",),
}
# What `auto` takes, first found first: mimalloc ships with pip, so every Linux install has it.
AUTO_ORDER = ("mimalloc", "tcmalloc", "jemalloc")
CHOICES = ("auto", *LIBRARIES, "system")
HOW_TO_INSTALL = {
    "mimalloc": "pip install cmeel-mimalloc",
    "tcmalloc": "Debian/Ubuntu: apt install libtcmalloc-minimal4",
    "jemalloc": "Debian/Ubuntu: apt install libjemalloc2",
}
# Settings each library needs in its environment (a value already set by the user wins).
LIBRARY_ENV = {
    # mimalloc decommits freed memory after a delay; -1: never, so the step's block stays.
    "mimalloc": {"MIMALLOC_PURGE_DELAY": "-1"},
    # tcmalloc prints a stack trace for every allocation over 1 GiB by default.
    "tcmalloc": {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 42)},
    # Without oversize_threshold:0 jemalloc purges large blocks at once, like glibc.
    "jemalloc": {"MALLOC_CONF": "oversize_threshold:0,dirty_decay_ms:30000,muzzy_decay_ms:30000"},
}
PIP_PREFIX = Path("cmeel.prefix") / "lib"


def search_dirs() -> list[Path]:
    """Where shared libraries are looked for: site-packages (pip), the interpreter's, the system's."""
    site_dirs = [sysconfig.get_paths()[key] for key in ("purelib", "platlib")]
    if site.ENABLE_USER_SITE:
        site_dirs.append(site.getusersitepackages())
    dirs = [Path(d) / PIP_PREFIX for d in site_dirs]
    dirs += [Path(sys.prefix) / "lib", Path(sysconfig.get_config_var("LIBDIR") or "/usr/lib")]
    multiarch = sysconfig.get_config_var("MULTIARCH")
    for root in ("/usr/local/lib", "/usr/lib", "/lib", "/usr/lib64"):
        if multiarch:
            dirs.append(Path(root) / multiarch)
        dirs.append(Path(root))
    return list(dict.fromkeys(dirs))


def find_library(kind: str, dirs: list[Path] | None = None) -> Path | None:
    """The first `kind` ("mimalloc", "tcmalloc" or "jemalloc") library file in `dirs`, or None."""
    for directory in search_dirs() if dirs is None else dirs:
        for name in LIBRARIES[kind]:
            if (directory / name).is_file():
                return directory / name
    return None


def kind_of(library: Path) -> str:
    """"mimalloc", "tcmalloc", "jemalloc" or "other", from a library's file name."""
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
        found = next(filter(None, (find_library(kind, dirs) for kind in AUTO_ORDER)), None)
        return found and found.resolve()  # the file /proc/<pid>/maps will name, not a symlink
    if value in LIBRARIES:
        found = find_library(value, dirs)
        if found is None:
            looked = ", ".join(str(d) for d in (search_dirs() if dirs is None else dirs))
            raise ConfigError(f"{VAR}={value}: no {' or '.join(LIBRARIES[value])} in {looked}; "
                              f"install it ({HOW_TO_INSTALL[value]}) or set {VAR}=system")
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
    """"mimalloc", "tcmalloc", "jemalloc", "other" (a library path) or "system": this process's."""
    library = active()
    return "system" if library == "system" else kind_of(Path(library))


def describe() -> str:
    """One line for the run's log: the allocator in use."""
    library = active()
    if library != "system":
        return f"{kind_of(Path(library))} ({library})"
    if sys.platform.startswith("linux") and choice(os.environ) == "auto":
        return f"glibc malloc (auto found no {', '.join(AUTO_ORDER)}; README 'The host allocator')"
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

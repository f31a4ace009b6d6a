"""The one entry point: `python -m llamahome.launch --gin_file=... --gin_param=...`.

The job itself is bound in gin (`launch.job = @train`); see `llamahome/cli.py` for the flags,
the order in which settings are bound, and the run dir. Before anything else the process
re-executes itself under a host memory allocator that keeps freed memory: mimalloc (from pip),
tcmalloc or jemalloc. Only the standard library and LlamaHome's bottom layer are imported
here, so that re-exec happens before JAX loads.

Why an allocator: XLA:CPU gives each execution one block for all its temporaries (1.97 GB for the `d512x8`
train step in benchmarks/). glibc serves a block that size with `mmap` and hands it back with
`munmap` when the step ends, so every step faults every page in again: ~500,000 page faults and
~0.8 s of system time in a 2.1 s step. mimalloc with `MIMALLOC_PURGE_DELAY=-1`, tcmalloc, and
jemalloc with `oversize_threshold:0` keep freed memory for reuse, which makes the same step
~1.65 s (benchmarks/README.md). glibc's own knobs do not get there: a block that size from a
worker thread's arena is always mmap'd, and `M_MMAP_MAX=0` with a single arena fragments the heap
(RSS grew to 9 GB with 4 s steps).

A process's allocator is fixed when it starts (`LD_PRELOAD`), so `reexec_under_allocator()`
runs the interpreter again, once, with the allocator preloaded; `python -m llamahome.launch`
and the benchmark scripts call it before importing JAX. `LLAMAHOME_MALLOC` (environment or
`.env`) chooses: `auto` (default: the first of ALLOCATOR_AUTO_ORDER found), `mimalloc`, `tcmalloc`, `jemalloc`,
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

from llamahome.config.gin_config import parse_dotenv
from llamahome.errors import ConfigError, UserError

MALLOC_VAR = "LLAMAHOME_MALLOC"
# Set in the re-executed process: the library it runs under (or "system"); stops a second re-exec.
MALLOC_ACTIVE_VAR = "LLAMAHOME_MALLOC_ACTIVE"

ALLOCATOR_LIBRARIES = {
    # The cmeel-mimalloc wheel installs libmimalloc.so* under site-packages/cmeel.prefix/lib.
    "mimalloc": ("libmimalloc.so.3", "libmimalloc.so.2", "libmimalloc.so"),
    "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4"),
    "jemalloc": ("libjemalloc.so.2",),
}
# What `auto` takes, first found first: mimalloc ships with pip, so every Linux install has it.
ALLOCATOR_AUTO_ORDER = ("mimalloc", "tcmalloc", "jemalloc")
ALLOCATOR_CHOICES = ("auto", *ALLOCATOR_LIBRARIES, "system")
ALLOCATOR_INSTALL = {
    "mimalloc": "pip install cmeel-mimalloc",
    "tcmalloc": "Debian/Ubuntu: apt install libtcmalloc-minimal4",
    "jemalloc": "Debian/Ubuntu: apt install libjemalloc2",
}
# Settings each library needs in its environment (a value already set by the user wins).
ALLOCATOR_ENV = {
    # mimalloc decommits freed memory after a delay; -1: never, so the step's block stays.
    "mimalloc": {"MIMALLOC_PURGE_DELAY": "-1"},
    # tcmalloc prints a stack trace for every allocation over 1 GiB by default.
    "tcmalloc": {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 42)},
    # Without oversize_threshold:0 jemalloc purges large blocks at once, like glibc.
    "jemalloc": {"MALLOC_CONF": "oversize_threshold:0,dirty_decay_ms:30000,muzzy_decay_ms:30000"},
}
PIP_LIB_DIR = Path("cmeel.prefix") / "lib"


def library_search_dirs() -> list[Path]:
    """Where shared libraries are looked for: site-packages (pip), the interpreter's, the system's."""
    site_dirs = [sysconfig.get_paths()[key] for key in ("purelib", "platlib")]
    if site.ENABLE_USER_SITE:
        site_dirs.append(site.getusersitepackages())
    dirs = [Path(d) / PIP_LIB_DIR for d in site_dirs]
    dirs += [Path(sys.prefix) / "lib", Path(sysconfig.get_config_var("LIBDIR") or "/usr/lib")]
    multiarch = sysconfig.get_config_var("MULTIARCH")
    for root in ("/usr/local/lib", "/usr/lib", "/lib", "/usr/lib64"):
        if multiarch:
            dirs.append(Path(root) / multiarch)
        dirs.append(Path(root))
    return list(dict.fromkeys(dirs))


def find_allocator(kind: str, dirs: list[Path] | None = None) -> Path | None:
    """The first `kind` ("mimalloc", "tcmalloc" or "jemalloc") library file in `dirs`, or None."""
    for directory in library_search_dirs() if dirs is None else dirs:
        for name in ALLOCATOR_LIBRARIES[kind]:
            if (directory / name).is_file():
                return directory / name
    return None


def allocator_kind(library: Path) -> str:
    """"mimalloc", "tcmalloc", "jemalloc" or "other", from a library's file name."""
    return next((kind for kind in ALLOCATOR_LIBRARIES if kind in library.name), "other")


def allocator_choice(environ: Mapping[str, str], dotenv: Path = Path(".env")) -> str:
    """LLAMAHOME_MALLOC from the environment, else from `.env`, else "auto"."""
    if MALLOC_VAR in environ:
        return environ[MALLOC_VAR].strip()
    try:
        return parse_dotenv(dotenv).get(MALLOC_VAR, "auto").strip() if dotenv.is_file() else "auto"
    except (OSError, ConfigError):
        return "auto"  # launch reads .env again and reports what is wrong with it


def resolve_allocator(value: str, dirs: list[Path] | None = None) -> Path | None:
    """The library that LLAMAHOME_MALLOC=`value` asks for; None for glibc."""
    if value == "system" or (value == "auto" and not sys.platform.startswith("linux")):
        return None
    if not sys.platform.startswith("linux"):
        raise ConfigError(f"{MALLOC_VAR}={value}: preloading an allocator (LD_PRELOAD) works on "
                          f"Linux only; use {MALLOC_VAR}=system or auto on {sys.platform}")
    if value == "auto":
        found = next(filter(None, (find_allocator(kind, dirs) for kind in ALLOCATOR_AUTO_ORDER)),
                     None)
        return found and found.resolve()  # the file /proc/<pid>/maps will name, not a symlink
    if value in ALLOCATOR_LIBRARIES:
        found = find_allocator(value, dirs)
        if found is None:
            looked = ", ".join(str(d) for d in (library_search_dirs() if dirs is None else dirs))
            raise ConfigError(f"{MALLOC_VAR}={value}: no {' or '.join(ALLOCATOR_LIBRARIES[value])} "
                              f"in {looked}; install it ({ALLOCATOR_INSTALL[value]}) or set "
                              f"{MALLOC_VAR}=system")
        return found.resolve()
    path = Path(value).expanduser()
    if "/" in value or path.suffix == ".so" or ".so." in path.name:
        if not path.is_file():
            raise ConfigError(f"{MALLOC_VAR}={value}: no such file")
        return path.resolve()
    raise ConfigError(f"{MALLOC_VAR}={value!r} is not one of {', '.join(ALLOCATOR_CHOICES)} "
                      "or a library path")


def preload_env(library: Path, environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` with `library` first in LD_PRELOAD and the settings it needs."""
    env = dict(environ)
    preload = [p for p in env.get("LD_PRELOAD", "").replace(":", " ").split() if p]
    env["LD_PRELOAD"] = " ".join([str(library), *preload])
    for key, value in ALLOCATOR_ENV.get(allocator_kind(library), {}).items():
        env.setdefault(key, value)
    env[MALLOC_ACTIVE_VAR] = str(library)
    return env


def active_allocator() -> str:
    """The allocator this process runs under: a library path, or "system".

    A library the dynamic loader could not preload (wrong architecture, say: it prints a
    warning and goes on) is not mapped into the process, so it reads as "system".
    """
    library = os.environ.get(MALLOC_ACTIVE_VAR, "system")
    if library == "system":
        return library
    try:
        maps = Path(f"/proc/{os.getpid()}/maps").read_text()
    except OSError:
        return library
    return library if os.path.realpath(library) in maps else "system"


def allocator_name() -> str:
    """"mimalloc", "tcmalloc", "jemalloc", "other" (a library path) or "system": this process's."""
    library = active_allocator()
    return "system" if library == "system" else allocator_kind(Path(library))


def describe_allocator() -> str:
    """One line for the run's log: the allocator in use."""
    library = active_allocator()
    if library != "system":
        return f"{allocator_kind(Path(library))} ({library})"
    if sys.platform.startswith("linux") and allocator_choice(os.environ) == "auto":
        return (f"glibc malloc (auto found no {', '.join(ALLOCATOR_AUTO_ORDER)}; "
                "README 'The host allocator')")
    return "system malloc"


def reexec_under_allocator() -> None:
    """Runs this interpreter again under the chosen allocator, or returns if there is none to use.

    Call it first thing in a `__main__`, before JAX (or anything else) is imported: the process
    is replaced with the same command line (`sys.orig_argv`), environment and pid.
    """
    if MALLOC_ACTIVE_VAR in os.environ:
        return
    library = resolve_allocator(allocator_choice(os.environ))
    if library is None:
        os.environ[MALLOC_ACTIVE_VAR] = "system"
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, preload_env(library, os.environ))


if __name__ == "__main__":
    try:
        reexec_under_allocator()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

    from llamahome.cli import run  # after the re-exec: it imports JAX

    run()

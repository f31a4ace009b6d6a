"""The host allocator: which library LLAMAHOME_MALLOC picks, and the re-exec that preloads it."""

from __future__ import annotations

import ctypes.util
import json
import platform
import sys
import sysconfig
from pathlib import Path

import pytest

from llamahome import launch
from llamahome.errors import ConfigError
from tests.conftest import run_python


def _libs(directory: Path, *names: str) -> Path:
    directory.mkdir(exist_ok=True)
    for name in names:
        (directory / name).write_bytes(b"")
    return directory


def test_auto_prefers_mimalloc_then_tcmalloc_then_jemalloc_then_glibc(tmp_path):
    every = _libs(tmp_path / "every", "libjemalloc.so.2", "libtcmalloc_minimal.so.4", "libmimalloc.so.3")
    both = _libs(tmp_path / "both", "libjemalloc.so.2", "libtcmalloc_minimal.so.4")
    only_je = _libs(tmp_path / "je", "libjemalloc.so.2")
    empty = _libs(tmp_path / "empty")
    assert launch.resolve_allocator("auto", [empty, every]) == (every / "libmimalloc.so.3").resolve()
    # The kind decides, not the directory order: mimalloc in a later directory still wins.
    assert launch.resolve_allocator("auto", [both, every]) == (every / "libmimalloc.so.3").resolve()
    assert launch.resolve_allocator("auto", [empty, both]) == (both / "libtcmalloc_minimal.so.4").resolve()
    assert launch.resolve_allocator("auto", [only_je]) == (only_je / "libjemalloc.so.2").resolve()
    assert launch.resolve_allocator("auto", [empty]) is None
    assert launch.resolve_allocator("system", [every]) is None
    assert launch.resolve_allocator("tcmalloc", [every]) == (every / "libtcmalloc_minimal.so.4").resolve()


def test_the_pip_installed_mimalloc_is_searched_first():
    pip_dir = Path(sysconfig.get_paths()["purelib"]) / "cmeel.prefix" / "lib"
    assert launch.library_search_dirs()[0] == pip_dir


def test_a_symlinked_library_resolves_to_the_file_the_process_maps(tmp_path):
    real = _libs(tmp_path / "lib", "libtcmalloc_minimal.so.4.5.10") / "libtcmalloc_minimal.so.4.5.10"
    (tmp_path / "lib" / "libtcmalloc_minimal.so.4").symlink_to(real.name)
    assert launch.resolve_allocator("auto", [tmp_path / "lib"]) == real.resolve()
    assert launch.resolve_allocator("tcmalloc", [tmp_path / "lib"]) == real.resolve()
    assert launch.allocator_kind(real) == "tcmalloc"


def test_named_library_that_is_missing_says_how_to_install_it(tmp_path):
    with pytest.raises(ConfigError, match="LLAMAHOME_MALLOC=tcmalloc.*apt install "
                       "libtcmalloc-minimal4.*LLAMAHOME_MALLOC=system"):
        launch.resolve_allocator("tcmalloc", [tmp_path])
    with pytest.raises(ConfigError, match="libjemalloc2"):
        launch.resolve_allocator("jemalloc", [tmp_path])
    with pytest.raises(ConfigError, match="LLAMAHOME_MALLOC=mimalloc.*pip install cmeel-mimalloc"):
        launch.resolve_allocator("mimalloc", [tmp_path])


def test_bad_values_are_named(tmp_path):
    with pytest.raises(ConfigError,
                       match="'tcmaloc' is not one of auto, mimalloc, tcmalloc, jemalloc, system"):
        launch.resolve_allocator("tcmaloc", [tmp_path])
    with pytest.raises(ConfigError, match="no such file"):
        launch.resolve_allocator(str(tmp_path / "libmine.so"), [tmp_path])
    mine = _libs(tmp_path, "libmine.so") / "libmine.so"
    assert launch.resolve_allocator(str(mine), [tmp_path]) == mine.resolve()


def test_active_reads_system_when_the_library_is_not_mapped(monkeypatch):
    monkeypatch.setenv("LLAMAHOME_MALLOC_ACTIVE", "/nowhere/libtcmalloc_minimal.so.4")
    assert launch.active_allocator() == "system" and launch.allocator_name() == "system"
    monkeypatch.setenv("LLAMAHOME_MALLOC", "auto")
    if sys.platform.startswith("linux"):
        assert launch.describe_allocator().startswith("glibc malloc (auto found no mimalloc")
        assert "apt" not in launch.describe_allocator()
    monkeypatch.setenv("LLAMAHOME_MALLOC", "system")
    assert launch.describe_allocator() == "system malloc"


def test_choice_reads_the_environment_then_dotenv(tmp_path):
    dotenv = tmp_path / ".env"
    assert launch.allocator_choice({}, dotenv) == "auto"
    dotenv.write_text("LLAMAHOME_MALLOC=system\n")
    assert launch.allocator_choice({}, dotenv) == "system"
    assert launch.allocator_choice({"LLAMAHOME_MALLOC": "jemalloc"}, dotenv) == "jemalloc"


def test_reexec_env_prepends_the_library_and_keeps_user_settings():
    tc = Path("/x/libtcmalloc_minimal.so.4")
    env = launch.preload_env(tc, {"LD_PRELOAD": "/y/libother.so", "PATH": "/bin"})
    assert env["LD_PRELOAD"] == "/x/libtcmalloc_minimal.so.4 /y/libother.so"
    assert int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 1 << 40
    assert env["LLAMAHOME_MALLOC_ACTIVE"] == str(tc) and env["PATH"] == "/bin"
    assert launch.preload_env(Path("/x/libmimalloc.so.3"), {})["MIMALLOC_PURGE_DELAY"] == "-1"
    mi = launch.preload_env(Path("/x/libmimalloc.so.3"), {"MIMALLOC_PURGE_DELAY": "500"})
    assert mi["MIMALLOC_PURGE_DELAY"] == "500"
    je = launch.preload_env(Path("/x/libjemalloc.so.2"), {"MALLOC_CONF": "narenas:1"})
    assert je["MALLOC_CONF"] == "narenas:1"
    assert "oversize_threshold:0" in launch.preload_env(Path("/x/libjemalloc.so.2"), {})["MALLOC_CONF"]


PROBE = """
import json, os, sys
from llamahome import launch
launch.reexec_under_allocator()
maps = open(f"/proc/{os.getpid()}/maps").read()
print(json.dumps({"argv": sys.argv[1:], "active": launch.active_allocator(), "name": launch.allocator_name(),
                  "mapped": [p for p in os.environ.get("LD_PRELOAD", "").split() if p in maps]}))
"""


def _probe(tmp_path: Path, value: str) -> dict:
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    result = run_python(["-X", "utf8", str(script), "a", "--b=c"], cwd=tmp_path,
                        env={"LLAMAHOME_MALLOC": value})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux's")
def test_reexec_preloads_the_library_and_keeps_the_command_line(tmp_path):
    libm = ctypes.util.find_library("m")
    candidates = [d / libm for d in launch.library_search_dirs()] if libm else []
    library = next((p for p in candidates if p.is_file()), None)
    if library is None:
        pytest.skip("no libm file to preload")
    # Any shared library shows the mechanics: it is mapped after the re-exec, argv is unchanged.
    got = _probe(tmp_path, str(library))
    assert got == {"argv": ["a", "--b=c"], "active": str(library.resolve()), "name": "other",
                   "mapped": [str(library.resolve())]}
    assert _probe(tmp_path, "system") == {"argv": ["a", "--b=c"], "active": "system",
                                          "name": "system", "mapped": []}


KEEP_PROBE = """
import ctypes, json, resource, sys
from llamahome import launch
launch.reexec_under_allocator()
libc = ctypes.CDLL(None)  # malloc and free as the process resolves them: the preloaded ones
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
faults = []
for _ in range(3):  # like a train step: one large block, written, freed, asked for again
    block = libc.malloc(256 << 20)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ctypes.memset(block, 1, 256 << 20)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    libc.free(block)
print(json.dumps({"name": launch.allocator_name(), "faults": faults}))
"""


def _keep_probe(tmp_path: Path, env: dict[str, str]) -> dict:
    script = tmp_path / "keep.py"
    script.write_text(KEEP_PROBE)
    result = run_python([str(script)], cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


PIP_MIMALLOC = sys.platform.startswith("linux") and platform.machine() in ("x86_64", "aarch64")


@pytest.mark.skipif(not PIP_MIMALLOC, reason="cmeel-mimalloc has wheels for Linux x86-64 and aarch64")
def test_auto_runs_under_the_pip_installed_mimalloc_and_keeps_a_freed_block(tmp_path):
    got = _keep_probe(tmp_path, {"LLAMAHOME_MALLOC": "auto"})
    # 256 MiB is 65,536 pages: glibc faults them all in again each time (munmap on free).
    assert got["name"] == "mimalloc"
    assert max(got["faults"][1:]) <= 8, got
    system = _keep_probe(tmp_path, {"LLAMAHOME_MALLOC": "system"})
    assert system["name"] == "system" and min(system["faults"][1:]) > 10_000, system


@pytest.mark.skipif(launch.find_allocator("tcmalloc") is None,
                    reason="no tcmalloc here (apt install libtcmalloc-minimal4)")
def test_tcmalloc_stays_usable_when_installed(tmp_path):
    got = _probe(tmp_path, "tcmalloc")
    assert got["name"] == "tcmalloc" and got["mapped"] == [got["active"]]


def test_launch_reports_a_bad_choice_without_a_traceback(tmp_path):
    result = run_python(["-m", "llamahome.launch"], cwd=tmp_path,
                        env={"LLAMAHOME_MALLOC": "tcmaloc"})
    assert result.returncode == 2
    assert result.stderr.startswith("error: LLAMAHOME_MALLOC='tcmaloc' is not one of")
    assert "Traceback" not in result.stderr


@pytest.mark.integration
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux's")
def test_launch_logs_the_allocator_it_runs_under(tmp_path):
    expected = next((kind for kind in launch.ALLOCATOR_AUTO_ORDER if launch.find_allocator(kind)), "system")
    result = run_python(["-m", "llamahome.launch", "--gin_file=gin/jobs/env_info.gin",
                         f"--gin_param=launch.run_dir='{tmp_path / 'run'}'"],
                        env={"XLA_FLAGS": "", "LLAMAHOME_MALLOC": "auto"}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"host_allocator: {expected}" in result.stderr
    assert "host allocator: " + ("glibc malloc" if expected == "system" else expected) in result.stderr

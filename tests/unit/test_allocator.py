"""The host allocator: which library LLAMAHOME_MALLOC picks, and the re-exec that preloads it."""

from __future__ import annotations

import ctypes.util
import json
import sys
from pathlib import Path

import pytest

from llamahome import allocator
from llamahome.errors import ConfigError
from tests.conftest import run_python


def _libs(directory: Path, *names: str) -> Path:
    directory.mkdir(exist_ok=True)
    for name in names:
        (directory / name).write_bytes(b"")
    return directory


def test_auto_prefers_tcmalloc_then_jemalloc_then_glibc(tmp_path):
    both = _libs(tmp_path / "both", "libjemalloc.so.2", "libtcmalloc_minimal.so.4")
    only_je = _libs(tmp_path / "je", "libjemalloc.so.2")
    empty = _libs(tmp_path / "empty")
    assert allocator.resolve("auto", [empty, both]) == (both / "libtcmalloc_minimal.so.4").resolve()
    assert allocator.resolve("auto", [only_je]) == (only_je / "libjemalloc.so.2").resolve()
    assert allocator.resolve("auto", [empty]) is None
    assert allocator.resolve("system", [both]) is None


def test_a_symlinked_library_resolves_to_the_file_the_process_maps(tmp_path):
    real = _libs(tmp_path / "lib", "libtcmalloc_minimal.so.4.5.10") / "libtcmalloc_minimal.so.4.5.10"
    (tmp_path / "lib" / "libtcmalloc_minimal.so.4").symlink_to(real.name)
    assert allocator.resolve("auto", [tmp_path / "lib"]) == real.resolve()
    assert allocator.resolve("tcmalloc", [tmp_path / "lib"]) == real.resolve()
    assert allocator.kind_of(real) == "tcmalloc"


def test_named_library_that_is_missing_says_how_to_install_it(tmp_path):
    with pytest.raises(ConfigError, match="LLAMAHOME_MALLOC=tcmalloc.*apt install "
                       "libtcmalloc-minimal4.*LLAMAHOME_MALLOC=system"):
        allocator.resolve("tcmalloc", [tmp_path])
    with pytest.raises(ConfigError, match="libjemalloc2"):
        allocator.resolve("jemalloc", [tmp_path])


def test_bad_values_are_named(tmp_path):
    with pytest.raises(ConfigError, match="'tcmaloc' is not one of auto, tcmalloc, jemalloc, system"):
        allocator.resolve("tcmaloc", [tmp_path])
    with pytest.raises(ConfigError, match="no such file"):
        allocator.resolve(str(tmp_path / "libmine.so"), [tmp_path])
    mine = _libs(tmp_path, "libmine.so") / "libmine.so"
    assert allocator.resolve(str(mine), [tmp_path]) == mine.resolve()


def test_active_reads_system_when_the_library_is_not_mapped(monkeypatch):
    monkeypatch.setenv("LLAMAHOME_MALLOC_ACTIVE", "/nowhere/libtcmalloc_minimal.so.4")
    assert allocator.active() == "system" and allocator.name() == "system"
    monkeypatch.setenv("LLAMAHOME_MALLOC", "auto")
    if sys.platform.startswith("linux"):
        assert "apt install libtcmalloc-minimal4" in allocator.describe()
    monkeypatch.setenv("LLAMAHOME_MALLOC", "system")
    assert allocator.describe() == "system malloc"


def test_choice_reads_the_environment_then_dotenv(tmp_path):
    dotenv = tmp_path / ".env"
    assert allocator.choice({}, dotenv) == "auto"
    dotenv.write_text("LLAMAHOME_MALLOC=system\n")
    assert allocator.choice({}, dotenv) == "system"
    assert allocator.choice({"LLAMAHOME_MALLOC": "jemalloc"}, dotenv) == "jemalloc"


def test_reexec_env_prepends_the_library_and_keeps_user_settings():
    tc = Path("/x/libtcmalloc_minimal.so.4")
    env = allocator.reexec_env(tc, {"LD_PRELOAD": "/y/libother.so", "PATH": "/bin"})
    assert env["LD_PRELOAD"] == "/x/libtcmalloc_minimal.so.4 /y/libother.so"
    assert int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 1 << 40
    assert env["LLAMAHOME_MALLOC_ACTIVE"] == str(tc) and env["PATH"] == "/bin"
    je = allocator.reexec_env(Path("/x/libjemalloc.so.2"), {"MALLOC_CONF": "narenas:1"})
    assert je["MALLOC_CONF"] == "narenas:1"
    assert "oversize_threshold:0" in allocator.reexec_env(Path("/x/libjemalloc.so.2"), {})["MALLOC_CONF"]


PROBE = """
import json, os, sys
from llamahome import allocator
allocator.reexec()
maps = open(f"/proc/{os.getpid()}/maps").read()
print(json.dumps({"argv": sys.argv[1:], "active": allocator.active(), "name": allocator.name(),
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
    candidates = [d / libm for d in allocator.search_dirs()] if libm else []
    library = next((p for p in candidates if p.is_file()), None)
    if library is None:
        pytest.skip("no libm file to preload")
    # Any shared library shows the mechanics: it is mapped after the re-exec, argv is unchanged.
    got = _probe(tmp_path, str(library))
    assert got == {"argv": ["a", "--b=c"], "active": str(library.resolve()), "name": "other",
                   "mapped": [str(library.resolve())]}
    assert _probe(tmp_path, "system") == {"argv": ["a", "--b=c"], "active": "system",
                                          "name": "system", "mapped": []}


@pytest.mark.skipif(allocator.find_library("tcmalloc") is None,
                    reason="no tcmalloc here (apt install libtcmalloc-minimal4; .ci/run does)")
def test_auto_runs_under_tcmalloc_when_installed(tmp_path):
    got = _probe(tmp_path, "auto")
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
    expected = "tcmalloc" if allocator.find_library("tcmalloc") else (
        "jemalloc" if allocator.find_library("jemalloc") else "system")
    result = run_python(["-m", "llamahome.launch", "--gin_file=gin/jobs/env_info.gin",
                         f"--gin_param=launch.run_dir='{tmp_path / 'run'}'"],
                        env={"XLA_FLAGS": "", "LLAMAHOME_MALLOC": "auto"}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"host_allocator: {expected}" in result.stderr
    assert "host allocator: " + ("glibc malloc" if expected == "system" else expected) in result.stderr

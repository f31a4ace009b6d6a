"""Imports point one way: no cycles, no import from a higher layer, no import hidden in a function.

The layers and the checker are benchmarks/architecture.py's; the checker is first shown to
find each kind of fault in a small package written here, so a green run means something.
"""

from __future__ import annotations

import importlib.util
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def arch():
    spec = importlib.util.spec_from_file_location("architecture", ROOT / "benchmarks" / "architecture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    package = tmp_path / "llamahome"
    for name, text in {"__init__.py": "", **files}.items():
        path = package / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return package


def test_checker_finds_a_cycle_a_backward_and_a_local_import(arch, tmp_path):
    package = _package(tmp_path, {
        "errors.py": "from llamahome.model import llama\n",  # bottom -> middle: backward
        "model/__init__.py": "",
        "model/llama.py": "from llamahome import errors\n",  # ... and a cycle with errors
        "train/__init__.py": "",
        "train/loop.py": "def f():\n    from llamahome.infer import generate\n",
        "infer/__init__.py": "",
        "infer/generate.py": "",
        "cli.py": "from llamahome import launch\n",
        "launch.py": "if __name__ == '__main__':\n    from llamahome import cli\n",  # not a cycle
    })
    graph, local = arch.import_graph(package)
    assert arch.cycles(graph) == [["llamahome.errors", "llamahome.model.llama"]]
    assert ("llamahome.errors", "llamahome.model.llama") in arch.backward_imports(graph)
    assert ("llamahome.train.loop", "llamahome.infer.generate") in arch.backward_imports(graph)
    assert ("llamahome.train.loop", "llamahome.infer.generate") in local
    assert {module for module, _ in local} == {"llamahome.train.loop"}


def test_layers(arch):
    assert arch.layer("llamahome.errors") == 0
    assert arch.layer("llamahome.config.validate") == 0
    assert arch.layer("llamahome.data.pipeline") == 1
    assert arch.layer("llamahome.train.loop") == 2
    assert arch.layer("llamahome.data.jobs") == 3
    assert arch.layer("llamahome.model.hf_jobs") == 3
    assert arch.layer("llamahome.cli") == 3


def test_the_package_imports_one_way(arch):
    graph, local = arch.import_graph()
    assert arch.cycles(graph) == []
    assert arch.backward_imports(graph) == []
    assert local == []

"""Gin files and run dirs of the previous version: module paths that moved (issue 16) are read as
their new ones, and a run dir it saved resumes with no config change."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import gin
import pytest

from llamahome import cli
from llamahome.config import gin_config
from llamahome.config.gin_config import MOVED_MODULES, explain_gin_error, update_moved_paths
from llamahome.train.checkpoint import config_changes
from tests.conftest import TEST_CACHE_HOME, run_python

NEW_IMPORT, OLD_IMPORT = "import llamahome.data.sources", "import llamahome.data.corpora"


def test_moved_paths_are_rewritten_outside_strings_and_comments():
    text = ("import llamahome.data.corpora\n"
            "from llamahome.parallel import watchdog\n"
            "from llamahome.data import corpora\n"
            "llamahome.monitor.writers.MetricsWriter.x = 'llamahome.paths'  # llamahome.paths\n"
            "x = @llamahome.cache.manager.CacheManager()\n"
            "llamahome.data.sources.y = 1\n")
    new, changes = update_moved_paths(text)
    assert new == ("import llamahome.data.sources\n"
                   "from llamahome.parallel import distributed\n"
                   "from llamahome.data import sources\n"
                   "llamahome.monitor.MetricsWriter.x = 'llamahome.paths'  # llamahome.paths\n"
                   "x = @llamahome.cache.CacheManager()\n"
                   "llamahome.data.sources.y = 1\n")
    assert [line for line, _, _ in changes] == [1, 2, 3, 4, 5]


def test_every_moved_module_maps_to_an_importable_module():
    for old, new in MOVED_MODULES.items():
        try:
            importlib.import_module(new)
        except ImportError:  # a name in a module (MemoryLimits)
            module, _, name = new.rpartition(".")
            assert hasattr(importlib.import_module(module), name), new
        with pytest.raises(ImportError):
            importlib.import_module(old)


def test_a_moved_import_parsed_by_gin_directly_names_the_new_module():
    with pytest.raises(ImportError) as raised:
        gin.parse_config(OLD_IMPORT)
    assert str(explain_gin_error(raised.value, "old.gin, line 1")) == (
        "old.gin, line 1: imports llamahome.data.corpora, which moved to llamahome.data.sources "
        "in this version; change the import line")


@pytest.mark.parametrize("recipe", ["gin/train/tiny_cpu.gin", "gin/train/quickstart.gin"])
def test_a_run_dir_of_the_previous_version_resumes_without_config_changes(recipe, tmp_path):
    """The previous version's gin files were these but for `import llamahome.data.corpora`: the
    config text its run saved differs from this version's in no binding (imports do not count)."""
    cli.import_configurables()
    gin_config.parse_config([recipe])
    current = gin.config_str()
    assert NEW_IMPORT in current and ".manager" not in current  # no binding the old run lacks
    saved = current.replace(NEW_IMPORT, OLD_IMPORT)
    assert config_changes(saved, current) == []
    # The saved config.gin passed back as --gin_file reads as this version's.
    gin.clear_config()
    (tmp_path / "config.gin").write_text(saved)
    gin_config.parse_config([str(tmp_path / "config.gin")])
    assert config_changes(saved, gin.config_str()) == []
    assert gin.config_str() == current


def test_imports_do_not_count_as_config_changes():
    assert config_changes("import a.b\nx.y = 1\n", "import c\nx.y = 1\n") == []


@pytest.mark.integration
def test_launch_reads_a_previous_version_gin_file_and_keeps_the_cache_out_of_home(tmp_path):
    (tmp_path / "old_include.gin").write_text("import llamahome.monitor.writers\n")
    (tmp_path / "old.gin").write_text(
        "include 'old_include.gin'\nimport llamahome.data.corpora\n"
        "llamahome.hub.security.MemoryLimits.host_ram_bytes = 12345\nlaunch.job = @env_info\n"
        "llamahome.model.config.LlamaConfig.name = 'old'\n")
    run = tmp_path / "run"
    result = run_python(["-m", "llamahome.launch", "--gin_file=old.gin",
                         f"--gin_param=launch.run_dir='{run}'"], env={"XLA_FLAGS": ""}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "old.gin, line 2: llamahome.data.corpora moved to llamahome.data.sources" in result.stderr
    assert "old_include.gin, line 1: llamahome.monitor.writers moved to llamahome.monitor" in result.stderr
    saved = (run / "config.gin").read_text()
    assert NEW_IMPORT in saved and "LlamaConfig.name = 'old'" in saved
    assert "MemoryLimits.host_ram_bytes = 12345" in saved
    # cli.launch turned on JAX's compilation cache: in the session's cache dir, not the home's.
    assert os.environ["LLAMAHOME_CACHE_DIR"] == str(TEST_CACHE_HOME / "llamahome")
    assert (TEST_CACHE_HOME / "llamahome" / "jax_compilation_cache").is_dir()
    assert not str(TEST_CACHE_HOME).startswith(str(Path.home()))

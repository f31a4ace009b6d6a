"""The hub's jobs: `download_model` and `models` (gin/jobs/download_model.gin, models.gin).

    python -m llamahome.launch --gin_file=gin/jobs/download_model.gin \\
      --gin_param="download_model.source='hf://org/name'" \\
      --gin_param="download_model.revision='<commit sha>'"
    python -m llamahome.launch --gin_file=gin/jobs/models.gin --gin_param="models.action='list'"

The run dir of `download_model` gets `download.json` (what was registered, with its hashes);
the token is never written there.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from absl import logging

from llamahome.files import RunDir, models_dir
from llamahome.errors import ConfigError
from llamahome.hub import download, storage
from llamahome.hub.registry import ModelVersion, Registry
from llamahome.hub.security import check_private
from llamahome.jobs import job

ACTIONS = ("list", "show", "pin", "unpin", "remove", "register", "verify")


def secret_files() -> list[Path]:
    """Files that may hold the Hugging Face token: `.env` and the Hub client's token file."""
    from huggingface_hub import constants  # noqa: PLC0415

    return [Path(".env"), Path(constants.HF_TOKEN_PATH)]


def summary(version: ModelVersion) -> dict:
    """What the jobs print and write about a version."""
    return {"ref": version.ref, "source": version.source, "revision": version.revision,
            "size": version.size, "pinned": version.pinned, "parent": version.parent,
            "adapter": version.is_adapter,
            "files": {n: e.sha256 for n, e in version.files.items()}}


@job
def download_model(run_dir: str, source: str | None = None, name: str | None = None,
                   revision: str | None = None, files: Sequence[str] | None = None,
                   sha256: dict[str, str] | str | None = None,
                   allow_patterns: Sequence[str] | None = None, allow_pickle: bool = False,
                   cache_dir: str | None = None, local_files_only: bool = False,
                   parent: str | None = None, progress: bool = True) -> dict:
    """Downloads a model (hf://org/name, an http(s) URL or a local path) into the registry."""
    if not source:
        raise ConfigError("download_model.source is not set; bind e.g. --gin_param="
                          "\"download_model.source='hf://org/name'\" (or a URL or local path)")
    for path in secret_files():
        check_private(path)
    version = download.install(source, name=name, revision=revision, files=files, sha256=sha256,
                               allow_patterns=allow_patterns, allow_pickle=allow_pickle,
                               cache_dir=cache_dir, local_files_only=local_files_only,
                               parent=parent, budget=storage.StorageBudget(), progress=progress)
    result = summary(version)
    RunDir(run_dir).download.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return result


@job(run_dir=False)
def models(run_dir: str | None = None, action: str = "list", ref: str | None = None,
           path: str | None = None, name: str | None = None, parent: str | None = None) -> object:
    """Lists, shows, pins, unpins, removes, verifies or registers (a local dir) model versions."""
    del run_dir  # the registry lives in the models dir, not the run dir
    registry = Registry(models_dir())
    if action not in ACTIONS:
        raise ConfigError(f"models.action = {action!r}; choose one of {', '.join(ACTIONS)}")
    if action == "list":
        versions = registry.list(name)
        if not versions:
            logging.info("no %s in the registry at %s. Add one with --gin_file=gin/jobs/"
                         "download_model.gin --gin_param=\"download_model.source='hf://org/name'\" "
                         "(or an https:// URL or a local folder), or register a local folder with "
                         "--gin_param=\"models.action='register'\" --gin_param=\"models.path='...'\"",
                         f"versions of {name!r}" if name else "models", registry.root)
        for v in versions:
            logging.info("%-40s %12d bytes %s%s%s", v.ref, v.size, v.source,
                         f" ({'adapter on' if v.is_adapter else 'fine-tune of'} {v.parent})"
                         if v.parent else "", " (pinned)" if v.pinned else "")
        return [summary(v) for v in versions]
    if action == "register":
        if not path:
            raise ConfigError("models.action='register' needs models.path (a local directory)")
        version = download.install(path, name=name, parent=parent,
                                   budget=storage.StorageBudget())
        return summary(version)
    if not ref:
        raise ConfigError(f"models.action={action!r} needs models.ref, e.g. 'name' or 'name@2'")
    if action == "show":
        version = registry.get(ref)
        logging.info("%s", json.dumps(version.to_json(), indent=1))
        return version.to_json()
    if action == "verify":
        bad = registry.verify(ref)
        logging.info("%s: %s", ref, f"bad files {bad}" if bad else "all files match their sha256")
        return bad
    if action == "remove":
        freed = registry.remove(ref)
        logging.info("removed %s (%d bytes freed)", ref, freed)
        return freed
    version = registry.pin(ref) if action == "pin" else registry.unpin(ref)
    logging.info("%s pinned: %s", version.ref, version.pinned)
    return summary(version)

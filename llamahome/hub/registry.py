"""The model registry: a JSON manifest of model versions under `files.models_dir()`.

Layout:

    <models_dir>/registry.json          the manifest (replaced atomically, under a file lock)
    <models_dir>/<name>/v<N>/...        the files of version N of model <name>
    <models_dir>/.staging/<key>/        downloads in progress (resumable; moved into place whole)

A version is referred to as `name@N`, or `name` for its newest version. Each entry records
name, version, source (an `hf://` repo, a URL without query or credentials, or a local path),
revision (the Hub commit), files with sha256 and size, total size, created and last-used
times, the run dirs that used it, whether it is pinned, and its parent (`base@N`) when it is
a fine-tune exported from a run and registered as a new version of its base model, or a LoRA
adapter (import_peft, a LoRA export_hf: its files hold `adapter.json`) on that base. A base
is neither removed nor evicted while an adapter on it is registered: an adapter needs its base.

A version is in use while a run that used it is running (its `status.json` says "running"
and its process is alive, or on another host its heartbeat is fresh); in-use versions are
never removed or evicted, and pinned versions are only removed after `unpin`.

Every file name read from the manifest goes through `security.safe_join`, so a manifest that
names `../../etc/passwd` is refused before anything is read or deleted.

The models dir may be on object storage (`models_dir.path = 's3://bucket/models'`, see
store.py): downloads are staged on local disk, uploaded into `<name>/v<N>/` and only then
entered in the manifest (edited under `files.locked_json`'s lock), so a version is in the
registry only once all its files are; files a crash left without an entry are replaced.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import gin

from llamahome import store
from llamahome.errors import CheckpointError, ConfigError, UserError, did_you_mean
from llamahome.files import RunDir, locked_json, models_dir
from llamahome.hub.security import safe_join
from llamahome.model.lora import META_FILE

MANIFEST = "registry.json"
LOCK_FILE = ".registry.lock"  # guards every manifest update
STAGING = ".staging"
FORMAT = 1
STALE_HEARTBEAT_S = 3600.0
CHUNK_BYTES = 1 << 20
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclasses.dataclass(frozen=True)
class FileEntry:
    """One file of a model version."""

    sha256: str
    size: int


@dataclasses.dataclass(frozen=True)
class ModelVersion:
    """One registered version of a model (one row of the manifest)."""

    name: str
    version: int
    source: str
    revision: str | None
    files: dict[str, FileEntry]
    created: float
    last_used: float
    runs: tuple[str, ...] = ()
    pinned: bool = False
    parent: str | None = None

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def is_adapter(self) -> bool:
        """A LoRA adapter (its parent is its base), known by its adapter.json."""
        return META_FILE in self.files

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files.values())

    def to_json(self) -> dict:
        record = dataclasses.asdict(self)
        record["runs"] = list(self.runs)
        record["size"] = self.size
        return record

    @classmethod
    def from_json(cls, record: dict) -> ModelVersion:
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in record.items() if k in fields}
        values["files"] = {n: FileEntry(**e) for n, e in record["files"].items()}
        values["runs"] = tuple(record.get("runs", ()))
        return cls(**values)


def sha256_file(path: store.AnyPath) -> str:
    """The hex sha256 of a file's bytes (a local file or an object)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def check_name(name: str) -> str:
    """Returns `name` if it is a valid model name (letters, digits, '.', '_', '-')."""
    if not _NAME.match(name):
        raise ConfigError(f"model name {name!r} is not valid: use letters, digits, '.', '_' and "
                          "'-' (a Hub repo 'org/name' becomes 'org--name')")
    return name


def parse_ref(ref: str) -> tuple[str, int | None]:
    """'tiny@3' -> ('tiny', 3); 'tiny' -> ('tiny', None) meaning the newest version."""
    name, sep, version = ref.partition("@")
    check_name(name)
    if not sep:
        return name, None
    if not version.lstrip("v").isdigit():
        raise ConfigError(f"model ref {ref!r}: the version after '@' must be a number, "
                          f"e.g. {name}@1")
    return name, int(version.lstrip("v"))


def run_is_active(run_dir: str, now: float | None = None) -> bool:
    """True while the run's status.json says running and its process (or heartbeat) is alive."""
    try:
        status = json.loads(RunDir(run_dir).status.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if status.get("status") != "running":
        return False
    if status.get("host") == socket.gethostname() and isinstance(status.get("pid"), int):
        try:
            os.kill(status["pid"], 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    updated = status.get("updated", 0)
    return (now or time.time()) - float(updated) < STALE_HEARTBEAT_S


class Registry:
    """The versions of models kept under `root`; every change is one locked manifest update."""

    def __init__(self, root: store.AnyPath | str):
        self.root = store.as_path(root)

    # -- reading ------------------------------------------------------------------------
    def versions(self) -> list[ModelVersion]:
        """Every registered version, validated (names and file paths), oldest first."""
        path = self.root / MANIFEST
        try:
            manifest = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        except ValueError as e:
            raise self._invalid(e) from None
        return self._parse(manifest)

    def _parse(self, manifest: dict) -> list[ModelVersion]:
        """The versions of a loaded manifest ({} when there is none yet), validated, oldest first."""
        try:
            versions = [ModelVersion.from_json(r) for r in manifest["versions"]] if manifest else []
        except (ValueError, KeyError, TypeError) as e:
            raise self._invalid(e) from None
        for v in versions:
            self._check(v)
        return sorted(versions, key=lambda v: (v.name, v.version))

    def _invalid(self, e: Exception) -> CheckpointError:
        return CheckpointError(f"{self.root / MANIFEST}: not a valid model registry ({e}); move it "
                               "aside and re-register the models")

    def list(self, name: str | None = None) -> list[ModelVersion]:
        """Versions of `name` (all models when None)."""
        return [v for v in self.versions() if name is None or v.name == name]

    def get(self, ref: str) -> ModelVersion:
        """The version `name@N`, or the newest version of `name`."""
        name, number = parse_ref(ref)
        versions = self.versions()
        matches = [v for v in versions if v.name == name and number in (None, v.version)]
        if not matches:
            refs = [v.ref for v in versions]
            hint = did_you_mean(ref, refs + [v.name for v in versions])
            raise ConfigError(f"no model {ref!r} in the registry at {self.root}.{hint} "
                              f"Registered: {', '.join(refs) or 'none'}")
        return matches[-1]

    def path(self, ref: str) -> Path:
        """The directory holding the files of `ref`."""
        return self.version_dir(self.get(ref))

    def version_dir(self, version: ModelVersion) -> Path:
        return safe_join(self.root, f"{check_name(version.name)}/v{int(version.version)}")

    def verify(self, ref: str) -> list[str]:
        """Files of `ref` that are missing or whose sha256 differs from the manifest."""
        version = self.get(ref)
        directory = self.version_dir(version)
        bad = []
        for name, entry in version.files.items():
            path = safe_join(directory, name)
            try:
                if not path.is_file() or sha256_file(path) != entry.sha256:
                    bad.append(name)
            except FileNotFoundError:
                bad.append(name)
        return bad

    def active_runs(self, version: ModelVersion) -> list[str]:
        """Runs that used `version` and are still running."""
        return [r for r in version.runs if run_is_active(r)]

    # -- changing -----------------------------------------------------------------------
    def add(self, name: str, staged: Path, files: dict[str, FileEntry], *, source: str,
            revision: str | None = None, parent: str | None = None) -> ModelVersion:
        """Moves the staged directory into place as the next version of `name` and records it."""
        check_name(name)
        on_disk = {p.relative_to(staged).as_posix(): p.stat().st_size
                   for p in staged.rglob("*") if p.is_file()}
        expected = {n: e.size for n, e in files.items()}
        if on_disk != expected:
            raise CheckpointError(f"{staged}: staged files {sorted(on_disk)} do not match the "
                                  f"verified list {sorted(expected)}; rerun the download")
        with self._locked() as versions:
            if parent is not None:
                parent = self._find(versions, parent).ref
            number = 1 + max((v.version for v in versions if v.name == name), default=0)
            now = time.time()
            version = ModelVersion(name=name, version=number, source=source, revision=revision,
                                   files=dict(files), created=now, last_used=now, parent=parent)
            self._check(version)
            target = self.version_dir(version)
            if target.exists():  # an orphan left by a crash between manifest and files
                _rmtree(target)
            if store.is_remote(target):  # the manifest entry, written after, marks it whole
                store.upload_dir(staged, target)
                shutil.rmtree(staged, ignore_errors=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staged, target)
            versions.append(version)
        return version

    def pin(self, ref: str) -> ModelVersion:
        """Protects `ref` from eviction and removal."""
        return self._update(ref, pinned=True)

    def unpin(self, ref: str) -> ModelVersion:
        return self._update(ref, pinned=False)

    def record_use(self, ref: str, run_dir: str) -> ModelVersion:
        """Notes that `run_dir` uses `ref` and marks it recently used (for LRU eviction)."""
        run = os.fspath(store.resolve(run_dir) if store.is_remote(run_dir)
                        else Path(run_dir).expanduser().resolve())
        with self._locked() as versions:
            old = self._find(versions, ref)
            runs = old.runs if run in old.runs else (*old.runs, run)
            new = dataclasses.replace(old, runs=runs, last_used=time.time())
            versions[versions.index(old)] = new
        return new

    def remove(self, ref: str) -> int:
        """Deletes a version's files and entry (not if pinned or in use); returns bytes freed."""
        with self._locked() as versions:
            version = self._find(versions, ref)
            if version.pinned:
                raise UserError(f"model {version.ref} is pinned; unpin it first "
                                f"(models.action='unpin', models.ref='{version.ref}')")
            active = self.active_runs(version)
            if active:
                raise UserError(f"model {version.ref} is in use by running run(s) {active}; "
                                "remove it after they finish")
            adapters = [v.ref for v in versions if v.is_adapter and v.parent == version.ref]
            if adapters:
                raise UserError(f"model {version.ref} is the base of adapter(s) "
                                f"{', '.join(adapters)}; remove those first "
                                "(models.action='remove')")
            directory = self.version_dir(version)
            versions.remove(version)
        _rmtree(directory)  # after the manifest: never a dangling entry
        if not store.is_remote(directory):  # object storage has no empty folders to remove
            with contextlib.suppress(OSError):
                directory.parent.rmdir()  # the model's folder, once its last version is gone
        return version.size

    # -- internals ----------------------------------------------------------------------
    def _check(self, version: ModelVersion) -> None:
        directory = self.version_dir(version)
        for name in version.files:
            safe_join(directory, name)

    def _find(self, versions: list[ModelVersion], ref: str) -> ModelVersion:
        name, number = parse_ref(ref)
        matches = [v for v in versions if v.name == name and number in (None, v.version)]
        if not matches:
            return self.get(ref)  # raises with the registered names
        return max(matches, key=lambda v: v.version)

    def _update(self, ref: str, **changes) -> ModelVersion:
        with self._locked() as versions:
            old = self._find(versions, ref)
            new = dataclasses.replace(old, **changes)
            versions[versions.index(old)] = new
        return new

    @contextlib.contextmanager
    def _locked(self) -> Iterator[list[ModelVersion]]:
        """Yields the versions for editing under an exclusive lock, then saves them atomically."""
        with locked_json(self.root / MANIFEST, self.root / LOCK_FILE) as manifest:
            versions = self._parse(manifest)
            yield versions
            manifest.clear()
            manifest.update(format=FORMAT, versions=[v.to_json() for v in versions])


def _rmtree(directory: store.AnyPath) -> None:
    """Deletes a version's folder, local or on object storage; a missing one is no error."""
    if not store.is_remote(directory):
        shutil.rmtree(directory, ignore_errors=True)
        return
    try:
        if directory.exists():
            directory.rmtree()
    except FileNotFoundError:
        pass
    except Exception as e:
        raise store.StorageError(f"cannot delete {store.show(directory)}: "
                                 f"{store.describe_error(e)}") from None


def use_model(ref: str, run_dir: str, root: Path | str | None = None) -> Path:
    """The files directory of `ref`, recording that `run_dir` uses it (for training/generation)."""
    registry = Registry(root if root is not None else models_dir())
    version = registry.record_use(ref, run_dir)
    return registry.version_dir(version)


MODEL_REF_PREFIX = "model:"


@gin.configurable
def model_files(ref: str = gin.REQUIRED) -> str:
    """The folder of `ref`: a registered version's for `model:name@N`, else `ref` (a path).

    A gin reference for files kept beside a model, e.g. its tokenizer in a recipe:
    `load_tokenizer.path = @model_files()` with `model_files.ref = %BASE`.
    """
    if not ref.startswith(MODEL_REF_PREFIX):
        return ref
    return str(Registry(models_dir()).path(ref[len(MODEL_REF_PREFIX):]))


def resolve_model_path(path: str, run_dir: str) -> str:
    """`model:name@N` -> that registered version's directory (recording the run's use); else `path`."""
    if not path.startswith(MODEL_REF_PREFIX):
        return path
    return str(use_model(path[len(MODEL_REF_PREFIX):], run_dir))

"""Fetching a model's files into the registry: the Hugging Face Hub, HTTP(S) URLs, local paths.

`install(source, ...)` stages the files under `<models_dir>/.staging/<key>/`, checks the disk
budget (`storage.ensure_room`) before bytes land, verifies sha256, refuses pickle and code
files, and only then moves the folder into place as a new registry version. A failed
verification deletes the staging folder, so nothing of it is registered; a broken connection
keeps it, and running the same download again resumes.

Sources:

- `hf://org/name` — a Hugging Face Hub repo, through `huggingface_hub.snapshot_download`.
  Only `DEFAULT_ALLOW_PATTERNS` (safetensors, config, tokenizer files) are fetched; `*.py`
  never, pickle formats only with `allow_pickle=True`.
- `https://host/path/model.safetensors`, or `https://host/dir/` with `files=[...]` — plain
  HTTP(S) with `Range` resume, retries and a progress bar; sha256 checked when given.
  No token is ever sent to a URL; the query string and credentials of a URL are not recorded.
- a local file or directory — copied (hashing as it goes); used by `models action=register`
  for a fine-tune exported from a run, registered as a new version of its base model.
- `gs://bucket/dir`, `s3://bucket/dir` — an object storage folder (store.py), copied to local
  staging (`store.download_dir`), then handled as a local directory.

The models dir itself may be a `gs://` / `s3://` URI: then staging is on local disk
(`files.local_cache_dir()/model-staging/`) and the registry uploads the verified folder
(registry.py).

The online Hub path (what the tests cannot run: they use an offline cache layout):

1. The token is `HF_TOKEN` (or `LLAMAHOME_HF_TOKEN`, or a `.env` loaded at start). It is
   passed to `snapshot_download` only, never bound in gin, logged or written to the run dir.
2. `snapshot_download(repo, revision, allow_patterns, ignore_patterns, dry_run=True)` lists
   the files to fetch with their sizes and the commit the revision points to; the budget is
   checked against those sizes.
3. `snapshot_download(..., revision=<that commit>)` fetches them into the Hub cache
   (`cache_dir`, default `HF_HUB_CACHE`); the Hub client resumes its own partial files.
4. Each file is hard-linked (or copied) from the cache into staging and hashed; the cache's
   blob names are the Hub's content hashes (sha256 for LFS files, git blob sha1 for small
   ones), so the hash is checked against what the Hub served.
5. The resolved commit is recorded as the version's revision. An unpinned revision ("main")
   is accepted with a warning that names the commit to pin, e.g.

       python -m llamahome.launch --gin_file=gin/jobs/download_model.gin \\
         --gin_param="download_model.source='hf://meta-llama/Llama-3.2-1B'" \\
         --gin_param="download_model.revision='4e20de362430cd3b72f300e6b0f18e50e7166e08'"
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from absl import logging
from tqdm import tqdm

from llamahome import secrets, store
from llamahome.errors import CheckpointError, ConfigError, DataError, UserError
from llamahome.files import dir_size, local_cache_dir, models_dir
from llamahome.hub import storage
from llamahome.hub.registry import (CHUNK_BYTES, STAGING, FileEntry, ModelVersion, Registry,
                                    check_name, sha256_file)
from llamahome.hub.security import PICKLE_SUFFIXES, refuse_code, refuse_pickle, safe_join

DEFAULT_ALLOW_PATTERNS = (
    "*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "chat_template.jinja",
)
CODE_PATTERNS = ("*.py",)
PICKLE_PATTERNS = tuple(f"*{s}" for s in PICKLE_SUFFIXES)
RETRY_HTTP_CODES = (408, 429, 500, 502, 503, 504)
_HEX40 = re.compile(r"^[0-9a-f]{40}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")

Room = Callable[[int], object]  # called with the bytes about to land, before they do


class IntegrityError(DataError):
    """A downloaded or cached file does not have the hash it must have."""


class TransferError(DataError):
    """A download broke off; its partial files are kept so that running it again resumes."""


def git_blob_sha1(path: Path) -> str:
    """The git object id of a file (what the Hub names non-LFS blobs by)."""
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())  # noqa: S324 (git's id)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def public_url(url: str) -> str:
    """`url` without credentials, query or fragment (what may be logged and recorded)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _check_expected(name: str, entry: FileEntry, expected: str | None, where: str) -> None:
    if expected is not None and entry.sha256 != expected.lower():
        raise IntegrityError(f"{where}: sha256 of {name} is {entry.sha256}, expected {expected}; "
                             "the file is corrupt or not the one you meant; nothing was registered")


# -- plain HTTP(S) ------------------------------------------------------------------------

def _request(url: str, offset: int = 0, method: str = "GET") -> urllib.request.Request:
    headers = {"User-Agent": "llamahome", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    return urllib.request.Request(url, headers=headers, method=method)


def http_size(url: str, timeout: float = 30.0) -> int | None:
    """Content-Length from a HEAD request, or None when the server does not say."""
    try:
        with urllib.request.urlopen(_request(url, method="HEAD"), timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
    except (urllib.error.URLError, OSError, http.client.HTTPException):
        return None
    return int(length) if length and length.isdigit() else None


def _range_start(resp: http.client.HTTPResponse) -> int | None:
    match = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


def http_download(url: str, dest: Path, *, sha256: str | None = None, retries: int = 5,
                  timeout: float = 30.0, backoff_s: float = 1.0,
                  progress: bool = True) -> FileEntry:
    """Downloads `url` to `dest`, resuming a `dest.part` left by an earlier try, and verifies it."""
    part = dest.with_name(dest.name + ".part")
    where = public_url(url)
    digest, offset = hashlib.sha256(), 0
    if part.exists():
        with open(part, "rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                digest.update(chunk)
                offset += len(chunk)
        logging.info("resuming %s at byte %d", where, offset)
    failures = 0
    while True:
        start_offset = offset
        try:
            with urllib.request.urlopen(_request(url, offset), timeout=timeout) as resp:
                if offset and (resp.status != 206 or _range_start(resp) != offset):
                    logging.warning("%s ignored the resume request; starting again", where)
                    digest, offset = hashlib.sha256(), 0
                    part.write_bytes(b"")
                length = resp.headers.get("Content-Length")
                total = offset + int(length) if length and length.isdigit() else None
                with open(part, "ab") as f, tqdm(total=total, initial=offset, unit="B",
                                                 unit_scale=True, desc=dest.name,
                                                 disable=not progress, leave=False) as bar:
                    while chunk := resp.read(CHUNK_BYTES):
                        f.write(chunk)
                        digest.update(chunk)
                        offset += len(chunk)
                        bar.update(len(chunk))
                if total is not None and offset < total:
                    raise http.client.IncompleteRead(b"", total - offset)
            break
        except urllib.error.HTTPError as e:
            if e.code == 416 and offset:  # asked to resume past the end: the part is complete
                break
            if e.code not in RETRY_HTTP_CODES:
                raise DataError(f"{where}: HTTP {e.code} {e.reason}") from None
            if failures >= retries:
                raise TransferError(f"{where}: HTTP {e.code} {e.reason} after {retries} "
                                    "retries; run the download again to resume") from None
            failures += 1
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            failures = 1 if offset > start_offset else failures + 1  # progress: a fresh count
            if failures > retries:
                raise TransferError(f"{where}: gave up after {retries} retries "
                                    f"({type(e).__name__}: {e}); run the download again to "
                                    f"resume from byte {offset}") from None
            logging.warning("%s: connection lost at byte %d (%s); resuming", where, offset,
                            type(e).__name__)
        time.sleep(min(backoff_s * 2 ** max(failures - 1, 0), 30.0))
    entry = FileEntry(sha256=digest.hexdigest(), size=offset)
    try:
        _check_expected(dest.name, entry, sha256, where)
    except IntegrityError:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, dest)
    return entry


def default_file_name(url: str) -> str:
    """The file name a URL ends in ('' when it ends in '/')."""
    path = urllib.parse.urlsplit(url).path
    return "" if path.endswith("/") else urllib.parse.unquote(path.rsplit("/", 1)[-1])


def fetch_http(url: str, staging: Path, *, files: Sequence[str] | None, sha256: dict[str, str],
               room: Room, progress: bool = True, retries: int = 5,
               backoff_s: float = 1.0) -> dict[str, FileEntry]:
    """Downloads one URL, or `files` relative to a base URL, into `staging`."""
    if files:
        base = url if url.endswith("/") else url + "/"
        urls = {name: urllib.parse.urljoin(base, urllib.parse.quote(name)) for name in files}
    else:
        name = default_file_name(url)
        if not name:
            raise ConfigError(f"{public_url(url)} names no file; give the file names with "
                              "download_model.files=[...]")
        urls = {name: url}
    dests = {name: safe_join(staging, name) for name in urls}
    room(sum(http_size(u) or 0 for u in urls.values()))
    entries = {}
    for name, file_url in urls.items():
        dest = dests[name]
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():  # finished in an earlier try
            entries[name] = FileEntry(sha256_file(dest), dest.stat().st_size)
            _check_expected(name, entries[name], sha256.get(name), public_url(file_url))
            continue
        entries[name] = http_download(file_url, dest, sha256=sha256.get(name), retries=retries,
                                      backoff_s=backoff_s, progress=progress)
    return entries


# -- local files and the Hub cache --------------------------------------------------------

def copy_hashed(src: Path, dest: Path, *, link: bool = False) -> FileEntry:
    """Copies (or, with `link`, hard-links) `src` to `dest`; returns the sha256 of what landed."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.unlink(missing_ok=True)
    if link:
        try:
            os.link(src, dest)
        except OSError:  # another filesystem, or links not allowed: copy instead
            link = False
    if not link:
        shutil.copyfile(src, dest)
    return FileEntry(sha256=sha256_file(dest), size=dest.stat().st_size)


def fetch_local(path: Path, staging: Path, *, allow_patterns: Sequence[str] | None,
                room: Room) -> dict[str, FileEntry]:
    """Copies a local file, or the matching files of a directory, into `staging`."""
    from huggingface_hub.utils import filter_repo_objects  # noqa: PLC0415

    if path.is_file():
        sources = {path.name: path}
    else:
        names = [p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()]
        sources = {n: safe_join(path, n) for n in sorted(
            filter_repo_objects(names, allow_patterns=allow_patterns))}
    if not sources:
        raise CheckpointError(f"{path}: no files matching {list(allow_patterns or ['*'])}")
    room(sum(p.stat().st_size for p in sources.values()))
    return {n: copy_hashed(src, safe_join(staging, n)) for n, src in sources.items()}


def fetch_store(uri: str, staging: Path, *, allow_patterns: Sequence[str] | None,
                room: Room) -> dict[str, FileEntry]:
    """Copies the matching objects under a `gs://` / `s3://` folder into `staging`."""
    store.check_access(uri, write=False)
    with tempfile.TemporaryDirectory(prefix="llamahome-fetch-") as tmp:
        local = store.download_dir(uri, Path(tmp) / "source")
        return fetch_local(local, staging, allow_patterns=allow_patterns, room=room)


def verify_hub_blob(name: str, blob: Path, entry: FileEntry) -> None:
    """Checks a file from the Hub cache against its blob name (the Hub's hash of its content)."""
    if _HEX64.match(blob.name):
        actual = entry.sha256
    elif _HEX40.match(blob.name):
        actual = git_blob_sha1(blob)
    else:
        logging.warning("%s: blob %s is not named by a hash; not verified against the Hub", name,
                        blob.name)
        return
    if actual != blob.name:
        raise IntegrityError(f"{name}: the Hub cache blob {blob} hashes to {actual}, not to its "
                             "name; the cache is corrupt. Delete that blob and download again")


def fetch_hf(repo_id: str, staging: Path, *, revision: str | None,
             allow_patterns: Sequence[str], allow_pickle: bool, cache_dir: str | None,
             local_files_only: bool, room: Room) -> tuple[str, dict[str, FileEntry]]:
    """Fetches the matching files of a Hub repo at `revision`; returns (commit, files)."""
    from huggingface_hub import constants, snapshot_download  # noqa: PLC0415
    from huggingface_hub.utils import filter_repo_objects  # noqa: PLC0415

    ignore = [*CODE_PATTERNS, *([] if allow_pickle else PICKLE_PATTERNS)]
    token = secrets.hf_token()
    kwargs = dict(revision=revision, cache_dir=cache_dir, allow_patterns=list(allow_patterns),
                  ignore_patterns=ignore, token=token)
    offline = local_files_only or constants.HF_HUB_OFFLINE
    logging.info("hf://%s: Hugging Face token %s; %s", repo_id, "set" if token else "not set",
                 "offline (local cache only)" if offline else "online")
    try:
        if not offline:
            planned = snapshot_download(repo_id, dry_run=True, **kwargs)
            room(sum(f.file_size or 0 for f in planned if f.will_download))
            if planned:
                kwargs["revision"] = planned[0].commit_hash  # fetch exactly what was sized
        snapshot = Path(snapshot_download(repo_id, local_files_only=offline, **kwargs))
    except (OSError, ValueError) as e:
        raise CheckpointError(secrets.redact(
            f"hf://{repo_id}@{revision or 'main'}: {type(e).__name__}: {e}")) from None
    commit = snapshot.name
    repo_folder = snapshot.parent.parent
    names = [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()]
    names = sorted(filter_repo_objects(names, allow_patterns=allow_patterns,
                                       ignore_patterns=ignore))
    if not names:
        raise CheckpointError(f"hf://{repo_id}@{commit}: no files match {list(allow_patterns)}")
    blobs = {n: safe_join(repo_folder, f"snapshots/{commit}/{n}") for n in names}
    if offline:
        room(sum(b.stat().st_size for b in blobs.values()))
    entries = {}
    for name, blob in blobs.items():
        entries[name] = copy_hashed(blob, safe_join(staging, name), link=True)
        verify_hub_blob(name, blob, entries[name])
    return commit, entries


# -- putting it together ------------------------------------------------------------------

def parse_source(source: str) -> tuple[str, str]:
    """('hf', 'org/name') | ('http', url) | ('store', uri) | ('local', path) for a source."""
    if source.startswith("hf://"):
        repo_id = source[len("hf://"):].strip("/")
        if repo_id.count("/") > 1 or not repo_id:
            raise ConfigError(f"source {source!r}: write a Hub repo as hf://org/name")
        return "hf", repo_id
    scheme = urllib.parse.urlsplit(source).scheme
    if scheme in ("http", "https"):
        return "http", source
    if store.is_remote(source):
        return "store", source.rstrip("/")
    if scheme and len(scheme) > 1:
        raise ConfigError(f"source {public_url(source)!r}: scheme {scheme!r} is not supported; "
                          "use hf://org/name, http(s)://, gs://, s3:// or a local path")
    path = Path(source).expanduser()
    if not path.exists():
        looks_like_repo = re.fullmatch(r"[\w.-]+/[\w.-]+", source)
        hint = f" For a Hub repo write 'hf://{source}'." if looks_like_repo else ""
        raise ConfigError(f"source {source!r}: no such local file or directory.{hint}")
    return "local", str(path.resolve())


def default_name(kind: str, where: str) -> str:
    """A registry name: 'org--name' for a Hub repo, else the last file or folder name (or host)."""
    if kind == "hf":
        return where.replace("/", "--")
    if kind == "http":
        parts = urllib.parse.urlsplit(where)
        segments = [s for s in parts.path.split("/") if s]
        tail = segments[-1].split(".")[0] if segments else parts.hostname or ""
    else:
        tail = store.as_path(where).name.split(".")[0]
    return re.sub(r"[^A-Za-z0-9._-]", "-", tail).lstrip("._-") or "model"


def _staging_dir(registry: Registry, *key: object) -> Path:
    """Where a download lands before it is registered: beside the versions (one rename into
    place), or on local disk when the models dir is on object storage."""
    if store.is_remote(registry.root):
        digest = hashlib.sha256(repr((os.fspath(registry.root), *key)).encode()).hexdigest()
        return local_cache_dir() / "model-staging" / digest[:16]
    digest = hashlib.sha256(repr(key).encode()).hexdigest()[:16]
    return registry.root / STAGING / digest


def install(source: str, *, name: str | None = None, revision: str | None = None,
            files: Sequence[str] | None = None, sha256: dict[str, str] | str | None = None,
            allow_patterns: Sequence[str] | None = None, allow_pickle: bool = False,
            cache_dir: str | None = None, local_files_only: bool = False,
            parent: str | None = None, registry: Registry | None = None,
            budget: storage.StorageBudget | None = None, progress: bool = True,
            retries: int = 5, backoff_s: float = 1.0,
            recorded_source: str | None = None) -> ModelVersion:
    """Fetches `source`, verifies it and registers it as a new version; returns that version.

    `recorded_source` is recorded instead of `source` (a local copy of an upload: its URI)."""
    registry = registry or Registry(models_dir())
    if store.is_remote(registry.root):  # refused before anything is fetched
        store.check_access(os.fspath(registry.root))
    kind, where = parse_source(source)
    label = public_url(where) if kind == "http" else store.show(source)  # never a password
    if files and kind != "http":
        raise ConfigError("download_model.files lists files under an http(s) base URL; for "
                          f"{kind} sources select files with download_model.allow_patterns")
    if parent is not None and name is None:
        name = registry.get(parent).name  # a fine-tune is a new version of its base model
    name = check_name(name or default_name(kind, where))
    if isinstance(sha256, str):
        if kind == "hf" or len(files or [None]) != 1:
            raise ConfigError("download_model.sha256 as one string needs exactly one file; give "
                              "a dict {file name: sha256}")
        sha256 = {(files[0] if files else default_file_name(where)): sha256}
    sha256 = dict(sha256 or {})
    refuse_pickle(allow_patterns or (), allow_pickle, f"{label} allow_patterns")
    staging = _staging_dir(registry, kind, where, revision, tuple(files or ()))
    if kind != "http":  # only HTTP resumes from staging; the Hub client resumes in its cache
        shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True, exist_ok=True)
    staged_bytes = dir_size(staging)

    def room(incoming: int) -> None:
        storage.ensure_room(registry, max(incoming - staged_bytes, 0), budget)

    recorded_revision = revision
    recorded_source = recorded_source or (store.show(where) if kind == "store" else where)
    try:
        if kind == "hf":
            allow = allow_patterns or DEFAULT_ALLOW_PATTERNS
            recorded_revision, entries = fetch_hf(
                where, staging, revision=revision, allow_patterns=allow, allow_pickle=allow_pickle,
                cache_dir=cache_dir, local_files_only=local_files_only, room=room)
            recorded_source = f"hf://{where}"
            if revision != recorded_revision:
                logging.warning("revision %r of %s is not pinned; it is commit %s now: pin it with "
                                "download_model.revision='%s'", revision or "main", recorded_source,
                                recorded_revision, recorded_revision)
        elif kind == "http":
            entries = fetch_http(where, staging, files=files, sha256=sha256, room=room,
                                 progress=progress, retries=retries, backoff_s=backoff_s)
            recorded_source = public_url(where)
        elif kind == "store":
            entries = fetch_store(where, staging, allow_patterns=allow_patterns, room=room)
        else:
            entries = fetch_local(Path(where), staging, allow_patterns=allow_patterns, room=room)
        for file_name, entry in entries.items():
            _check_expected(file_name, entry, sha256.get(file_name), recorded_source)
        unknown = sorted(set(sha256) - set(entries))
        if unknown:
            raise ConfigError(f"download_model.sha256 names {unknown}, which {label!r} does not "
                              f"hold; its files: {sorted(entries)}")
        refuse_code(entries, recorded_source)
        refuse_pickle(entries, allow_pickle, recorded_source)
    except UserError as e:
        if not isinstance(e, TransferError):  # bad or unwanted bytes: nothing to resume from
            shutil.rmtree(staging, ignore_errors=True)
        raise
    version = registry.add(name, staging, entries, source=recorded_source,
                           revision=recorded_revision, parent=parent)
    logging.info("registered %s (%d files, %d bytes) from %s", version.ref, len(entries),
                 version.size, recorded_source)
    return version

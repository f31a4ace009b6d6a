"""Where bytes live: one path layer for local paths and object storage (`gs://`, `s3://`).

Every path setting (run, cache and models dirs, checkpoints, HF dirs, data sources) goes
through `as_path`: a local path becomes a `pathlib.Path`, a `gs://bucket/key` or
`s3://bucket/key` URI an `etils.epath.Path` (fsspec's gcsfs and s3fs underneath, the same
objects Orbax reads and writes). Both answer `/`, `exists`, `read_bytes`, `write_bytes`,
`iterdir`, `glob`, `mkdir` and `unlink`, so code that only reads and writes whole files needs
no branch. What differs on object storage is said once, here:

- There is no rename, so no write-then-rename: one PUT of a whole object is atomic (a reader
  sees the old object or the new one), and a folder is made whole by a marker object written
  last (Orbax's `commit_success.txt`, the checkpoint manifest, the token cache's ledger).
- There is no flock, so a lock or an index edited by several writers uses preconditions:
  `read_versioned` returns an object with its version (GCS generation, S3 ETag) and
  `write_if` / `delete_if` succeed only while the object is still at that version
  (`write_if(..., version=None)`: only if there is none). See `files.py` (the run lock).
- Arrays go through TensorStore's own `gcs` and `s3` drivers: `kvstore_spec`.

Credentials come from the environment as each cloud's own tools read them, never from gin:
Application Default Credentials (`GOOGLE_APPLICATION_CREDENTIALS`, `gcloud auth
application-default login`, the metadata server) for GCS; the `AWS_*` variables, `~/.aws` and
instance roles for S3, with `AWS_ENDPOINT_URL` (or `AWS_ENDPOINT_URL_S3`) for an
S3-compatible store (MinIO, R2, Ceph, moto) and `AWS_REGION`. `STORAGE_EMULATOR_HOST` points
GCS at an emulator (gcsfs and google-cloud-storage read it; `configure_environment` hands it to
TensorStore as `TENSORSTORE_GCS_HTTP_URL`). Nothing here writes a credential anywhere; an URI
is shown through `secrets.redact` (`s3://key:secret@bucket` loses its userinfo).

A failure to reach a bucket is a `StorageError` (a `UserError`: launch prints one line, exit 2)
naming the URI and the cause, from `describe_error`; `check_access` probes a prefix once, at a
job's start, before anything is written.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import uuid
from pathlib import Path
from typing import Any, Union

from etils import epath

from llamahome import secrets
from llamahome.errors import UserError

SCHEMES = ("gs", "s3")
_URI = re.compile(r"^(?P<scheme>gs|s3)://(?P<bucket>[^/]*)/?(?P<key>.*)$")

AnyPath = Union[Path, epath.Path]


class StorageError(UserError):
    """A bucket is missing, denied, unreachable, or the credentials are."""


class Conflict(Exception):
    """A conditional write or delete lost: the object is no longer at the version given."""


def is_remote(path: str | os.PathLike) -> bool:
    """Whether `path` is an object storage URI (`gs://...`, `s3://...`)."""
    return bool(_URI.match(os.fspath(path)))


def as_path(path: str | os.PathLike) -> AnyPath:
    """`path` as a local `pathlib.Path` (with `~` expanded) or, for a URI, an `epath.Path`."""
    text = os.fspath(path)
    if is_remote(text):
        split(text)  # refuses credentials in the URI before any library logs it
        configure_environment()
        return epath.Path(text.rstrip("/"))
    return Path(text).expanduser()


def uri(path: str | os.PathLike) -> str:
    """The URI or local path of `path`, as a string (`epath` keeps the `scheme://`)."""
    return os.fspath(path)


def split(path: str | os.PathLike) -> tuple[str, str, str]:
    """(scheme, bucket, key) of a URI; the key has no leading slash."""
    m = _URI.match(os.fspath(path))
    if not m:
        raise ValueError(f"{path} is not a gs:// or s3:// URI")
    _refuse_userinfo(os.fspath(path), m["bucket"])
    if not m["bucket"]:
        raise StorageError(f"{secrets.redact(os.fspath(path))}: the URI names no bucket")
    return m["scheme"], m["bucket"], m["key"].strip("/")


def _refuse_userinfo(text: str, bucket: str) -> None:
    if "@" in bucket or ":" in bucket:
        raise StorageError(f"{show(text)}: credentials in a URI are not used (and would reach "
                           "logs); set them in the environment: AWS_ACCESS_KEY_ID/"
                           "AWS_SECRET_ACCESS_KEY or AWS_PROFILE for S3, Application Default "
                           "Credentials for GCS")


def show(path: str | os.PathLike) -> str:
    """`path` for a log line or an error: any credentials in it redacted."""
    return secrets.redact(os.fspath(path))


def resolve(path: str | os.PathLike) -> AnyPath:
    """`as_path`, made absolute for a local path (Orbax wants absolute paths)."""
    p = as_path(path)
    return p if is_remote(p) else p.absolute()


# -- the environment --------------------------------------------------------------------------


def configure_environment() -> None:
    """Points TensorStore's GCS driver at `STORAGE_EMULATOR_HOST` when that is set, and teaches
    Orbax to write S3 as it writes GCS (`_orbax_s3`)."""
    host = os.environ.get("STORAGE_EMULATOR_HOST")
    if host and "TENSORSTORE_GCS_HTTP_URL" not in os.environ:
        os.environ["TENSORSTORE_GCS_HTTP_URL"] = host if "://" in host else f"http://{host}"
    if host:  # emulators have no storage-control API for gcsfs's bucket-type lookup
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    _quiet_gcsfs()
    _orbax_s3()


class _OncePerProcess(logging.Filter):
    """Lets the first of gcsfs's "could not determine bucket type" warnings through: gcsfs
    retries the lookup (and warns) at every listing when it is denied, which floods a log."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if "bucket type" not in record.getMessage() and "storage layout" not in record.getMessage():
            return True
        seen, self.seen = self.seen, True
        return not seen


@functools.lru_cache(maxsize=None)
def _quiet_gcsfs() -> None:
    logging.getLogger("gcsfs").addFilter(_OncePerProcess())


@functools.lru_cache(maxsize=None)
def _orbax_s3() -> None:
    """Orbax (0.11-0.12) writes arrays to GCS through TensorStore's `gcs` driver and commits a
    step with a `commit_success.txt` written last, because GCS cannot rename; an `s3://` path
    it takes for a local one (a rename-based commit, a `file` kvstore). Here the same three
    decisions Orbax makes for `gs://` are made for `s3://`: TensorStore's `s3` driver (with
    `kvstore_spec`'s endpoint and region), the path normalised without losing `//`, and the
    commit-file atomicity. tests/integration/test_object_storage.py saves, kills and restores
    through it on an S3 emulator, so an Orbax that moves these functions fails there first."""
    try:
        from orbax.checkpoint._src.path import atomicity, atomicity_defaults, gcs_utils
        from orbax.checkpoint._src.serialization import tensorstore_utils as tsu
    except ImportError:  # another Orbax layout: s3:// checkpoints then fail loudly in Orbax
        return
    use_native, normalize, kvstore_for_gcs = (tsu._use_gcs_driver, tsu._normalize_path,
                                              gcs_utils.get_kvstore_for_gcs)

    def _use_driver(directory: str) -> bool:
        return str(directory).startswith("s3://") or use_native(directory)

    def _normalize_path(path: str) -> str:
        text = normalize(path)
        return text.replace("s3:/", "s3://", 1) if text.startswith("s3:/") else text

    def _kvstore(path: str) -> dict[str, Any]:
        if str(path).startswith("s3://"):
            spec = kvstore_spec(str(path))
            spec["path"] = spec["path"].rstrip("/")
            return spec
        return kvstore_for_gcs(path)

    def _commit_file_for_s3(default):
        def temporary_path_class(path, *, atomicity_options=None):
            if str(path).startswith("s3://") and atomicity_options is None:
                return atomicity.CommitFileTemporaryPath
            return default(path, atomicity_options=atomicity_options)
        return temporary_path_class

    tsu._use_gcs_driver, tsu._normalize_path = _use_driver, _normalize_path
    gcs_utils.get_kvstore_for_gcs = _kvstore
    for name in ("get_default_temporary_path_class", "get_item_default_temporary_path_class"):
        setattr(atomicity_defaults, name, _commit_file_for_s3(getattr(atomicity_defaults, name)))


def s3_endpoint() -> str | None:
    """The S3 endpoint override (an S3-compatible store), from the environment."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def kvstore_spec(path: str | os.PathLike) -> dict[str, Any]:
    """The TensorStore kvstore spec of a folder: `file`, `gcs` or `s3` (with the endpoint)."""
    if not is_remote(path):
        return {"driver": "file", "path": str(resolve(path)) + "/"}
    scheme, bucket, key = split(path)
    prefix = f"{key}/" if key else ""
    configure_environment()
    if scheme == "gs":
        return {"driver": "gcs", "bucket": bucket, "path": prefix}
    spec: dict[str, Any] = {"driver": "s3", "bucket": bucket, "path": prefix,
                            "aws_region": s3_region()}
    if s3_endpoint():
        spec["endpoint"] = s3_endpoint()
    if os.environ.get("AWS_ACCESS_KEY_ID"):  # the keys in the environment, as botocore takes
        spec["aws_credentials"] = {"type": "environment"}  # them (and no ~/.aws errors logged)
    return spec


# -- clients for what fsspec does not offer (preconditions) -----------------------------------


@functools.lru_cache(maxsize=None)
def _s3_client(endpoint: str | None, region: str):
    import botocore.session  # s3fs's dependency; imported only when an s3:// URI is used

    return botocore.session.get_session().create_client("s3", endpoint_url=endpoint,
                                                       region_name=region)


def s3_client():
    return _s3_client(s3_endpoint(), s3_region())


@functools.lru_cache(maxsize=None)
def _gcs_client(emulator: str | None):
    from google.cloud import storage  # gcsfs's dependency; imported only for gs:// URIs

    if emulator:
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(project="llamahome-emulator", credentials=AnonymousCredentials())
    return storage.Client()


def gcs_client():
    return _gcs_client(os.environ.get("STORAGE_EMULATOR_HOST"))


def reset_clients() -> None:
    """Forgets cached clients and filesystems (after the credentials or endpoint change)."""
    _s3_client.cache_clear()
    _gcs_client.cache_clear()
    try:
        import fsspec

        for proto in ("gs", "gcs", "s3"):
            try:
                fsspec.get_filesystem_class(proto).clear_instance_cache()
            except (ImportError, ValueError):
                pass
    except ImportError:
        pass


def read_versioned(path: str | os.PathLike) -> tuple[bytes | None, str | None]:
    """The object at `path` and its version (GCS generation, S3 ETag), or (None, None)."""
    scheme, bucket, key = split(path)
    try:
        if scheme == "s3":
            try:
                r = s3_client().get_object(Bucket=bucket, Key=key)
            except Exception as e:  # botocore's ClientError
                if _code(e) in ("NoSuchKey", "404"):
                    return None, None
                raise
            return r["Body"].read(), r["ETag"]
        from google.api_core import exceptions as gexc

        for _ in range(5):  # the object may be replaced between the two requests
            blob = gcs_client().bucket(bucket).get_blob(key)
            if blob is None:
                return None, None
            generation = str(blob.generation)  # a download may reset it from its headers
            try:
                return blob.download_as_bytes(if_generation_match=int(generation)), generation
            except (gexc.PreconditionFailed, gexc.NotFound):
                continue
        raise Conflict(show(path))
    except Exception as e:
        raise StorageError(f"{show(path)}: {describe_error(e)}") from None


def write_if(path: str | os.PathLike, data: bytes, version: str | None) -> str:
    """Writes the object at `path` only while it is at `version` (None: only if absent);
    returns its new version, or raises `Conflict`."""
    scheme, bucket, key = split(path)
    try:
        if scheme == "s3":
            cond = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}
            return s3_client().put_object(Bucket=bucket, Key=key, Body=data, **cond)["ETag"]
        blob = gcs_client().bucket(bucket).blob(key)
        blob.upload_from_string(data, if_generation_match=0 if version is None else int(version))
        return str(blob.generation)
    except Exception as e:
        if _is_precondition_failure(e):
            raise Conflict(show(path)) from None
        raise StorageError(f"{show(path)}: {describe_error(e)}") from None


def delete_if(path: str | os.PathLike, version: str) -> None:
    """Deletes the object at `path` only while it is at `version`; raises `Conflict` if not."""
    scheme, bucket, key = split(path)
    try:
        if scheme == "s3":
            s3_client().delete_object(Bucket=bucket, Key=key, IfMatch=version)
        else:
            gcs_client().bucket(bucket).blob(key).delete(if_generation_match=int(version))
    except Exception as e:
        if _is_precondition_failure(e) or _code(e) in ("NoSuchKey", "404"):
            raise Conflict(show(path)) from None
        raise StorageError(f"{show(path)}: {describe_error(e)}") from None


def put(path: AnyPath, data: bytes) -> None:
    """Writes a whole object in one request (atomic for readers: old or new, never half)."""
    try:
        path.write_bytes(data)
    except Exception as e:
        raise StorageError(f"cannot write {show(path)}: {describe_error(e)}") from None


# -- errors -----------------------------------------------------------------------------------


def _code(e: BaseException) -> str:
    response = getattr(e, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return str(getattr(e, "code", "") or "")


def _is_precondition_failure(e: BaseException) -> bool:
    return _code(e) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409") or (
        type(e).__name__ in ("PreconditionFailed", "Conflict"))


def describe_error(e: BaseException) -> str:
    """One line of cause for a storage failure: missing bucket, credentials, permission, ..."""
    name, text, code = type(e).__name__, str(e), _code(e)
    low = text.lower()
    if name in ("NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError") or (
            "credentials" in low and ("not found" in low or "could not" in low
                                      or "unable to locate" in low)):
        return ("no credentials found (S3: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE;"
                " GCS: Application Default Credentials)")
    if code == "NoSuchBucket" or "nosuchbucket" in low or "bucket does not exist" in low or (
            "specified bucket does not exist" in low):
        return "the bucket does not exist"
    if code in ("AccessDenied", "403", "AllAccessDisabled", "InvalidAccessKeyId",
                "SignatureDoesNotMatch") or name in ("Forbidden", "PermissionError") or (
            "access denied" in low or "forbidden" in low or " 403" in low):
        return f"access denied ({code or name})"
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionError",
                "ClientConnectorError", "ServerDisconnectedError") or "connect" in low:
        return f"cannot reach the storage endpoint ({secrets.redact(text.splitlines()[0][:200])})"
    if isinstance(e, FileNotFoundError):
        return "not found"
    first = secrets.redact(text.splitlines()[0][:300]) if text else ""
    return f"{name}: {first}" if first else name


def check_access(path: str | os.PathLike, write: bool = True) -> None:
    """Raises `StorageError` naming `path` and the cause unless its bucket can be listed (and,
    with `write`, a probe object written and deleted under it). Local paths pass."""
    if not is_remote(path):
        return
    scheme, bucket, key = split(path)
    p = as_path(path)
    try:
        if scheme == "s3":  # s3fs's exists() reads any failure (no credentials too) as "no"
            try:
                s3_client().head_bucket(Bucket=bucket)
            except Exception as e:
                if _code(e) in ("404", "NoSuchBucket", "NotFound"):
                    raise StorageError(f"{show(path)}: the bucket does not exist") from None
                raise
        elif gcs_client().lookup_bucket(bucket) is None:
            raise StorageError(f"{show(path)}: the bucket does not exist")
        if write:
            probe = p / f".llamahome-write-check-{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()
    except StorageError:
        raise
    except Exception as e:
        raise StorageError(f"{show(path)}: {describe_error(e)}") from None


# -- whole folders ----------------------------------------------------------------------------


def upload_dir(local: str | os.PathLike, remote: str | os.PathLike, last: tuple[str, ...] = ()) -> None:
    """Copies the files under a local folder to `remote`, the names in `last` after all others
    (a folder's marker, e.g. an HF dir's `config.json`, so a reader never takes half a folder
    for a whole one)."""
    local = Path(local)
    files = sorted(p for p in local.rglob("*") if p.is_file())
    files.sort(key=lambda p: p.relative_to(local).as_posix() in last)
    dest = as_path(remote)
    for f in files:
        put(dest / f.relative_to(local).as_posix(), f.read_bytes())


def refresh(path: str | os.PathLike) -> None:
    """Drops fsspec's cached listings under `path`, so `exists`/`iterdir` see objects another
    process wrote since (call it before polling for a marker)."""
    if is_remote(path):
        filesystem(path)[0].invalidate_cache(filesystem(path)[1])


def filesystem(path: str | os.PathLike) -> tuple[Any, str]:
    """(the fsspec filesystem epath itself uses for `path`, `path` in its terms): for gs:// not
    `fsspec.filesystem("gcs")`, whose listings cache is another one."""
    p = as_path(path)
    fs = p._backend.fs(os.fspath(p))
    return fs, fs._strip_protocol(os.fspath(p)).rstrip("/")


def find(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """`{relative name: fsspec info (size, generation or ETag, ...)}` of every object under a
    remote folder, recursively, freshly listed (another process may have written since the last
    listing): one request per 1,000 objects. {} if there is none; `StorageError` if the listing
    fails (a missing bucket, credentials)."""
    fs, prefix = filesystem(path)
    try:
        fs.invalidate_cache(prefix)
        found = fs.find(prefix, detail=True, withdirs=False)
    except FileNotFoundError:
        return {}
    except Exception as e:
        raise StorageError(f"cannot list {show(path)}: {describe_error(e)}") from None
    return {name[len(prefix) + 1:]: info for name, info in sorted(found.items())
            if name.startswith(prefix + "/") and info.get("type", "file") == "file"}


def files_under(path: str | os.PathLike) -> list[AnyPath]:
    """Every file under a folder, recursively, sorted (`rglob` on object storage is refused by
    epath: here it is `find`)."""
    if not is_remote(path):
        return sorted(p for p in as_path(path).rglob("*") if p.is_file())
    root = as_path(path)
    return [root / name for name in find(path)]


def download_dir(remote: str | os.PathLike, local: str | os.PathLike) -> Path:
    """Copies every object under `remote` into the local folder `local` (made if missing);
    returns `local`. Raises `StorageError` naming `remote` if there is nothing there."""
    src, local = as_path(remote), Path(local)
    try:
        found = False
        for f in files_under(remote):
            found = True
            target = local / os.path.relpath(os.fspath(f), os.fspath(src))
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(f.read_bytes())
    except StorageError:
        raise
    except Exception as e:
        raise StorageError(f"cannot read {show(remote)}: {describe_error(e)}") from None
    if not found:
        raise StorageError(f"{show(remote)}: no such folder (no objects under it)")
    return local

"""Object storage emulators on 127.0.0.1 for the tests: moto's S3 server and gcp-storage-emulator.

`emulators()` (a session fixture in conftest: `object_stores`) starts both once per test session
on free loopback ports and stops them at the end; `ObjectStore.env()` is the environment a job
needs to reach one (endpoint, dummy credentials), and `ObjectStore.bucket()` makes a fresh bucket
so tests never share state.

gcp-storage-emulator ignores GCS preconditions (`ifGenerationMatch`), which the run lock relies
on, and sends no `x-goog-generation` header with a download, which TensorStore reads; so it runs
here through `python -m tests.object_store gcs PORT`: the emulator with its object insert and
delete handlers checking `ifGenerationMatch` as GCS does (412 when the object is not at that
generation; 0 means "must not exist") and its downloads naming the generation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class ObjectStore:
    scheme: str  # "s3" or "gs"
    endpoint: str  # http://127.0.0.1:PORT

    def env(self) -> dict[str, str]:
        """What a process needs in its environment to use this store."""
        if self.scheme == "s3":
            return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                    "AWS_SECRET_ACCESS_KEY": "testing-secret-key", "AWS_REGION": "us-east-1",
                    "AWS_EC2_METADATA_DISABLED": "true"}
        return {"STORAGE_EMULATOR_HOST": self.endpoint,
                "TENSORSTORE_GCS_HTTP_URL": self.endpoint,
                "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}

    def bucket(self) -> str:
        """Creates a new empty bucket; returns its URI (`s3://name` or `gs://name`)."""
        name = f"lh-{uuid.uuid4().hex[:16]}"
        if self.scheme == "s3":
            import botocore.session

            client = botocore.session.get_session().create_client(
                "s3", endpoint_url=self.endpoint, region_name="us-east-1",
                aws_access_key_id="testing", aws_secret_access_key="testing-secret-key")
            client.create_bucket(Bucket=name)
        else:
            from google.auth.credentials import AnonymousCredentials
            from google.cloud import storage

            storage.Client(project="test", credentials=AnonymousCredentials(),
                           client_options={"api_endpoint": self.endpoint}).create_bucket(name)
        return f"{self.scheme}://{name}"


def _wait_for(port: int, proc: subprocess.Popen, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} in {timeout} s")


@contextlib.contextmanager
def emulators() -> Iterator[dict[str, ObjectStore]]:
    """Starts the S3 and GCS emulators on loopback; yields {"s3": ..., "gs": ...}."""
    procs, stores = [], {}
    try:
        for scheme in ("s3", "gs"):
            port = free_port()
            if scheme == "s3":
                cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
            else:
                cmd = [sys.executable, "-m", "tests.object_store", "gcs", str(port)]
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, start_new_session=True)
            procs.append(proc)
            _wait_for(port, proc, f"the {scheme} emulator")
            stores[scheme] = ObjectStore(scheme, f"http://127.0.0.1:{port}")
        yield stores
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


# -- gcp-storage-emulator with preconditions --------------------------------------------------


def _serve_gcs(port: int) -> None:
    from http import HTTPStatus

    from gcp_storage_emulator import storage as emulator_storage
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    wanted = threading.local()

    class PreconditionFailed(Exception):
        pass

    def generation(store, bucket: str, name: str) -> str:
        try:
            return str(store.get_file_obj(bucket, name)["generation"])
        except NotFound:
            return "0"

    def check(store, bucket: str, name: str) -> None:
        want = getattr(wanted, "generation", None)
        if want is not None and generation(store, bucket, name) != want:
            raise PreconditionFailed

    create_file = emulator_storage.Storage.create_file
    delete_file = emulator_storage.Storage.delete_file

    def checked_create(self, bucket_name, file_name, *args, **kwargs):
        check(self, bucket_name, file_name)
        return create_file(self, bucket_name, file_name, *args, **kwargs)

    def checked_delete(self, bucket_name, file_name, *args, **kwargs):
        check(self, bucket_name, file_name)
        return delete_file(self, bucket_name, file_name, *args, **kwargs)

    emulator_storage.Storage.create_file = checked_create
    emulator_storage.Storage.delete_file = checked_delete

    def with_precondition(handler):
        def wrapped(request, response, storage, *args, **kwargs):
            values = request.query.get("ifGenerationMatch")
            wanted.generation = values[0] if values else None
            try:
                return handler(request, response, storage, *args, **kwargs)
            except PreconditionFailed:
                response.status = HTTPStatus.PRECONDITION_FAILED
                response.json({"error": {"code": 412, "message": "Precondition Failed"}})
            finally:
                wanted.generation = None
        return wrapped

    download = objects.download

    def download_with_generation(request, response, storage, *args, **kwargs):
        """GCS names the object's generation in every download's headers; TensorStore reads
        it (without it, about one save in two fails with "Malformed StorageGeneration")."""
        with contextlib.suppress(NotFound, KeyError):
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = str(obj["generation"])
            response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
        return download(request, response, storage, *args, **kwargs)

    objects.download = download_with_generation
    objects.insert = with_precondition(objects.insert)
    objects.delete = with_precondition(objects.delete)
    objects.upload_partial = with_precondition(objects.upload_partial)

    from gcp_storage_emulator.server import create_server  # after the patch: it binds handlers

    server = create_server("127.0.0.1", port, in_memory=True)
    server.run()


if __name__ == "__main__":
    if sys.argv[1:2] == ["gcs"]:
        os.environ.pop("STORAGE_EMULATOR_HOST", None)
        _serve_gcs(int(sys.argv[2]))

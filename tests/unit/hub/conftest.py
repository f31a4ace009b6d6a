"""Hub test fixtures: a registry in a temp dir, a real HTTP server on 127.0.0.1, a Hub cache."""

from __future__ import annotations

import http.server
import json
import os
import socket
import time
import re
import threading
import urllib.parse
from pathlib import Path

import pytest

from llamahome.hub import download
from llamahome.hub.registry import Registry


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "models")


class FileServer:
    """Serves `files` over HTTP on 127.0.0.1 with Range support; can cut a response off once."""

    def __init__(self, files: dict[str, bytes]):
        self.files = dict(files)
        self.requests: list[tuple[str, str, dict[str, str]]] = []  # (method, path, headers)
        self.cut_once: dict[str, int] = {}  # file name -> bytes sent before the connection drops
        self.honor_range = True
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output quiet
                pass

            def do_HEAD(self):
                self._serve(body=False)

            def do_GET(self):
                self._serve(body=True)

            def _serve(self, body: bool):
                server.requests.append((self.command, self.path, dict(self.headers)))
                name = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path.lstrip("/"))
                data = server.files.get(name)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                match = re.match(r"bytes=(\d+)-$", self.headers.get("Range", ""))
                if match and server.honor_range:
                    start = int(match.group(1))
                    if start >= len(data):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                if not body:
                    return
                payload = data[start:]
                if body and name in server.cut_once:
                    payload = payload[:server.cut_once.pop(name)]
                    self.close_connection = True
                self.wfile.write(payload)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/"

    def gets(self, name: str) -> list[dict[str, str]]:
        """Headers of each GET of `name`."""
        return [h for m, p, h in self.requests if m == "GET" and p.lstrip("/").startswith(name)]


@pytest.fixture
def file_server():
    servers = []

    def start(files: dict[str, bytes]) -> FileServer:
        server = FileServer(files)
        server.thread.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.httpd.shutdown()
        server.httpd.server_close()


COMMIT = "0123456789abcdef0123456789abcdef01234567"


def make_hub_cache(cache_dir: Path, repo_id: str, files: dict[str, bytes],
                   commit: str = COMMIT) -> Path:
    """Lays out `files` as the Hugging Face Hub cache does (blobs named by hash, refs/main, snapshot
    symlinks); large-file formats get sha256 blob names (LFS), others git blob sha1s."""
    import hashlib  # noqa: PLC0415

    repo = cache_dir / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        if name.endswith((".safetensors", ".bin", ".model")):
            blob = hashlib.sha256(data).hexdigest()
        else:
            blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        (snapshot / name).symlink_to(Path("../../blobs") / blob)
    return repo


def add(registry: Registry, tmp_path: Path, name: str, data: bytes):
    """Registers a one-file model `name` holding `data`."""
    src = tmp_path / f"src-{name}-{len(registry.list())}"
    src.mkdir()
    (src / "model.safetensors").write_bytes(data)
    return download.install(str(src), name=name, registry=registry)


def write_status(run_dir: Path, status: str, **fields) -> Path:
    """Writes a run dir status.json as training does (this process and host)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"status": status, "pid": os.getpid(), "host": socket.gethostname(),
              "updated": time.time(), **fields}
    (run_dir / "status.json").write_text(json.dumps(record))
    return run_dir

"""Fault injection against a real dashboard on 127.0.0.1 (issue 15, item 8): malformed,
oversized and cross-origin requests, and symlinks out of the runs dir.

Generation is a recording fake (`Playground(load=...)`), so every case is fast and a test can
assert that a refused request ran nothing. The body-limit cases speak raw HTTP over a socket,
to claim or stream more than is ever sent.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from llamahome.dashboard import app as app_module
from llamahome.dashboard import run_files
from llamahome.dashboard.app import build_app
from llamahome.dashboard.playground import Playground
from llamahome.dashboard.request_guard import MAX_BODY_BYTES
from tests.conftest import REPO
from tests.integration.headless_chromium import Chromium, find_chromium
from tests.unit.dashboard.fake_runs import serve, write_run

pytestmark = pytest.mark.integration

GENERATE = "/api/runs/live/generate"
SECRET = "the contents of a file outside the runs dir"
TEXT = ["Once", " upon", " a time"]


class FakeGenerator:
    def __init__(self, calls: list) -> None:
        self.calls = calls

    def stream(self, prompt, max_new_tokens, **sampling):
        self.calls.append({"prompt": prompt, "max_new_tokens": max_new_tokens, **sampling})
        yield from TEXT


@pytest.fixture(scope="module")
def outside(tmp_path_factory):
    """A directory beside the runs dir holding what must never be served."""
    root = tmp_path_factory.mktemp("outside")
    (root / "secret.gin").write_text(f"# {SECRET}\nLlamaConfig.name = 'secret'\n")
    (root / "metrics.jsonl").write_text(json.dumps({"step": 1, "split": "train", "loss": 7.0}) + "\n")
    (root / "cache_stats.json").write_text(json.dumps({"hits": 999}))
    write_run(root, "foreign_run", checkpoints={5: 100})
    (root / "ckpt").mkdir()
    (root / "ckpt" / "data").write_bytes(b"\0" * 10)
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory, outside):
    root = tmp_path_factory.mktemp("runs")
    write_run(root, "live", steps=5, checkpoints={10: 100, 20: 200})
    (root / "alias").symlink_to(root / "live")  # stays inside: followed
    (root / "escape").symlink_to(outside / "foreign_run")  # a whole run dir out
    write_run(root, "links", steps=3, checkpoints={10: 100})
    links = root / "links"
    (links / "operative_config.gin").symlink_to(outside / "secret.gin")
    (links / "metrics.jsonl").unlink()
    (links / "metrics.jsonl").symlink_to(outside / "metrics.jsonl")
    (links / "cache_stats.json").symlink_to(outside / "cache_stats.json")
    (links / "checkpoints" / "30").symlink_to(outside / "ckpt")
    (links / "checkpoints" / "10" / "sub0" / "data").unlink()
    (links / "checkpoints" / "10" / "sub0" / "data").symlink_to(outside / "secret.gin")
    return root


@pytest.fixture(scope="module")
def calls():
    return []


@pytest.fixture(scope="module")
def url(runs, calls):
    playground = Playground(load=lambda run_dir, step: FakeGenerator(calls))
    with serve(build_app(runs, playground=playground)) as base:
        yield base


@pytest.fixture(scope="module")
def http(url):
    with httpx.Client(base_url=url, timeout=10) as client:
        yield client


@pytest.fixture(autouse=True)
def _no_calls_yet(calls):
    calls.clear()


def post(http: httpx.Client, body: bytes | str, *, content_type: str | None = "application/json",
         headers: dict | None = None, path: str = GENERATE) -> httpx.Response:
    headers = {**({"Content-Type": content_type} if content_type else {}), **(headers or {})}
    return http.post(path, content=body, headers=headers)


def assert_error(response: httpx.Response, status: int, text: str, field: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert text in body["error"]
    assert body.get("field") == field
    return body


def events(response: httpx.Response) -> list[tuple[str, dict]]:
    out = []
    for block in response.text.split("\n\n"):
        if block.strip():
            fields = dict(line.split(": ", 1) for line in block.split("\n"))
            out.append((fields.get("event", "message"), json.loads(fields["data"])))
    return out


# --- Malformed bodies: 400 naming the field, nothing generated ---------------------------

@pytest.mark.parametrize("raw,field", [
    ('{"max_new_tokens": 1e400}', "max_new_tokens"),
    ('{"max_new_tokens": -1e400}', "max_new_tokens"),
    ('{"max_new_tokens": 1' + "0" * 400 + "}", "max_new_tokens"),
    ('{"max_new_tokens": 64.5}', "max_new_tokens"),
    ('{"max_new_tokens": "64"}', "max_new_tokens"),
    ('{"max_new_tokens": true}', "max_new_tokens"),
    ('{"max_new_tokens": 0}', "max_new_tokens"),
    ('{"max_new_tokens": 1025}', "max_new_tokens"),
    ('{"max_new_tokens": [64]}', "max_new_tokens"),
    ('{"temperature": 1e400}', "temperature"),
    ('{"temperature": 1' + "0" * 400 + "}", "temperature"),
    ('{"temperature": -0.5}', "temperature"),
    ('{"temperature": 101}', "temperature"),
    ('{"temperature": "hot"}', "temperature"),
    ('{"top_p": 0}', "top_p"),
    ('{"top_p": 1.5}', "top_p"),
    ('{"top_p": 1e400}', "top_p"),
    ('{"top_k": -1}', "top_k"),
    ('{"top_k": 2147483648}', "top_k"),
    ('{"seed": -1}', "seed"),
    ('{"seed": 4294967296}', "seed"),
    ('{"step": -1}', "step"),
    ('{"step": "latest"}', "step"),
    ('{"prompt": 123}', "prompt"),
    ('{"prompt": {"text": "hi"}}', "prompt"),
    ('{"prompt": "' + "x" * 8193 + '"}', "prompt"),
    ('{"prompt": "\\ud800"}', "prompt"),
    ('{"promt": "hi"}', "promt"),
    ('["prompt", "hi"]', "body"),
    ('"hi"', "body"),
    ("null", "body"),
])
def test_a_bad_field_is_a_400_that_names_it_and_runs_nothing(http, calls, raw, field):
    assert_error(post(http, raw), 400, field, field)
    assert calls == []


@pytest.mark.parametrize("raw,says", [
    ('{"max_new_tokens": NaN}', "NaN is not a JSON number"),
    ('{"temperature": Infinity}', "Infinity is not a JSON number"),
    ('{"temperature": -Infinity}', "-Infinity is not a JSON number"),
    ("[" * 100_000 + "]" * 100_000, "nests too deeply"),
    ('{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}", "nests too deeply"),
    ("", "not valid JSON"),
    ('{"prompt": "hi"', "not valid JSON"),
    (b'{"prompt": "\xff\xfe"}', "not valid JSON"),
])
def test_a_body_that_is_not_json_is_a_400(http, calls, raw, says):
    assert_error(post(http, raw), 400, says)
    assert calls == []


@pytest.mark.parametrize("content_type", [None, "text/plain", "text/plain;charset=UTF-8",
                                          "application/x-www-form-urlencoded", "multipart/form-data",
                                          "application/jsonx"])
def test_a_json_endpoint_refuses_other_content_types_with_415(http, calls, content_type):
    assert_error(post(http, '{"prompt": "hi"}', content_type=content_type), 415,
                 "Content-Type: application/json")
    assert calls == []


def test_a_bad_since_or_run_name_is_a_4xx_not_a_500(http):
    for query in ("since=1e400", "since=" + "9" * 5000, "since=%00", "since=-"):
        assert http.get(f"/api/runs/live/metrics?{query}").status_code == 400
    for name in ("x" * 5000, "%00", "%ff%fe", "..%2f..", "%2e%2e"):
        assert http.get(f"/api/runs/{name}/config").status_code == 404


# --- Body limit: refused while reading, without buffering ------------------------------

def _address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname, parts.port


def _head(url: str, extra: str) -> bytes:
    host, port = _address(url)
    return (f"POST {GENERATE} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: application/json\r\n{extra}\r\n").encode()


def _read_response(sock: socket.socket, timeout_s: float = 10.0) -> bytes:
    """Everything the server sends until it closes the connection."""
    sock.settimeout(timeout_s)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:  # the server closed with our unread bytes in its buffer
        pass
    return data


def _status(response: bytes) -> int:
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", response)
    assert match, f"no HTTP response: {response[:200]!r}"
    return int(match.group(1))


def post_claiming(url: str, claimed: int, sent: int) -> tuple[bytes, float]:
    """POSTs a `Content-Length: claimed` header and `sent` bytes; (response, seconds to it)."""
    with socket.create_connection(_address(url), timeout=10) as sock:
        start = time.monotonic()
        sock.sendall(_head(url, f"Content-Length: {claimed}\r\n") + b"{" + b" " * (sent - 1))
        return _read_response(sock), time.monotonic() - start


def post_chunked(url: str, chunk_bytes: int = 64 << 10, max_bytes: int = 32 << 20) -> tuple[bytes, int]:
    """Streams a chunked body until the server answers (or `max_bytes`); (response, bytes sent)."""
    chunk = b"%x\r\n" % chunk_bytes + b" " * chunk_bytes + b"\r\n"
    sent = 0
    with socket.create_connection(_address(url), timeout=10) as sock:
        sock.sendall(_head(url, "Transfer-Encoding: chunked\r\n") + b"1\r\n{\r\n")
        while sent < max_bytes and not select.select([sock], [], [], 0)[0]:
            try:
                sock.sendall(chunk)
            except OSError:  # reset or timed out: the server stopped reading
                break
            sent += chunk_bytes
        if sent >= max_bytes:  # never refused: end the body and see what the server says
            sock.sendall(b"0\r\n\r\n")
        return _read_response(sock), sent


def test_a_declared_300_mb_body_is_refused_with_413_before_it_is_read(url, calls):
    response, seconds = post_claiming(url, 300 << 20, sent=64 << 10)
    assert _status(response) == 413 and b"connection: close" in response.lower()
    assert b"limit of %d bytes" % MAX_BODY_BYTES in response
    assert seconds < 5  # answered without waiting for the 300 MB that never come
    assert calls == []


def test_a_chunked_body_is_refused_with_413_once_it_passes_the_limit(url, calls):
    response, sent = post_chunked(url)
    assert _status(response) == 413, response[:300]
    assert sent < 16 << 20, f"the client got to send {sent} bytes before the refusal"
    assert calls == []


def test_a_body_just_under_the_limit_is_read(http, calls):
    body = json.dumps({"prompt": "hi"}).encode()
    body += b" " * (MAX_BODY_BYTES - len(body))
    response = post(http, body)
    assert response.status_code == 200 and calls[0]["prompt"] == "hi"
    assert post(http, body + b" ").status_code == 413


SERVE = """
import sys
from pathlib import Path
import uvicorn
from llamahome.dashboard.app import build_app
from llamahome.dashboard.server import bind_socket
from llamahome.net import url_of
sock = bind_socket("127.0.0.1", 0)
print(url_of(sock), flush=True)
uvicorn.Server(uvicorn.Config(build_app(Path(sys.argv[1])), log_level="warning")).run(sockets=[sock])
"""


def _peak_rss_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE).group(1)) * 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the peak RSS from /proc")
def test_oversized_bodies_do_not_grow_the_server_process(runs):
    """In a server process of its own, so its peak resident memory can be read."""
    proc = subprocess.Popen([sys.executable, "-c", SERVE, str(runs)], cwd=REPO, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE)
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), url
        assert httpx.get(f"{url}/api/runs", timeout=30).status_code == 200  # warmed up
        before = _peak_rss_bytes(proc.pid)
        statuses = [_status(post_claiming(url, 300 << 20, sent=64 << 10)[0])]
        statuses += [_status(post_chunked(url)[0]) for _ in range(3)]
        grown = _peak_rss_bytes(proc.pid) - before
        assert grown < 8 << 20, f"the server's peak memory grew by {grown} bytes"
        assert statuses == [413] * 4
        assert httpx.get(f"{url}/api/runs", timeout=10).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# --- Cross-origin requests: refused before the body is read ----------------------------

@pytest.mark.parametrize("headers", [
    {"Origin": "http://evil.example"},
    {"Origin": "null"},
    {"Origin": "http://127.0.0.1"},  # another port is another origin
    {"Origin": "http://localhost:{port}"},  # another host name is another origin
    {"Origin": "https://127.0.0.1:{port}"},
    {"Origin": "http://127.0.0.1:{port}.evil.example"},
    {"Sec-Fetch-Site": "cross-site"},
    {"Sec-Fetch-Site": "same-site"},
    {"Sec-Fetch-Site": "cross-site", "Origin": "http://127.0.0.1:{port}"},
])
@pytest.mark.parametrize("content_type", ["text/plain", "application/json"])
def test_a_cross_origin_post_is_refused_with_403_and_runs_nothing(url, http, calls, headers, content_type):
    port = _address(url)[1]
    headers = {k: v.format(port=port) for k, v in headers.items()}
    assert_error(post(http, '{"prompt": "hi"}', content_type=content_type, headers=headers),
                 403, "cross-origin request refused")
    assert calls == []


def test_a_cross_origin_request_with_another_method_is_refused_too(http):
    for method in ("PUT", "DELETE", "PATCH"):
        response = http.request(method, GENERATE, headers={"Origin": "http://evil.example"})
        assert response.status_code == 403
        assert http.request(method, GENERATE).status_code == 405


def test_same_origin_and_non_browser_posts_still_generate(url, http, calls):
    body = json.dumps({"prompt": "hi", "max_new_tokens": 7, "temperature": 0.5, "top_k": 0,
                       "top_p": None, "seed": 3, "step": 10})
    for headers in ({"Origin": url, "Sec-Fetch-Site": "same-origin"}, {"Sec-Fetch-Site": "none"},
                    {"Origin": url}, {}):
        response = post(http, body, content_type="application/json; charset=utf-8", headers=headers)
        assert response.status_code == 200, response.text
        assert events(response) == [*[("message", {"text": t}) for t in TEXT], ("done", {})]
    assert calls == [{"prompt": "hi", "max_new_tokens": 7, "temperature": 0.5, "top_k": None,
                      "top_p": None, "seed": 3}] * 4


def test_the_playground_page_still_generates_in_a_real_browser(runs, calls):
    """What Chromium sends for the page's same-origin fetch passes the guard (and is checked)."""
    if (binary := find_chromium()) is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    posted = []
    app = build_app(runs, playground=Playground(load=lambda run_dir, step: FakeGenerator(calls)))

    async def recording(scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST":
            posted.append({k.decode(): v.decode() for k, v in scope["headers"]})
        await app(scope, receive, send)

    with serve(recording) as base:
        browser = Chromium(binary)
        try:
            browser.goto(f"{base}/playground?run=live")
            browser.wait_for("document.querySelectorAll('#step option').length === 2")
            browser.evaluate("document.getElementById('prompt').value = 'hi'; "
                             "document.getElementById('generate').click()")
            output = browser.wait_for("(document.getElementById('state').textContent === 'done' || "
                                      "document.querySelector('#output .error')) && "
                                      "document.getElementById('output').textContent")
        finally:
            browser.close()
    assert output == "hi" + "".join(TEXT)
    assert calls == [{"prompt": "hi", "max_new_tokens": 64, "temperature": 0.8, "top_k": None,
                      "top_p": None, "seed": 0}]
    [headers] = posted
    assert (headers["origin"], headers["sec-fetch-site"]) == (base, "same-origin")
    assert headers["content-type"] == "application/json"


def test_reads_and_pages_are_served_whatever_the_origin(http):
    headers = {"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"}
    assert http.get("/api/runs", headers=headers).status_code == 200
    assert http.get("/playground", headers=headers).status_code == 200


def test_a_foreign_host_header_is_still_refused(http, calls):
    response = post(http, '{"prompt": "hi"}', headers={"Host": "evil.example"})
    assert_error(response, 403, "loopback Host")
    assert calls == []


# --- Symlinks out of the runs dir: not followed ----------------------------------------

def test_a_run_dir_symlinked_out_of_the_runs_dir_is_not_served(http):
    names = [r["name"] for r in http.get("/api/runs").json()["runs"]]
    assert sorted(names) == ["alias", "links", "live"]
    for path in ("", "/metrics", "/config", "/checkpoints", "/cache_stats"):
        assert http.get(f"/api/runs/escape{path}").status_code == 404
    assert http.get("/runs/escape").status_code == 404
    assert post(http, '{"prompt": "hi"}', path="/api/runs/escape/generate").status_code == 404
    assert http.get("/api/runs/alias/config").json()["config"]  # inside: served


def test_run_files_symlinked_out_of_the_run_dir_read_as_missing(http, runs):
    api = "/api/runs/links"
    config = http.get(f"{api}/config")
    assert config.json() == {"config": (runs / "links" / "config.gin").read_text(),
                             "operative_config": None}
    metrics = http.get(f"{api}/metrics").json()
    assert metrics["records"] == [] and metrics["size"] == 0
    assert http.get(f"{api}/cache_stats").json() == {"cache_stats": None}
    checkpoints = http.get(f"{api}/checkpoints").json()["checkpoints"]
    assert [c["step"] for c in checkpoints] == [10]
    run = http.get(api).json()
    assert run["model"] == "tiny" and run["last_loss"] is None
    for path in ("", "/config", "/metrics", "/cache_stats", "/checkpoints"):
        assert SECRET not in http.get(f"{api}{path}").text


def test_the_playground_does_not_load_through_a_symlink_out(http, calls):
    for step, says in ((30, "no checkpoint at step 30"), (10, "is a symlink to outside the run dir")):
        response = post(http, json.dumps({"prompt": "hi", "step": step}),
                        path="/api/runs/links/generate")
        [(event, data)] = events(response)
        assert event == "error" and says in data["message"]
    assert calls == []


def test_static_files_symlinked_out_of_the_static_dir_are_404(tmp_path, monkeypatch, outside):
    static = tmp_path / "static"
    shutil.copytree(app_module.STATIC_DIR, static)
    (static / "leak.js").symlink_to(outside / "secret.gin")
    monkeypatch.setattr(app_module, "STATIC_DIR", static)
    with serve(build_app(tmp_path / "runs")) as base:
        assert httpx.get(f"{base}/static/common.js", timeout=10).status_code == 200
        response = httpx.get(f"{base}/static/leak.js", timeout=10)
        assert response.status_code == 404 and SECRET not in response.text


# --- Server errors: a generic 500, nothing internal leaked -------------------------------

def test_an_unexpected_error_is_a_generic_500_without_a_traceback(http, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("/very/secret/path exploded")

    monkeypatch.setattr(run_files, "list_runs", broken)
    response = http.get("/api/runs")
    assert_error(response, 500, "internal server error")
    assert "secret" not in response.text and "Traceback" not in response.text


def test_a_generation_crash_streams_a_generic_error_event(runs):
    def crash(run_dir, step):
        raise RuntimeError("/very/secret/path exploded")

    with serve(build_app(runs, playground=Playground(load=crash))) as base:
        response = httpx.post(base + GENERATE, json={"prompt": "hi"}, timeout=10)
    [(event, data)] = events(response)
    assert event == "error" and "internal server error" in data["message"]
    assert "secret" not in response.text

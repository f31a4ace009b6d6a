"""The dashboard's Starlette app: four pages and the JSON API they read.

Pages (static HTML + JS from `static/`, drawn in the browser from the API):
  /                      runs list
  /runs/<name>           one run: curves, config, checkpoints, cache stats (live-updating)
  /compare?runs=a,b      loss curves of several runs overlaid
  /playground?run=<name> sample text from a checkpoint, streamed back

API (JSON; every run is a directory directly under `runs_dir`, a local folder or a `gs://` /
`s3://` URI read through `run_files.RemoteReader`):
  GET  /api/runs                          [run summary] (see run_files.run_summary)
  GET  /api/runs/<name>                   run summary plus the raw status.json
  GET  /api/runs/<name>/metrics?since=N   metrics.jsonl records from byte offset N:
                                          {records, next, size, reset}; poll with since=next
  GET  /api/runs/<name>/config            {config, operative_config} (gin text or null)
  GET  /api/runs/<name>/checkpoints       {checkpoints: [{step, bytes, path, mtime}]}
  GET  /api/runs/<name>/cache_stats       {cache_stats: {...} or null}
  POST /api/runs/<name>/generate          {step, prompt, max_new_tokens, temperature, top_k,
                                          top_p, seed} (Content-Type: application/json) ->
                                          text/event-stream of `data: {"text": ...}` then
                                          `event: done`

Every request first passes `request_guard.RequestGuard` (loopback Host, same-origin for
state-changing methods, a body size limit). Client mistakes are 4xx with a JSON
`{"error": ..., "field": ...}` naming what to fix; an unexpected server error is a 500 with
a generic message, its traceback going to the dashboard's log only.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from absl import logging
from starlette.applications import Starlette
from starlette.concurrency import iterate_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from llamahome import secrets, store
from llamahome.dashboard import run_files
from llamahome.dashboard.playground import FieldError, Playground, SampleRequest
from llamahome.dashboard.request_guard import MAX_BODY_BYTES, RequestGuard
from llamahome.errors import UserError
from llamahome.files import RunDir

STATIC_DIR = Path(__file__).parent / "static"
_NO_STORE = {"Cache-Control": "no-store"}


class RequestError(Exception):
    """A client mistake: answered with `status` and a JSON {"error": message[, "field"]}."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.field = status, message, field


def _json(value: object, status_code: int = 200) -> JSONResponse:
    return JSONResponse(value, status_code=status_code, headers=_NO_STORE)


def _not_found(what: str) -> JSONResponse:
    return _json({"error": f"{what} not found"}, 404)


def _request_error(request: Request, exc: RequestError) -> JSONResponse:
    body = {"error": exc.message} | ({"field": exc.field} if exc.field else {})
    return _json(body, exc.status)


def _server_error(request: Request, exc: Exception) -> JSONResponse:
    """Starlette re-raises `exc` after this response, so the server logs its traceback."""
    return _json({"error": "internal server error; the dashboard's log has the details"}, 500)


def _no_json_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


async def read_json_body(request: Request) -> object:
    """The request's JSON body; RequestError (415, 400) unless it is `application/json` JSON."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise RequestError(415, f"send the body as JSON with Content-Type: application/json "
                                f"(got {media_type or 'no Content-Type'!r})")
    try:
        body = await request.body()  # RequestGuard stops it at its size limit
    except ClientDisconnect:  # no one to answer; the status only shows in the access log
        raise RequestError(400, "the client disconnected before the end of the body") from None
    try:
        return json.loads(body, parse_constant=_no_json_constant)
    except RecursionError:
        raise RequestError(400, "the JSON body nests too deeply") from None
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise RequestError(400, f"the body is not valid JSON: {e}") from None


def _run_dir(request: Request) -> Path | None:
    return run_files.run_dir_of(request.app.state.runs_dir, request.path_params["name"])


def _run_json(run_dir: Path, name: str) -> dict | None:
    return run_files.read_json(run_files.run_file(run_dir, name))


def _page(file: str):
    def page(request: Request) -> FileResponse:
        return FileResponse(STATIC_DIR / file, headers=_NO_STORE)
    return page


def run_page(request: Request):
    if _run_dir(request) is None:
        return PlainTextResponse(f"no run {request.path_params['name']!r} under "
                                 f"{store.show(request.app.state.runs_dir)}", 404)
    return FileResponse(STATIC_DIR / "run.html", headers=_NO_STORE)


def api_runs(request: Request) -> JSONResponse:
    state = request.app.state
    return _json({"runs_dir": store.show(state.runs_dir), "stale_after_s": state.stale_after_s,
                  "runs": run_files.list_runs(state.runs_dir, state.stale_after_s)})


def api_run(request: Request) -> JSONResponse:
    if (run_dir := _run_dir(request)) is None:
        return _not_found("run")
    summary = run_files.run_summary(run_dir, request.app.state.stale_after_s)
    summary["status_json"] = _run_json(run_dir, RunDir.STATUS_FILE)
    return _json(summary)


def api_metrics(request: Request) -> JSONResponse:
    if (run_dir := _run_dir(request)) is None:
        return _not_found("run")
    try:
        since = int(request.query_params.get("since", "0"))
    except ValueError:
        return _json({"error": "since must be an integer byte offset (the `next` of the "
                               "previous response)", "field": "since"}, 400)
    return _json(run_files.read_metrics(run_dir, since))


def _config_text(run_dir: Path, name: str) -> str | None:
    text = run_files.read_text(run_files.run_file(run_dir, name))
    return None if text is None else secrets.redact_gin_config(text)


def api_config(request: Request) -> JSONResponse:
    if (run_dir := _run_dir(request)) is None:
        return _not_found("run")
    return _json({"config": _config_text(run_dir, RunDir.CONFIG_FILE),
                  "operative_config": _config_text(run_dir, RunDir.OPERATIVE_CONFIG_FILE)})


def api_checkpoints(request: Request) -> JSONResponse:
    if (run_dir := _run_dir(request)) is None:
        return _not_found("run")
    return _json({"checkpoints": run_files.list_checkpoints(run_dir)})


def api_cache_stats(request: Request) -> JSONResponse:
    if (run_dir := _run_dir(request)) is None:
        return _not_found("run")
    return _json({"cache_stats": _run_json(run_dir, RunDir.CACHE_STATS_FILE)})


def _sse(event: str | None, data: dict) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data)}\n\n"


def _sse_stream(chunks: Iterator[str]) -> Iterator[str]:
    """Server-sent events for a stream of text chunks; a failure becomes an `error` event."""
    try:
        for text in chunks:
            yield _sse(None, {"text": text})
    except UserError as e:
        yield _sse("error", {"message": str(e)})
        return
    except Exception:  # a bug: tell the page that much, and log the traceback here only
        logging.exception("playground request failed")
        yield _sse("error", {"message": "internal server error; the dashboard's log has the details"})
        return
    yield _sse("done", {})


async def api_generate(request: Request):
    if (run_dir := _run_dir(request)) is None:
        return _not_found("run")
    body = await read_json_body(request)
    try:
        sample = SampleRequest.from_json(body)
    except FieldError as e:
        raise RequestError(400, str(e), e.field) from None
    chunks = request.app.state.playground.stream(run_dir, sample)
    return StreamingResponse(iterate_in_threadpool(_sse_stream(chunks)),
                             media_type="text/event-stream", headers=_NO_STORE)


def build_app(runs_dir: Path | str, *, stale_after_s: float = 120.0, loopback_only: bool = True,
              playground: Playground | None = None, max_body_bytes: int = MAX_BODY_BYTES) -> Starlette:
    """The dashboard over the run dirs directly under `runs_dir`."""
    routes = [
        Route("/", _page("index.html")),
        Route("/runs/{name}", run_page),
        Route("/compare", _page("compare.html")),
        Route("/playground", _page("playground.html")),
        Route("/api/runs", api_runs),
        Route("/api/runs/{name}", api_run),
        Route("/api/runs/{name}/metrics", api_metrics),
        Route("/api/runs/{name}/config", api_config),
        Route("/api/runs/{name}/checkpoints", api_checkpoints),
        Route("/api/runs/{name}/cache_stats", api_cache_stats),
        Route("/api/runs/{name}/generate", api_generate, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC_DIR, follow_symlink=False), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={RequestError: _request_error,
                                                       Exception: _server_error})
    app.add_middleware(RequestGuard, loopback_only=loopback_only, max_body_bytes=max_body_bytes)
    app.state.runs_dir = store.as_path(runs_dir)
    app.state.stale_after_s = stale_after_s
    app.state.playground = playground or Playground()
    return app

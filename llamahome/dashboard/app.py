"""The dashboard's Starlette app: four pages and the JSON API they read.

Pages (static HTML + JS from `static/`, drawn in the browser from the API):
  /                      runs list
  /runs/<name>           one run: curves, config, checkpoints, cache stats (live-updating)
  /compare?runs=a,b      loss curves of several runs overlaid
  /playground?run=<name> sample text from a checkpoint, streamed back

API (JSON; every run is a directory directly under `runs_dir`):
  GET  /api/runs                          [run summary] (see run_files.run_summary)
  GET  /api/runs/<name>                   run summary plus the raw status.json
  GET  /api/runs/<name>/metrics?since=N   metrics.jsonl records from byte offset N:
                                          {records, next, size, reset}; poll with since=next
  GET  /api/runs/<name>/config            {config, operative_config} (gin text or null)
  GET  /api/runs/<name>/checkpoints       {checkpoints: [{step, bytes, path, mtime}]}
  GET  /api/runs/<name>/cache_stats       {cache_stats: {...} or null}
  POST /api/runs/<name>/generate          {step, prompt, max_new_tokens, temperature, top_k,
                                          top_p, seed} -> text/event-stream of
                                          `data: {"text": ...}` then `event: done`
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from absl import logging
from starlette.applications import Starlette
from starlette.concurrency import iterate_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from llamahome.dashboard import run_files
from llamahome.dashboard.playground import Playground, SampleRequest
from llamahome.errors import UserError

STATIC_DIR = Path(__file__).parent / "static"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
_NO_STORE = {"Cache-Control": "no-store"}


def _json(value: object, status_code: int = 200) -> JSONResponse:
    return JSONResponse(value, status_code=status_code, headers=_NO_STORE)


def _not_found(what: str) -> JSONResponse:
    return _json({"error": f"{what} not found"}, 404)


def _run_dir(request: Request) -> Path | None:
    return run_files.run_dir_of(request.app.state.runs_dir, request.path_params["name"])


def _page(file: str):
    def page(request: Request) -> FileResponse:
        return FileResponse(STATIC_DIR / file, headers=_NO_STORE)
    return page


def run_page(request: Request):
    if _run_dir(request) is None:
        return PlainTextResponse(f"no run {request.path_params['name']!r} under "
                                 f"{request.app.state.runs_dir}", 404)
    return FileResponse(STATIC_DIR / "run.html", headers=_NO_STORE)


def api_runs(request: Request) -> JSONResponse:
    state = request.app.state
    return _json({"runs_dir": str(state.runs_dir), "stale_after_s": state.stale_after_s,
                  "runs": run_files.list_runs(state.runs_dir, state.stale_after_s)})


def api_run(request: Request) -> JSONResponse:
    if (run_dir := _run_dir(request)) is None:
        return _not_found("run")
    summary = run_files.run_summary(run_dir, request.app.state.stale_after_s)
    summary["status_json"] = run_files.read_json(run_dir / run_files.STATUS_FILE)
    return _json(summary)


def api_metrics(request: Request) -> JSONResponse:
    if (run_dir := _run_dir(request)) is None:
        return _not_found("run")
    try:
        since = int(request.query_params.get("since", "0"))
    except ValueError:
        return _json({"error": "since must be an integer byte offset (the `next` of the "
                               "previous response)"}, 400)
    return _json(run_files.read_metrics(run_dir, since))


def api_config(request: Request) -> JSONResponse:
    if (run_dir := _run_dir(request)) is None:
        return _not_found("run")
    return _json({"config": run_files.read_text(run_dir / run_files.CONFIG_FILE),
                  "operative_config": run_files.read_text(run_dir / run_files.OPERATIVE_CONFIG_FILE)})


def api_checkpoints(request: Request) -> JSONResponse:
    if (run_dir := _run_dir(request)) is None:
        return _not_found("run")
    return _json({"checkpoints": run_files.list_checkpoints(run_dir)})


def api_cache_stats(request: Request) -> JSONResponse:
    if (run_dir := _run_dir(request)) is None:
        return _not_found("run")
    return _json({"cache_stats": run_files.read_json(run_dir / run_files.CACHE_STATS_FILE)})


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
    except Exception as e:  # a bug: still tell the page, and log the traceback here
        logging.exception("playground request failed")
        yield _sse("error", {"message": f"{type(e).__name__}: {e} (see the dashboard's log)"})
        return
    yield _sse("done", {})


async def api_generate(request: Request):
    if (run_dir := _run_dir(request)) is None:
        return _not_found("run")
    try:
        sample = SampleRequest.from_json(await request.json())
    except (ValueError, TypeError, KeyError) as e:
        return _json({"error": f"bad request body: {e}"}, 400)
    chunks = request.app.state.playground.stream(run_dir, sample)
    return StreamingResponse(iterate_in_threadpool(_sse_stream(chunks)),
                             media_type="text/event-stream", headers=_NO_STORE)


class LoopbackHostOnly:
    """Rejects requests whose Host header is not a loopback name (DNS-rebinding defence)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            if urlsplit(f"//{host}").hostname not in LOOPBACK_NAMES:
                await PlainTextResponse("dashboard: only loopback Host headers are served", 403)(
                    scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(runs_dir: Path, *, stale_after_s: float = 120.0, loopback_only: bool = True,
              playground: Playground | None = None) -> Starlette:
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
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ]
    app = Starlette(routes=routes)
    if loopback_only:
        app.add_middleware(LoopbackHostOnly)
    app.state.runs_dir = Path(runs_dir)
    app.state.stale_after_s = stale_after_s
    app.state.playground = playground or Playground()
    return app

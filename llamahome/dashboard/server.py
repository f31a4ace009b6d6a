"""The `dashboard` job: serves the dashboard app with uvicorn on a loopback address.

    python -m llamahome.launch --gin_file=gin/dashboard.gin --gin_param='dashboard.runs_dir="runs"'

`runs_dir` may be a `gs://` or `s3://` URI: the runs are read from the bucket (run_files.py).

Only loopback hosts (127.0.0.1, ::1, localhost) are served unless `allow_public=True`: the
dashboard has no authentication, and its playground runs models on this machine.
"""

from __future__ import annotations

import socket

import uvicorn
from absl import logging

from llamahome import files, net, store
from llamahome.dashboard.app import build_app
from llamahome.jobs import job


_PUBLIC_HINT = ("the dashboard has no authentication; use dashboard.host='127.0.0.1' (and an SSH "
                "tunnel to reach it), or set dashboard.allow_public=True to serve it anyway")


def bind_socket(host: str, port: int, allow_public: bool = False) -> socket.socket:
    """A listening TCP socket on (host, port); port 0 picks a free one."""
    return net.listen(host, port, allow_public=allow_public, setting="dashboard",
                      public_hint=_PUBLIC_HINT, backlog=128)


@job(run_dir=False)
def dashboard(run_dir: str | None = None, runs_dir: str | None = None,
              host: str = "127.0.0.1",
              port: int = 8265, allow_public: bool = False, stale_after_s: float = 120.0) -> None:
    """Serves the dashboard over the runs under `runs_dir` until interrupted (run_dir is unused)."""
    del run_dir  # the dashboard only reads run dirs: it gets none of its own
    root = store.as_path(runs_dir) if runs_dir else files.runs_dir()
    store.check_access(root, write=False)  # a missing bucket or credentials: one line, exit 2
    sock = bind_socket(host, port, allow_public)
    app = build_app(root, stale_after_s=stale_after_s, loopback_only=not allow_public)
    logging.info("dashboard of %s on %s (Ctrl-C stops it)", store.show(store.resolve(root)),
                 net.url_of(sock))
    print(f"dashboard: {net.url_of(sock)}", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    server.run(sockets=[sock])

"""The `dashboard` job: serves the dashboard app with uvicorn on a loopback address.

    python -m llamahome.launch --gin_file=gin/dashboard.gin --gin_param='dashboard.runs_dir="runs"'

Only loopback hosts (127.0.0.1, ::1, localhost) are served unless `allow_public=True`: the
dashboard has no authentication, and its playground runs models on this machine.
"""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

import uvicorn
from absl import logging

from llamahome import files
from llamahome.dashboard.app import build_app
from llamahome.errors import ConfigError
from llamahome.jobs import job


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_socket(host: str, port: int, allow_public: bool = False) -> socket.socket:
    """A listening TCP socket on (host, port); port 0 picks a free one."""
    if not is_loopback(host) and not allow_public:
        raise ConfigError(f"dashboard.host={host!r} is not a loopback address and the dashboard "
                          "has no authentication; use dashboard.host='127.0.0.1' (and an SSH "
                          "tunnel to reach it), or set dashboard.allow_public=True to serve it anyway")
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise ConfigError(f"dashboard cannot listen on {host}:{port} ({e.strerror}); choose "
                          "another dashboard.port, or 0 for any free port") from None
    sock.listen(128)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@job(run_dir=False)
def dashboard(run_dir: str | None = None, runs_dir: str | None = None,
              host: str = "127.0.0.1",
              port: int = 8265, allow_public: bool = False, stale_after_s: float = 120.0) -> None:
    """Serves the dashboard over the runs under `runs_dir` until interrupted (run_dir is unused)."""
    del run_dir  # the dashboard only reads run dirs: it gets none of its own
    root = Path(runs_dir).expanduser() if runs_dir else files.runs_dir()
    sock = bind_socket(host, port, allow_public)
    app = build_app(root, stale_after_s=stale_after_s, loopback_only=not allow_public)
    logging.info("dashboard of %s on %s (Ctrl-C stops it)", root.resolve(), url_of(sock))
    print(f"dashboard: {url_of(sock)}", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    server.run(sockets=[sock])

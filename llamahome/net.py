"""Listening sockets for the HTTP jobs (`serve`, `dashboard`): loopback unless told otherwise.

    sock = listen("127.0.0.1", 0, setting="serve", public_hint="...")   # port 0: any free port
    print(url_of(sock))

A non-loopback host is refused (ConfigError, exit 2) unless the job's `allow_public` is set:
both jobs run models on this machine, and the dashboard has no authentication.
"""

from __future__ import annotations

import ipaddress
import socket

from llamahome.errors import ConfigError


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listen(host: str, port: int, *, allow_public: bool = False, setting: str,
           public_hint: str, backlog: int = 256) -> socket.socket:
    """A listening TCP socket on (host, port).

    `setting` names the job's gin scope in messages (`<setting>.host`, `<setting>.port`);
    `public_hint` says why a public bind is refused and how to allow it.
    """
    if not is_loopback(host) and not allow_public:
        raise ConfigError(f"{setting}.host={host!r} is not a loopback address; {public_hint}")
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise ConfigError(f"{setting} cannot listen on {host}:{port} ({e.strerror}); choose "
                          f"another {setting}.port, or 0 for any free port") from None
    sock.listen(backlog)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

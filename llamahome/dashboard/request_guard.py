"""The dashboard's checks on every request, before any route sees it (an ASGI middleware).

- Host: only loopback names are served unless told otherwise (DNS-rebinding defence).
- Cross-origin: a state-changing request (any method but GET, HEAD, OPTIONS) from a browser
  must come from the page's own origin: `Sec-Fetch-Site`, when sent, must be `same-origin`
  or `none`, and `Origin`, when sent, must equal the served origin (scheme, Host header).
  Requests with neither header come from a non-browser client (curl, a script), which no
  other site can drive; this is the check of Go's `http.CrossOriginProtection` with the
  Origin comparison applied on top of a passing `Sec-Fetch-Site`.
- Body size: a declared Content-Length over the limit is refused before a byte of the body
  is read; a chunked body is counted as it is read and refused when it passes the limit, so
  no request can make the server hold more than `max_body_bytes` of it.

A refused request gets a JSON `{"error": ...}` and `Connection: close`, so the server never
reads the rest of its body.
"""

from __future__ import annotations

import json
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
ALLOWED_FETCH_SITES = ("same-origin", "none")  # "none": the user typed the URL or bookmarked it
MAX_BODY_BYTES = 256 << 10  # the largest valid request (an 8192-character prompt) is < 100 KiB
_DEFAULT_PORTS = {"http": 80, "https": 443}


class BodyTooLarge(Exception):
    """Raised from `receive` when a request body passes the limit while being read."""


def _origin_key(scheme: str | None, netloc: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) with the scheme's default port filled in; None if malformed."""
    try:
        parts = urlsplit(f"//{netloc}")
        port = parts.port
    except ValueError:
        return None
    if not scheme or not parts.hostname:
        return None
    return scheme.lower(), parts.hostname.lower(), port or _DEFAULT_PORTS.get(scheme.lower(), 0)


def cross_origin_refusal(method: str, scheme: str, headers: dict[str, str]) -> str | None:
    """Why a request must be refused as cross-origin, or None when it may go on."""
    if method in SAFE_METHODS:
        return None
    site = headers.get("sec-fetch-site")
    if site is not None and site.lower() not in ALLOWED_FETCH_SITES:
        return f"cross-origin request refused (Sec-Fetch-Site: {site})"
    origin = headers.get("origin")
    if origin is None:
        return None
    parts = urlsplit(origin) if origin != "null" else None
    served = _origin_key(scheme, headers.get("host", ""))
    if parts is None or served is None or _origin_key(parts.scheme, parts.netloc) != served:
        return "cross-origin request refused (the Origin header is not this dashboard's origin)"
    return None


def declared_length(headers: dict[str, str]) -> int | None:
    """The Content-Length header as an int, None when absent; ValueError when malformed."""
    value = headers.get("content-length")
    if value is None:
        return None
    if not (value.isascii() and value.isdigit()):
        raise ValueError(f"Content-Length {value!r} is not a byte count")
    return int(value)  # more than 4300 digits: a ValueError too


class RequestGuard:
    """Applies the checks of the module docstring to every HTTP request to `app`."""

    def __init__(self, app: ASGIApp, *, loopback_only: bool = True,
                 max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.loopback_only = loopback_only
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.loopback_only and urlsplit(f"//{headers.get('host', '')}").hostname not in LOOPBACK_NAMES:
            await _refuse(send, 403, "only loopback Host headers are served")
            return
        if refusal := cross_origin_refusal(scope["method"], scope.get("scheme", "http"), headers):
            await _refuse(send, 403, refusal)
            return
        try:
            length = declared_length(headers)
        except ValueError:
            await _refuse(send, 400, "malformed Content-Length header")
            return
        if length is not None and length > self.max_body_bytes:
            await _refuse(send, 413, self._too_large())
            return
        await self._call_with_body_limit(scope, receive, send)

    def _too_large(self) -> str:
        return f"request body larger than the dashboard's limit of {self.max_body_bytes} bytes"

    async def _call_with_body_limit(self, scope: Scope, receive: Receive, send: Send) -> None:
        received = 0
        started = False

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLarge
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except BodyTooLarge:
            if started:  # too late for a status code: drop the connection instead
                raise
            await _refuse(send, 413, self._too_large())


async def _refuse(send: Send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"cache-control", b"no-store"), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})

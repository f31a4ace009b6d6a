"""The cross-origin rule of the dashboard's request guard (the HTTP side is in
tests/integration/faults/test_dashboard_faults.py)."""

from __future__ import annotations

import pytest

from llamahome.dashboard.request_guard import cross_origin_refusal, declared_length


@pytest.mark.parametrize("method,headers", [
    ("GET", {"host": "127.0.0.1:8265", "origin": "http://evil.example", "sec-fetch-site": "cross-site"}),
    ("POST", {"host": "127.0.0.1:8265"}),  # not a browser: no other site can drive it
    ("POST", {"host": "127.0.0.1:8265", "origin": "http://127.0.0.1:8265", "sec-fetch-site": "same-origin"}),
    ("POST", {"host": "localhost", "origin": "http://localhost:80"}),  # the default port, spelled out
    ("POST", {"host": "[::1]:8265", "origin": "http://[::1]:8265"}),
    ("POST", {"host": "LocalHost:8265", "origin": "http://localhost:8265"}),
    ("POST", {"host": "127.0.0.1:8265", "sec-fetch-site": "none"}),
])
def test_same_origin_and_non_browser_requests_pass(method, headers):
    assert cross_origin_refusal(method, "http", headers) is None


@pytest.mark.parametrize("headers", [
    {"host": "127.0.0.1:8265", "origin": "http://evil.example"},
    {"host": "127.0.0.1:8265", "origin": "null"},
    {"host": "127.0.0.1:8265", "origin": "http://127.0.0.1:8266"},
    {"host": "127.0.0.1:8265", "origin": "https://127.0.0.1:8265"},
    {"host": "127.0.0.1:8265", "origin": "http://127.0.0.1:bad"},
    {"host": "127.0.0.1:8265", "sec-fetch-site": "cross-site"},
    {"host": "127.0.0.1:8265", "sec-fetch-site": "same-site"},
    {"origin": "http://127.0.0.1:8265"},  # no Host to compare with
])
@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_cross_origin_state_changing_requests_are_refused(method, headers):
    assert "cross-origin request refused" in cross_origin_refusal(method, "http", headers)


def test_declared_length_refuses_what_is_not_a_plain_count():
    assert declared_length({}) is None and declared_length({"content-length": "12"}) == 12
    for bad in ("-1", "1e9", " 12", "0x10", "", "\u00b2", "9" * 5000):
        with pytest.raises(ValueError):
            declared_length({"content-length": bad})

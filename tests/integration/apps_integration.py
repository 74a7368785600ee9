"""The WSGI app the integration tests put behind real web servers.

It is the shared test app, ``tests.apps.wsgi_apps.app`` (``/hello``, ``/echo``, ``/query``,
``/cookies``, ``/stream``, ``/slow``, ``/environ``, 404 for the rest), plus the few routes that
tell *which process* answered, which the spawner and concurrency tests need:

- ``/pid``            -- ``pid N``
- ``/token?t=T``      -- sleeps ``?sleep=S`` (default 0.05 s, so many requests are in flight at
                         once and cross-talk would show), then answers ``token T pid N``
- ``/slow_pid?s=S``   -- sleeps S seconds (default 3), then answers ``slow done pid N``
- ``/notify_socket``  -- the process environment's NOTIFY_SOCKET, or ``-``

Routing is on ``SCRIPT_NAME + PATH_INFO`` like the shared app: each server splits the URL
differently (nginx as configured by the fixtures and lighttpd with ``fix-root-scriptname``:
"" + path; Apache mod_proxy_fcgi: path + ""), the concatenation is the same everywhere.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterable

from tests.apps import wsgi_apps
from tests.apps.wsgi_apps import STREAM_CHUNK, STREAM_MIB, Environ, StartResponse

__all__ = ["STREAM_MIB", "app", "stream_sha256"]


def stream_sha256(mib: int = STREAM_MIB) -> str:
    """The digest of ``/stream?mib=N``'s body, for byte-exact checks without keeping a copy."""
    digest = hashlib.sha256()
    for _ in range(mib * 16):
        digest.update(STREAM_CHUNK)
    return digest.hexdigest()


def _arg(environ: Environ, name: str, default: str) -> str:
    from urllib.parse import parse_qs

    values = parse_qs(environ.get("QUERY_STRING", "")).get(name)
    return values[0] if values else default


def _text(start_response: StartResponse, text: str) -> list[bytes]:
    body = text.encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
    if path == "/pid":
        return _text(start_response, f"pid {os.getpid()}\n")
    if path == "/token":
        time.sleep(float(_arg(environ, "sleep", "0.05")))
        return _text(start_response, f"token {_arg(environ, 't', '')} pid {os.getpid()}\n")
    if path == "/notify_socket":  # what the app's own code (and children) would see
        return _text(start_response, os.environ.get("NOTIFY_SOCKET", "-"))
    if path == "/slow_pid":
        time.sleep(float(_arg(environ, "s", "3")))
        return _text(start_response, f"slow done pid {os.getpid()}\n")
    return wsgi_apps.app(environ, start_response)

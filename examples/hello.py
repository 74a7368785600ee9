"""The demo app: the smallest useful WSGI application.

Run it with ``fcgispawn -n -s /tmp/hello.sock --wsgi hello:app`` from this directory (the
working directory is on the import path, as with gunicorn).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any


def app(
    environ: dict[str, Any], start_response: Callable[[str, list[tuple[str, str]]], Any]
) -> Iterable[bytes]:
    """Say hello, naming the worker pid so a reload or a restart is visible from outside."""
    name = environ.get("QUERY_STRING", "").partition("name=")[2] or "world"
    body = f"Hello, {name}! (fcgispawn worker pid {os.getpid()})\n".encode()
    start_response(
        "200 OK",
        [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))],
    )
    return [body]

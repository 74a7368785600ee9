"""WSGI test applications for the responder (server/runtime tests, benchmarks, integration).

Load any of them with ``--wsgi tests.apps.wsgi_apps:NAME`` (repo root on ``sys.path``). Each is a
plain PEP 3333 callable, standard library only:

* ``hello``        -- ``200``, ``Hello, World!`` as ``return [body]`` (the fast path)
* ``echo``         -- ``200``, the request body echoed byte-exact: reads it all, then answers
                      (what most apps do; a client that sends everything before reading, like
                      fcgispawn.client, needs this)
* ``echo_stream``  -- ``200``, the body streamed back 64 KiB at a time while it is read (a
                      client must read while it sends); ``echo_sha256`` answers the body's
                      SHA-256 and length instead (a 1 GiB upload in flat memory)
* ``query``        -- ``200``, the raw ``QUERY_STRING`` as the body
* ``cookies``      -- ``200`` with two ``Set-Cookie`` headers (``a=1``, ``b=2``)
* ``not_found``    -- ``404 Not Found``
* ``stream``       -- a 20 MiB body from a generator in 64 KiB chunks of a known pattern
                      (``?mib=N`` changes the size); ``STREAM_CHUNK``/``stream_bytes()`` for checks
* ``slow``         -- sleeps ``?s=SECONDS`` (default 1), then answers ``slept``
* ``raises``       -- raises ``RuntimeError("boom")`` before start_response (expect 500)
* ``cut``          -- ``200``, one chunk, then ``RuntimeError("cut short")`` (a broken response)
* ``short``        -- ``200`` with ``Content-Length: 100`` and 10 body bytes
* ``environ_json`` -- the CGI/WSGI environ (str values only) as JSON, plus ``wsgi.multithread``,
                      ``wsgi.multiprocess``, ``wsgi.url_scheme`` and ``pid``
* ``stderr``       -- writes ``logged to wsgi.errors`` to ``wsgi.errors``, answers ``ok``
* ``sys_exit``     -- raises ``SystemExit(3)`` in the request (the worker must survive it)
* ``roles``        -- ``fcgi.role|stdin|FCGI_DATA`` (AUTHORIZER and FILTER roles)
* ``file``         -- ``stream_bytes(mib)`` (default 1) through ``wsgi.file_wrapper``
* ``big_list``     -- ``stream_bytes(mib)`` (default 3) returned as ``[body]``
* ``app``          -- all of the above behind one router on ``SCRIPT_NAME + PATH_INFO``:
                      ``/hello``, ``/echo``, ``/echo_stream``, ``/echo_sha256``, ``/query``,
                      ``/cookies``, ``/stream``, ``/slow``, ``/raises``, ``/cut``, ``/short``,
                      ``/environ``,
                      ``/stderr``, ``/sys_exit``, ``/roles``, ``/file``, ``/big_list``;
                      anything else is a 404
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import parse_qs

StartResponse = Callable[..., Callable[[bytes], object]]
Environ = dict[str, Any]

#: 64 KiB of a pattern in which a dropped, repeated or swapped chunk is visible.
STREAM_CHUNK = bytes(range(256)) * 256
STREAM_MIB = 20


def stream_bytes(mib: int = STREAM_MIB) -> bytes:
    """What ``stream`` sends for ``?mib=N`` (for byte-exact comparisons)."""
    return STREAM_CHUNK * (mib * 16)


def _arg(environ: Environ, name: str, default: str) -> str:
    values = parse_qs(environ.get("QUERY_STRING", "")).get(name)
    return values[0] if values else default


def _plain(start_response: StartResponse, body: bytes, status: str = "200 OK") -> list[bytes]:
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def hello(environ: Environ, start_response: StartResponse) -> list[bytes]:
    return _plain(start_response, b"Hello, World!")


def echo(environ: Environ, start_response: StartResponse) -> list[bytes]:
    body = environ["wsgi.input"].read()
    start_response(
        "200 OK",
        [("Content-Type", "application/octet-stream"), ("Content-Length", str(len(body)))],
    )
    return [body]


def echo_stream(environ: Environ, start_response: StartResponse) -> Iterator[bytes]:
    start_response("200 OK", [("Content-Type", "application/octet-stream")])
    stream = environ["wsgi.input"]
    while chunk := stream.read(65536):
        yield chunk


def echo_sha256(environ: Environ, start_response: StartResponse) -> list[bytes]:
    digest = hashlib.sha256()
    size = 0
    stream = environ["wsgi.input"]
    while chunk := stream.read(65536):
        digest.update(chunk)
        size += len(chunk)
    return _plain(start_response, f"{size} {digest.hexdigest()}".encode())


def query(environ: Environ, start_response: StartResponse) -> list[bytes]:
    return _plain(start_response, environ.get("QUERY_STRING", "").encode("latin-1"))


def cookies(environ: Environ, start_response: StartResponse) -> list[bytes]:
    body = b"two cookies"
    start_response(
        "200 OK",
        [
            ("Content-Type", "text/plain"),
            ("Set-Cookie", "a=1; Path=/"),
            ("Set-Cookie", "b=2; Path=/"),
            ("Content-Length", str(len(body))),
        ],
    )
    return [body]


def not_found(environ: Environ, start_response: StartResponse) -> list[bytes]:
    return _plain(start_response, b"not found", "404 Not Found")


def stream(environ: Environ, start_response: StartResponse) -> Iterator[bytes]:
    mib = int(_arg(environ, "mib", str(STREAM_MIB)))
    start_response(
        "200 OK",
        [("Content-Type", "application/octet-stream"), ("Content-Length", str(mib << 20))],
    )
    for _ in range(mib * 16):
        yield STREAM_CHUNK


def slow(environ: Environ, start_response: StartResponse) -> list[bytes]:
    time.sleep(float(_arg(environ, "s", "1")))
    return _plain(start_response, b"slept")


def raises(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    raise RuntimeError("boom")


def cut(environ: Environ, start_response: StartResponse) -> Iterator[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    yield b"first chunk\n"
    raise RuntimeError("cut short")


def short(environ: Environ, start_response: StartResponse) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "100")])
    return [b"only ten.\n"]


def environ_json(environ: Environ, start_response: StartResponse) -> list[bytes]:
    data: dict[str, Any] = {k: v for k, v in environ.items() if isinstance(v, str)}
    for key in ("wsgi.multithread", "wsgi.multiprocess", "wsgi.run_once"):
        data[key] = environ[key]
    data["pid"] = os.getpid()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps(data, sort_keys=True).encode()]


def stderr(environ: Environ, start_response: StartResponse) -> list[bytes]:
    print("logged to wsgi.errors", file=environ["wsgi.errors"])
    return _plain(start_response, b"ok")


def sys_exit(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    """Calls ``sys.exit(3)`` inside the request (a misbehaving app: the worker must live on)."""
    raise SystemExit(3)


def roles(environ: Environ, start_response: StartResponse) -> list[bytes]:
    """Answers ``ROLE`` (``fcgi.role``, default RESPONDER), then the stdin and FCGI_DATA bodies."""
    data_stream = environ.get("fcgi.data")
    data = data_stream.read() if data_stream is not None else b""
    body = environ["wsgi.input"].read()
    role = environ.get("fcgi.role", "RESPONDER").encode()
    return _plain(start_response, role + b"|" + body + b"|" + data)


def file(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    """``stream_bytes(mib)`` (default 1 MiB) through ``wsgi.file_wrapper`` over a BytesIO."""
    mib = int(_arg(environ, "mib", "1"))
    start_response("200 OK", [("Content-Type", "application/octet-stream")])
    wrapper: Callable[..., Iterable[bytes]] = environ["wsgi.file_wrapper"]
    return wrapper(io.BytesIO(stream_bytes(mib)))


def big_list(environ: Environ, start_response: StartResponse) -> list[bytes]:
    """``stream_bytes(mib)`` (default 3 MiB) as a one-element list (one big send)."""
    return _plain(start_response, stream_bytes(int(_arg(environ, "mib", "3"))))


_ROUTES: dict[str, Callable[[Environ, StartResponse], Iterable[bytes]]] = {
    "/hello": hello,
    "/echo": echo,
    "/echo_stream": echo_stream,
    "/echo_sha256": echo_sha256,
    "/query": query,
    "/cookies": cookies,
    "/stream": stream,
    "/slow": slow,
    "/raises": raises,
    "/cut": cut,
    "/short": short,
    "/environ": environ_json,
    "/stderr": stderr,
    "/sys_exit": sys_exit,
    "/roles": roles,
    "/file": file,
    "/big_list": big_list,
}


def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
    return _ROUTES.get(path, not_found)(environ, start_response)

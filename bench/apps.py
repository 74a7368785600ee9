"""The WSGI apps every Python peer of the benchmarks serves, and the flup runners.

Every backend must put the same bytes on the wire, or the comparison measures the app instead of
the server: ``app`` answers ``200 OK``, ``Content-Type: text/plain``, ``Content-Length: 13`` and
``Hello, World!`` — exactly what ``bench/hello_c.c`` writes. uWSGI loads this file with
``--wsgi-file`` (it looks for ``application``), fcgispawn as ``bench.apps:app``.

``large_app`` serves the large-body measurements (bench/large.py): ``GET /download?bytes=N``
streams N bytes in 64 KiB chunks from one preallocated block (no per-chunk allocation, so the
server's own buffering is what shows in the worker's memory), and ``POST /upload`` reads
``wsgi.input`` in 64 KiB chunks and answers with the byte count it saw.

Run as a script, it starts a flup server on a UNIX socket (used by bench.py)::

    python bench/apps.py flup-fork SOCKET      # flup.server.fcgi_fork, exactly 2 children
    python bench/apps.py flup-threaded SOCKET  # flup.server.fcgi (threads), one process
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

StartResponse = Callable[..., Callable[[bytes], object]]
Environ = dict[str, Any]

_HELLO = b"Hello, World!"
_HELLO_HEADERS = [("Content-Type", "text/plain"), ("Content-Length", str(len(_HELLO)))]

CHUNK = 65536
_BLOCK = b"x" * CHUNK


def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    """The hello app: the smallest honest WSGI response (a list, a Content-Length). A POST's
    body is read first (bench.py --body), as an app would, so every server hands it over."""
    if environ.get("CONTENT_LENGTH"):
        environ["wsgi.input"].read()
    start_response("200 OK", _HELLO_HEADERS)
    return [_HELLO]


application = app  # the name uWSGI's --wsgi-file looks for


def _stream(total: int) -> Iterator[bytes]:
    """Yields ``total`` bytes in CHUNK pieces, all views of one block."""
    full, rest = divmod(total, CHUNK)
    for _ in range(full):
        yield _BLOCK
    if rest:
        yield _BLOCK[:rest]


def large_app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    """Large bodies: ``/download?bytes=N`` streams N bytes; ``/upload`` counts the body."""
    if environ.get("REQUEST_METHOD") == "POST":
        stream = environ["wsgi.input"]
        seen = 0
        while True:
            data = stream.read(CHUNK)
            if not data:
                break
            seen += len(data)
        body = str(seen).encode()
        start_response(
            "200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))]
        )
        return [body]
    query = environ.get("QUERY_STRING", "")
    total = 0
    for part in query.split("&"):
        name, _, value = part.partition("=")
        if name == "bytes" and value.isdigit():
            total = int(value)
    start_response(
        "200 OK",
        [("Content-Type", "application/octet-stream"), ("Content-Length", str(total))],
    )
    return _stream(total)


def run_flup(kind: str, socket_path: str, which: str = "app") -> None:
    """Serves ``app`` (or ``large_app``) with flup 1.0.3 on a UNIX socket until SIGINT/SIGTERM.

    flup quirks that matter here (read from its source):
    - ``bindAddress`` as a str makes flup bind a UNIX socket itself (it unlinks the path first);
      without it flup expects the socket on fd 0.
    - The prefork server keeps the child count in [maxSpare, maxChildren]: minSpare=1,
      maxSpare=2, maxChildren=2 gives exactly 2 children.
    - The threaded server is one process; its pool starts maxSpare threads and grows on demand
      up to maxThreads (default unbounded).
    """
    target = large_app if which == "large_app" else app
    if kind == "flup-fork":
        from flup.server.fcgi_fork import WSGIServer as ForkServer

        ForkServer(
            target, bindAddress=socket_path, minSpare=1, maxSpare=2, maxChildren=2
        ).run()
    elif kind == "flup-threaded":
        from flup.server.fcgi import WSGIServer as ThreadedServer

        ThreadedServer(target, bindAddress=socket_path).run()
    else:
        raise SystemExit(f"apps.py: unknown flup server {kind!r} (flup-fork, flup-threaded)")


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        raise SystemExit("usage: apps.py flup-fork|flup-threaded SOCKET [app|large_app]")
    run_flup(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) == 4 else "app")

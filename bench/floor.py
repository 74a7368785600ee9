"""The floor of a pure-Python FastCGI responder on this machine: how cheap can one request be?

Not a server anyone should run: it trusts its input (a request must arrive as BEGIN, one PARAMS
record, empty PARAMS, empty STDIN, every length below 128), skips every check PEP 3333 and the
FastCGI spec ask for, and never parks a slow peer. It exists to split fcgispawn's cost per
request into what Python itself costs here and what fcgispawn adds (issue 6; results in
bench/results/2026-11-29-floor.md).

    python bench/floor.py MODE PROCESSES    # the listening socket on fd 0, as spawn-fcgi gives it

MODE letters: ``T`` serve in a thread (the main thread waits) instead of the main thread;
``W`` use fcgispawn's own protocol and WSGI layers (``whole_responder_request``,
``build_environ_latin1``, ``run_app``, ``encode_response``) instead of the hand-rolled walk and
CGI head; ``N`` fcgispawn's syscalls (non-blocking accept, ``preadv2``/``pwritev2`` with
RWF_NOWAIT) instead of blocking accept, read and writev; ``-`` none of these. Load it with
bench/fcgiload.c and read the processes' CPU time.
"""

from __future__ import annotations

import mmap
import os
import select
import socket
import struct
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any

from fcgispawn.protocol import Limits, encode_response, whole_responder_request
from fcgispawn.wsgi import ErrorStream, InputStream, build_environ_latin1, run_app

STDIN_END = bytes([1, 5, 0, 1, 0, 0, 0, 0])
END_REQUEST_1 = bytes([1, 3, 0, 1, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
BASE = {
    "wsgi.version": (1, 0),
    "wsgi.url_scheme": "http",
    "wsgi.multithread": False,
    "wsgi.multiprocess": True,
    "wsgi.run_once": False,
}
LIMITS = Limits()
_writev: Callable[[int, Any], int] = os.writev


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "13")])
    return [b"Hello, World!"]


def _drop(data: bytes) -> None:
    """wsgi.errors sink: the hello app never writes to it."""


def _request(fd: int) -> bytes:
    data = os.read(fd, 65536)
    while data and not data.endswith(STDIN_END):
        more = os.read(fd, 65536)
        if not more:
            break
        data += more
    return data


def _bare(fd: int, data: bytes) -> None:
    text = data.decode("latin-1")
    end = 24 + ((ord(text[20]) << 8) | ord(text[21]))
    env: dict[str, Any] = BASE.copy()
    p = 24
    while p < end:
        nlen = ord(text[p])
        vlen = ord(text[p + 1])
        p += 2
        env[text[p : p + nlen]] = text[p + nlen : p + nlen + vlen]
        p += nlen + vlen
    head: list[Any] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
        head.extend((status, headers))

    body = b"".join(app(env, start_response))
    lines = "".join(f"{k}: {v}\r\n" for k, v in head[1])
    out = f"Status: {head[0]}\r\n{lines}\r\n".encode("latin-1") + body
    _writev(fd, [struct.pack(">BBHHBx", 1, 6, 1, len(out), 0), out, END_REQUEST_1])


def _layered(fd: int, data: bytes) -> None:
    params = whole_responder_request(data, LIMITS)
    assert params is not None
    environ = build_environ_latin1(
        params.take_latin1(),
        input=InputStream(bytes),
        errors=ErrorStream(_drop),
        multithread=False,
        multiprocess=True,
    )
    pending: list[bytes] = []
    status = run_app(app, environ, pending.extend, log=print)
    _writev(fd, encode_response(params.request_id, pending, status))


def serve_nowait(listener: socket.socket, handle: Callable[[int, bytes], None]) -> None:
    """serve() with fcgispawn's syscalls: a non-blocking accept (poll when it says EAGAIN), the
    read as preadv2(RWF_NOWAIT) into a reused mmap, the write as pwritev2(RWF_NOWAIT)."""
    global _writev
    accept = listener._accept  # type: ignore[attr-defined]
    listener.setblocking(False)
    waiter = select.poll()
    waiter.register(listener.fileno(), select.POLLIN)
    buf = mmap.mmap(-1, 65536)
    bufs, view = [buf], memoryview(buf)
    nowait = os.RWF_NOWAIT
    _writev = lambda fd, data: os.pwritev(fd, data, -1, nowait)  # noqa: E731
    while True:
        try:
            fd, _ = accept()
        except BlockingIOError:
            waiter.poll()
            continue
        try:
            try:
                n = os.preadv(fd, bufs, -1, nowait)
            except BlockingIOError:  # connected before it wrote: wait for its bytes
                select.select([fd], [], [], 5)
                n = os.preadv(fd, bufs, -1, nowait)
            if n:
                handle(fd, bytes(view[:n]))
        except (OSError, AssertionError, IndexError):
            pass
        os.close(fd)


def serve(listener: socket.socket, handle: Callable[[int, bytes], None]) -> None:
    accept = listener._accept  # type: ignore[attr-defined]  # the bare fd, as server.py does
    while True:
        fd, _ = accept()
        try:
            data = _request(fd)
            if data:
                handle(fd, data)
        except (OSError, AssertionError, IndexError):
            pass  # the load generator hung up (or sent what this floor does not read)
        os.close(fd)


def main() -> None:
    mode, processes = sys.argv[1], int(sys.argv[2])
    listener = socket.socket(fileno=0)
    handle = _layered if "W" in mode else _bare
    for _ in range(processes - 1):
        if os.fork() == 0:
            break
    loop = serve_nowait if "N" in mode else serve
    if "T" in mode:
        threading.Thread(target=loop, args=(listener, handle), daemon=True).start()
        threading.Event().wait()
    else:
        loop(listener, handle)


if __name__ == "__main__":
    main()

"""Profile one request cycle of the responder's hot path, in-process and repeatable.

Two drivers, both with the hello app and the bytes nginx 1.22 sends for ``GET /hello?x=1``
with Debian's ``/etc/nginx/fastcgi_params`` plus a few browser headers (25 pairs, PARAMS padded
to 8 bytes as nginx pads, BEGIN_REQUEST flags 0, empty PARAMS and empty STDIN in the same
buffer, request id 1):

- ``--mode cycle`` (default): what ``Server._run`` does, without sockets:
  ``ServerConnection.receive`` -> events -> ``build_environ`` -> ``run_app`` (with the server's
  deferring send) -> ``ServerConnection.respond``. Pure Python work only.
- ``--mode server``: the real ``Server._serve_new`` on a socketpair whose peer end already
  holds the request: ``os.read``, the app, ``os.writev``, ``close`` -- everything a pool thread
  does after ``accept()``. The response is read back and checked.
- ``--mode kept``: the next request on a connection kept open (FCGI_KEEP_CONN), from the pool
  thread's epoll event to the connection parked again.

Modes of measurement:

    .venv/bin/python bench/profile_hotpath.py                 # wall time per cycle (noisy)
    .venv/bin/python bench/profile_hotpath.py --cprofile      # cProfile, top functions
    bench/profile_hotpath.py --callgrind [--mode server]      # instructions per request

``--callgrind`` re-runs this script under ``valgrind --tool=callgrind`` twice (N and 2N
cycles, after the same warm-up) and reports (Ir(2N) - Ir(N)) / N: the instructions of one
request cycle with start-up, imports and warm-up subtracted. Instruction counts are stable to
a fraction of a percent on a noisy shared machine, unlike timings.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fcgispawn import protocol, wsgi  # noqa: E402
from fcgispawn.protocol import (  # noqa: E402
    FCGI_VERSION_1,
    BeginRequest,
    Params,
    ServerConnection,
    Stdin,
)

# GET /hello?x=1 through nginx 1.22 with Debian's fastcgi_params (HTTPS is "if_not_empty": absent
# on plain http), a PATH_INFO as fastcgi_split_path_info sets it, and the headers a browser
# adds (nginx passes request headers on as HTTP_*; Host is replaced by fastcgi_params' $host).
NGINX_PARAMS: list[tuple[bytes, bytes]] = [
    (b"QUERY_STRING", b"x=1"),
    (b"REQUEST_METHOD", b"GET"),
    (b"CONTENT_TYPE", b""),
    (b"CONTENT_LENGTH", b""),
    (b"SCRIPT_NAME", b"/hello"),
    (b"REQUEST_URI", b"/hello?x=1"),
    (b"DOCUMENT_URI", b"/hello"),
    (b"DOCUMENT_ROOT", b"/usr/share/nginx/html"),
    (b"SERVER_PROTOCOL", b"HTTP/1.1"),
    (b"REQUEST_SCHEME", b"http"),
    (b"GATEWAY_INTERFACE", b"CGI/1.1"),
    (b"SERVER_SOFTWARE", b"nginx/1.22.1"),
    (b"REMOTE_ADDR", b"127.0.0.1"),
    (b"REMOTE_PORT", b"54321"),
    (b"REMOTE_USER", b""),
    (b"SERVER_ADDR", b"127.0.0.1"),
    (b"SERVER_PORT", b"8080"),
    (b"SERVER_NAME", b"localhost"),
    (b"REDIRECT_STATUS", b"200"),
    (b"HTTP_HOST", b"localhost"),
    (b"PATH_INFO", b""),
    (b"HTTP_USER_AGENT", b"Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"),
    (b"HTTP_ACCEPT", b"text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"),
    (b"HTTP_ACCEPT_ENCODING", b"gzip, deflate, br"),
    (b"HTTP_ACCEPT_LANGUAGE", b"en-US,en;q=0.5"),
]


def nginx_request(params: Iterable[tuple[bytes, bytes]] = NGINX_PARAMS) -> bytes:
    """BEGIN_REQUEST (flags 0) + one padded PARAMS record + empty PARAMS + empty STDIN."""
    body = protocol.encode_pairs(list(params))
    return (
        protocol.encode_begin_request(1)
        + protocol.encode_record(protocol.RecordType.PARAMS, 1, body)
        + protocol.encode_record(protocol.RecordType.PARAMS, 1, b"")
        + protocol.encode_record(protocol.RecordType.STDIN, 1, b"")
    )


WIRE = nginx_request()
HELLO = b"Hello, World!"
_HEADERS = [("Content-Type", "text/plain"), ("Content-Length", str(len(HELLO)))]


def hello(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    """bench.apps.app: 200, two headers, a 13-byte list body."""
    start_response("200 OK", _HEADERS)
    return [HELLO]


def _log(message: str) -> None:
    sys.stderr.write(message + "\n")


class _CycleReq:
    """The parts of server._Req the hot path touches: a deferring send, and ``defer``, which
    run_app sets when the app returns a list (then the response is one sendmsg). Trees from
    before run_app's ``batching`` wrap the app instead (call_app)."""

    __slots__ = ("app", "defer", "pending")

    def __init__(self, app: Callable[..., Any]) -> None:
        self.app = app
        self.defer = False
        self.pending: list[Any] = []

    def read_stdin(self) -> bytes:
        return b""

    def send_stderr(self, data: bytes) -> None:
        pass

    def call_app(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        result: Iterable[bytes] = self.app(environ, start_response)
        rtype = type(result)
        if rtype is list or rtype is tuple or rtype is wsgi.FileWrapper:
            self.defer = True
        return result

    def send(self, bufs: list[bytes]) -> None:
        if self.defer:
            self.pending.extend(bufs)
            return
        raise AssertionError("hello returns a list: its response is always deferred")


def make_cycle(app: Callable[..., Any], *, legacy: bool = False) -> Callable[[], list[Any]]:
    """One request as Server._serve_new/_read/_dispatch/_run/_end do it, minus the syscalls.

    ``legacy``: environ from ``Params.params`` with ``build_environ`` (bytes dict, then
    decoded), as server.py did before; otherwise ``ServerConnection(latin1_params=True)``,
    ``Params.take_latin1()`` and ``build_environ_latin1`` (one pass, no bytes dict), the
    server.py patch proposed with them.
    """
    limits = protocol.Limits()
    build_environ = wsgi.build_environ
    build_latin1 = getattr(wsgi, "build_environ_latin1", None)
    if build_latin1 is None:  # a tree from before the fast path
        legacy = True
    run_app: Any = wsgi.run_app
    batching = hasattr(wsgi, "Batching")
    input_stream = wsgi.InputStream
    error_stream = wsgi.ErrorStream

    def cycle() -> list[Any]:
        # (a tree from before latin1_params has no such keyword: legacy is forced there)
        proto = ServerConnection(limits) if legacy else ServerConnection(limits, latin1_params=True)
        events = proto.receive(WIRE)
        out = proto.pending_output()
        assert not out
        params: Params | None = None
        rid = 0
        for ev in events:  # the server's _dispatch: exact type tests
            if type(ev) is BeginRequest:
                rid = ev.request_id
            elif type(ev) is Params:
                params = ev
            elif type(ev) is Stdin:
                pass
        assert params is not None
        req = _CycleReq(app)
        if legacy:
            environ = build_environ(
                params.params,
                input=input_stream(req.read_stdin),
                errors=error_stream(req.send_stderr),
                multithread=True,
                multiprocess=True,
            )
        else:
            assert build_latin1 is not None
            environ = build_latin1(
                params.take_latin1(),
                input=input_stream(req.read_stdin),
                errors=error_stream(req.send_stderr),
                multithread=True,
                multiprocess=True,
            )
        if batching:
            status = run_app(app, environ, req.send, log=_log, batching=req)
        else:
            status = run_app(req.call_app, environ, req.send, log=_log)
        return proto.respond(rid, req.pending, status)

    return cycle


def make_server_cycle(app: Callable[..., Any]) -> Callable[[], list[Any]]:
    """One request through the real Server._serve_new on a socketpair (no accept, no epoll)."""
    from fcgispawn.server import Server

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server = Server(app, listener, threads=2, multiprocess=True, log=_log)
    # What a pool thread passes: its own counters (trees before them: none, counted under the
    # lock, which the real accept path never did).
    cell: list[int] | None = None
    if hasattr(server, "_cells"):
        cell = [0, 0]
        server._cells.append(cell)

    def cycle() -> list[Any]:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        theirs.sendall(WIRE)
        fd = ours.detach()
        if cell is None:
            server._serve_new(fd, "")
        else:
            server._serve_new(fd, "", cell)
        got = theirs.recv(65536)
        theirs.close()
        return [got]

    return cycle


def make_kept_cycle(app: Callable[..., Any]) -> Callable[[], list[Any]]:
    """The next request on a connection nginx keeps open (``fastcgi_keep_conn on``): the
    request (KEEP_CONN set) is waiting on a parked connection; what a pool thread does on its
    epoll event (take it out of the watched set, ``_pickup``: read, answer, park it again).
    Everything but the epoll_wait."""
    import select

    from fcgispawn.server import Server, _Conn

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server = Server(app, listener, threads=1, multiprocess=True, log=_log)
    server._ep = select.epoll()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fd = ours.detach()
    conn = _Conn(fd, server.limits, socket.AF_UNIX)
    conn.fresh = False
    with server._lock:
        server._work += 1
    server._leave(conn)  # parked, as after its first request
    wire = protocol.encode_begin_request(1, keep_conn=True) + WIRE[16:]

    def cycle() -> list[Any]:
        theirs.sendall(wire)
        with server._lock:  # the pool thread's epoll branch (Server._worker)
            got = server._watched.pop(fd)
            got.idle = False
            server._unpark_locked(got)
            server._work += 1
        server._pickup(got)
        return [theirs.recv(65536)]

    return cycle


def make_floor_cycle(app: Callable[..., Any], *, bare: bool = False) -> Callable[[], list[Any]]:
    """bench/floor.py's W loop body on the same socketpair: what fcgispawn's protocol and WSGI
    layers cost without the server around them (the server-mode count minus this one is the
    server's own overhead per request)."""
    from bench import floor

    floor.app = app
    handle = floor._bare if bare else floor._layered

    def cycle() -> list[Any]:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        theirs.sendall(WIRE)
        fd = ours.detach()
        data = floor._request(fd)
        handle(fd, data)
        os.close(fd)
        got = theirs.recv(65536)
        theirs.close()
        return [got]

    return cycle


def _check(out: list[Any]) -> None:
    data = b"".join(bytes(b) for b in out)
    if HELLO not in data or not data.endswith(
        protocol._HEADER.pack(FCGI_VERSION_1, 3, 1, 8, 0) + b"\0" * 8
    ):
        raise SystemExit(f"unexpected response: {data!r}")


def _run_n(cycle: Callable[[], list[Any]], n: int) -> None:
    for _ in range(n):
        cycle()


def _callgrind(args: argparse.Namespace) -> None:
    def measure(n: int) -> int:
        with tempfile.TemporaryDirectory() as tmp:
            outfile = os.path.join(tmp, "cg.out")
            cmd = [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={outfile}",
                sys.executable,
                __file__,
                "--mode",
                args.mode,
                "--cycles",
                str(n),
                "--warmup",
                str(args.warmup),
                "--quiet",
                *(["--legacy"] if args.legacy else []),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise SystemExit(proc.stdout + proc.stderr)
            m = re.search(r"Collected\s*:\s*(\d+)", proc.stderr)
            if m is None:
                raise SystemExit("no 'Collected' line from callgrind:\n" + proc.stderr)
            return int(m.group(1))

    n = args.cycles
    one = measure(n)
    two = measure(2 * n)
    per = (two - one) / n
    print(
        f"mode={args.mode} legacy={args.legacy} instructions/request={per:,.0f} "
        f"(Ir {one:,} for {n}, {two:,} for {2 * n})"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--mode", choices=("cycle", "server", "kept", "floor", "bare"), default="cycle"
    )
    ap.add_argument("--cycles", type=int, default=0, help="cycles to run (default: per action)")
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--callgrind", action="store_true", help="instructions per request")
    ap.add_argument("--cprofile", action="store_true", help="cProfile of the cycles")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument(
        "--legacy", action="store_true", help="cycle: environ via Params.params + build_environ"
    )
    args = ap.parse_args()

    if args.callgrind:
        args.cycles = args.cycles or 2000
        _callgrind(args)
        return

    if args.mode == "server":
        cycle = make_server_cycle(hello)
    elif args.mode == "kept":
        cycle = make_kept_cycle(hello)
    elif args.mode in ("floor", "bare"):
        cycle = make_floor_cycle(hello, bare=args.mode == "bare")
    else:
        cycle = make_cycle(hello, legacy=args.legacy)
    _check(cycle())
    _run_n(cycle, args.warmup)
    if args.quiet:  # the callgrind child: just the work
        _run_n(cycle, args.cycles)
        return
    n = args.cycles or 200_000
    if args.cprofile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.runcall(_run_n, cycle, n)
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        return
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        _run_n(cycle, n // 5)
        best = min(best, (time.perf_counter() - t0) / (n // 5))
    print(f"mode={args.mode} best of 5: {best * 1e6:.2f} us/cycle (wall, in-process)")


if __name__ == "__main__":
    main()

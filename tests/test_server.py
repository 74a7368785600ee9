"""Component tests of the responder (fcgispawn.server) over real sockets.

The server runs in a thread of the test process on a UNIX socket in ``sockdir`` (or on
loopback TCP for FCGI_WEB_SERVER_ADDRS) and is driven by fcgispawn.client or raw records.
Signals and process exit are covered in test_runtime.py.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fcgispawn import server as server_mod
from fcgispawn.client import ClientError, FastCGIClient, RequestSpec
from fcgispawn.protocol import (
    CLOSING_MARK,
    ClientConnection,
    EndRequest,
    GetValuesResult,
    ProtocolStatus,
    RecordType,
    Role,
    StderrData,
    StdoutData,
    encode_abort_request,
    encode_begin_request,
    encode_get_values,
    encode_pairs,
    encode_record,
    encode_request,
    whole_responder_request,
)
from fcgispawn.server import Server, parse_web_server_addrs
from fcgispawn.wsgi import RequestBodyIncomplete
from tests.apps import wsgi_apps
from tests.procs import stdout_until_eof, wait_for

pytestmark = pytest.mark.timeout(60)


@dataclass
class Running:
    """A server serving in a background thread, and what it logged."""

    server: Server
    thread: threading.Thread
    address: str | tuple[str, int]
    logs: list[str] = field(default_factory=list)
    result: list[int] = field(default_factory=list)

    def client(self, timeout: float = 10.0) -> FastCGIClient:
        return FastCGIClient(self.address, timeout=timeout)

    def stop(self, graceful: bool = True) -> int:
        self.server.stop(graceful)
        self.thread.join(15)
        assert not self.thread.is_alive()
        return self.result[0]


Start = Callable[..., Running]


@pytest.fixture
def start(sockdir: Path) -> Iterator[Start]:
    """Start a Server on a new UNIX socket (or a given listener); stopped at teardown."""
    running: list[Running] = []

    def _start(
        app: Any = wsgi_apps.app, *, listener: socket.socket | None = None, **opts: Any
    ) -> Running:
        address: str | tuple[str, int]
        if listener is None:
            path = str(sockdir / f"s{len(running)}.sock")
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(path)
            listener.listen(128)
            address = path
        else:
            address = listener.getsockname()
        logs: list[str] = []
        opts.setdefault("threads", 4)
        srv = Server(app, listener, log=logs.append, **opts)
        result: list[int] = []
        thread = threading.Thread(target=lambda: result.append(srv.serve_forever()), daemon=True)
        thread.start()
        run = Running(srv, thread, address, logs, result)
        running.append(run)
        return run

    yield _start
    for run in running:
        run.server.stop(graceful=False)
        run.thread.join(10)
        run.server.listener.close()


def _until_eof(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Every byte the server sends until it closes the connection."""
    sock.settimeout(timeout)
    raw = b""
    while chunk := sock.recv(65536):
        raw += chunk
    return raw


def _get(path: str, query: str = "", **extra: str) -> dict[str, str]:
    params = {"REQUEST_METHOD": "GET", "SCRIPT_NAME": "", "PATH_INFO": path, "QUERY_STRING": query}
    params.update(extra)
    return params


def _raw_exchange(address: str, wire: bytes, timeout: float = 10.0) -> list[Any]:
    """Send raw bytes, read until EOF; return the client-side events."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(address)
        sock.sendall(wire)
        conn = ClientConnection()
        events: list[Any] = []
        while chunk := sock.recv(65536):
            events += conn.receive(chunk)
        return events


# --------------------------------------------------------------------------- basic responses


def test_hello_get(start: Start) -> None:
    run = start()
    resp = run.client().request(_get("/hello"))
    assert resp.status == 200
    assert resp.body == b"Hello, World!"
    assert resp.header("Content-Length") == "13"
    assert resp.app_status == 0
    assert resp.protocol_status == ProtocolStatus.REQUEST_COMPLETE


def test_post_1mib_echoed_byte_exact(start: Start) -> None:
    run = start()
    body = bytes(range(256)) * 4096 + b"tail"
    params = _get("/echo", REQUEST_METHOD="POST", CONTENT_LENGTH=str(len(body)))
    resp = run.client().request(params, body)
    assert resp.status == 200
    assert resp.body == body


def test_upload_is_streamed_to_the_app_while_it_arrives(start: Start) -> None:
    """16 MiB through wsgi.input in pieces (the app reads as the records come in)."""
    run = start()
    body = bytes(range(256)) * (1 << 16)
    import hashlib

    params = _get("/echo_sha256", REQUEST_METHOD="POST", CONTENT_LENGTH=str(len(body)))
    resp = run.client(timeout=30).request(params, body)
    assert resp.body == f"{len(body)} {hashlib.sha256(body).hexdigest()}".encode()


def test_query_string_reaches_the_app(start: Start) -> None:
    run = start()
    resp = run.client().request(_get("/query", "a=1&b=%20x&c"))
    assert resp.body == b"a=1&b=%20x&c"


def test_two_set_cookie_headers_are_both_sent(start: Start) -> None:
    run = start()
    resp = run.client().request(_get("/cookies"))
    cookies = [v for k, v in resp.headers if k.lower() == "set-cookie"]
    assert cookies == ["a=1; Path=/", "b=2; Path=/"]


def test_404(start: Start) -> None:
    run = start()
    resp = run.client().request(_get("/nowhere"))
    assert resp.status == 404
    assert resp.body == b"not found"


def test_20mb_streamed_response(start: Start) -> None:
    run = start()
    resp = run.client(timeout=30).request(_get("/stream"))
    assert resp.status == 200
    assert len(resp.body) == 20 << 20
    assert resp.body == wsgi_apps.stream_bytes()


@pytest.mark.parametrize("path", ["/stderr", "/echo"])
def test_wsgi_errors_go_out_as_fcgi_stderr_and_to_the_workers_log(start: Start, path: str) -> None:
    """FCGI_STDERR for the web server's error log, and the worker's own log too: Caddy 2.6
    drops FCGI_STDERR (even with capture_stderr), and with it every error an app logs there
    (Flask's tracebacks of the exceptions it handles itself). /stderr takes the whole-request
    path, /echo with a body sent apart the connection path."""
    def errors_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        environ["wsgi.input"].read()
        environ["wsgi.errors"].write("logged to wsgi.errors\n")
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    run = start(errors_app)
    resp = run.client().request(_get(path), stdin=b"x" * 100_000 if path == "/echo" else b"")
    assert resp.body == b"ok"
    assert resp.stderr == b"logged to wsgi.errors\n"
    assert run.logs.count("logged to wsgi.errors") == 1


def test_an_app_exception_is_logged_once(start: Start) -> None:
    """The traceback of an app's exception goes to wsgi.errors, which the worker's log gets
    too: once, not a second time from the server itself."""
    run = start(threads=1)
    resp = run.client().request(_get("/raises"))
    assert resp.status == 500 and b"boom" in resp.stderr
    assert sum("boom" in line for line in run.logs) == 1, run.logs


def test_environ_flags_follow_threads_and_multiprocess(start: Start) -> None:
    import json

    one = json.loads(start(threads=1).client().request(_get("/environ")).body)
    assert one["wsgi.multithread"] is False
    assert one["wsgi.multiprocess"] is False
    many = json.loads(start(threads=3, multiprocess=True).client().request(_get("/environ")).body)
    assert many["wsgi.multithread"] is True
    assert many["wsgi.multiprocess"] is True


def test_50_concurrent_requests_without_cross_talk(start: Start) -> None:
    run = start(threads=4)

    def one(i: int) -> tuple[int, bytes, bytes]:
        body = f"request-{i}-".encode() * (i + 1)
        params = _get("/echo", f"i={i}", REQUEST_METHOD="POST", CONTENT_LENGTH=str(len(body)))
        resp = FastCGIClient(run.address, timeout=20).request(params, body)
        return i, body, resp.body

    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(one, range(50)))
    assert len(results) == 50
    for _i, sent, got in results:
        assert got == sent


# --------------------------------------------------------------------------- connections


def test_keep_conn_serves_several_requests_on_one_connection(start: Start) -> None:
    run = start(threads=2)
    with run.client() as client:
        first = client.request(_get("/hello"), keep_conn=True)
        kept = client._sock
        assert kept is not None
        for i in range(5):
            resp = client.request(_get("/query", f"n={i}"), keep_conn=True)
            assert resp.body == f"n={i}".encode()
            assert client._sock is kept  # the same connection every time
        assert first.body == b"Hello, World!"


def test_idle_kept_connection_does_not_pin_the_only_thread(start: Start) -> None:
    run = start(threads=1)
    with run.client() as idle:
        assert idle.request(_get("/hello"), keep_conn=True).status == 200
        # The connection stays open and idle; the one pool thread must still accept others.
        other = run.client(timeout=5).request(_get("/query", "second"))
        assert other.body == b"second"
        # ...and the parked connection is still served when it speaks again.
        assert idle.request(_get("/query", "again"), keep_conn=True).body == b"again"


def test_idle_kept_connection_is_closed_after_the_idle_timeout(
    start: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_mod, "IDLE_TIMEOUT", 0.3)
    run = start(threads=1)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        assert isinstance(run.address, str)
        sock.connect(run.address)
        sock.sendall(encode_request(1, {b"PATH_INFO": b"/hello"}, keep_conn=True))
        conn = ClientConnection()
        ended = False
        while not ended:
            ended = any(isinstance(e, EndRequest) for e in conn.receive(sock.recv(65536)))
        t0 = time.monotonic()
        assert sock.recv(1) == b""  # closed by the server once idle for 0.3 s
        assert 0.1 < time.monotonic() - t0 < 3


def test_connection_without_keep_conn_is_closed_after_the_response(start: Start) -> None:
    run = start()
    assert isinstance(run.address, str)
    events = _raw_exchange(run.address, encode_request(1, {b"PATH_INFO": b"/hello"}))
    assert isinstance(events[-1], EndRequest)  # and the read loop ended: EOF


def test_multiplexed_requests_run_concurrently(start: Start) -> None:
    run = start(threads=2)
    slow = _get("/slow", "s=0.6")
    t0 = time.monotonic()
    with run.client() as client:
        responses = client.requests([slow, slow])
    elapsed = time.monotonic() - t0
    assert [r.body for r in responses] == [b"slept", b"slept"]
    assert elapsed < 1.1, f"two 0.6 s requests took {elapsed:.2f} s: not concurrent"


def test_multiplexed_requests_with_bodies_do_not_mix(start: Start) -> None:
    run = start(threads=3)
    bodies = [bytes([65 + i]) * (100_000 * (i + 1)) for i in range(3)]
    specs = [
        RequestSpec(_get("/echo", REQUEST_METHOD="POST", CONTENT_LENGTH=str(len(b))), b)
        for b in bodies
    ]
    with run.client(timeout=20) as client:
        responses = client.requests(specs)
        assert [r.body for r in responses] == bodies
        # the connection is still usable afterwards
        assert client.request(_get("/hello"), keep_conn=True).body == b"Hello, World!"


def _pairs(params: dict[str, str]) -> dict[bytes, bytes]:
    return {k.encode(): v.encode() for k, v in params.items()}


def _read_events(
    sock: socket.socket, conn: ClientConnection, until: Callable[[list[Any]], bool]
) -> list[Any]:
    events: list[Any] = []
    while not until(events):
        chunk = sock.recv(65536)
        assert chunk, f"closed early: {events}"
        events += conn.receive(chunk)
    return events


def _ended(rid: int) -> Callable[[list[Any]], bool]:
    return lambda events: any(isinstance(e, EndRequest) and e.request_id == rid for e in events)


def _ask_values(sock: socket.socket, conn: ClientConnection) -> None:
    """What HAProxy (option get-values) sends first on each connection."""
    sock.sendall(encode_get_values([b"FCGI_MPXS_CONNS", b"FCGI_MAX_REQS"]))
    _read_events(sock, conn, lambda evs: any(isinstance(e, GetValuesResult) for e in evs))


@contextlib.contextmanager
def _multiplexer(run: Running) -> Iterator[tuple[socket.socket, ClientConnection]]:
    """A connection opened as HAProxy with get-values and mpxs-conns opens one."""
    assert isinstance(run.address, str)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(run.address)
        conn = ClientConnection()
        _ask_values(sock, conn)
        yield sock, conn


@pytest.mark.parametrize("peer", ["get-values", "numbered"])
def test_a_request_multiplexed_onto_a_busy_connection_runs_at_once(
    start: Start, peer: str
) -> None:
    """HAProxy (mpxs-conns) sends its next request on a connection whose request still runs.
    It was read only when that request ended: a /hello sent 50 ms after a 1.5 s request was
    answered after 1.5 s, although GET_VALUES said FCGI_MPXS_CONNS=1 and a thread was free.
    HAProxy asks GET_VALUES first on each connection (get-values), and numbers its requests
    1, 3, 5, ...; either tells that it multiplexes (nginx and the others do neither)."""
    run = start(threads=2)
    assert isinstance(run.address, str)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(run.address)
        conn = ClientConnection()
        if peer == "get-values":
            _ask_values(sock, conn)
        else:  # a first request answered, then the next numbers
            sock.sendall(encode_request(1, _pairs(_get("/hello")), keep_conn=True))
            _read_events(sock, conn, _ended(1))
        slow, fast = (1, 3) if peer == "get-values" else (3, 5)
        sock.sendall(encode_request(slow, _pairs(_get("/slow", "s=1.5")), keep_conn=True))
        time.sleep(0.05)  # the slow one runs
        t0 = time.monotonic()
        sock.sendall(encode_request(fast, _pairs(_get("/hello")), keep_conn=True))
        events = _read_events(sock, conn, _ended(fast))
        assert time.monotonic() - t0 < 0.75, "the second request waited for the first"
        assert not _ended(slow)(events)
        assert b"Hello, World!" in b"".join(
            e.data for e in events if isinstance(e, StdoutData) and e.request_id == fast
        )
        events += _read_events(sock, conn, _ended(slow))
        assert b"slept" in b"".join(
            e.data for e in events if isinstance(e, StdoutData) and e.request_id == slow
        )
        # and the connection goes on serving
        sock.sendall(encode_request(7, _pairs(_get("/hello")), keep_conn=True))
        _read_events(sock, conn, _ended(7))


def _drip(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    """A byte every 0.1 s for 3 s (a slow stream), or /slow's answer."""
    if environ["PATH_INFO"] != "/drip":
        return wsgi_apps.app(environ, start_response)
    start_response("200 OK", [("Content-Type", "text/plain")])

    def body() -> Iterator[bytes]:
        for _ in range(30):
            yield b"x"
            time.sleep(0.1)

    return body()


def test_get_values_and_abort_are_read_while_a_request_runs(start: Start) -> None:
    """Management records and ABORT_REQUEST on a connection whose request runs are answered
    then, not after it: GET_VALUES at once, and a streaming response stops at the abort (it
    was read only after the app's 3 s, which sent all 30 chunks)."""
    run = start(_drip, threads=2)
    with _multiplexer(run) as (sock, conn):
        sock.sendall(encode_request(1, _pairs(_get("/drip")), keep_conn=True))
        _read_events(sock, conn, lambda evs: any(isinstance(e, StdoutData) for e in evs))
        t0 = time.monotonic()
        sock.sendall(encode_get_values([b"FCGI_MPXS_CONNS"]))
        _read_events(sock, conn, lambda evs: any(isinstance(e, GetValuesResult) for e in evs))
        assert time.monotonic() - t0 < 0.75, "GET_VALUES waited for the running request"
        t0 = time.monotonic()
        sock.sendall(encode_abort_request(1))
        events = _read_events(sock, conn, _ended(1))
        assert time.monotonic() - t0 < 0.75, "the abort waited for the app's whole stream"
        assert sum(len(e.data) for e in events if isinstance(e, StdoutData)) < 10


def _cutting(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    """/cut: a chunk, then an exception; /short: 10 of 100 Content-Length bytes (a list,
    held back and sent with the end); anything else as wsgi_apps.app."""
    path = environ["PATH_INFO"]
    if path == "/cut":
        start_response("200 OK", [("Content-Type", "text/plain")])

        def body() -> Iterator[bytes]:
            yield b"first chunk"
            raise RuntimeError("the database went away")

        return body()
    if path == "/short":
        start_response("200 OK", [("Content-Length", "100")])
        return [b"x" * 10]
    return wsgi_apps.app(environ, start_response)


def _stdout(events: list[Any], rid: int = 1) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, StdoutData) and e.request_id == rid)


@pytest.mark.parametrize("keep_conn", [False, True])
def test_a_response_cut_short_ends_in_a_closed_connection_not_an_end_request(
    start: Start, keep_conn: bool
) -> None:
    """END_REQUEST's app status is all a web server got when an app failed after its response
    started, and nginx, Apache and HAProxy ignore it: they ended a chunked response as if it
    were whole (HAProxy gave curl a 200 with 8 bytes and exit status 0). The connection is
    closed instead, after what the app sent, so the web server passes the break on."""
    run = start(_cutting, threads=1)
    assert isinstance(run.address, str)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(run.address)
        sock.sendall(encode_request(1, _pairs(_get("/cut")), keep_conn=keep_conn))
        events = ClientConnection().receive(_until_eof(sock))
    assert b"first chunk" in _stdout(events)
    assert not any(isinstance(e, EndRequest) for e in events)
    assert any("truncated" in line for line in run.logs)
    assert run.client().request(_get("/hello")).body == b"Hello, World!"  # serving on


@pytest.mark.parametrize("path", ["/short", "/cut"])
def test_nginx_over_unix_without_keepalive_gets_end_request_for_a_cut_response(
    start: Start, path: str
) -> None:
    """The one web server a close cannot tell: nginx without fastcgi_keep_conn takes it for
    the end of the response, and its client then waited for the rest of a body short of its
    Content-Length until it timed out. At END_REQUEST nginx checks the length itself. Any
    other web server, or nginx keeping the connection, gets the close."""
    run = start(_cutting, threads=1)
    assert isinstance(run.address, str)
    nginx = _pairs(_get(path, SERVER_SOFTWARE="nginx/1.22.1"))
    events = _raw_exchange(run.address, encode_request(1, nginx))
    assert isinstance(events[-1], EndRequest) and events[-1].app_status == 1
    other = _pairs(_get(path, SERVER_SOFTWARE="Apache/2.4.71 (Debian)"))
    events = _raw_exchange(run.address, encode_request(1, other))
    assert not any(isinstance(e, EndRequest) for e in events)


def test_a_response_cut_short_over_tcp_ends_in_a_reset(start: Start) -> None:
    """nginx without fastcgi_keep_conn takes an EOF for the end of a response: over TCP the
    close of a response cut short is a reset, which it reports and passes on as an error."""
    run = start(_cutting, threads=1, listener=_tcp_listener())
    with socket.create_connection(run.address, timeout=10) as sock:  # type: ignore[arg-type]
        sock.sendall(encode_request(1, _pairs(_get("/cut"))))
        with pytest.raises(ConnectionResetError):
            while sock.recv(65536):
                pass
    assert run.client().request(_get("/hello")).body == b"Hello, World!"


def test_a_response_cut_short_on_a_multiplexing_connection_keeps_it(start: Start) -> None:
    """A web server that multiplexes may have sent its next request on the connection
    already, unread while every thread was busy: breaking the connection off lost it. There
    the cut one ends with app status 1, and the connection serves on."""
    run = start(_cutting, threads=2)
    with _multiplexer(run) as (sock, conn):
        sock.sendall(encode_request(1, _pairs(_get("/cut")), keep_conn=True))
        events = _read_events(sock, conn, _ended(1))
        end = next(e for e in events if isinstance(e, EndRequest))
        assert end.app_status == 1
        sock.sendall(encode_request(3, _pairs(_get("/hello")), keep_conn=True))
        assert _stdout(_read_events(sock, conn, _ended(3)), 3).endswith(b"Hello, World!")


def test_an_aborted_upload_leaves_a_kept_connection_open(start: Start) -> None:
    """HAProxy sends ABORT_REQUEST for an upload its client gave up, and stops sending its
    body. The connection was closed once idle, and with it the requests HAProxy had already
    multiplexed onto it; the rest of an ended request's STDIN is ignored (spec 3.3)."""
    run = start(threads=2)
    with _multiplexer(run) as (sock, conn):
        post = _get("/echo", REQUEST_METHOD="POST", CONTENT_LENGTH="100000")
        head = encode_request(1, _pairs(post), b"x" * 20000, keep_conn=True)
        sock.sendall(head[: -len(encode_record(RecordType.STDIN, 1, b""))])  # no end of STDIN
        time.sleep(0.1)
        sock.sendall(encode_abort_request(1))
        _read_events(sock, conn, _ended(1))
        time.sleep(0.2)  # the request's thread has left the connection
        sock.sendall(encode_request(3, _pairs(_get("/hello")), keep_conn=True))
        assert _stdout(_read_events(sock, conn, _ended(3)), 3).endswith(b"Hello, World!")


def test_a_response_cut_short_next_to_other_requests_ends_with_app_status_1(
    start: Start,
) -> None:
    """On a connection other requests share, closing it would break them too: the cut one
    then ends with app status 1, and the others are answered."""
    run = start(_cutting, threads=2)
    with _multiplexer(run) as (sock, conn):
        sock.sendall(encode_request(1, _pairs(_get("/slow", "s=0.5")), keep_conn=True))
        time.sleep(0.1)
        sock.sendall(encode_request(3, _pairs(_get("/cut")), keep_conn=True))
        events = _read_events(sock, conn, _ended(3))
        end = next(e for e in events if isinstance(e, EndRequest) and e.request_id == 3)
        assert end.app_status == 1
        events += _read_events(sock, conn, _ended(1))
        assert _stdout(events, 1).endswith(b"slept")


def test_more_concurrent_ids_than_threads_get_overloaded(start: Start) -> None:
    run = start(threads=2)
    with run.client() as client:
        responses = client.requests([_get("/hello")] * 3)
    statuses = [r.protocol_status for r in responses]
    assert statuses[:2] == [ProtocolStatus.REQUEST_COMPLETE] * 2
    assert statuses[2] == ProtocolStatus.OVERLOADED


def test_single_thread_refuses_multiplexing(start: Start) -> None:
    run = start(threads=1)
    with run.client() as client:
        responses = client.requests([_get("/hello"), _get("/hello")])
    assert responses[0].body == b"Hello, World!"
    assert responses[1].protocol_status == ProtocolStatus.CANT_MPX_CONN


# --------------------------------------------------------------------------- protocol edges


def test_get_values_reports_the_real_limits(start: Start) -> None:
    run = start(threads=3)
    values = run.client().get_values(
        ["FCGI_MAX_CONNS", "FCGI_MAX_REQS", "FCGI_MPXS_CONNS", "NOT_A_NAME"]
    )
    assert values == {
        b"FCGI_MAX_CONNS": str(3 + server_mod.MAX_IDLE_CONNS).encode(),
        b"FCGI_MAX_REQS": b"3",
        b"FCGI_MPXS_CONNS": b"1",
    }


def test_unknown_role_is_answered_unknown_role(start: Start) -> None:
    run = start()
    assert isinstance(run.address, str)
    wire = encode_record(RecordType.BEGIN_REQUEST, 1, b"\x00\x09\x00" + b"\x00" * 5)
    events = _raw_exchange(run.address, wire)
    assert events == [EndRequest(1, 0, ProtocolStatus.UNKNOWN_ROLE)]
    # worker alive
    assert run.client().request(_get("/hello")).status == 200


def test_unknown_management_record_gets_unknown_type(start: Start) -> None:
    run = start()
    assert isinstance(run.address, str)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(run.address)
        sock.sendall(encode_record(42, 0, b""))
        events = ClientConnection().receive(sock.recv(64))
    assert [type(e).__name__ for e in events] == ["UnknownType"]


def test_protocol_error_closes_only_that_connection(start: Start) -> None:
    run = start()
    assert isinstance(run.address, str)
    assert _raw_exchange(run.address, b"\x09" * 16) == []  # bad version: closed, no answer
    assert run.client().request(_get("/hello")).status == 200
    assert any("protocol error" in line for line in run.logs)


def test_abort_request_stops_feeding_the_app_and_ends_the_request(start: Start) -> None:
    run = start()
    assert isinstance(run.address, str)
    params = encode_pairs({b"PATH_INFO": b"/echo", b"REQUEST_METHOD": b"POST"})
    wire = (
        encode_begin_request(1)
        + encode_record(RecordType.PARAMS, 1, params)
        + encode_record(RecordType.PARAMS, 1, b"")
        + encode_record(RecordType.STDIN, 1, b"partial body")
    )
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(run.address)
        sock.sendall(wire)
        time.sleep(0.2)  # the app is now blocked reading more input
        sock.sendall(encode_abort_request(1))
        conn = ClientConnection()
        events: list[Any] = []
        while chunk := sock.recv(65536):
            events += conn.receive(chunk)
    ends = [e for e in events if isinstance(e, EndRequest)]
    assert len(ends) == 1
    assert ends[0].protocol_status == ProtocolStatus.REQUEST_COMPLETE
    assert "body was complete: the web server aborted the request" in "\n".join(run.logs)
    assert run.client().request(_get("/hello")).status == 200


@pytest.mark.parametrize("how", ["abort", "eof", "stall"])
def test_a_body_cut_short_raises_in_the_apps_read_instead_of_ending_early(
    start: Start, how: str
) -> None:
    """An upload nginx stops passing on (its client went away: ABORT_REQUEST; the connection
    closed; nothing more for io_timeout) must not read as a complete, shorter body: with no
    CONTENT_LENGTH (chunked) and wsgi.input_terminated the app could not tell, and would store a
    cut upload as whole."""
    seen: list[tuple[int, BaseException | None]] = []

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        stream, got = environ["wsgi.input"], 0
        try:
            while chunk := stream.read(100):
                got += len(chunk)
        except Exception as exc:
            seen.append((got, exc))
            raise
        seen.append((got, None))
        start_response("200 OK", [("Content-Length", "0")])
        return []

    run = start(app, threads=1, io_timeout=0.3)
    assert isinstance(run.address, str)
    params = encode_pairs({b"PATH_INFO": b"/upload", b"REQUEST_METHOD": b"POST"})
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(run.address)
        sock.sendall(
            encode_begin_request(1)
            + encode_record(RecordType.PARAMS, 1, params)
            + encode_record(RecordType.PARAMS, 1, b"")
            + encode_record(RecordType.STDIN, 1, b"x" * 1000)
        )
        time.sleep(0.1)  # the app is reading, waiting for more
        if how == "abort":
            sock.sendall(encode_abort_request(1))
        elif how == "eof":
            sock.shutdown(socket.SHUT_WR)
        while sock.recv(65536):
            pass
    wait_for(lambda: bool(seen), what="the app's read to end")
    assert seen[0][0] == 1000
    assert isinstance(seen[0][1], RequestBodyIncomplete), seen
    wait_for(lambda: any("before its body was complete" in line for line in run.logs))
    assert not any("Traceback" in line for line in run.logs)  # a client going away is no bug
    assert run.client().request(_get("/hello")).status == 200


# --------------------------------------------------------------------------- failures


def test_app_exception_gives_500_and_the_worker_lives(start: Start) -> None:
    run = start(threads=1)
    resp = run.client().request(_get("/raises"))
    assert resp.status == 500
    assert resp.app_status == 1
    assert any("boom" in line for line in run.logs)
    assert run.client().request(_get("/hello")).body == b"Hello, World!"


def test_client_disconnect_mid_response_leaves_the_worker_alive(start: Start) -> None:
    run = start(threads=1)
    assert isinstance(run.address, str)
    for _ in range(3):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(run.address)
            sock.sendall(encode_request(1, {b"PATH_INFO": b"/stream", b"QUERY_STRING": b"mib=50"}))
            sock.recv(65536)  # the response has started; now go away
    resp = run.client().request(_get("/hello"))
    assert resp.body == b"Hello, World!"
    # One line per disconnect at most: no traceback storm.
    assert len(run.logs) <= 3
    assert not any("Traceback" in line for line in run.logs)


@pytest.mark.parametrize("split", [False, True])
def test_a_response_the_web_server_no_longer_waits_for_is_logged_once(
    start: Start, split: bool
) -> None:
    """The web server gave up while the app ran (its read timeout, its client gone) and closed
    the connection: the response's last write fails. That left no trace (Caddy's 504 had no
    counterpart in the worker's log); now one line, and the worker serves on. In one piece the
    request takes the whole-request path; with its body sent apart, the connection path."""
    run = start(threads=1)
    assert isinstance(run.address, str)
    params = {b"PATH_INFO": b"/slow", b"QUERY_STRING": b"s=0.4", b"REQUEST_METHOD": b"POST"}
    wire = encode_request(1, params, b"body")
    cut = len(wire) - 16 if split else len(wire)  # 16: the body's record and the empty one
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(run.address)
        sock.sendall(wire[:cut])
        time.sleep(0.05)
        sock.sendall(wire[cut:])
        time.sleep(0.1)  # the app runs; the web server gives up
    wait_for(lambda: any("closed the connection before the response" in x for x in run.logs))
    assert run.client().request(_get("/hello")).body == b"Hello, World!"
    assert sum("closed the connection before the response" in x for x in run.logs) == 1


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_a_web_server_that_closes_once_it_has_the_whole_body_is_no_failure(
    start: Start, method: str
) -> None:
    """lighttpd closes the connection once it has a response's Content-Length of body, and
    nginx once it has a HEAD's head, before END_REQUEST: nothing was lost, nothing to log
    (23,000 false "closed the connection" lines in 10 s of lighttpd load; a Django
    FileResponse logged "client went away" for every HEAD)."""

    class Slow:  # a body, then close() takes a while: END_REQUEST comes after it
        def __iter__(self) -> Iterator[bytes]:
            yield b"x" * 10
            yield b"y" * 10

        def close(self) -> None:
            time.sleep(0.3)

    def app(environ: dict[str, Any], start_response: Any) -> Slow:
        start_response("200 OK", [("Content-Length", "20")])
        return Slow()

    run = start(app, threads=1)
    assert isinstance(run.address, str)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(run.address)
        sock.sendall(encode_request(1, {b"REQUEST_METHOD": method.encode()}))
        conn, got = ClientConnection(), b""
        sock.settimeout(5)
        while (b"y" * 10 if method == "GET" else b"\r\n\r\n") not in got:
            out, _, _ = _streams(conn.receive(sock.recv(65536)))
            got += out
    assert run.client().request(_get("/")).body == b"x" * 10 + b"y" * 10  # after the close()
    assert not any("closed the connection" in x or "went away" in x for x in run.logs), run.logs


# --------------------------------------------------------------------------- lifecycle


def test_graceful_stop_finishes_the_request_in_flight(start: Start) -> None:
    run = start(threads=2)
    out: list[bytes] = []
    t = threading.Thread(
        target=lambda: out.append(run.client().request(_get("/slow", "s=0.8")).body)
    )
    t.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    assert run.stop(graceful=True) == 0
    t.join(5)
    assert out == [b"slept"]
    assert time.monotonic() - t0 >= 0.3  # it waited for the request
    # not accepting any more
    with pytest.raises(ClientError):
        FastCGIClient(run.address, timeout=1).request(_get("/hello"))


def test_graceful_timeout_bounds_the_drain(start: Start) -> None:
    run = start(threads=1, graceful_timeout=0.3)
    t = threading.Thread(
        target=lambda: FastCGIClient(run.address, timeout=10).request(_get("/slow", "s=3")),
        daemon=True,
    )
    t.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    assert run.stop(graceful=True) == 0
    assert time.monotonic() - t0 < 2.5
    assert any("graceful timeout" in line for line in run.logs)


def test_max_requests_stops_after_n(start: Start) -> None:
    run = start(threads=2, max_requests=5)
    client = run.client(timeout=5)
    for _ in range(5):
        assert client.request(_get("/hello")).status == 200
    run.thread.join(10)
    assert not run.thread.is_alive()
    assert run.result == [0]
    assert run.server.served == 5


def test_max_requests_jitter_adds_up_to_jitter(start: Start) -> None:
    srv = Server(
        wsgi_apps.hello, socket.socket(), max_requests=10, max_requests_jitter=5, log=print
    )
    assert 10 <= srv.max_requests <= 15
    srv.listener.close()


# --------------------------------------------------------------------------- FCGI_WEB_SERVER_ADDRS


def test_parse_web_server_addrs() -> None:
    assert parse_web_server_addrs(None) is None
    assert parse_web_server_addrs("") is None
    allowed = parse_web_server_addrs("127.0.0.1, ::1")
    assert allowed is not None
    assert {"127.0.0.1", "::ffff:127.0.0.1", "::1"} <= allowed
    with pytest.raises(ValueError, match="nonsense"):
        parse_web_server_addrs("127.0.0.1,nonsense")


def _tcp_request_from(source: str, port: int) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
        try:
            sock.sendall(encode_request(1, {b"PATH_INFO": b"/hello"}))
        except OSError:
            return b""
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
        return data


def test_web_server_addrs_rejects_tcp_peers_not_listed(start: Start) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    start(listener=listener, web_server_addrs=["127.0.0.1"])
    assert b"Hello, World!" in _tcp_request_from("127.0.0.1", port)
    assert _tcp_request_from("127.0.0.2", port) == b""


def test_web_server_addrs_do_not_filter_unix_peers(start: Start) -> None:
    run = start(web_server_addrs="10.9.8.7")
    assert run.client().request(_get("/hello")).status == 200


def test_io_timeout_drops_a_stalled_peer(start: Start) -> None:
    run = start(threads=1, io_timeout=0.3)
    assert isinstance(run.address, str)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(run.address)
        sock.sendall(encode_begin_request(1))  # ... and nothing more
        assert sock.recv(1) == b""
    assert run.client().request(_get("/hello")).status == 200


def test_stdout_records_never_interleave_under_multiplexing(start: Start) -> None:
    """Raw check: every STDOUT record of a multiplexed 2x2 MiB stream is whole and in order."""
    run = start(threads=2)
    assert isinstance(run.address, str)
    wire = b"".join(
        encode_request(rid, {b"PATH_INFO": b"/stream", b"QUERY_STRING": b"mib=2"}, keep_conn=True)
        for rid in (1, 2)
    )
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(run.address)
        sock.sendall(wire)
        conn = ClientConnection()
        out: dict[int, list[bytes]] = {1: [], 2: []}
        ended: set[int] = set()
        while len(ended) < 2:
            for ev in conn.receive(sock.recv(65536)):
                if isinstance(ev, StdoutData):
                    out[ev.request_id].append(ev.data)
                elif isinstance(ev, EndRequest):
                    ended.add(ev.request_id)
                else:
                    assert not isinstance(ev, StderrData)
    for rid in (1, 2):
        body = b"".join(out[rid]).split(b"\r\n\r\n", 1)[1]
        assert body == wsgi_apps.stream_bytes(2)


def test_app_calling_sys_exit_does_not_kill_the_worker(start: Start) -> None:
    run = start(threads=1)
    with pytest.raises(ClientError):
        run.client().request(_get("/sys_exit"))
    assert any("SystemExit" in line for line in run.logs)
    assert run.client().request(_get("/hello")).status == 200


def test_filter_role_gets_fcgi_data_and_authorizer_its_role(start: Start) -> None:
    run = start()
    client = run.client()
    resp = client.request(_get("/roles"), b"in", role=Role.FILTER, data=b"file data")
    assert resp.body == b"FILTER|in|file data"
    resp = client.request(_get("/roles"), role=Role.AUTHORIZER)
    assert resp.body == b"AUTHORIZER||"


def test_late_second_request_on_a_busy_connection_is_served(start: Start) -> None:
    """Request 2 arrives while request 1 runs and reads nothing: it waits for request 1 (the
    connection is only read when a request needs input or none runs), then is answered.

    Documented limitation: extra ids run concurrently when they arrive together with, or while,
    input is being read; no real web server multiplexes at all (shared/reference/fastcgi.md).
    """
    run = start(threads=2)
    assert isinstance(run.address, str)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(run.address)
        sock.sendall(
            encode_request(1, {b"PATH_INFO": b"/slow", b"QUERY_STRING": b"s=0.5"}, keep_conn=True)
        )
        time.sleep(0.2)
        sock.sendall(encode_request(2, {b"PATH_INFO": b"/hello"}, keep_conn=True))
        conn = ClientConnection()
        order: list[int] = []
        while len(order) < 2:
            for ev in conn.receive(sock.recv(65536)):
                if isinstance(ev, EndRequest):
                    order.append(ev.request_id)
    assert sorted(order) == [1, 2]


def test_echo_streams_while_the_upload_arrives(start: Start) -> None:
    """A web-server-like peer that writes and reads at once: 8 MiB echoed as it streams."""
    run = start(threads=2)
    assert isinstance(run.address, str)
    body = bytes(range(256)) * (1 << 15)
    params = {
        b"PATH_INFO": b"/echo_stream",
        b"REQUEST_METHOD": b"POST",
        b"CONTENT_LENGTH": str(len(body)).encode(),
    }
    wire = encode_request(1, params, body)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(20)
        sock.connect(run.address)
        sender = threading.Thread(target=sock.sendall, args=(wire,))
        sender.start()
        conn = ClientConnection()
        out: list[bytes] = []
        done = False
        while not done:
            for ev in conn.receive(sock.recv(65536)):
                if isinstance(ev, StdoutData):
                    out.append(ev.data)
                elif isinstance(ev, EndRequest):
                    done = True
        sender.join(10)
    assert b"".join(out).split(b"\r\n\r\n", 1)[1] == body


@pytest.mark.parametrize("graceful", [True, False])
def test_stop_closes_parked_connections(start: Start, graceful: bool) -> None:
    """An idle kept connection is closed by the end of a stop: a graceful one after
    PENDING_DRAIN (a request may still come on it, see below), a fast one at once."""
    run = start(threads=1)
    with run.client() as client:
        client.request(_get("/hello"), keep_conn=True)
        sock = client._sock
        assert sock is not None
        t0 = time.monotonic()
        assert run.stop(graceful) == 0
        sock.settimeout(5)
        assert sock.recv(1) == b""
        took = time.monotonic() - t0
        assert took < server_mod.PENDING_DRAIN + 1.0 if graceful else took < 0.5


def test_request_sent_on_a_parked_connection_during_stop_is_served(start: Start) -> None:
    """A request already sent on a parked connection when the stop comes is not dropped."""
    run = start(threads=1)
    gate = threading.Event()
    with run.client() as client:
        client.request(_get("/hello"), keep_conn=True)
        sock = client._sock
        assert sock is not None

        # Keep the only thread busy so the parked connection's next request waits in the
        # socket, then stop: the drain must peek, find it, and serve it.
        def occupy() -> None:
            gate.set()
            run.client().request(_get("/slow", "s=0.6"))

        busy = threading.Thread(target=occupy, daemon=True)
        busy.start()
        gate.wait(5)
        time.sleep(0.2)
        sock.sendall(encode_request(1, {b"PATH_INFO": b"/query", b"QUERY_STRING": b"late"}))
        time.sleep(0.1)
        stopper = threading.Thread(target=run.stop)
        stopper.start()
        sock.settimeout(10)
        got = stdout_until_eof(sock)
        stopper.join(10)
    assert got.endswith(b"late")


def _late_request_on_a_parked_connection(
    run: Running, path: str, extra: dict[str, str], *, split: bool
) -> bytes:
    """A kept connection parked idle, a stop begun, then a POST to ``path`` on it (``split``:
    its body after a pause, so not one whole request in one read): all the server sends
    until it closes the connection."""
    with run.client() as client:
        client.request(_get("/hello", **extra), keep_conn=True)  # now parked, idle
        sock = client._sock
        assert sock is not None
        stopper = threading.Thread(target=run.stop)
        stopper.start()
        time.sleep(0.2)  # the stop is under way
        params = {k.encode(): v.encode() for k, v in _get(path, **extra).items()}
        params[b"REQUEST_METHOD"] = b"POST"
        wire = encode_request(1, params, b"late", keep_conn=True)
        if split:
            cut = wire.index(encode_record(RecordType.STDIN, 1, b"late"))
            sock.sendall(wire[:cut])
            time.sleep(0.05)
            wire = wire[cut:]
        sock.sendall(wire)
        raw = _until_eof(sock)
        stopper.join(10)
    return raw


@pytest.mark.parametrize("path", ["/hello", "/echo"])
def test_a_kept_nginx_connection_used_during_a_stop_is_served_and_marked_not_to_be_reused(
    start: Start, path: str
) -> None:
    """nginx keeps idle connections cached and sends its next request on one any moment: a
    stop that closed them at once met those requests (a reset: 30-80 failed POSTs a reload
    under load). They stay open through the drain and a request on one is answered, followed
    by protocol.CLOSING_MARK (nginx then drops the connection instead of reusing it), then the
    connection is closed. /hello takes the whole-request path, /echo with a body sent apart
    the connection path."""
    run = start(threads=1)
    nginx = {"SERVER_SOFTWARE": "nginx/1.22.1"}
    raw = _late_request_on_a_parked_connection(run, path, nginx, split=path == "/echo")
    events = ClientConnection().receive(raw)
    out, _, _ = _streams(events)
    assert out.endswith(b"Hello, World!" if path == "/hello" else b"late")
    assert raw.endswith(CLOSING_MARK)
    assert [type(e).__name__ for e in events[-2:]] == ["EndRequest", "GetValuesResult"]


def test_a_stop_serves_the_connections_queued_before_it_gives_up_the_listener(
    start: Start,
) -> None:
    """The worker program gives up its copy of the listener when a stop begins (new
    connections are refused at once); connections already waiting in the accept queue were
    then reset when the last copy went (28 of 32 under nginx load): in a final stop -- the
    supervisor removed the socket file -- they are served."""
    run = start(threads=1, release_listener=True)
    assert isinstance(run.address, str)
    busy = threading.Thread(target=lambda: run.client().request(_get("/slow", "s=0.5")))
    busy.start()
    time.sleep(0.2)  # the only thread runs the slow request: these wait in the backlog
    queued = []
    for _ in range(3):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(run.address)
        sock.sendall(encode_request(1, {b"PATH_INFO": b"/hello"}))
        queued.append(sock)
    os.unlink(run.address)  # what the supervisor does when a stop begins
    stopper = threading.Thread(target=run.stop)
    stopper.start()
    try:
        for sock in queued:
            out, _, _ = _streams(ClientConnection().receive(_until_eof(sock)))
            assert out.endswith(b"Hello, World!")
    finally:
        for sock in queued:
            sock.close()
        stopper.join(10)
        busy.join(10)


def test_a_byte_on_the_signal_wakeup_fd_wakes_the_coordinator_once(start: Start) -> None:
    """runtime.py hands signal_wakeup_fd() to signal.set_wakeup_fd: a TERM that landed just
    before the coordinating thread entered poll() ran its Python handler only after poll()
    returned, and an idle worker slept through it until the supervisor's KILL (1 stop in
    30-200 under load). The C handler's byte wakes the thread, which empties the pipe."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server = Server(wsgi_apps.app, listener, log=lambda line: None)
    wakeup = server.signal_wakeup_fd()
    reaps: list[float] = []
    reap = server._reap

    def counting_reap() -> float | None:
        reaps.append(time.monotonic())
        return reap()

    server._reap = counting_reap  # type: ignore[method-assign]
    listener.bind(str(Path(tempfile.mkdtemp()) / "w.sock"))
    listener.listen(8)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        wait_for(lambda: len(reaps) == 1, what="the coordinator asleep")
        os.write(wakeup, bytes([signal.SIGTERM]))
        wait_for(lambda: len(reaps) == 2, what="the coordinator woken")
        time.sleep(0.2)
        assert len(reaps) == 2  # the pipe was emptied: no spinning
    finally:
        server.stop()
        thread.join(10)
        server.close_signal_wakeup()
        listener.close()


def test_an_inherited_tcp_listener_hands_out_connections_without_nagle(start: Start) -> None:
    """The server sets TCP_NODELAY on a TCP listener it was given (systemd's, an embedder's):
    Django's and Werkzeug's responses end in a second small write (END_REQUEST), which with
    Nagle waited 44 ms for nginx's delayed ACK on every kept connection's request."""
    listener = _tcp_listener()
    assert listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
    run = start(listener=listener)
    assert listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    assert run.client().request(_get("/hello")).body == b"Hello, World!"


def test_a_server_that_stops_by_itself_announces_it_first(start: Start) -> None:
    """on_retire runs when --max-requests ends the server, before its drain (the runtime
    sends its supervisor STOPPING=1 there, so the replacement starts at once); not on a stop
    someone asked for, who knows already."""
    calls: list[str] = []
    run = start(threads=1, max_requests=2, on_retire=lambda: calls.append("retire"))
    client = run.client()
    client.request(_get("/hello"))
    client.request(_get("/hello"))
    run.thread.join(10)
    assert calls == ["retire"] and run.result == [0]
    asked: list[str] = []
    other = start(threads=1, on_retire=lambda: asked.append("retire"))
    assert other.stop() == 0 and asked == []


def _tcp_listener() -> socket.socket:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    return listener


def _slow_fin(monkeypatch: pytest.MonkeyPatch) -> None:
    """Widen the gap between a last response and the FIN after it (the web server's wake-up
    preempting the worker there is what let Apache reuse the connection in between). 50 ms:
    far wider than that preemption, and well below the 200 ms for which Linux holds corked
    data at most (tcp(7)) -- at 200 ms the test raced that ceiling and failed under load."""
    last_on = Server._last_on

    def late(self: Server, conn: Any) -> None:
        time.sleep(0.05)
        last_on(self, conn)

    monkeypatch.setattr(Server, "_last_on", late)


def _end_then_eof(sock: socket.socket) -> list[Any]:
    """Read until END_REQUEST, then look, without waiting, whether EOF is there too: what
    Apache's check of a pooled connection does before it reuses it."""
    sock.settimeout(5)
    conn = ClientConnection()
    events: list[Any] = []
    while not any(type(e).__name__ == "EndRequest" for e in events):
        chunk = sock.recv(65536)
        assert chunk, "closed before END_REQUEST"
        events += conn.receive(chunk)
    sock.setblocking(False)  # (with a timeout, recv would poll for it first)
    try:
        assert sock.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        raise AssertionError("END_REQUEST came without the FIN: it looks reusable") from None
    return events


APACHE = {"SERVER_SOFTWARE": "Apache/2.4.71 (Debian)"}


def _next_on_kept(client: FastCGIClient, path: str, query: str) -> socket.socket:
    """Apache's kept connection: one request answered on it, the next (``path``) sent."""
    client.request(_get("/hello", **APACHE), keep_conn=True)
    sock = client._sock
    assert sock is not None
    params = {k.encode(): v.encode() for k, v in _get(path, query, **APACHE).items()}
    sock.sendall(encode_request(1, params, keep_conn=True))
    return sock


def test_other_web_servers_idle_kept_unix_connections_are_closed_when_a_stop_begins(
    start: Start,
) -> None:
    """Apache (enablereuse) would read the mark as the first record of its next response, and
    checks a pooled connection for EOF before reusing it: on a UNIX socket, where nothing can
    put our FIN in step with a last response, its idle ones are closed at once."""
    run = start(threads=1)
    with run.client() as client:
        client.request(_get("/hello", **APACHE), keep_conn=True)
        sock = client._sock
        assert sock is not None
        stopper = threading.Thread(target=run.stop)
        t0 = time.monotonic()
        stopper.start()
        sock.settimeout(5)
        assert sock.recv(1) == b""
        assert time.monotonic() - t0 < server_mod.PENDING_DRAIN
        stopper.join(10)


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_other_web_servers_get_their_last_response_then_the_end_never_the_mark(
    start: Start, monkeypatch: pytest.MonkeyPatch, transport: str
) -> None:
    """A request in flight on another web server's kept connection when a stop begins: its
    response, then our FIN, never the mark, which Apache (enablereuse=on) would read as its
    next response. Apache checks a pooled connection for EOF before it reuses it, but a FIN
    sent microseconds after END_REQUEST came too late (its thread, woken by END_REQUEST,
    preempted the worker, reused the connection and lost the request: 18-58 per three reloads
    under load). On TCP the FIN now leaves in END_REQUEST's segment (TCP_CORK until the
    shutdown), however late the worker gets to it; a UNIX socket has no such step."""
    tcp = transport == "tcp"
    if tcp:
        _slow_fin(monkeypatch)
    run = start(threads=1, listener=_tcp_listener() if tcp else None)
    with run.client() as client:
        sock = _next_on_kept(client, "/slow", "s=0.3")
        time.sleep(0.1)  # the app runs
        stopper = threading.Thread(target=run.stop)
        stopper.start()
        events = _end_then_eof(sock) if tcp else ClientConnection().receive(_until_eof(sock))
        stopper.join(10)
    assert _streams(events)[0].endswith(b"slept")
    assert type(events[-1]).__name__ == "EndRequest"  # (the mark would follow it)


def test_the_request_that_reaches_max_requests_ends_its_kept_connection(
    start: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The response that reaches --max-requests is the connection's last: it carries the FIN
    (TCP: in its segment). The stop that follows closed the kept connection only after it,
    when Apache may have sent its next request on it already (1 in 250 requests failed with
    --max-requests 1000 under load)."""
    _slow_fin(monkeypatch)
    shutdown = Server._shutdown

    def late_stop(self: Server, ctl: Any) -> int:
        time.sleep(0.2)  # the stop's own closing of idle connections comes later still
        return shutdown(self, ctl)

    monkeypatch.setattr(Server, "_shutdown", late_stop)
    run = start(threads=1, listener=_tcp_listener(), max_requests=2)
    with run.client() as client:
        events = _end_then_eof(_next_on_kept(client, "/query", "two"))
    assert _streams(events)[0].endswith(b"two")
    run.thread.join(10)
    assert run.result == [0]


@pytest.mark.parametrize("path", ["/hello", "/echo"])
def test_another_web_servers_kept_tcp_connection_is_served_during_a_stop_then_ended(
    start: Start, path: str
) -> None:
    """On TCP a kept connection can be ended safely after a response (the FIN in its segment),
    so a stopping server keeps other web servers' ones open through the drain, as nginx's, and
    answers a request that comes on one: closing them when the stop began met the request
    Apache was sending on one (a reset, a 503). /hello takes the whole-request path, /echo
    the connection path."""
    run = start(threads=1, listener=_tcp_listener())
    raw = _late_request_on_a_parked_connection(run, path, APACHE, split=False)
    events = ClientConnection().receive(raw)
    assert _streams(events)[0].endswith(b"Hello, World!" if path == "/hello" else b"late")
    assert type(events[-1]).__name__ == "EndRequest" and CLOSING_MARK not in raw


def _half_duplex(address: str, path: str, body: bytes) -> list[Any]:
    """A request as Caddy 2.6 sends one: all of the body first (8 KiB records), and only then
    is the response read."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(20)
        sock.connect(address)
        path, _, query = path.partition("?")
        params = {b"REQUEST_METHOD": b"POST", b"PATH_INFO": path.encode()}
        params[b"QUERY_STRING"] = query.encode()
        params[b"CONTENT_LENGTH"] = str(len(body)).encode()
        wire = encode_begin_request(1) + encode_record(RecordType.PARAMS, 1, encode_pairs(params))
        wire += encode_record(RecordType.PARAMS, 1, b"")
        for i in range(0, len(body), 8192):
            wire += encode_record(RecordType.STDIN, 1, body[i : i + 8192])
        sock.sendall(wire + encode_record(RecordType.STDIN, 1, b""))
        return ClientConnection().receive(_until_eof(sock, 20))


def test_a_big_answer_to_an_unread_upload_reaches_a_web_server_that_reads_only_after_sending(
    start: Start,
) -> None:
    """Caddy 2.6 sends a request's whole body before it reads any of the response: an app
    that answered a big upload with a big page without reading it (a 1 MB 413) waited on the
    web server, which waited on it, until io_timeout, then a 502 blamed on the web server. A
    response write that waits now reads on, keeps 4 MiB of body for the app, drops the rest."""
    run = start(threads=1, io_timeout=3)
    assert isinstance(run.address, str)
    events = _half_duplex(run.address, "/big_list?mib=1", b"u" * (10 << 20))
    out, _, _ = _streams(events)
    assert out.endswith(wsgi_apps.stream_bytes(1))
    assert type(events[-1]).__name__ == "EndRequest"
    assert any("the rest of the body is discarded" in line for line in run.logs), run.logs
    assert run.client().request(_get("/hello")).body == b"Hello, World!"


def test_a_streaming_app_gets_the_whole_body_from_a_web_server_that_reads_only_after_sending(
    start: Start,
) -> None:
    """An app that reads as it answers (an echo) from such a web server: its response writes
    fill the socket while the body is still coming; what they read meanwhile is kept for the
    app (up to 4 MiB), so the whole body comes back."""
    run = start(threads=1, io_timeout=3)
    assert isinstance(run.address, str)
    body = bytes(range(256)) * (3 << 12)  # 3 MiB
    out, _, _ = _streams(_half_duplex(run.address, "/echo_stream", body))
    assert out.split(b"\r\n\r\n", 1)[1] == body


@pytest.mark.parametrize(("path", "mib"), [("/file", 1), ("/file", 5), ("/big_list", 3)])
def test_coalesced_responses_arrive_whole(start: Start, path: str, mib: int) -> None:
    """Lists and file_wrappers are coalesced (flushed every FLUSH_BYTES): nothing lost."""
    run = start()
    resp = run.client(timeout=20).request(_get(path, f"mib={mib}"))
    assert resp.status == 200
    assert resp.body == wsgi_apps.stream_bytes(mib)


def test_small_list_response_is_one_write(start: Start, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hello path: STDOUT + END_REQUEST leave in a single writev."""
    import os

    calls: list[int] = []
    real_writev, real_pwritev = os.writev, os.pwritev

    def counting(fd: int, bufs: Any) -> int:
        calls.append(fd)
        return real_writev(fd, bufs)

    def counting_p(fd: int, bufs: Any, offset: int, flags: int = 0) -> int:
        calls.append(fd)
        return real_pwritev(fd, bufs, offset, flags)

    monkeypatch.setattr(os, "writev", counting)
    monkeypatch.setattr(os, "pwritev", counting_p)
    run = start(threads=1)
    assert run.client().request(_get("/hello")).body == b"Hello, World!"
    assert len(calls) == 1


def test_keyboard_interrupt_in_serve_forever_stops_the_pool(sockdir: Path) -> None:
    """Embedded without runtime's handlers: Ctrl-C (default SIGINT handler) must not leave
    daemon threads accepting behind the caller's back."""
    import signal

    path = str(sockdir / "k.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    srv = Server(wsgi_apps.hello, listener, threads=2, log=lambda m: None)
    timer = threading.Timer(
        0.3, lambda: signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)
    )
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        srv.serve_forever()
    time.sleep(0.2)
    assert not any(t.is_alive() for t in srv._pool)
    listener.close()


def test_idle_connections_beyond_the_cap_are_closed(
    start: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_mod, "MAX_IDLE_CONNS", 1)
    run = start(threads=1)
    with run.client() as first, run.client() as second:
        assert first.request(_get("/hello"), keep_conn=True).status == 200
        assert second.request(_get("/hello"), keep_conn=True).status == 200
        # One idle connection fits; the second was closed instead of parked.
        assert second._sock is not None
        second._sock.settimeout(5)
        assert second._sock.recv(1) == b""
        assert first.request(_get("/query", "still"), keep_conn=True).body == b"still"


def test_app_ignoring_a_large_body_still_answers(start: Start) -> None:
    """The unread STDIN is drained after END_REQUEST so the peer's send completes and the
    close does not reset the connection under the response."""
    run = start(threads=1)
    body = b"x" * (4 << 20)
    params = _get("/hello", REQUEST_METHOD="POST", CONTENT_LENGTH=str(len(body)))
    resp = run.client(timeout=20).request(params, body)
    assert resp.body == b"Hello, World!"
    assert run.client().request(_get("/hello")).status == 200


# --------------------------------------------------------------------------- the whole-request path


def _whole_and_split(params: dict[str, str], rid: int = 1) -> tuple[bytes, bytes]:
    """The same request twice: whole (BEGIN, one PARAMS record, empty PARAMS, empty STDIN: what
    the server answers without connection state) and with its PARAMS split over two records
    (which goes through ServerConnection)."""
    pairs = {k.encode(): v.encode() for k, v in params.items()}
    whole = encode_request(rid, pairs)
    block = encode_pairs(pairs)
    split = (
        encode_begin_request(rid, Role.RESPONDER, False)
        + encode_record(RecordType.PARAMS, rid, block[:5])
        + encode_record(RecordType.PARAMS, rid, block[5:])
        + encode_record(RecordType.PARAMS, rid, b"")
        + encode_record(RecordType.STDIN, rid, b"")
    )
    return whole, split


@pytest.fixture
def whole_taken(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Whether each first read the server looked at was a whole request (one entry per read)."""
    taken: list[bool] = []
    real = whole_responder_request

    def spy(*args: Any) -> Any:
        result = real(*args)
        taken.append(result is not None)
        return result

    monkeypatch.setattr(server_mod, "whole_responder_request", spy)
    return taken


@pytest.mark.parametrize(
    "path",
    ["/hello", "/stderr", "/raises", "/stream", "/file", "/big_list", "/cookies", "/sys_exit"],
)
def test_whole_request_path_answers_like_the_connection_path(
    start: Start, whole_taken: list[bool], path: str
) -> None:
    taken = whole_taken
    run = start(threads=1)
    assert isinstance(run.address, str)
    for rid in (1, 7):
        whole, split = _whole_and_split(_get(path, "mib=1"), rid)
        taken.clear()
        fast = _raw_exchange(run.address, whole)
        assert taken == [True], "the whole request did not take the whole-request path"
        taken.clear()
        slow = _raw_exchange(run.address, split)
        assert True not in taken
        assert _streams(fast) == _streams(slow)
        if path == "/sys_exit":
            assert fast == []  # the connection is dropped, no END_REQUEST, the worker lives
        else:
            assert isinstance(fast[-1], EndRequest) and fast[-1].request_id == rid
    assert run.client().request(_get("/hello")).body == b"Hello, World!"


@pytest.mark.parametrize("size", [1, 4000, 70_000])
def test_whole_request_with_its_body_answers_like_the_connection_path(
    start: Start, whole_taken: list[bool], size: int
) -> None:
    """A small POST that arrives whole (its body before the empty STDIN, in the first read)
    takes the whole-request path; the app reads the same body and the web server gets the
    same bytes as when the request comes in pieces."""
    taken = whole_taken
    run = start(threads=1)
    assert isinstance(run.address, str)
    payload = bytes(range(256)) * (size // 256) + b"y" * (size % 256)
    params = {
        b"REQUEST_METHOD": b"POST",
        b"SCRIPT_NAME": b"",
        b"PATH_INFO": b"/echo",
        b"CONTENT_LENGTH": str(size).encode(),
    }
    whole = encode_request(1, params, payload)
    pieces = [whole[:10], whole[10:]]  # the first read is never a whole request
    taken.clear()
    fast = _raw_exchange(run.address, whole)
    if size < 10_000:  # (a larger one may come in two reads: then it is not whole)
        assert taken == [True]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(run.address)
        sock.sendall(pieces[0])
        time.sleep(0.05)
        sock.sendall(pieces[1])
        conn = ClientConnection()
        slow: list[Any] = []
        while chunk := sock.recv(65536):
            slow += conn.receive(chunk)
    assert _streams(fast) == _streams(slow)
    assert _streams(fast)[0].endswith(payload)


def _streams(events: list[Any]) -> tuple[bytes, bytes, list[Any]]:
    """What a web server makes of a response: the STDOUT and STDERR bytes (record boundaries
    are the sender's choice) and the END_REQUESTs."""
    out = b"".join(e.data for e in events if isinstance(e, StdoutData))
    err = b"".join(e.data for e in events if isinstance(e, StderrData))
    return out, err, [e for e in events if isinstance(e, EndRequest)]


def test_whole_request_path_counts_requests_for_max_requests(start: Start) -> None:
    run = start(threads=1, max_requests=3)
    for _ in range(3):
        whole, _split = _whole_and_split(_get("/hello"))
        events = _raw_exchange(str(run.address), whole)
        assert isinstance(events[-1], EndRequest)
    run.thread.join(10)
    assert run.result == [0]
    assert run.server.served == 3


def test_max_requests_is_reached_under_concurrent_whole_requests(start: Start) -> None:
    """Pool threads look at --max-requests without the lock first: with four threads serving
    whole requests at once, the worker still stops at the limit (the requests in flight then
    finish: at most one per thread beyond it)."""
    run = start(threads=4, max_requests=40)
    whole, _split = _whole_and_split(_get("/hello"))

    def one(_: int) -> bool:
        if not run.thread.is_alive():
            return False  # stopped at the limit: later connections would wait in the backlog
        try:
            events = _raw_exchange(str(run.address), whole, timeout=1)
        except OSError:
            return False  # connected after the limit: nobody answers
        return bool(events) and isinstance(events[-1], EndRequest)

    with ThreadPoolExecutor(8) as pool:
        answered = sum(pool.map(one, range(80)))
    run.thread.join(10)
    assert not run.thread.is_alive()
    assert run.result == [0]
    assert 40 <= run.server.served <= 44
    assert 40 <= answered <= run.server.served  # (a client may give up on a slow answer)


def test_a_whole_request_after_part_of_a_record_is_read_as_the_rest_of_that_record(
    start: Start,
) -> None:
    """The whole-request path is for a connection's first bytes only: bytes that complete an
    earlier partial record belong to it (here they make a 256-byte BEGIN_REQUEST body that
    never completes: no answer)."""
    run = start(threads=1)
    whole, _split = _whole_and_split(_get("/hello"))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        sock.connect(str(run.address))
        sock.sendall(whole[:3])
        time.sleep(0.2)  # read and parked: the next bytes continue this record
        sock.sendall(whole)
        with pytest.raises(TimeoutError):
            sock.recv(65536)
    assert run.client().request(_get("/hello")).body == b"Hello, World!"


def test_new_connection_gets_first_wait_and_a_silent_one_turns_waiting_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A connection accepted a moment before its request arrives is read, not parked; one
    that stays silent costs FIRST_WAIT once, and then new connections are parked at once."""
    monkeypatch.setattr(server_mod, "FIRST_WAIT", 0.2)  # room for a slow timer thread
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv = Server(wsgi_apps.app, listener, log=lambda _: None)
    late, peer = socket.socketpair()
    silent, silent_peer = socket.socketpair()
    other, other_peer = socket.socketpair()
    with listener, late, peer, silent, silent_peer, other, other_peer:
        timer = threading.Timer(0.001, peer.sendall, (b"\x01\x01",))  # part of a header
        timer.start()
        data = srv._wait_first(late.fileno(), None)
        timer.join()
        assert data is not None and bytes(data) == b"\x01\x01"

        t0 = time.monotonic()
        assert srv._wait_first(silent.fileno(), None) is None
        assert time.monotonic() - t0 >= server_mod.FIRST_WAIT * 0.9
        t0 = time.monotonic()
        assert srv._wait_first(other.fileno(), None) is None  # within FIRST_WAIT_BACKOFF: no wait
        assert time.monotonic() - t0 < server_mod.FIRST_WAIT / 2


def _kept_exchange(run: Running, path: str, query: str, flags: list[bool]) -> list[bytes]:
    """One connection, one request per entry of ``flags`` (KEEP_CONN or not); the STDOUT of
    each, and b"" appended if the server closed the connection after the last one."""
    assert isinstance(run.address, str)
    pairs = {k.encode(): v.encode() for k, v in _get(path, query).items()}
    out: list[bytes] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(run.address)
        conn = ClientConnection()
        for keep in flags:
            sock.sendall(encode_request(1, pairs, keep_conn=keep))
            out.append(_streams(_one_response(sock, conn))[0])
        if not flags[-1]:
            out.append(sock.recv(65536))
    return out


def _one_response(sock: socket.socket, conn: ClientConnection) -> list[Any]:
    """The events of one response on a kept connection, up to its END_REQUEST."""
    events: list[Any] = []
    while not any(isinstance(e, EndRequest) for e in events):
        chunk = sock.recv(65536)
        assert chunk, "the server closed the kept connection"
        events += conn.receive(chunk)
    return events


@pytest.mark.parametrize("path", ["/hello", "/stderr", "/raises", "/stream", "/big_list"])
def test_requests_on_a_kept_connection_take_the_whole_path_and_answer_alike(
    start: Start, whole_taken: list[bool], path: str
) -> None:
    """nginx with fastcgi_keep_conn: the next request on a kept connection, whole in one read,
    is answered without the connection machinery; the bytes are those of the same request in
    pieces (which takes the machinery), and the connection stays open for the next one."""
    run = start(threads=1)
    assert isinstance(run.address, str)
    pairs = {k.encode(): v.encode() for k, v in _get(path, "mib=1").items()}
    whole = encode_request(1, pairs, keep_conn=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(run.address)
        conn = ClientConnection()
        answers = []
        for _ in range(3):
            sock.sendall(whole)
            answers.append(_streams(_one_response(sock, conn)))
        # The first, on a new connection, is tried as one without KEEP_CONN, then as a kept one.
        assert whole_taken == [False, True, True, True]
        sock.sendall(whole[:10])  # the same request in two reads: the connection machinery
        time.sleep(0.05)
        sock.sendall(whole[10:])
        answers.append(_streams(_one_response(sock, conn)))
    assert answers[0] == answers[1] == answers[2] == answers[3]


def test_one_thread_answers_many_kept_connections_ready_at_once_each_with_its_own(
    start: Start,
) -> None:
    """With one pool thread, one epoll_wait hands it every ready connection (up to
    EVENTS_ONE_THREAD): twenty kept connections with a request each, five rounds, every answer
    on its own connection and none lost, including one after a slow request in the batch."""
    run = start(threads=1)
    assert isinstance(run.address, str)
    socks = []
    try:
        for _ in range(20):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            socks.append(sock)
            sock.settimeout(10)
            sock.connect(run.address)
        conns = [ClientConnection() for _ in socks]
        for rnd in range(5):
            for i, sock in enumerate(socks):
                path, query = ("/slow", "s=0.05") if i == 3 else ("/query", f"r{rnd}c{i}")
                pairs = {k.encode(): v.encode() for k, v in _get(path, query).items()}
                sock.sendall(encode_request(1, pairs, keep_conn=True))
            for i, (sock, conn) in enumerate(zip(socks, conns, strict=True)):
                out, _, ends = _streams(_one_response(sock, conn))
                assert len(ends) == 1
                assert out.endswith(b"slept" if i == 3 else f"r{rnd}c{i}".encode())
    finally:
        for sock in socks:
            sock.close()
    assert run.client().request(_get("/query", "after")).body.endswith(b"after")
    assert not any("Traceback" in line for line in run.logs)


def test_a_new_connections_keep_conn_request_takes_the_whole_path_and_parks_it(
    start: Start, whole_taken: list[bool]
) -> None:
    """nginx with fastcgi_keep_conn opens connections as its keepalive pool needs them, and
    closes the ones the pool has no room for after one response: the first request of a new
    connection is answered without the connection machinery too, the connection then waits for
    its next request, and when the web server closes it the worker closes its side and counts
    it out."""
    run = start(threads=1)
    answers = _kept_exchange(run, "/query", "first", [True])
    assert len(answers) == 1 and answers[0].endswith(b"first")
    assert True in whole_taken
    def closed_and_counted() -> bool:
        # (served goes up when the connection is released, after the answer went out; the EOF
        # is then picked up from the epoll)
        with run.server._lock:
            return (
                run.server._served_total() == 1
                and not run.server._watched
                and run.server._idle_count == 0
                and run.server._busy() == 0
            )

    deadline = time.monotonic() + 10
    while not closed_and_counted() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert closed_and_counted()
    assert _kept_exchange(run, "/query", "again", [True, False])[1].endswith(b"again")


def test_a_kept_connections_request_without_keep_conn_is_answered_then_closed(
    start: Start,
) -> None:
    answers = _kept_exchange(start(threads=1), "/query", "x", [True, True, False])
    assert [a[-1:] for a in answers] == [b"x", b"x", b"x", b""]  # then EOF: closed


def test_whole_requests_on_a_kept_connection_count_for_max_requests(start: Start) -> None:
    run = start(threads=1, max_requests=3)
    answers = _kept_exchange(run, "/hello", "", [True, True, True])
    assert all(a.endswith(b"Hello, World!") for a in answers)
    run.thread.join(10)
    assert run.result == [0]
    assert run.server.served == 3


# --------------------------------------------------------------------------- full socket buffers


def _send_timeout_of(sock: socket.socket) -> float:
    sec, usec = server_mod._TIMEVAL.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, server_mod._TIMEVAL.size)
    )
    return float(sec + usec / 1e6)


def _count_switches(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    """Record the fds that server_mod.<name> (_blocking_sends/_blocking_reads) switches."""
    switched: list[int] = []
    real: Callable[[int, float], bool] = getattr(server_mod, name)

    def counting(fd: int, timeout: float) -> bool:
        switched.append(fd)
        return real(fd, timeout)

    monkeypatch.setattr(server_mod, name, counting)
    return switched


def _drain_slowly(sock: socket.socket, total: int, got: list[bytes]) -> None:
    """A web server that reads a little at a time, so the writer finds its buffer full."""
    n = 0
    while n < total:
        time.sleep(0.001)
        chunk = sock.recv(min(16384, total - n))
        if not chunk:
            return
        got.append(chunk)
        n += len(chunk)


def test_a_full_socket_buffer_switches_the_fd_to_blocking_writes_bounded_by_io_timeout() -> None:
    """A response larger than the socket buffer: after the first write finds it full, the rest
    goes out in blocking writes (the kernel sleeps the thread until there is room) that
    SO_SNDTIMEO bounds with io_timeout; every byte arrives, in order."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        payload = [bytes([i]) * 65536 for i in range(16)]
        got: list[bytes] = []
        reader = threading.Thread(target=_drain_slowly, args=(theirs, 16 * 65536, got))
        reader.start()
        assert server_mod._write_all(ours.fileno(), list(payload), 2.5, None) is True
        assert _send_timeout_of(ours) == 2.5
        # The next write on the same fd is a plain blocking one (the caller passes True back).
        assert server_mod._write_all(ours.fileno(), [b"end"], 2.5, None, True) is True
        reader.join(10)
        assert b"".join(got) == b"".join(payload)
        assert theirs.recv(3) == b"end"


def test_a_web_server_that_takes_nothing_times_out_once_after_io_timeout() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match=r"took no response bytes for 0\.3 s"):
            server_mod._write_all(ours.fileno(), [b"x" * (8 << 20)], 0.3, None)
        assert 0.25 < time.monotonic() - t0 < 2.0  # one timeout, not one per retry
        # In blocking mode, a write with nothing sent raises at once after its own timeout.
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            server_mod._write_all(ours.fileno(), [b"y" * 65536], 0.3, None, True)
        assert time.monotonic() - t0 < 2.0


def test_a_non_blocking_fd_keeps_waiting_in_poll() -> None:
    """An fd a socket object made non-blocking (a timeout) is never switched: blocking writes
    on it would fail at once instead of waiting."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        ours.setblocking(False)
        got: list[bytes] = []
        reader = threading.Thread(target=_drain_slowly, args=(theirs, 4 * 65536, got))
        reader.start()
        assert server_mod._write_all(ours.fileno(), [b"z" * 65536] * 4, 2.0, None) is False
        reader.join(10)
        assert len(b"".join(got)) == 4 * 65536
        assert _send_timeout_of(ours) == 0.0


def test_an_apps_socket_default_timeout_does_not_make_the_fd_non_blocking() -> None:
    """socket.setdefaulttimeout() (apps set it to bound their outbound calls) makes every new
    socket object non-blocking, including the one that sets SO_SNDTIMEO on our fd: the switch
    must leave the fd blocking, or every write after it fails at once as a timeout."""
    ours, theirs = socket.socketpair()
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(5.0)
    try:
        with ours, theirs:
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
            got: list[bytes] = []
            reader = threading.Thread(target=_drain_slowly, args=(theirs, 8 * 65536, got))
            reader.start()
            assert server_mod._write_all(ours.fileno(), [b"q" * 65536] * 8, 2.0, None) is True
            assert os.get_blocking(ours.fileno())
            reader.join(10)
            assert len(b"".join(got)) == 8 * 65536
    finally:
        socket.setdefaulttimeout(old)


def test_a_streamed_response_switches_its_connection_once_and_arrives_whole(
    start: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    """4 MiB streamed to a web server that reads slowly: the response's writes switch the fd
    to blocking writes once (not per chunk, not again for the end of the response), and every
    byte arrives, then END_REQUEST."""
    switched = _count_switches(monkeypatch, "_blocking_sends")
    run = start(threads=1)
    assert isinstance(run.address, str)
    pairs = {k.encode(): v.encode() for k, v in _get("/stream", "mib=4").items()}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        sock.connect(run.address)
        sock.sendall(encode_request(1, pairs))
        time.sleep(0.2)  # the socket buffers fill up while nobody reads
        conn = ClientConnection()
        events: list[Any] = []
        while chunk := sock.recv(65536):
            events += conn.receive(chunk)
        out, _, ends = _streams(events)
    assert out.endswith(wsgi_apps.stream_bytes(4))
    assert len(ends) == 1
    assert len(switched) == 1


def _trickle_upload(address: str, pieces: list[bytes], pause: float) -> bytes:
    """POST to /echo with its STDIN sent a record at a time, ``pause`` between records (as
    nginx passes an upload on while it comes); the response body, or b"" when the connection
    was closed without one."""
    body = b"".join(pieces)
    params = {
        k.encode(): v.encode()
        for k, v in _get("/echo", REQUEST_METHOD="POST", CONTENT_LENGTH=str(len(body))).items()
    }
    head = (
        encode_begin_request(1)
        + encode_record(RecordType.PARAMS, 1, encode_pairs(params))
        + encode_record(RecordType.PARAMS, 1)
    )
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(address)
        sock.sendall(head)
        for piece in pieces:
            time.sleep(pause)
            if piece:
                sock.sendall(encode_record(RecordType.STDIN, 1, piece))
        if pieces and pieces[-1] == b"":
            time.sleep(pause)  # the last piece says "stall": no end of STDIN
        else:
            sock.sendall(encode_record(RecordType.STDIN, 1))
        conn = ClientConnection()
        events: list[Any] = []
        while chunk := sock.recv(65536):
            events += conn.receive(chunk)
    out, _, _ = _streams(events)
    return out.split(b"\r\n\r\n", 1)[1] if out else b""


def test_a_body_that_trickles_in_switches_its_connection_to_blocking_reads_once(
    start: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The app waits for each record of the body: the first wait switches the connection to
    blocking reads that SO_RCVTIMEO bounds with io_timeout (one read a wake-up, no failing
    read and poll), once, and every byte reaches the app in order."""
    switched = _count_switches(monkeypatch, "_blocking_reads")
    run = start(threads=1, io_timeout=7.5)
    assert isinstance(run.address, str)
    pieces = [bytes([i]) * (1000 + i) for i in range(12)]
    assert _trickle_upload(run.address, pieces, 0.02) == b"".join(pieces)
    if server_mod._nowait:
        assert len(switched) == 1
    else:  # no RWF_NOWAIT here: waits stay in poll, the same bytes arrive
        assert switched == []


def test_without_rwf_nowait_the_socket_object_path_serves_the_same(
    start: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kernels whose sockets refuse RWF_NOWAIT get socket objects and MSG_DONTWAIT instead, and
    waits in poll(): a GET, a body that trickles in, kept connections and a body that stops
    coming behave as on the fast path."""
    monkeypatch.setattr(server_mod, "_nowait", False)
    run = start(threads=1, io_timeout=0.5)
    assert isinstance(run.address, str)
    assert run.client().request(_get("/hello")).body == b"Hello, World!"
    pieces = [bytes([i]) * 700 for i in range(6)]
    assert _trickle_upload(run.address, pieces, 0.02) == b"".join(pieces)
    answers = _kept_exchange(run, "/query", "k", [True, True, False])
    assert [a[-1:] for a in answers] == [b"k", b"k", b"k", b""]
    assert _trickle_upload(run.address, [b"a" * 10, b""], 0.05) == b""
    assert any("sent no request input for 0.5 s" in line for line in run.logs)


def test_a_body_that_stops_coming_times_out_once_after_io_timeout(start: Start) -> None:
    """Blocking reads are bounded: a web server that sends part of a body and then nothing
    gets its connection closed after io_timeout (logged), and the worker serves on."""
    run = start(threads=1, io_timeout=0.4)
    assert isinstance(run.address, str)
    t0 = time.monotonic()
    assert _trickle_upload(run.address, [b"a" * 100, b"b" * 100, b""], 0.05) == b""
    took = time.monotonic() - t0
    assert 0.4 < took < 3.0  # one timeout after the last bytes, not one per retry
    assert any("sent no request input for 0.4 s" in line for line in run.logs)
    assert run.client().request(_get("/hello")).status == 200


@pytest.mark.parametrize(("timeout", "expected"), [(1e-7, 0.0), (1.5, 1.5), (1e12, 2**31 - 1)])
def test_send_timeouts_never_round_to_none_and_never_overflow(
    timeout: float, expected: float
) -> None:
    """SO_SNDTIMEO 0 would mean "block forever": a tiny timeout becomes the smallest the
    kernel keeps (one scheduler tick), a huge one the largest a timeval holds."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        assert server_mod._blocking_sends(ours.fileno(), timeout)
        got = _send_timeout_of(ours)
        assert got > 0
        if expected:
            assert got == pytest.approx(expected)

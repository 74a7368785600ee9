"""fcgispawn.client against a tiny FastCGI application built on ServerConnection.

The application runs in threads of this process over a real UNIX socket (in ``sockdir``), so
these tests pin the client's behaviour on a real transport without depending on server.py.
What the app does is chosen by SCRIPT_NAME (see ``MiniApp._answer``).
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fcgispawn.client import (
    ClientError,
    ClientTimeoutError,
    FastCGIClient,
    Probe,
    RequestSpec,
    Response,
    parse_cgi_head,
)
from fcgispawn.protocol import (
    BeginRequest,
    Buffer,
    Data,
    Limits,
    Params,
    ProtocolError,
    ProtocolStatus,
    Role,
    ServerConnection,
    Stdin,
    encode_get_values,
)


class MiniApp:
    """A FastCGI application: one thread accepts, one thread per connection answers."""

    def __init__(self, path: Path, limits: Limits = Limits()) -> None:  # noqa: B008
        self.path = path
        self.limits = limits
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(16)
        self.accepted = 0
        self.concurrent_ids: list[int] = []  # most ids seen active at once, per connection
        self._conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._start(self._accept_loop)

    def _start(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        thread.start()
        self._threads.append(thread)

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        with self._lock:
            for sock in self._conns:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(5)

    def _accept_loop(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                self.accepted += 1
                self._conns.append(sock)
                self.concurrent_ids.append(0)
                index = len(self.concurrent_ids) - 1
            self._start(self._serve, sock, index)

    def _serve(self, sock: socket.socket, index: int) -> None:
        conn = ServerConnection(self.limits)
        params: dict[int, dict[bytes, bytes]] = {}
        stdin: dict[int, bytearray] = {}
        data: dict[int, bytearray] = {}
        with sock:
            while True:
                try:
                    chunk = sock.recv(65536)
                except OSError:
                    return
                if not chunk:
                    return
                try:
                    events = conn.receive(chunk)
                except ProtocolError:
                    return
                out: list[Buffer] = [conn.pending_output()]
                ready: list[int] = []
                for event in events:
                    if isinstance(event, BeginRequest):
                        stdin[event.request_id] = bytearray()
                        data[event.request_id] = bytearray()
                    elif isinstance(event, Params):
                        params[event.request_id] = event.params
                        if event.params.get(b"SCRIPT_NAME") == b"/early":
                            # Answers before reading the body, as an app refusing an upload.
                            out += conn.respond(event.request_id, [b"Status: 413 Too Big\r\n\r\n"])
                    elif isinstance(event, Stdin):
                        stdin[event.request_id] += event.data
                        if not event.data and conn.role(event.request_id) != Role.FILTER:
                            ready.append(event.request_id)
                    elif isinstance(event, Data):
                        data[event.request_id] += event.data
                        if not event.data:
                            ready.append(event.request_id)
                self.concurrent_ids[index] = max(
                    self.concurrent_ids[index], len(conn.active_requests)
                )
                # Answer in reverse order, so a client that does not demultiplex fails.
                for rid in reversed(ready):
                    action = self._answer(conn, rid, params[rid], stdin[rid], data[rid], out)
                    if action == "close":
                        sock.shutdown(socket.SHUT_RDWR)
                        return
                    if action == "garbage":
                        out.append(b"\x02\x06\x00\x01\x00\x00\x00\x00")
                answer = b"".join(out)
                try:
                    if answer:
                        sock.sendall(answer)
                except OSError:  # the client went away (e.g. after an early answer)
                    return
                if any(p.get(b"SCRIPT_NAME") == b"/close-after" for p in params.values()):
                    return
                if conn.should_close and not conn.active_requests:
                    return

    def _answer(
        self,
        conn: ServerConnection,
        rid: int,
        params: dict[bytes, bytes],
        stdin: bytearray,
        data: bytearray,
        out: list[Buffer],
    ) -> str:
        script = params.get(b"SCRIPT_NAME", b"/")
        if script == b"/close":
            return "close"
        if script == b"/slow":
            return "slow"
        if script == b"/garbage":
            return "garbage"
        if script == b"/stderr":
            out += conn.stderr(rid, b"something went wrong")
            out += conn.respond(rid, [b"Status: 500 Oops\r\n\r\n"], app_status=3)
            return "ok"
        status = b"404 Not Found" if script == b"/missing" else b"200 OK"
        head = b"Status: " + status + b"\r\nContent-Type: text/plain\r\nX-Id: %d\r\n\r\n" % rid
        body = b"%s|%d|%s|" % (script, len(stdin), params.get(b"Q", b""))
        out += conn.stdout(rid, head)
        out += conn.respond(rid, [body, bytes(stdin), bytes(data)])
        return "ok"


@pytest.fixture
def app(sockdir: Path) -> Iterator[MiniApp]:
    server = MiniApp(sockdir / "app.sock")
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def client(app: MiniApp) -> Iterator[FastCGIClient]:
    with FastCGIClient(app.path, timeout=5) as c:
        yield c


# --- request / response -------------------------------------------------------------------------


def test_request_returns_parsed_cgi_response(client: FastCGIClient) -> None:
    response = client.request({"SCRIPT_NAME": "/hello", "Q": "x=1"}, b"body")
    assert response == Response(
        status=200,
        headers=[("Content-Type", "text/plain"), ("X-Id", "1")],
        body=b"/hello|4|x=1|body",
        stdout=b"Status: 200 OK\r\nContent-Type: text/plain\r\nX-Id: 1\r\n\r\n/hello|4|x=1|body",
        stderr=b"",
        app_status=0,
        protocol_status=ProtocolStatus.REQUEST_COMPLETE,
    )
    assert response.header("content-type") == "text/plain"
    assert response.header("Status") is None


def test_request_accepts_bytes_params_and_a_large_body(client: FastCGIClient) -> None:
    body = bytes(range(256)) * 1000
    params: dict[str | bytes, str | bytes] = {b"SCRIPT_NAME": b"/big", "Q": b"\xff"}
    response = client.request(params, body)
    assert response.body == b"/big|256000|\xff|" + body


def test_status_header_sets_the_status(client: FastCGIClient) -> None:
    assert client.request({"SCRIPT_NAME": "/missing"}).status == 404


def test_stderr_and_app_status_are_returned(client: FastCGIClient) -> None:
    response = client.request({"SCRIPT_NAME": "/stderr"})
    assert (response.status, response.stderr, response.app_status) == (
        500,
        b"something went wrong",
        3,
    )


def test_filter_role_sends_the_data_stream(client: FastCGIClient) -> None:
    response = client.request({"SCRIPT_NAME": "/f"}, b"in", role=Role.FILTER, data=b"file")
    assert response.body == b"/f|2||infile"


# --- multiplexing and keep-alive ----------------------------------------------------------------


def test_requests_are_multiplexed_on_one_connection(app: MiniApp, client: FastCGIClient) -> None:
    specs: list[RequestSpec | dict[str, str]] = [
        RequestSpec({"SCRIPT_NAME": "/a"}, b"1"),
        {"SCRIPT_NAME": "/b"},
        RequestSpec({"SCRIPT_NAME": "/c"}, b"333"),
    ]
    responses = client.requests(specs)
    assert [r.body for r in responses] == [b"/a|1||1", b"/b|0||", b"/c|3||333"]
    assert [r.header("X-Id") for r in responses] == ["1", "2", "3"]
    assert app.accepted == 1
    assert app.concurrent_ids == [3]


def test_keep_conn_reuses_one_connection(app: MiniApp, client: FastCGIClient) -> None:
    for i in range(3):
        assert client.request({"SCRIPT_NAME": f"/{i}"}, keep_conn=True).body == f"/{i}|0||".encode()
    client.requests([{"SCRIPT_NAME": "/m1"}, {"SCRIPT_NAME": "/m2"}])
    assert app.accepted == 1


def test_without_keep_conn_every_request_has_its_own_connection(
    app: MiniApp, client: FastCGIClient
) -> None:
    for _ in range(3):
        assert client.request({"SCRIPT_NAME": "/x"}).status == 200
    assert app.accepted == 3


def test_a_kept_connection_closed_while_idle_is_replaced(
    app: MiniApp, client: FastCGIClient
) -> None:
    assert client.request({"SCRIPT_NAME": "/close-after"}, keep_conn=True).status == 200
    time.sleep(0.05)  # let the app close its side
    assert client.request({"SCRIPT_NAME": "/again"}, keep_conn=True).body == b"/again|0||"
    assert app.accepted == 2


def test_no_multiplexing_app_rejects_the_second_id(sockdir: Path) -> None:
    server = MiniApp(sockdir / "single.sock", Limits(mpxs_conns=False))
    try:
        with FastCGIClient(server.path, timeout=5) as c:
            first, second = c.requests([{"SCRIPT_NAME": "/1"}, {"SCRIPT_NAME": "/2"}])
    finally:
        server.close()
    assert (first.status, first.protocol_status) == (200, ProtocolStatus.REQUEST_COMPLETE)
    assert (second.status, second.stdout) == (0, b"")
    assert second.protocol_status is ProtocolStatus.CANT_MPX_CONN


def test_an_answer_before_the_body_was_read_is_returned(
    app: MiniApp, client: FastCGIClient
) -> None:
    upload = b"u" * (8 << 20)  # far more than the socket buffers hold
    assert client.request({"SCRIPT_NAME": "/early"}, upload).status == 413
    # With KEEP_CONN the app keeps the connection, but the client stopped mid-stream: it must
    # not reuse that connection.
    assert client.request({"SCRIPT_NAME": "/early"}, upload, keep_conn=True).status == 413
    assert client.request({"SCRIPT_NAME": "/next"}, keep_conn=True).body == b"/next|0||"
    assert app.accepted == 3


def test_multiplexed_large_bodies_do_not_deadlock(client: FastCGIClient) -> None:
    bodies = [bytes([65 + i]) * (3 << 20) for i in range(3)]
    responses = client.requests([RequestSpec({"SCRIPT_NAME": "/up"}, b) for b in bodies])
    assert [r.body for r in responses] == [b"/up|%d||" % len(b) + b for b in bodies]


# --- management records -------------------------------------------------------------------------


def test_get_values_returns_the_apps_values_and_omits_unknown_names(sockdir: Path) -> None:
    server = MiniApp(sockdir / "gv.sock", Limits(max_conns=3, max_reqs=9))
    try:
        values = FastCGIClient(server.path, timeout=5).get_values(
            ["FCGI_MAX_CONNS", b"FCGI_MAX_REQS", "FCGI_MPXS_CONNS", "NOT_A_VALUE"]
        )
    finally:
        server.close()
    assert values == {b"FCGI_MAX_CONNS": b"3", b"FCGI_MAX_REQS": b"9", b"FCGI_MPXS_CONNS": b"1"}


def test_send_raw_returns_what_the_app_sends_until_eof_or_timeout(client: FastCGIClient) -> None:
    answer = client.send_raw(encode_get_values([b"FCGI_MPXS_CONNS"]), timeout=0.3)
    assert answer == b"\x01\x0a\x00\x00\x00\x12\x06\x00\x0f\x01FCGI_MPXS_CONNS1" + b"\0" * 6
    # Malformed input: the app closes the connection, and send_raw sees EOF.
    started = time.monotonic()
    assert client.send_raw(b"\x02" * 8, timeout=3) == b""
    assert time.monotonic() - started < 2


# --- errors -------------------------------------------------------------------------------------


def test_early_close_raises_client_error(client: FastCGIClient) -> None:
    with pytest.raises(ClientError, match="closed the connection before END_REQUEST"):
        client.request({"SCRIPT_NAME": "/close"})


def test_protocol_error_from_the_app_raises_client_error(client: FastCGIClient) -> None:
    with pytest.raises(ClientError, match="protocol error"):
        client.request({"SCRIPT_NAME": "/garbage"})


def test_timeout_raises_client_timeout_error(app: MiniApp) -> None:
    started = time.monotonic()
    with (
        FastCGIClient(app.path, timeout=0.3) as c,
        pytest.raises(ClientTimeoutError),
    ):
        c.request({"SCRIPT_NAME": "/slow"})
    assert time.monotonic() - started < 3


def test_connect_failure_raises_client_error(sockdir: Path) -> None:
    with pytest.raises(ClientError, match="cannot connect"):
        FastCGIClient(sockdir / "nobody-here.sock", timeout=1).request({})


def test_tcp_address_on_loopback() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()
    with pytest.raises(ClientError, match="cannot connect"):
        FastCGIClient(("127.0.0.1", port), timeout=1).request({})


# --- CGI head parsing ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stdout", "expected"),
    [
        (b"Content-Type: a\r\n\r\nbody", (200, [("Content-Type", "a")], b"body")),
        (b"Status: 302 Found\nLocation: /x\n\n", (302, [("Location", "/x")], b"")),
        (b"Status:204\r\n\r\n\r\n\r\n", (204, [], b"\r\n\r\n")),
        (b"X: \xe9\r\n\r\n", (200, [("X", "\xe9")], b"")),
        (b"", (0, [], b"")),
        (b"no head at all", (0, [], b"no head at all")),
    ],
)
def test_parse_cgi_head(stdout: bytes, expected: tuple[int, list[tuple[str, str]], bytes]) -> None:
    assert parse_cgi_head(stdout) == expected


@pytest.mark.parametrize("stdout", [b"Status: abc\r\n\r\n", b"Status: 20\r\n\r\n", b"junk\r\n\r\n"])
def test_parse_cgi_head_rejects_malformed_heads(stdout: bytes) -> None:
    with pytest.raises(ClientError, match="malformed"):
        parse_cgi_head(stdout)


def _run_probe(probe: Probe, seconds: float = 5.0) -> bool | None:
    """Drive a Probe as the supervisor's selector loop does, for at most ``seconds``."""
    deadline = time.monotonic() + seconds
    with selectors.DefaultSelector() as sel:
        sel.register(probe, selectors.EVENT_WRITE if probe.wants_write else selectors.EVENT_READ)
        while time.monotonic() < deadline:
            wait = 0.05 if probe.retry_at is None else max(0.0, probe.retry_at - time.monotonic())
            sel.select(wait)
            answer = probe.step()
            if answer is not None:
                return answer
            sel.modify(probe, selectors.EVENT_WRITE if probe.wants_write else selectors.EVENT_READ)
    return None


def test_probe_is_answered_by_a_fastcgi_app(app: MiniApp) -> None:
    """The supervisor's question to a pool (an FCGI_GET_VALUES on its listener, without
    blocking): an application answers it."""
    probe = Probe(str(app.path), socket.AF_UNIX)
    try:
        assert _run_probe(probe) is True
    finally:
        probe.close()


def test_probe_gets_no_answer_where_nothing_accepts_or_speaks_fastcgi(sockdir: Path) -> None:
    """A listener nobody accepts on stays unanswered (the caller's timeout decides), a peer
    that closes at once is a failure, and a UNIX backlog too full to queue the connect is
    tried again instead of failing."""
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.bind(str(sockdir / "silent.sock"))
    silent.listen(0)
    filler = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    filler.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        filler.connect(str(sockdir / "silent.sock"))
    probes = [Probe(str(sockdir / "silent.sock"), socket.AF_UNIX) for _ in range(3)]
    try:
        assert any(p.retry_at is not None for p in probes)  # the backlog (0 + 1) is full
        assert all(_run_probe(p, 0.3) is None for p in probes)
    finally:
        for p in probes:
            p.close()
        filler.close()
        silent.close()
    closer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    closer.bind(str(sockdir / "closer.sock"))
    closer.listen(4)
    probe = Probe(str(sockdir / "closer.sock"), socket.AF_UNIX)
    try:
        closer.accept()[0].close()
        assert _run_probe(probe) is False
    finally:
        probe.close()
        closer.close()


def test_probe_over_tcp_completes_its_connect_in_the_background() -> None:
    """On TCP a non-blocking connect is in progress at first (EINPROGRESS): the probe waits
    for it to complete (writable), asks, and gets its answer."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)

    def answer() -> None:
        conn, _ = listener.accept()
        with conn:
            server = ServerConnection()
            while True:
                data = conn.recv(4096)
                if not data:
                    return
                server.receive(data)
                out = server.pending_output()
                if out:
                    conn.sendall(out)
                    return

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    probe = Probe(listener.getsockname(), socket.AF_INET)
    try:
        assert _run_probe(probe) is True
    finally:
        probe.close()
        thread.join(5)
        listener.close()

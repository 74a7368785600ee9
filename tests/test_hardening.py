"""Hardening (issue 5): hostile input, resource exhaustion and faults against a RUNNING worker.

Most tests drive the worker program (:func:`fcgispawn.runtime.run`) in a subprocess on a UNIX
socket passed as fd 0, exactly as the supervisor runs it, with short timeouts set in the child
(``IO_TIMEOUT``/``IDLE_TIMEOUT`` are read when the Server is built). After every bad input the
same worker must still answer a normal request: only the offending connection may be lost.
A few component tests run the Server in-process where they need to look inside (the
multiplexing stress test, FCGI_WEB_SERVER_ADDRS on IPv6) or cost nothing extra.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fcgispawn import sockets, spawner
from fcgispawn.client import FastCGIClient, RequestSpec
from fcgispawn.config import Options, build
from fcgispawn.protocol import (
    ClientConnection,
    RecordType,
    StderrData,
    StdoutData,
    encode_begin_request,
    encode_pairs,
    encode_record,
    encode_request,
)
from fcgispawn.server import EXIT_REQUEST_TIMEOUT, Server
from tests.apps import wsgi_apps
from tests.procs import REPO, ProcessGroup, process_group, stdout_until_eof, wait_for

pytestmark = pytest.mark.timeout(90)

#: The worker program with the I/O and idle timeouts shortened (argv: app threads io idle
#: request_timeout).
RUNNER = """
import sys
import fcgispawn.server as server
server.IO_TIMEOUT = float(sys.argv[3])
server.IDLE_TIMEOUT = float(sys.argv[4])
from fcgispawn.runtime import run
sys.exit(run(sys.argv[1], threads=int(sys.argv[2]), request_timeout=float(sys.argv[5])))
"""
APP = "tests.apps.wsgi_apps:app"
IO_TIMEOUT = 1.0


def header_injection_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """Tries to smuggle a second header (and a body) through a header value."""
    start_response(
        "200 OK", [("Content-Type", "text/plain"), ("X-Evil", "a\r\nSet-Cookie: pwned=1\r\n\r\nx")]
    )
    return [b"should not be sent"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    env["PYTHONPATH"] = str(REPO)
    env.pop("FCGI_WEB_SERVER_ADDRS", None)
    return env


class Worker:
    """A worker process serving on a UNIX socket, and what it wrote to stderr."""

    def __init__(
        self,
        procs: ProcessGroup,
        path: Path,
        *,
        app: str = APP,
        threads: int = 1,
        io_timeout: float = IO_TIMEOUT,
        idle_timeout: float = 60.0,
        request_timeout: float = 0.0,
        prefix: Iterable[str] = (),
    ) -> None:
        self.path = str(path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.path)
        listener.listen(1024)
        argv = [*prefix, sys.executable, "-c", RUNNER, app, str(threads)]
        argv += [str(io_timeout), str(idle_timeout), str(request_timeout)]
        try:
            self.proc = procs.start(argv, stdin=listener.fileno(), env=_env(), cwd=REPO)
        finally:
            listener.close()
        self._err = bytearray()
        self._err_lock = threading.Lock()
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()
        self.wait_ready()

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        while chunk := os.read(fd, 65536):
            with self._err_lock:
                self._err += chunk

    @property
    def stderr(self) -> str:
        with self._err_lock:
            return self._err.decode("utf-8", "replace")

    def wait_ready(self) -> None:
        wait_for(self.answers, timeout=15, what="worker answering")

    def answers(self) -> bool:
        """Any complete response (the app may answer 500 to everything)."""
        try:
            self.client(2).request(_get("/hello"))
        except Exception:
            return False
        return True

    def client(self, timeout: float = 10.0) -> FastCGIClient:
        return FastCGIClient(self.path, timeout=timeout)

    def ok(self, timeout: float = 5.0) -> bool:
        """A normal request succeeds (the worker lives and serves)."""
        try:
            resp = self.client(timeout).request(_get("/hello"))
        except Exception:
            return False
        return resp.status == 200 and resp.body == b"Hello, World!"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def connect(self, timeout: float = 10.0) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(self.path)
        return sock


def _get(path: str, query: str = "", **extra: str) -> dict[str, str]:
    params = {"REQUEST_METHOD": "GET", "SCRIPT_NAME": "", "PATH_INFO": path, "QUERY_STRING": query}
    params.update(extra)
    return params


def _closed_within(sock: socket.socket, timeout: float) -> float:
    """Seconds until the peer closed ``sock`` (EOF or reset), reading and discarding; fails
    the test if it stays open longer than ``timeout``."""
    t0 = time.monotonic()
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            if time.monotonic() - t0 > timeout:
                break
        else:
            return time.monotonic() - t0
    except ConnectionResetError:
        return time.monotonic() - t0
    except TimeoutError:
        pass
    raise AssertionError(f"the worker kept the connection open for more than {timeout} s")


@pytest.fixture(scope="module")
def shared() -> Iterator[Worker]:
    """One worker for the bad-input tests: each must leave it serving for the next."""
    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="fs-h-", dir="/tmp"))
    try:
        with process_group() as group:
            yield Worker(group, d / "w.sock")  # the default: one thread
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def worker(shared: Worker) -> Iterator[Worker]:
    """The shared worker; after the test it must be alive and serving (the point of each)."""
    yield shared
    assert shared.alive(), shared.stderr
    assert shared.ok(), shared.stderr


# --------------------------------------------------------------------------- bad input


def _hdr(version: int, rtype: int, rid: int, clen: int, plen: int = 0) -> bytes:
    return struct.pack("!BBHHBx", version, rtype, rid, clen, plen)


_PARAMS_END = encode_record(RecordType.PARAMS, 1, b"")
_BAD_INPUTS: dict[str, bytes] = {
    "version_2": _hdr(2, RecordType.BEGIN_REQUEST, 1, 8) + b"\0\1\0\0\0\0\0\0",
    "begin_request_twice": encode_begin_request(1) + encode_begin_request(1),
    "stdin_before_params_end": encode_begin_request(1)
    + encode_record(RecordType.PARAMS, 1, encode_pairs({b"A": b"b"}))
    + encode_record(RecordType.STDIN, 1, b"body"),
    # A name length of 2**31-1: refused from the length alone, nothing is allocated.
    "name_length_2gib": encode_begin_request(1)
    + encode_record(RecordType.PARAMS, 1, b"\xff\xff\xff\xff\x01" + b"x" * 16)
    + _PARAMS_END,
    "value_length_2gib": encode_begin_request(1)
    + encode_record(RecordType.PARAMS, 1, b"\x01\xff\xff\xff\xffN" + b"x" * 16)
    + _PARAMS_END,
    # 17 x 64 KiB of PARAMS: past the 1 MiB cap.
    "params_flood": encode_begin_request(1)
    + encode_record(RecordType.PARAMS, 1, b"\x7f" * 65528) * 17,
    "stdout_from_the_web_server": encode_begin_request(1)
    + encode_record(RecordType.STDOUT, 1, b"x"),
}


@pytest.mark.parametrize("name", sorted(_BAD_INPUTS))
def test_protocol_violation_closes_only_that_connection(worker: Worker, name: str) -> None:
    with worker.connect() as sock:
        sock.sendall(_BAD_INPUTS[name])
        took = _closed_within(sock, 5)
    assert took < 2  # at once: a violation is not a timeout
    # The log line and the close race each other out of the worker: wait for the line.
    wait_for(lambda: "protocol error" in worker.stderr, timeout=5, what="protocol error logged")


def test_random_bytes_close_only_that_connection(worker: Worker) -> None:
    """Seeded noise: either a violation (closed at once) or a header claiming more bytes than
    arrive (closed after io_timeout); never an answer, never a dead worker."""
    rng = random.Random(5)
    for _ in range(20):
        with worker.connect() as sock:
            sock.sendall(rng.randbytes(rng.randint(1, 4096)))
            _closed_within(sock, IO_TIMEOUT + 4)
        assert worker.ok()


@pytest.mark.parametrize(
    "wire",
    [
        pytest.param(b"\x01\x01\x00", id="truncated_header"),
        pytest.param(_hdr(1, RecordType.BEGIN_REQUEST, 1, 8) + b"\0\1", id="truncated_body"),
        pytest.param(
            encode_begin_request(1) + _hdr(1, RecordType.PARAMS, 1, 1000) + b"x" * 10,
            id="content_length_beyond_what_arrives",
        ),
    ],
)
def test_partial_record_then_eof_closes_at_once(worker: Worker, wire: bytes) -> None:
    with worker.connect() as sock:
        sock.sendall(wire)
        sock.shutdown(socket.SHUT_WR)
        assert _closed_within(sock, 5) < 2


@pytest.mark.parametrize(
    "wire",
    [
        pytest.param(b"", id="nothing"),
        pytest.param(b"\x01\x01\x00", id="truncated_header"),
        pytest.param(
            encode_begin_request(1) + _hdr(1, RecordType.PARAMS, 1, 1000) + b"x" * 10,
            id="content_length_beyond_what_arrives",
        ),
        pytest.param(
            encode_request(1, {b"PATH_INFO": b"/echo", b"REQUEST_METHOD": b"POST"}, b"")[:-8],
            id="stdin_never_ends_while_the_app_reads",
        ),
    ],
)
def test_silent_peer_is_closed_after_the_io_timeout(worker: Worker, wire: bytes) -> None:
    with worker.connect() as sock:
        sock.sendall(wire)
        took = _closed_within(sock, IO_TIMEOUT + 4)
    assert IO_TIMEOUT * 0.8 < took < IO_TIMEOUT + 3


def test_trickling_bytes_do_not_extend_the_io_timeout(worker: Worker) -> None:
    """A slowloris sending a byte at a time never completes a record: no more time for it."""
    wire = encode_begin_request(1) + _hdr(1, RecordType.PARAMS, 1, 500)
    with worker.connect() as sock:
        t0 = time.monotonic()
        with contextlib.suppress(OSError):
            for byte in wire:
                sock.sendall(bytes([byte]))
                time.sleep(0.1)
                if time.monotonic() - t0 > IO_TIMEOUT + 3:
                    break
        _closed_within(sock, IO_TIMEOUT + 3)
        assert time.monotonic() - t0 < IO_TIMEOUT + 3


def test_records_for_unknown_ids_are_ignored_and_the_connection_serves_on(worker: Worker) -> None:
    junk = (
        encode_record(RecordType.STDIN, 7, b"for nobody")
        + encode_record(RecordType.PARAMS, 9, encode_pairs({b"A": b"b"}))
        + encode_record(RecordType.ABORT_REQUEST, 3)
        + encode_record(RecordType.DATA, 4, b"x")
    )
    with worker.connect() as sock:
        sock.sendall(junk + encode_request(1, {b"PATH_INFO": b"/hello"}))
        body = stdout_until_eof(sock)
    assert body.endswith(b"Hello, World!")


def test_app_exception_is_a_500_without_traceback_and_logged(worker: Worker) -> None:
    resp = worker.client().request(_get("/raises"))
    assert resp.status == 500
    assert b"Traceback" not in resp.body and b"boom" not in resp.body
    # Logged by the worker and sent on FCGI_STDERR, which web servers write to their error
    # log (never to the client): the one log left when the worker's stderr is /dev/null.
    assert resp.stderr.startswith(b"error in the WSGI application, answering 500: RuntimeError")
    wait_for(lambda: "RuntimeError: boom" in worker.stderr, timeout=5, what="traceback logged")


def test_client_disconnect_mid_response_is_quiet(worker: Worker) -> None:
    before = worker.stderr.count("\n")
    for _ in range(5):
        with worker.connect() as sock:
            sock.sendall(encode_request(1, {b"PATH_INFO": b"/stream", b"QUERY_STRING": b"mib=20"}))
            sock.recv(65536)
    assert worker.ok()
    new = worker.stderr.splitlines()[before:]
    assert len(new) <= 5  # one line per disconnect at most
    assert not any("Traceback" in line for line in new)


# --------------------------------------------------------------------------- resources


@pytest.mark.parametrize("threads", [1, 2])
def test_1000_silent_connections_pin_no_thread_and_are_closed_after_the_io_timeout(
    procs: ProcessGroup, sockdir: Path, threads: int
) -> None:
    w = Worker(procs, sockdir / "i.sock", threads=threads, io_timeout=2.0)
    idle = [w.connect() for _ in range(1000)]
    try:
        t0 = time.monotonic()
        resp = w.client(timeout=5).request(_get("/hello"))
        served_in = time.monotonic() - t0
        assert resp.body == b"Hello, World!"
        assert served_in < 1.0, f"a request behind 1,000 silent connections took {served_in:.2f}s"
        # ...and the silent ones are all closed by the worker after io_timeout.
        deadline = time.monotonic() + 10
        for sock in idle:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ConnectionResetError):
                assert sock.recv(1) == b""
        assert time.monotonic() - t0 < 10
    finally:
        for sock in idle:
            sock.close()
    assert w.ok()


def test_parked_connection_is_served_while_new_connections_never_let_the_backlog_drain(
    procs: ProcessGroup, sockdir: Path
) -> None:
    """One thread; a connection parked before its request came, then 12 clients keeping the
    backlog full with 5 ms requests: accept() never says EAGAIN, yet the parked connection's
    request is answered within a few requests, not when the load stops."""
    w = Worker(procs, sockdir / "f.sock", threads=1, io_timeout=10.0)
    late = w.connect()
    time.sleep(0.3)  # accepted, FIRST_WAIT ran out: parked
    stop = time.monotonic() + 3.0
    served: list[int] = []
    failures: list[BaseException] = []

    def load() -> None:
        client = w.client(timeout=20)
        while time.monotonic() < stop:
            try:
                assert client.request(_get("/slow", "s=0.005")).body == b"slept"
                served.append(1)
            except BaseException as exc:
                failures.append(exc)
                return

    threads = [threading.Thread(target=load, daemon=True) for _ in range(12)]
    for t in threads:
        t.start()
    with late:
        time.sleep(0.5)  # the backlog is full now
        t0 = time.monotonic()
        params = {k.encode(): v.encode() for k, v in _get("/query", "late").items()}
        late.sendall(encode_request(1, params))
        body = stdout_until_eof(late)
        took = time.monotonic() - t0
        still_loading = time.monotonic() < stop - 0.2
    for t in threads:
        t.join(30)
    assert body.endswith(b"late")
    assert not failures, (failures[:3], w.stderr)
    assert still_loading, "the load ended before the parked request was answered"
    assert took < 1.0, f"the parked connection's request took {took:.2f} s under load"
    assert len(served) > 100


def test_out_of_fds_accept_backs_off_and_serving_resumes_when_fds_free_up(
    procs: ProcessGroup, sockdir: Path
) -> None:
    """RLIMIT_NOFILE 64 in the worker (prlimit): 100 silent connections exhaust it; accept()
    fails with EMFILE, the worker backs off (no busy loop, logged once) and keeps its parked
    connections; once they go away a queued request is served within ~the backoff."""
    w = Worker(
        procs,
        sockdir / "f.sock",
        threads=2,
        io_timeout=30.0,
        prefix=["prlimit", "--nofile=64:64", "--"],
    )
    idle = [w.connect() for _ in range(100)]
    try:
        wait_for(lambda: "accept() failed" in w.stderr, timeout=10, what="EMFILE logged")
        cpu0 = _cpu_seconds(w.proc.pid)
        result: list[bytes] = []
        t = threading.Thread(
            target=lambda: result.append(w.client(timeout=20).request(_get("/hello")).body)
        )
        t.start()
        time.sleep(1.0)
        assert not result  # still waiting in the backlog: no fd to accept it with
        # Backing off, not spinning: well under half a CPU while stuck for a second.
        assert _cpu_seconds(w.proc.pid) - cpu0 < 0.5
        t0 = time.monotonic()
    finally:
        for sock in idle:
            sock.close()
    t.join(20)
    recovered = time.monotonic() - t0
    assert result == [b"Hello, World!"]
    assert recovered < 2.0, f"serving resumed {recovered:.2f}s after fds were freed"
    print(f"EMFILE recovery: request served {recovered * 1000:.0f} ms after fds were freed")
    assert w.stderr.count("accept() failed") == 1  # one line per outage, not per retry
    wait_for(lambda: "accept() works again" in w.stderr, timeout=5, what="recovery logged")
    assert w.ok()


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_client_that_stops_reading_costs_one_thread_for_io_timeout_only(
    procs: ProcessGroup, sockdir: Path
) -> None:
    w = Worker(procs, sockdir / "r.sock", threads=2, io_timeout=1.0)
    with w.connect() as stuck:
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.sendall(encode_request(1, {b"PATH_INFO": b"/stream", b"QUERY_STRING": b"mib=64"}))
        time.sleep(0.3)  # the response fills the socket buffers; its thread waits for room
        t0 = time.monotonic()
        assert w.ok(timeout=2)  # the other thread serves meanwhile
        assert time.monotonic() - t0 < 1.0
        wait_for(
            lambda: "took no response bytes" in w.stderr, timeout=IO_TIMEOUT + 5, what="timeout"
        )
        # The worker closed it: reading now ends well before 64 MiB.
        got = 0
        stuck.settimeout(5)
        with contextlib.suppress(ConnectionResetError):
            while chunk := stuck.recv(1 << 20):
                got += len(chunk)
        assert got < 64 << 20
    assert w.ok()
    assert w.alive()


def test_worker_raises_a_low_soft_fd_limit_towards_the_hard_limit(
    procs: ProcessGroup, sockdir: Path
) -> None:
    w = Worker(procs, sockdir / "n.sock", prefix=["prlimit", "--nofile=256:4096", "--"])
    limits = Path(f"/proc/{w.proc.pid}/limits").read_text()
    line = next(x for x in limits.splitlines() if x.startswith("Max open files"))
    assert line.split()[3:5] == ["4096", "4096"]


# --------------------------------------------------------------------------- faults


def test_hung_app_call_ends_the_worker_with_status_124_naming_the_request(
    procs: ProcessGroup, sockdir: Path
) -> None:
    w = Worker(procs, sockdir / "t.sock", threads=2, request_timeout=1.0)
    fast_ok: list[bool] = []

    def hang() -> None:
        with contextlib.suppress(Exception):
            w.client(timeout=30).request(_get("/slow", "s=60"))

    t = threading.Thread(target=hang, daemon=True)
    t.start()
    time.sleep(0.2)
    fast_ok.append(w.ok())  # the other thread still serves before the limit
    t0 = time.monotonic()
    assert w.proc.wait(10) == EXIT_REQUEST_TIMEOUT
    assert time.monotonic() - t0 < 5
    assert fast_ok == [True]
    line = next(x for x in w.stderr.splitlines() if "request timeout" in x)
    assert "GET /slow?s=60" in line and "limit 1 s" in line


def test_request_timeout_is_no_limit_for_calls_that_finish_in_time(start_server: Any) -> None:
    run = start_server(request_timeout=2.0)
    for _ in range(3):
        assert run.client().request(_get("/slow", "s=0.3")).body == b"slept"
    assert run.server._calls == {}
    assert run.alive()


def test_request_timeout_in_process_returns_124_and_the_other_thread_finishes(
    start_server: Any,
) -> None:
    run = start_server(request_timeout=0.5, threads=2)
    other: list[bytes] = []

    def hang() -> None:
        with contextlib.suppress(Exception):
            run.client(timeout=10).request(_get("/slow", "s=5"))

    threading.Thread(target=hang, daemon=True).start()
    time.sleep(0.2)
    t = threading.Thread(
        target=lambda: other.append(run.client().request(_get("/slow", "s=0.4")).body)
    )
    t.start()
    run.thread.join(5)
    t.join(5)
    assert run.result == [EXIT_REQUEST_TIMEOUT]
    assert other == [b"slept"]  # in flight on the other thread: drained, not dropped
    assert any("request timeout: GET /slow?s=5" in line for line in run.logs)


# --------------------------------------------------------------------------- item 4


def test_multiplexed_large_stdin_batches_on_a_kept_connection_never_mix_up(
    start_server: Any,
) -> None:
    """Regression: two threads could read one socket (a woken thread picking up a connection
    as shared after its last user parked it, or a leaver re-arming it after a third thread
    took it over), so records were parsed out of order ("unsupported FastCGI version 45") or
    never answered, in ~1 % of these batches. 200 batches, every answer byte-exact."""
    run = start_server(threads=4)
    body = random.Random(4).randbytes(300_000)
    post = _get("/echo", REQUEST_METHOD="POST", CONTENT_LENGTH=str(len(body)))
    client = run.client(timeout=10)
    for i in range(200):
        got = client.requests([RequestSpec(post, body), _get("/hello"), _get("/query", f"i={i}")])
        assert [r.body for r in got] == [body, b"Hello, World!", f"i={i}".encode()], i
    assert not any("protocol error" in line for line in run.logs), run.logs


# --------------------------------------------------------------------------- security


def test_response_header_with_crlf_never_reaches_the_wire(
    procs: ProcessGroup, sockdir: Path
) -> None:
    w = Worker(procs, sockdir / "c.sock", app="tests.test_hardening:header_injection_app")
    with w.connect() as sock:
        sock.sendall(encode_request(1, {b"PATH_INFO": b"/"}))
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    events = ClientConnection().receive(raw)
    stdout = b"".join(ev.data for ev in events if isinstance(ev, StdoutData))
    stderr = b"".join(ev.data for ev in events if isinstance(ev, StderrData))
    assert stdout.startswith(b"Status: 500")
    assert b"pwned" not in stdout and b"X-Evil" not in stdout and b"should not be sent" not in raw
    # The error report (for the web server's log) names the value escaped: no CR/LF either.
    assert b"invalid value for response header" in stderr and b"\r\nSet-Cookie" not in stderr
    assert w.alive()


def _tcp_v6_exchange(port: int) -> bytes:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(("::1", port))
        with contextlib.suppress(OSError):
            sock.sendall(encode_request(1, {b"PATH_INFO": b"/hello"}))
        data = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                data += chunk
        return data


@pytest.mark.parametrize(
    ("allowed", "served"), [("::1", True), ("127.0.0.1", False), ("127.0.0.1, ::1", True)]
)
def test_web_server_addrs_filter_ipv6_peers(start_server: Any, allowed: str, served: bool) -> None:
    listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    listener.bind(("::1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    start_server(listener=listener, web_server_addrs=allowed)
    assert (b"Hello, World!" in _tcp_v6_exchange(port)) is served


def test_non_loopback_bind_without_an_allow_list_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    """spawner's warning, checked on a stand-in socket: tests never bind beyond loopback."""

    class Exposed:
        family = socket.AF_INET

        def __init__(self, host: str) -> None:
            self.host = host

        def getsockname(self) -> tuple[str, int]:
            return (self.host, 9000)

    monkeypatch.delenv("FCGI_WEB_SERVER_ADDRS", raising=False)

    def warnings(host: str, **opts: Any) -> list[str]:
        cfg = build(Options(wsgi=APP, port=9000, address=host, **opts))
        lines: list[str] = []
        spawner._warn_if_exposed(Exposed(host), cfg, lines.append)  # type: ignore[arg-type]
        return lines

    assert any("not loopback" in x for x in warnings("0.0.0.0"))
    assert warnings("127.0.0.1") == []
    assert warnings("0.0.0.0", web_server_addrs="10.0.0.5") == []
    monkeypatch.setenv("FCGI_WEB_SERVER_ADDRS", "10.0.0.5")
    assert warnings("0.0.0.0") == []


def test_unix_socket_is_0660_by_default_and_follows_M(procs: ProcessGroup, sockdir: Path) -> None:
    from tests.procs import can_connect_unix, fcgispawn_argv

    for mode, expected in ((None, 0o660), ("0600", 0o600)):
        path = sockdir / f"m{expected:o}.sock"
        argv = [*fcgispawn_argv(), "-n", "-s", str(path), "--wsgi", APP]
        if mode:
            argv += ["-M", mode]
        proc = procs.start(argv, env=_env(), cwd=REPO)
        wait_for(functools.partial(can_connect_unix, path), timeout=15, what="socket")
        assert path.stat().st_mode & 0o7777 == expected
        procs.stop(proc)


def test_socket_close_never_unlinks_through_a_symlink(sockdir: Path) -> None:
    """Our socket path replaced by a symlink to another socket: close() leaves both alone."""
    listener = sockets.bind(sockets.UnixAddress(str(sockdir / "a.sock")))
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(str(sockdir / "other.sock"))
    try:
        os.unlink(sockdir / "a.sock")
        os.symlink(sockdir / "other.sock", sockdir / "a.sock")
        listener.close(unlink=True)
        assert (sockdir / "a.sock").is_symlink()
        assert (sockdir / "other.sock").exists()
    finally:
        other.close()


# --------------------------------------------------------------------------- in-process helper


class _Running:
    def __init__(self, server: Server, thread: threading.Thread, address: Any) -> None:
        self.server = server
        self.thread = thread
        self.address = address
        self.logs: list[str] = []
        self.result: list[int] = []

    def client(self, timeout: float = 10.0) -> FastCGIClient:
        return FastCGIClient(self.address, timeout=timeout)

    def alive(self) -> bool:
        return self.thread.is_alive()


@pytest.fixture
def start_server(sockdir: Path) -> Iterator[Callable[..., _Running]]:
    runs: list[_Running] = []

    def _start(*, listener: socket.socket | None = None, **opts: Any) -> _Running:
        address: Any
        if listener is None:
            address = str(sockdir / f"p{len(runs)}.sock")
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(address)
            listener.listen(128)
        else:
            address = listener.getsockname()[:2]
        opts.setdefault("threads", 4)
        logs: list[str] = []
        srv = Server(wsgi_apps.app, listener, log=logs.append, **opts)
        run = _Running(srv, threading.Thread(daemon=True), address)
        run.logs = logs
        run.thread = threading.Thread(
            target=lambda: run.result.append(srv.serve_forever()), daemon=True
        )
        run.thread.start()
        runs.append(run)
        return run

    yield _start
    for run in runs:
        run.server.stop(graceful=False)
        run.thread.join(10)
        run.server.listener.close()


def test_graceful_stop_serves_a_connection_whose_request_was_still_on_its_way(
    start_server: Callable[..., _Running],
) -> None:
    """Accepted, nothing read yet, then the stop (a reload's drain): the web server is writing
    that request right now, so it is served, not closed under it (that would be a 502)."""
    run = start_server(threads=2)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(run.address)
        time.sleep(0.2)  # accepted and parked: nothing was sent yet
        stopper = threading.Thread(target=run.server.stop)
        stopper.start()
        time.sleep(0.2)
        sock.sendall(encode_request(1, {b"PATH_INFO": b"/hello"}))
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    stopper.join(5)
    run.thread.join(5)
    assert raw.endswith(_end_request_tail()) and b"Hello, World!" in raw
    assert run.result == [0]


def _end_request_tail() -> bytes:
    return encode_record(RecordType.END_REQUEST, 1, b"\0" * 8)


@pytest.mark.parametrize("opts", [{"io_timeout": 0}, {"idle_timeout": -1}, {"request_timeout": -1}])
def test_nonsense_timeouts_are_refused(opts: dict[str, float]) -> None:
    with socket.socket() as sock, pytest.raises(ValueError, match="timeout"):
        Server(wsgi_apps.hello, sock, log=print, **opts)  # type: ignore[arg-type]

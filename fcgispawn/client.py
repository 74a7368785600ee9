"""A small blocking FastCGI client: what a web server does, for tests, benchmarks and probes.

It is built on the same sans-IO module as the responder (``fcgispawn.protocol``), so it checks
every record it gets back; anything the application gets wrong surfaces as :class:`ClientError`
instead of a hang. Every socket operation is bounded by ``timeout``.

Why it can multiplex and keep connections alive when no real web server does (see
shared/reference/fastcgi.md): the responder supports both, and tests must be able to drive them.
"""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import socket
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from fcgispawn.protocol import (
    ClientConnection,
    ClientEvent,
    EndRequest,
    GetValuesResult,
    ProtocolError,
    ProtocolStatus,
    Role,
    StderrData,
    StdoutData,
    UnknownType,
    encode_get_values,
    encode_request,
)

__all__ = [
    "Address",
    "ClientError",
    "ClientTimeoutError",
    "FastCGIClient",
    "Probe",
    "RequestSpec",
    "Response",
    "parse_cgi_head",
]

Address = str | os.PathLike[str] | tuple[str, int]
ParamsLike = (
    Mapping[str, str | bytes] | Mapping[bytes, str | bytes] | Mapping[str | bytes, str | bytes]
)

_RECV_SIZE = 256 * 1024


class ClientError(Exception):
    """The application broke the exchange: early close, protocol error, connect failure."""


class ClientTimeoutError(ClientError):
    """No complete answer within the client's timeout."""


@dataclass(frozen=True, slots=True)
class Response:
    """One request's outcome: the CGI output parsed, and the raw streams for byte-exact tests.

    ``status`` comes from the CGI ``Status:`` header (default 200); it is 0 when stdout holds
    no CGI head at all (e.g. the request was rejected with a protocol_status). ``headers``
    excludes ``Status`` (a CGI directive, not an HTTP header) and are latin-1 decoded.
    """

    status: int
    headers: list[tuple[str, str]]
    body: bytes
    stdout: bytes
    stderr: bytes
    app_status: int
    protocol_status: ProtocolStatus

    def header(self, name: str) -> str | None:
        """The first header called ``name`` (case-insensitive), or None."""
        lname = name.lower()
        for key, value in self.headers:
            if key.lower() == lname:
                return value
        return None


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """One request of FastCGIClient.requests()."""

    params: ParamsLike
    stdin: bytes = b""
    role: Role = Role.RESPONDER
    data: bytes = b""


def _to_bytes(value: str | bytes) -> bytes:
    # UTF-8 for str: nginx sends decoded URIs as UTF-8 bytes, so this is what the app will see
    # in the real world; pass bytes for exact control.
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)


def _encode_params(params: ParamsLike) -> list[tuple[bytes, bytes]]:
    return [(_to_bytes(k), _to_bytes(v)) for k, v in params.items()]


def parse_cgi_head(stdout: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
    """Split CGI output into (status, headers, body); status 0 if there is no head at all."""
    ends = [(i, len(sep)) for sep in (b"\r\n\r\n", b"\n\n") if (i := stdout.find(sep)) >= 0]
    if not ends:
        return 0, [], stdout
    cut, seplen = min(ends)
    head, body = stdout[:cut], stdout[cut + seplen :]
    status = 200
    headers: list[tuple[str, str]] = []
    for raw in head.split(b"\n"):
        line = raw.rstrip(b"\r").decode("latin-1")
        name, colon, value = line.partition(":")
        if not colon:
            raise ClientError(f"malformed CGI header line {line!r}")
        name, value = name.strip(), value.strip()
        if name.lower() == "status":
            code = value.split(" ", 1)[0]
            if not (len(code) == 3 and code.isdigit()):
                raise ClientError(f"malformed CGI Status header {value!r}")
            status = int(code)
        else:
            headers.append((name, value))
    return status, headers, body


class _Exchange:
    """Collects one request's streams until its END_REQUEST."""

    __slots__ = ("end", "stderr", "stdout")

    def __init__(self) -> None:
        self.stdout: list[bytes] = []
        self.stderr: list[bytes] = []
        self.end: EndRequest | None = None

    def response(self) -> Response:
        assert self.end is not None
        stdout = b"".join(self.stdout)
        status, headers, body = parse_cgi_head(stdout)
        return Response(
            status=status,
            headers=headers,
            body=body,
            stdout=stdout,
            stderr=b"".join(self.stderr),
            app_status=self.end.app_status,
            protocol_status=self.end.protocol_status,
        )


class FastCGIClient:
    """Blocking client for one application address (UNIX path or ``(host, port)``).

    ``request(..., keep_conn=True)`` and ``requests()`` keep their connection open and reuse it
    for the next call; ``close()`` (or the context manager) drops it.
    """

    def __init__(self, address: Address, *, timeout: float = 10.0) -> None:
        self.address: str | tuple[str, int] = (
            address if isinstance(address, tuple) else os.fspath(address)
        )
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._conn = ClientConnection()

    # -- connections -----------------------------------------------------------------------

    def connect(self) -> socket.socket:
        """A new connection to the application (ClientError if it cannot be made)."""
        try:
            if isinstance(self.address, tuple):
                return socket.create_connection(self.address, timeout=self.timeout)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(self.timeout)
                sock.connect(self.address)
            except BaseException:
                sock.close()
                raise
            return sock
        except OSError as exc:
            raise ClientError(f"cannot connect to {self.address!r}: {exc}") from exc

    def close(self) -> None:
        """Close the kept-alive connection, if any."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> FastCGIClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- requests --------------------------------------------------------------------------

    def request(
        self,
        params: ParamsLike,
        stdin: bytes = b"",
        *,
        role: Role = Role.RESPONDER,
        keep_conn: bool = False,
        data: bytes = b"",
    ) -> Response:
        """One request with id 1, as nginx sends it; waits for its END_REQUEST."""
        wire = encode_request(
            1, _encode_params(params), stdin, role=role, keep_conn=keep_conn, data=data
        )
        return self._exchange(wire, [1], keep_conn=keep_conn)[0]

    def requests(self, specs: Sequence[RequestSpec | ParamsLike]) -> list[Response]:
        """Several requests multiplexed on ONE connection (ids 1..n, all with KEEP_CONN).

        Every request goes out at once (no waiting for an answer in between), so the application
        sees them concurrently. Responses come back in the order of ``specs``.
        """
        wire = bytearray()
        ids = []
        for rid, item in enumerate(specs, start=1):
            spec = item if isinstance(item, RequestSpec) else RequestSpec(item)
            wire += encode_request(
                rid,
                _encode_params(spec.params),
                spec.stdin,
                role=spec.role,
                keep_conn=True,
                data=spec.data,
            )
            ids.append(rid)
        return self._exchange(bytes(wire), ids, keep_conn=True)

    def get_values(self, names: Iterable[str | bytes]) -> dict[bytes, bytes]:
        """GET_VALUES on a fresh connection (closed afterwards); unknown names are omitted."""
        sock = self.connect()
        conn = ClientConnection()
        try:
            self._send(sock, encode_get_values(_to_bytes(n) for n in names))
            deadline = time.monotonic() + self.timeout
            while True:
                for event in self._recv_events(sock, conn, deadline):
                    if isinstance(event, GetValuesResult):
                        return event.values
                    if isinstance(event, UnknownType):
                        raise ClientError(f"application does not know management type {event}")
                    raise ClientError(f"unexpected answer to GET_VALUES: {event}")
        finally:
            sock.close()

    def send_raw(self, data: bytes, *, timeout: float | None = None) -> bytes:
        """Send arbitrary bytes on a fresh connection; return all bytes read until EOF or timeout.

        For tests that feed malformed input: a timeout is not an error here, it just ends the
        read (half-close is not used, so the application sees the connection as open), and
        neither is an application that closes before reading everything: what it sent is
        still returned.
        """
        sock = self.connect()
        received = bytearray()
        try:
            with contextlib.suppress(ClientError):
                self._send(sock, data)
            deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
            while (left := deadline - time.monotonic()) > 0:
                sock.settimeout(left)
                try:
                    chunk = sock.recv(_RECV_SIZE)
                except TimeoutError:
                    break
                except OSError:  # e.g. ECONNRESET when the app closes with unread input
                    break
                if not chunk:
                    break
                received += chunk
            return bytes(received)
        finally:
            sock.close()

    # -- internals -------------------------------------------------------------------------

    def _send(self, sock: socket.socket, data: bytes) -> None:
        try:
            sock.settimeout(self.timeout)
            sock.sendall(data)
        except TimeoutError as exc:
            raise ClientTimeoutError(f"timed out sending to {self.address!r}") from exc
        except OSError as exc:
            raise ClientError(f"sending to {self.address!r} failed: {exc}") from exc

    def _recv_events(
        self, sock: socket.socket, conn: ClientConnection, deadline: float
    ) -> list[object]:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ClientTimeoutError(f"no complete answer from {self.address!r} in time")
        try:
            sock.settimeout(left)
            chunk = sock.recv(_RECV_SIZE)
        except TimeoutError as exc:
            raise ClientTimeoutError(f"no complete answer from {self.address!r} in time") from exc
        except OSError as exc:
            raise ClientError(f"receiving from {self.address!r} failed: {exc}") from exc
        if not chunk:
            raise ClientError(f"{self.address!r} closed the connection before END_REQUEST")
        try:
            return list(conn.receive(chunk))
        except ProtocolError as exc:
            raise ClientError(f"protocol error from {self.address!r}: {exc}") from exc

    def _exchange(self, wire: bytes, ids: list[int], *, keep_conn: bool) -> list[Response]:
        reused = self._sock is not None
        sock = self._sock if self._sock is not None else self.connect()
        self._sock = None
        conn = self._conn if reused else ClientConnection()
        try:
            try:
                return self._run(sock, conn, wire, ids, keep_conn=keep_conn, retry=reused)
            except _IdleClosed:
                # A kept connection the application closed while idle: its close raced our
                # send. Nothing was answered, so sending again on a fresh one is safe.
                sock.close()
                sock = self.connect()
                conn = ClientConnection()
                return self._run(sock, conn, wire, ids, keep_conn=keep_conn, retry=False)
        except BaseException:
            sock.close()
            raise

    def _run(
        self,
        sock: socket.socket,
        conn: ClientConnection,
        wire: bytes,
        ids: list[int],
        *,
        keep_conn: bool,
        retry: bool,
    ) -> list[Response]:
        """Send ``wire`` while reading answers, until every id has its END_REQUEST.

        Sending and reading at once (one selector, non-blocking socket) is what keeps a big
        STDIN from deadlocking against an application that answers before reading it all.
        ``retry``: the connection was reused, so a close before any answer means it went idle.
        """
        exchanges = {rid: _Exchange() for rid in ids}
        waiting = set(ids)
        got_any = False
        deadline = time.monotonic() + self.timeout
        out = memoryview(wire)
        sent = 0
        send_error: OSError | None = None
        with selectors.DefaultSelector() as selector:
            selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
            sock.setblocking(False)
            while waiting:
                left = deadline - time.monotonic()
                ready = selector.select(left) if left > 0 else []
                if not ready:
                    raise ClientTimeoutError(
                        f"no complete answer from {self.address!r} in {self.timeout}s"
                    )
                mask = ready[0][1]
                if mask & selectors.EVENT_WRITE:
                    try:
                        sent += sock.send(out[sent : sent + _RECV_SIZE])
                    except BlockingIOError:
                        pass
                    except OSError as exc:  # EPIPE/ECONNRESET: read what was answered first
                        send_error = exc
                        sent = len(out)
                    if sent == len(out):
                        selector.modify(sock, selectors.EVENT_READ)
                if not mask & selectors.EVENT_READ:
                    continue
                try:
                    chunk = sock.recv(_RECV_SIZE)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    if retry and not got_any:
                        raise _IdleClosed from None
                    raise ClientError(f"receiving from {self.address!r} failed: {exc}") from exc
                if not chunk:
                    if retry and not got_any:
                        raise _IdleClosed from None
                    why = f" (sending failed: {send_error})" if send_error else ""
                    raise ClientError(
                        f"{self.address!r} closed the connection before END_REQUEST{why}"
                    )
                got_any = True
                try:
                    events = conn.receive(chunk)
                except ProtocolError as exc:
                    raise ClientError(f"protocol error from {self.address!r}: {exc}") from exc
                for event in events:
                    self._dispatch(event, exchanges, waiting)
        sock.settimeout(self.timeout)
        # A connection is only reusable if every byte of every request went out: the app may
        # answer before reading all of STDIN, and a half-sent record would break the framing.
        if keep_conn and sent == len(out) and send_error is None:
            self._sock = sock
            self._conn = conn
        else:
            sock.close()
        return [exchanges[rid].response() for rid in ids]

    @staticmethod
    def _dispatch(event: ClientEvent, exchanges: dict[int, _Exchange], waiting: set[int]) -> None:
        if not isinstance(event, StdoutData | StderrData | EndRequest):
            raise ClientError(f"unexpected management record in a request: {event}")
        ex = exchanges.get(event.request_id)
        if ex is None or ex.end is not None:
            raise ClientError(f"record for request {event.request_id} not in flight")
        if isinstance(event, StdoutData):
            ex.stdout.append(event.data)
        elif isinstance(event, StderrData):
            ex.stderr.append(event.data)
        else:
            ex.end = event
            waiting.discard(event.request_id)


class Probe:
    """One FCGI_GET_VALUES sent to a listening socket, without ever blocking: does whoever
    accepts there speak FastCGI? The supervisor runs it in its selector loop (it knows no
    FastCGI itself, see supervisor.ProbeFactory): it waits for ``fileno()`` to become writable
    (``wants_write``) or readable, and calls :meth:`step` then, and at ``retry_at`` if set,
    until step() says True (an answer: GET_VALUES_RESULT, or UNKNOWN_TYPE from an app that
    knows no management records) or False (refused, closed, not FastCGI). A UNIX listener
    whose backlog is full refuses a non-blocking connect (EAGAIN) instead of queueing it, so
    the connect is tried again every RETRY seconds."""

    RETRY = 0.02

    def __init__(self, address: str | bytes | tuple[str, int], family: int) -> None:
        self._address = address
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.setblocking(False)
        self._conn = ClientConnection()
        self._connected = False
        self._sent = False
        self.retry_at: float | None = None
        self._connect()

    def _connect(self) -> None:
        try:
            self._sock.connect(self._address)
        except BlockingIOError as exc:
            if exc.errno == errno.EINPROGRESS:  # TCP: completes in the background
                self._connected = True
            else:  # a full UNIX backlog: nothing pending, try again
                self.retry_at = time.monotonic() + self.RETRY
            return
        self._connected = True
        self.retry_at = None

    def fileno(self) -> int:
        return self._sock.fileno()

    @property
    def wants_write(self) -> bool:
        return not self._sent

    def step(self) -> bool | None:
        """Move on after an event (or at ``retry_at``): True answered, False failed, None not
        yet. Any OSError is a failure (refused, reset, gone)."""
        try:
            if not self._connected:
                self._connect()
                return None
            if not self._sent:
                if self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    return False
                self._sock.send(encode_get_values([b"FCGI_MPXS_CONNS"]))
                self._sent = True
                return None
            data = self._sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return False
        if not data:
            return False
        try:
            events = self._conn.receive(data)
        except ProtocolError:
            return False
        return True if any(type(e) in (GetValuesResult, UnknownType) for e in events) else None

    def close(self) -> None:
        self._sock.close()


class _IdleClosed(Exception):
    """Internal: a reused connection was found closed before any answer."""

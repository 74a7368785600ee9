"""The responder runtime: a pool of threads serving FastCGI requests on one listening socket.

Why it is shaped like this (DESIGN.md, server.py; each point was measured on prototypes):

* **Fast path, no hand-off.** Every pool thread accepts connections itself and runs the whole
  request inline on the bare fd: ``accept4`` -> ``read`` -> app -> one ``writev`` -> ``close``,
  4 syscalls (measured with ``strace -c`` behind nginx; the read and the writev are
  ``preadv2``/``pwritev2`` with RWF_NOWAIT, see below, at the same cost). A dispatcher
  thread feeding workers cost ~40 % more CPU per request; a selector loop on the fast path
  5-10 us more; asyncio 4x.
  The listener is non-blocking and a thread only sleeps when ``accept()`` says EAGAIN, so
  under load the steady state is one accept per request. No socket object is made per
  connection: CPython's constructor adds a ``getsockname`` syscall.
* **Sleeping without polling, waking without thundering herds.** Idle threads sleep in ONE
  shared epoll instance. Waiters of one epoll instance are woken exclusively (one per event),
  and every item except the stop eventfd is ``EPOLLONESHOT``, so a new connection, a ready
  parked connection or a queued task wakes exactly one thread. The listener is re-armed by the
  thread that got its event right after its ``accept()``, so a second pending connection
  wakes the next sleeper. The stop eventfd is level-triggered: epoll passes a level-triggered
  event from one exclusive waiter to the next, which wakes every thread exactly when all of
  them must exit. ``shutdown()`` on the listener is never used: it would break the other
  worker processes sharing it. Why not one epoll per thread with ``EPOLLEXCLUSIVE`` on the
  listener: parked connections and queued tasks must wake one thread too, and
  ``EPOLLEXCLUSIVE`` can neither be combined with ``EPOLLONESHOT`` nor used on a nested epoll
  fd (EINVAL), so every parked connection would wake every idle thread.
* **No peer pins a thread.** Every read that must not wait is non-blocking
  (``preadv2(RWF_NOWAIT)`` on the bare fd: the same single syscall as ``read``, see
  :func:`_nowait_io`). A connection with nothing
  to read -- accepted before the web server wrote (after :data:`FIRST_WAIT`, at most 5 ms and
  only while no silent peer made that wait run out in the last second), kept open between
  requests (nginx ``fastcgi_keep_conn``), or stalled in the middle of a record before its
  request starts -- is parked in the epoll and the thread goes back to accepting; when bytes
  arrive, one sleeping thread picks it up, or a busy one within :data:`FAIR_ACCEPTS` accepts.
  Parked connections are closed by the coordinating main thread (which
  sleeps until the earliest deadline) after :data:`IDLE_TIMEOUT` seconds between requests, or
  ``io_timeout`` seconds (:data:`IO_TIMEOUT`) for a connection that has not finished sending a
  request; bytes that complete no record do not extend that deadline (no slowloris). So 1,000
  silent connections cost 1,000 fds and no thread. A thread blocks on a peer only while it runs
  that peer's request: waiting for more STDIN (after the first wait, the connection's waiting
  reads block with SO_RCVTIMEO = ``io_timeout``), or for the web server to take response bytes
  (a write first tries without blocking; once the socket buffer was full, the connection's
  writes block with SO_SNDTIMEO = ``io_timeout``), so a stuck web server never hangs one for
  longer. On that timeout the connection is closed, logged in one line.
* **Hung applications.** ``request_timeout`` bounds one app call (from the call to the end of
  its response). A thread cannot be interrupted, so when a call overruns, the coordinator logs
  one line naming the request and its run time and the server stops with
  :data:`EXIT_REQUEST_TIMEOUT`: requests on other threads get up to ``request_timeout`` more
  to finish, then runtime.py exits the process and the supervisor starts a fresh worker. The
  coordinator's timer is armed only while app calls are in flight (no polling when idle).
* **Out of file descriptors.** ``accept()`` failing with EMFILE/ENFILE/ENOBUFS/ENOMEM leaves
  the connection in the backlog; the thread that saw it sleeps :data:`ACCEPT_BACKOFF` before
  it re-arms the listener, so one thread retries ten times a second (never a busy loop) while
  the others keep serving their connections; it is logged once, then once per
  :data:`ACCEPT_LOG_EVERY` seconds, and the recovery is logged with the outage's length.
* **Multiplexing off the fast path.** A second concurrent request id on a connection makes the
  connection *shared*: extra requests become tasks that other pool threads pick up, writes go
  out under a per-connection lock (whole records at a time), and reading follows a
  leader/follower scheme: whichever thread needs input (or an epoll-woken idle thread) holds
  the connection's read token and dispatches every record it reads to its request's bounded
  queue. A connection that only ever carries one request at a time takes no lock at all.
* **Streaming both ways.** The app starts once PARAMS is complete; ``wsgi.input`` pulls the next
  STDIN chunk by reading the socket (so a 1 GiB upload never sits in memory; a record cut by the
  end of a read is handed on as far as it came, never reassembled), and the response
  goes out as it is produced. A response returned as a list (``return [body]``, the hello
  case) or a ``wsgi.file_wrapper`` is coalesced with END_REQUEST into one ``sendmsg``; any other
  iterable is sent chunk by chunk as PEP 3333 requires (never delayed while the app works).

Signals are not this module's business (runtime.py installs them), but pool threads block the
asynchronous ones so that they always reach the main thread, which sleeps in ``poll()`` and so
runs Python signal handlers at once; :meth:`Server.stop` only sets a flag and writes an eventfd.

The module knows nothing of where its socket came from (layering: it imports only protocol
and wsgi).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import io
import ipaddress
import mmap
import os
import random
import select
import signal
import socket
import struct
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any, Final

from fcgispawn.protocol import (
    CLOSING_MARK,
    STDOUT_CHUNK,
    AbortRequest,
    BeginRequest,
    Buffer,
    Data,
    Limits,
    Params,
    ProtocolError,
    Role,
    ServerConnection,
    Stdin,
    asks_keep_conn,
    encode_response,
    frame_stream,
    whole_responder_request,
)
from fcgispawn.wsgi import (
    ErrorStream,
    InputStream,
    RequestBodyIncomplete,
    WSGIApplication,
    build_environ_latin1,
    run_app,
)

__all__ = [
    "ACCEPT_BACKOFF",
    "EXIT_REQUEST_TIMEOUT",
    "IDLE_TIMEOUT",
    "IO_TIMEOUT",
    "MAX_IDLE_CONNS",
    "MAX_PENDING_CONNS",
    "Server",
    "parse_web_server_addrs",
]

#: Seconds a parked KEEP_CONN connection may stay idle before we close it. nginx's own
#: upstream ``keepalive_timeout`` defaults to 60 s: closing at the same time avoids keeping
#: connections nginx has already forgotten, and nginx copes with a close of an idle one.
IDLE_TIMEOUT: Final = 60.0
#: Seconds a connection that has not finished sending a request may stay silent: before its
#: first record, in the middle of a record or of PARAMS (parked, no thread), or while its running
#: request waits for STDIN or for the web server to take response bytes (a thread waits). Longer
#: than the front ends' own limits, so that they decide: a web server that streams an upload
#: (nginx with fastcgi_request_buffering off, Apache mod_proxy_fcgi) passes its client's pauses
#: on, and allows those up to 60 s by default (nginx client_body_timeout, Apache Timeout,
#: lighttpd max-read-idle); at 30 s we cut off uploads they still accepted. A web server that
#: gives up closes the connection or aborts the request, which ends the wait at once.
IO_TIMEOUT: Final = 90.0
#: Exit status of a worker whose app call overran ``request_timeout`` (as timeout(1) uses):
#: distinct from a crash (1) and a clean recycle (0), so the supervisor and logs can tell.
EXIT_REQUEST_TIMEOUT: Final = 124
#: How long the thread whose accept() failed for lack of fds/memory waits before retrying.
ACCEPT_BACKOFF: Final = 0.1
#: An accept() outage is logged when it starts, then at most once per this many seconds.
ACCEPT_LOG_EVERY: Final = 10.0
#: Parked idle (kept-open, between requests) connections kept at most; beyond, the connection
#: that would become one more is closed instead. Bounds fds (runtime.py raises RLIMIT_NOFILE).
MAX_IDLE_CONNS: Final = 1024
#: How long a thread waits for the first bytes of a connection it just accepted before it
#: parks the connection. A web server writes its request right after connect(), but one that
#: waits for writability first (nginx over TCP, bench/fcgiload) is often accepted before its
#: bytes arrive; parking it costs ~10 us (epoll_ctl, epoll_wait, a second read, the connection
#: object), and under load the parked connections leave the backlog short enough that the
#: next accept finds a fresh, empty one again: straight at the socket 29 % of connections were
#: parked, 2 % with this wait (bench/results/2026-11-29-first-wait.md). A silent peer therefore
#: costs a thread at most this long, and only once per FIRST_WAIT_BACKOFF (see _wait_first).
FIRST_WAIT: Final = 0.005
#: After a first wait ran out (a silent peer), new connections are parked at once for this
#: long: a flood of silent connections costs a thread FIRST_WAIT per this period, not per peer.
FIRST_WAIT_BACKOFF: Final = 1.0
#: Under load, a pool thread looks at the epoll (for parked connections that became readable)
#: at least once per this many accepts; see _worker.
FAIR_ACCEPTS: Final = 4
#: How many ready connections one epoll_wait hands the only pool thread (--threads 1). Several
#: threads take one at a time, so that a ready connection is never held by a thread busy with
#: another; the only thread serves them in turn either way, and taking them together saves an
#: epoll_wait per request on kept connections (nginx keepalive): straight at the socket with
#: FCGI_KEEP_CONN, 0.99 -> 0.09 epoll_wait and 0.59 -> 0.29 context switches per request.
EVENTS_ONE_THREAD: Final = 16
#: On a graceful stop, how long connections accepted just before it get to send their request.
PENDING_DRAIN: Final = 1.0
#: On a graceful stop of the worker program, how long it goes on serving the connections
#: queued on its listener before it gives its copy up (see Server._drain_backlog).
BACKLOG_DRAIN: Final = 5.0
#: Parked connections owing a request (new and silent, or stalled mid-request) kept at most;
#: beyond, the oldest is closed. Separate from MAX_IDLE_CONNS so that a flood of silent
#: connections never evicts the web server's kept-open ones.
MAX_PENDING_CONNS: Final = 1024
#: The size of each pool thread's read buffer (one preadv per read, into a buffer made once).
#: A typical nginx request is < 2 KiB; during an upload a read takes whatever the socket holds
#: (up to ~200 KiB on a UNIX socket): 256 KiB reads cost ~40 % less CPU per 100 MB upload than
#: 64 KiB ones (fewer reads, and fewer records cut by the end of a read). Pages of the buffer
#: that no read reached are never touched, so a worker that serves small requests pays nothing.
RECV_SIZE: Final = 256 * 1024
#: Request body a response write that waits may read and keep for its app (_Req.drainer).
DRAIN_BUFFER: Final = 4 << 20
#: Where a read must allocate its result (socket.recv: kernels without RWF_NOWAIT, draining):
#: below glibc's mmap threshold, so the bytes come from the heap, not from an mmap/munmap pair.
_RECV_ALLOC: Final = 65536
#: A coalesced (list) response is flushed once this much is pending, so memory stays bounded
#: for a 100 MB file_wrapper response while small responses are one sendmsg.
FLUSH_BYTES: Final = 256 * 1024
#: STDIN bytes queued for one multiplexed request before the reader waits for its consumer.
STDIN_QUEUE_BYTES: Final = 1 << 20
#: How long a reader waits for a multiplexed request to consume its queue before the request
#: is aborted (the only way to break a cycle of requests waiting for each other's threads).
STDIN_QUEUE_WAIT: Final = 30.0
#: sendmsg takes at most IOV_MAX (1024 on Linux) buffers per call.
_IOV_MAX: Final = 1024

_ASYNC_SIGNALS: Final = frozenset(
    {
        signal.SIGTERM,
        signal.SIGINT,
        signal.SIGQUIT,
        signal.SIGHUP,
        signal.SIGUSR1,
        signal.SIGUSR2,
        signal.SIGCHLD,
        signal.SIGALRM,
        signal.SIGTTIN,
        signal.SIGTTOU,
        signal.SIGWINCH,
    }
)
_ROLE_NAMES: Final = {role: role.name for role in Role}
# Enum members as plain globals: ``Role.FILTER`` is a class attribute lookup through the enum
# machinery, ~30 ns each time on 3.11, a global ~2 ns.
_RESPONDER: Final = Role.RESPONDER
_FILTER: Final = Role.FILTER
_EP_IN: Final = select.EPOLLIN | select.EPOLLONESHOT
_EP_STOP: Final = select.EPOLLIN
_DONTWAIT: Final = socket.MSG_DONTWAIT
#: Placeholders of unshared connections: every use of a connection's locks and condition is
#: behind ``conn.shared``, and a connection gets its own (``_Conn.share``) before it becomes
#: shared. Allocating three locks and a Condition per connection cost ~2 % of a request, and
#: only multiplexed connections (which no real web server opens) ever need them.
_NO_LOCK: Final = threading.Lock()
_NO_COND: Final = threading.Condition(_NO_LOCK)
#: Placeholder input queue of a request that has none yet (any GET; FCGI_DATA for every role
#: but FILTER, which the protocol refuses): never appended to (see ``_Req.queue_for``).
_NO_CHUNKS: Final[collections.deque[bytes]] = collections.deque(maxlen=0)
_PEEK_DONTWAIT: Final = socket.MSG_DONTWAIT | socket.MSG_PEEK
#: _first_read's answer for "a whole request came and was answered, the fd is closed".
_WHOLE: Final = memoryview(b"")
#: wsgi.input of every whole request (its body is empty), shared: an InputStream whose source
#: is bytes() only ever stores b"", 0 and True in itself, so no request can leave state in it
#: for the next one (and __slots__ keeps apps from adding any).
_NO_BODY: Final = InputStream(bytes)
_RWF_NOWAIT: Final = getattr(os, "RWF_NOWAIT", 0)
_TIMEVAL: Final = struct.Struct("@ll")  # struct timeval (SO_SNDTIMEO/SO_RCVTIMEO), as Linux has it
_POLLIN: Final = select.POLLIN
_POLLOUT: Final = select.POLLOUT

#: Whether ``preadv2``/``pwritev2`` with RWF_NOWAIT work on sockets here (None: not probed yet).
_nowait: bool | None = None
#: Each pool thread reads into its own reusable buffer (see _Conn.recv).
_tls = threading.local()


def _nowait_io() -> bool:
    """Probe once per process whether RWF_NOWAIT works on sockets (Linux >= 4.14 for reads;
    writes need FMODE_NOWAIT on sockets, newer kernels).

    Why: the fd from ``accept()`` is blocking (CPython's accept4 passes no SOCK_NONBLOCK) and
    making it non-blocking costs two fcntl calls, while a socket object (for recv/sendmsg with
    MSG_DONTWAIT) costs a getsockname per connection; ``preadv2``/``pwritev2`` with
    RWF_NOWAIT are non-blocking per call on the bare fd for the price of read/writev. Without
    them the connection's socket object and MSG_DONTWAIT are used instead: same behaviour, one
    syscall more per connection.
    """
    global _nowait
    if _nowait is None:
        ok = bool(_RWF_NOWAIT)
        if ok:
            a, b = socket.socketpair()
            try:
                with contextlib.suppress(BlockingIOError):
                    os.preadv(a.fileno(), [bytearray(1)], -1, _RWF_NOWAIT)
                os.pwritev(a.fileno(), [b"x"], -1, _RWF_NOWAIT)
                ok = os.preadv(b.fileno(), [bytearray(1)], -1, _RWF_NOWAIT) == 1
            except (OSError, AttributeError):
                ok = False
            finally:
                a.close()
                b.close()
        _nowait = ok
    return _nowait


def _read_buffer() -> tuple[list[mmap.mmap], memoryview, list[bytes]]:
    """This thread's receive buffer, as the iovec list ``preadv`` takes and a view of it, and
    its list for the body of a whole request (see _body_input): ``preadv`` needs a writable
    buffer, and allocating one per read would cost more than the read; all three are made
    once, so a read makes one slice and no other object. An anonymous mmap, not a bytearray
    (which zero-fills, so touches, all of its RECV_SIZE): only the pages reads reach are ever
    touched, so small requests keep a worker's memory small."""
    try:
        read: tuple[list[mmap.mmap], memoryview, list[bytes]] = _tls.read
    except AttributeError:
        buf = mmap.mmap(-1, RECV_SIZE)
        read = _tls.read = ([buf], memoryview(buf), [])
    return read


def _body_input(body: list[bytes]) -> io.BytesIO:
    """wsgi.input of a whole request with a body: all of it is here, so a BytesIO (read,
    readline, readlines and iteration in C, and read() of it all returns the bytes without a
    copy) instead of an InputStream pulling chunks through Python calls. Takes the chunks out
    of ``body`` (the thread's list, reused by its next request)."""
    data = body[0] if len(body) == 1 else b"".join(body)
    body.clear()
    return io.BytesIO(data)


def _wait_fd(fd: int, events: int, timeout: float) -> int:
    """Block until ``fd`` is ready for ``events`` (or has an error/hang-up): the events it is
    ready for, 0 (false) on timeout.

    A poll object per wait costs no syscall of its own; this only runs when a non-blocking read
    or write found nothing to do, i.e. off the fast path.
    """
    p = select.poll()
    p.register(fd, events)
    ready = p.poll(max(0, int(timeout * 1000) + 1))
    return ready[0][1] if ready else 0


def parse_web_server_addrs(text: str | Sequence[str] | None) -> frozenset[str] | None:
    """FCGI_WEB_SERVER_ADDRS (spec §3.2) as the set of peer host strings ``accept()`` returns.

    The spec lists IPv4 dotted quads; IPv6 addresses are accepted too. Each IPv4 address also
    matches its IPv4-mapped IPv6 form (a dual-stack listener reports ``::ffff:a.b.c.d``), so
    the per-connection check is a single set lookup. ``None`` or an empty value means no
    filtering. A malformed entry raises ValueError naming it.
    """
    if text is None:
        return None
    items = text.split(",") if isinstance(text, str) else list(text)
    allowed: set[str] = set()
    for item in items:
        entry = item.strip()
        if not entry:
            continue
        try:
            ip = ipaddress.ip_address(entry)
        except ValueError:
            raise ValueError(
                f"FCGI_WEB_SERVER_ADDRS: {entry!r} is not an IPv4 or IPv6 address"
            ) from None
        allowed.add(str(ip))
        if isinstance(ip, ipaddress.IPv4Address):
            allowed.add(f"::ffff:{ip}")
        elif ip.ipv4_mapped is not None:
            allowed.add(str(ip.ipv4_mapped))
    return frozenset(allowed) if allowed else None


class _Output:
    """The response side of a request: STDOUT, written at once or coalesced (``defer``, set by
    run_app: see wsgi.Batching). Subclasses say how records reach the socket; ``aborted`` says
    the web server aborted the request or is gone (a plain attribute: send() tests it on every
    chunk)."""

    __slots__ = ("aborted", "cut", "defer", "pending", "pending_bytes", "rid", "server")

    server: Server
    rid: int
    aborted: bool
    cut: bool  # set by run_app: the response was cut short (see wsgi.Batching)
    defer: bool
    pending: list[Buffer]
    pending_bytes: int

    def send(self, bufs: list[bytes]) -> None:
        """``run_app``'s send callback: frame as STDOUT records and write (or coalesce)."""
        if self.aborted:
            raise BrokenPipeError(errno.EPIPE, "the web server aborted the request")
        if self.defer:
            self.pending.extend(bufs)
            n = self.pending_bytes = self.pending_bytes + sum(map(len, bufs))
            if n < FLUSH_BYTES:
                return
            bufs = self.pending  # type: ignore[assignment]
            self.pending = []
            self.pending_bytes = 0
        self._write_stdout(bufs)

    def _write_stdout(self, bufs: list[bytes]) -> None:
        raise NotImplementedError


class _Req(_Output):
    """One active request on a connection; its thread is the only one that runs its app.

    STDIN chunks are queued here by whoever reads the connection (usually the request's own
    thread); ``queued`` counts their bytes so a reader can apply back-pressure.
    """

    __slots__ = (
        "chunks",
        "conn",
        "data_chunks",
        "data_done",
        "discarding",
        "keep_conn",
        "params",
        "queued",
        "role",
        "stdin_done",
    )

    def __init__(self, server: Server, conn: _Conn, rid: int, role: Role, keep_conn: bool) -> None:
        self.server = server
        self.conn = conn
        self.rid = rid
        self.role = role
        self.keep_conn = keep_conn
        self.params: Params | None = None
        # Created when the first chunk arrives (queue_for): most requests carry no body.
        self.chunks: collections.deque[bytes] = _NO_CHUNKS
        self.queued = 0
        self.stdin_done = False
        self.data_chunks: collections.deque[bytes] = _NO_CHUNKS
        self.data_done = role is not _FILTER
        self.discarding = False  # the unread rest of the body is dropped (see drainer)
        self.aborted = False
        self.cut = False
        self.defer = False
        self.pending: list[Buffer] = []
        self.pending_bytes = 0

    # -- wsgi.input / FCGI_DATA sources --------------------------------------------------------

    def queue_for(self, data: bool) -> collections.deque[bytes]:
        """The STDIN (or FCGI_DATA) queue, created on first use by the connection's reader."""
        queue = self.data_chunks if data else self.chunks
        if queue is _NO_CHUNKS:
            queue = collections.deque()
            if data:
                self.data_chunks = queue
            else:
                self.chunks = queue
        return queue

    def read_stdin(self) -> bytes:
        """``InputStream`` source: the next STDIN chunk, reading the socket when none is queued."""
        return self._next_chunk(data=False)

    def read_data(self) -> bytes:
        """FILTER role: the FCGI_DATA stream (``environ["fcgi.data"]``), after STDIN (spec §6.4)."""
        return self._next_chunk(data=True)

    def _next_chunk(self, *, data: bool) -> bytes:
        while True:
            # Re-read each turn: the reader replaces the placeholder queue on the first input.
            chunks = self.data_chunks if data else self.chunks
            if chunks:
                chunk = chunks.popleft()
                if self.conn.shared:
                    self.conn.consumed(self, len(chunk))
                else:
                    self.queued -= len(chunk)
                return chunk
            if self.discarding and not data:
                raise RequestBodyIncomplete(
                    "the rest of the request body was discarded while the response waited for "
                    "a web server that sends all of a body before it reads the answer"
                )
            if self.data_done if data else self.stdin_done:
                return b""
            if self.aborted:
                raise RequestBodyIncomplete("the web server aborted the request")
            if not self.server._await_input(self.conn, self):
                raise RequestBodyIncomplete(
                    "the connection to the web server was closed or timed out"
                )

    # -- the response ---------------------------------------------------------------------------

    def _write_stdout(self, bufs: list[bytes]) -> None:
        conn = self.conn
        if len(bufs) == 1:
            data: Buffer = bufs[0]
        else:
            total = sum(map(len, bufs))
            data = b"".join(bufs) if total <= STDOUT_CHUNK else b""
            if not data and total:
                records: list[Buffer] = []
                for b in bufs:
                    if b:
                        records += conn.frame(self.rid, b, stderr=False)
                conn.write(records, self.server.io_timeout, self.drainer())
                return
        conn.write(
            conn.frame(self.rid, data, stderr=False), self.server.io_timeout, self.drainer()
        )

    def send_stderr(self, data: bytes) -> None:
        """``wsgi.errors`` sink: FCGI_STDERR records (nginx logs them as an error line)."""
        if self.aborted or self.conn.dead:
            raise BrokenPipeError(errno.EPIPE, "the connection is gone")
        conn = self.conn
        conn.write(conn.frame(self.rid, data, stderr=True), self.server.io_timeout, self.drainer())

    def drainer(self) -> Callable[[], bool] | None:
        """What a response write that waits for room does meanwhile, when the body is not all
        here: read on, keeping up to DRAIN_BUFFER bytes for the app and dropping the rest.
        Caddy 2.6 sends a request's whole body before it reads any of the response: an app
        that answered a big upload with a big page (a 1 MB 413) without reading it waited on
        the web server, which waited on it, until io_timeout (90 s, then a 502 blamed on the
        web server). An app that reads after it answered (streaming) finds what was kept, and
        past a drop RequestBodyIncomplete. None where nothing is owed, or others read the
        connection."""
        if self.stdin_done or self.aborted or self.conn.shared:
            return None
        return self._drain

    def _drain(self) -> bool:
        """One read for drainer(); False once there is nothing more to read."""
        if not self.discarding and self.queued >= DRAIN_BUFFER:
            self.discarding = True
            self.server.log(
                f"the web server sent more than {DRAIN_BUFFER >> 20} MiB of request body the "
                "app had not read while the response waited for it to read: the rest of the "
                "body is discarded (a web server that sends all of a body before it reads the "
                "answer, such as Caddy)"
            )
        conn = self.conn
        self.server._read(conn, wait=False, answer=False)
        return not (conn.dead or self.stdin_done or self.aborted or conn.runnable)


class _Whole(_Output):
    """The one request of a connection that carries nothing else (see
    ``protocol.whole_responder_request``): it needs no protocol state and no _Conn, only its
    socket, so the server answers it with the fewest steps a correct response allows."""

    __slots__ = ("blocking", "close", "closing", "fd", "stderr_used")

    def __init__(self, server: Server, fd: int, rid: int, close: bool) -> None:
        self.server = server
        self.fd = fd
        self.close = close  # False: a kept connection, its owner parks it again
        self.closing = False  # True: the last response on a kept one (CLOSING_MARK)
        self.rid = rid
        self.defer = False
        self.cut = False
        self.pending = []
        self.pending_bytes = 0
        self.aborted = False  # the connection failed: nothing more is written
        self.stderr_used = False
        self.blocking = False  # the fd takes blocking writes (see _send_rest)

    def _write(self, records: list[Buffer]) -> None:
        try:
            self.blocking = _write_all(
                self.fd, records, self.server.io_timeout, None, self.blocking
            )
        except OSError:
            self.aborted = True
            raise

    def _write_stdout(self, bufs: list[bytes]) -> None:
        self._write(frame_stream(self.rid, bufs))

    def send_stderr(self, data: bytes) -> None:
        """``wsgi.errors`` sink, as _Req.send_stderr."""
        if self.aborted:
            raise BrokenPipeError(errno.EPIPE, "the connection is gone")
        records = frame_stream(self.rid, (data,), stderr=True)
        if records:
            self.stderr_used = True
            self._write(records)

    def _cut(self) -> None:
        """A response cut short (see wsgi.Batching): what is pending, then no END_REQUEST; the
        connection is closed (a kept one by its owner, who sees ``aborted``)."""
        self.aborted = True
        if self.pending:
            with contextlib.suppress(OSError):
                _write_all(
                    self.fd, frame_stream(self.rid, self.pending), self.server.io_timeout,
                    None, self.blocking,
                )  # fmt: skip
        _break_off(self.fd, self.server._family)

    def finish(self, app_status: int) -> None:
        """What is pending + the end of the streams + END_REQUEST, then close (unless kept)."""
        # (try/except, not contextlib.suppress: that costs ~0.5 us, on every request)
        if self.cut and not self.aborted:
            self._cut()
        if not self.aborted:
            tail = encode_response(self.rid, self.pending, app_status, stderr_used=self.stderr_used)
            if self.closing:  # the kept connection is closed next (see _serve_whole)
                tail.append(CLOSING_MARK)
            try:  # (_write's body: a call less on every request)
                _write_all(self.fd, tail, self.server.io_timeout, None, self.blocking)
            except OSError as exc:
                self.aborted = True  # a kept connection is dropped (_serve_whole)
                if self.pending:  # (not when only END_REQUEST was left: see _unsent)
                    self.server._unsent(exc)
        if not self.close:
            return
        try:  # noqa: SIM105
            os.close(self.fd)
        except OSError:
            pass


class _Conn:
    """One transport connection and its protocol state.

    ``users`` counts the threads working on it (its reader/owner and one per running or queued
    request). While it is 1 and ``shared`` is False, one thread owns everything and no lock is
    taken; ``shared`` turns on when a second actor appears (a task for a multiplexed request,
    or an epoll registration while requests are active) and off again when the connection is
    picked up idle from the epoll.
    """

    __slots__ = (
        "_sock",
        "blocking",
        "cond",
        "dead",
        "deadline",
        "family",
        "fd",
        "fresh",
        "idle",
        "lock",
        "markable",
        "mpx",
        "pending",
        "progress",
        "proto",
        "rblocking",
        "registered",
        "reqs",
        "rlock",
        "runnable",
        "served",
        "shared",
        "stdin_incomplete",
        "users",
        "wlock",
    )

    def __init__(self, fd: int, limits: Limits, family: int) -> None:
        self.fd = fd
        self.family = family
        #: Whether the web server drops this connection on protocol.CLOSING_MARK (nginx), known
        #: from its first request's SERVER_SOFTWARE (see _marks_understood); None: not yet.
        self.markable: bool | None = None
        #: The web server asked GET_VALUES (or got a request refused) on it: it may
        #: multiplex (HAProxy with get-values), see Server._multiplexed.
        self.mpx = False
        self._sock: socket.socket | None = None
        self.proto = ServerConnection(limits, latin1_params=True)
        self.reqs: dict[int, _Req] = {}
        # A list, not a deque (cheaper to create): it holds more than one request only when a
        # connection multiplexes; append and pop(0) are each atomic, as a reader that appends
        # without the lock needs (see _hand_off).
        self.runnable: list[_Req] = []
        self.users = 1
        self.shared = False
        self.dead = False
        self.registered = False
        self.idle = False
        self.deadline = 0.0  # when a parked connection is closed (0: never parked yet)
        self.fresh = True  # no record has completed yet (its first request is still due)
        self.progress = False  # a read completed a record since the connection was last parked
        self.pending = False  # parked owing a request (io_timeout), not idle between requests
        self.served = 0
        self.stdin_incomplete = False
        self.blocking = False  # the fd takes blocking writes (see _send_rest)
        self.rblocking = False  # waiting reads block, bounded by SO_RCVTIMEO (see Server._read)
        # Created by share() when the connection first becomes shared: a Condition costs
        # 1.5 us, as much as a twentieth of a whole request, and only multiplexed connections
        # need these.
        self.lock = _NO_LOCK  # protocol state + users (short critical sections)
        self.cond: threading.Condition = _NO_COND
        self.rlock = _NO_LOCK  # the read token: who holds it reads the socket
        self.wlock = _NO_LOCK  # whole sendmsg calls

    def share(self) -> None:
        """Give the connection its own locks before a second actor may touch it (the caller
        is its only user, so nobody holds or waits on the placeholders meanwhile)."""
        if self.cond is _NO_COND:
            self.lock = threading.Lock()
            self.rlock = threading.Lock()
            self.wlock = threading.Lock()
            self.cond = threading.Condition(self.lock)

    @property
    def sock(self) -> socket.socket:
        """A socket object for the rare calls that need one (MSG_DONTWAIT, shutdown, options).

        The fast path uses the bare fd (``os.read``/``os.writev``/``os.close``): CPython's
        socket constructor costs a ``getsockname`` syscall per connection, 25 % of the
        syscalls of a whole request. A kept-alive connection pays it once, not per request.
        """
        sock = self._sock
        if sock is None:
            sock = self._sock = _socket_for(self.fd, self.family)
        return sock

    def recv(self) -> Buffer:
        """One non-blocking read: the bytes (a view of this thread's buffer, valid until its
        next read), ``b""`` at EOF; BlockingIOError when nothing is there yet."""
        if _nowait:
            bufs, view, _ = _read_buffer()
            return view[: os.preadv(self.fd, bufs, -1, _RWF_NOWAIT)]
        return self.sock.recv(_RECV_ALLOC, _DONTWAIT)

    def recv_wait(self) -> Buffer:
        """One blocking read, bounded by SO_RCVTIMEO (only once ``rblocking``, see
        Server._read): BlockingIOError when it ran out."""
        bufs, view, _ = _read_buffer()
        return view[: os.readv(self.fd, bufs)]

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        else:
            os.close(self.fd)

    def frame(self, rid: int, data: Buffer, *, stderr: bool) -> list[Buffer]:
        if self.shared:
            with self.lock:
                return self.proto.stderr(rid, data) if stderr else self.proto.stdout(rid, data)
        return self.proto.stderr(rid, data) if stderr else self.proto.stdout(rid, data)

    def write(
        self, bufs: list[Buffer], timeout: float, drain: Callable[[], bool] | None = None
    ) -> None:
        """Send every buffer (whole records) or raise OSError; one writev in the common case.

        A full socket buffer (a web server that stopped reading) makes the thread wait for at
        most ``timeout`` seconds of no progress (see _send_rest), then TimeoutError; other
        threads keep serving meanwhile. ``drain``: called when input arrives meanwhile (see
        _Req.drainer).
        """
        if self.dead:
            raise BrokenPipeError(errno.EPIPE, "the connection is gone")
        if self.shared:
            with self.wlock:
                self._write(bufs, timeout, None)
        else:
            self._write(bufs, timeout, drain)

    def _write(
        self, bufs: list[Buffer], timeout: float, drain: Callable[[], bool] | None
    ) -> None:
        try:
            self.blocking = _write_all(
                self.fd, bufs, timeout, None if _nowait else self.sock, self.blocking, drain
            )
        except OSError:
            self.dead = True
            raise

    def consumed(self, req: _Req, n: int) -> None:
        """A multiplexed request took ``n`` queued bytes: wake a reader waiting for room."""
        with self.cond:
            req.queued -= n
            self.cond.notify_all()


class Server:
    """Serve a WSGI app over FastCGI on ``listener`` with a pool of ``threads`` threads.

    ``serve_forever()`` runs the pool and coordinates (idle timeouts, stopping) in the calling
    thread, which should be the main thread when signal handlers call :meth:`stop`. It returns
    0 after a stop (graceful drain done, or its timeout passed, or ``max_requests`` reached).
    Three timeouts, each for one thing (the module docstring says how they work):

    * ``request_timeout`` (seconds, 0 = none; cli's ``--request-timeout``): the longest one app
      call may run, its response included. Overrunning it stops the server with
      :data:`EXIT_REQUEST_TIMEOUT` (runtime.py then ends the process: a hung thread cannot be
      stopped any other way, and the supervisor replaces the worker).
    * ``io_timeout`` (None: :data:`IO_TIMEOUT`): how long a peer may keep us waiting in the
      middle of a request -- before its first record, within a record or PARAMS, for STDIN the
      app reads, or to take response bytes. The connection is closed, the worker lives.
    * ``idle_timeout`` (None: :data:`IDLE_TIMEOUT`): how long a kept-open connection may sit
      between requests.

    ``web_server_addrs`` (FCGI_WEB_SERVER_ADDRS, spec §3.2) is checked on TCP listeners only:
    a peer not listed is closed right after accept(). On a UNIX listener peers have no
    address to check, and the file mode of the socket is what restricts them, so the list is
    ignored there (the spec defines it for TCP).

    ``release_listener``: when a stop begins, give up this process's copy of the listening
    socket at once (its fd then refers to /dev/null, so a pool thread still about to accept
    gets an error, never another file that reused the number). The worker program sets it: in
    a final stop every copy goes and the web server is refused at once, instead of queueing
    connections nobody accepts until the drain ends and then being reset; in a reload or a
    recycle the supervisor's and the new workers' copies keep the socket. Off for library use
    (:func:`runtime.serve`): the caller owns its socket.

    Multiplexing: extra request ids run concurrently (on other pool threads) when they arrive
    while the connection is being read -- together with the first request, or while a running
    request reads its input. An id that arrives while the only running request computes
    without reading waits until that request ends. No real web server multiplexes
    (shared/reference/fastcgi.md); a busy single request never pays for watching.
    """

    def __init__(
        self,
        app: WSGIApplication,
        listener: socket.socket,
        *,
        threads: int = 1,
        max_requests: int = 0,
        max_requests_jitter: int = 0,
        graceful_timeout: float = 30.0,
        request_timeout: float = 0,
        io_timeout: float | None = None,
        idle_timeout: float | None = None,
        web_server_addrs: Sequence[str] | str | None = None,
        multiprocess: bool = False,
        release_listener: bool = False,
        on_retire: Callable[[], None] | None = None,
        log: Callable[[str], None],
    ) -> None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, not {threads}")
        if request_timeout < 0:
            raise ValueError(f"request_timeout must not be negative, not {request_timeout}")
        for name, value in (("io_timeout", io_timeout), ("idle_timeout", idle_timeout)):
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, not {value}")
        if max_requests < 0 or max_requests_jitter < 0:
            raise ValueError("max_requests and max_requests_jitter must not be negative")
        self.app = app
        self.listener = listener
        self.release_listener = release_listener
        #: Called when the server stops by itself (--max-requests, --request-timeout), before
        #: its drain: the runtime tells its supervisor (STOPPING=1) to start the replacement.
        self.on_retire = on_retire
        self.threads = threads
        self.max_requests = (
            max_requests + random.randint(0, max_requests_jitter) if max_requests else 0
        )
        self.graceful_timeout = graceful_timeout
        self.request_timeout = request_timeout
        # None: the module values, read at construction (not import) so that a test running
        # the worker program can shorten them in the child.
        self.io_timeout = IO_TIMEOUT if io_timeout is None else io_timeout
        self.idle_timeout = IDLE_TIMEOUT if idle_timeout is None else idle_timeout
        self.multithread = threads > 1
        self.multiprocess = multiprocess
        self.log = log
        self.allowed = parse_web_server_addrs(web_server_addrs)
        # What GET_VALUES reports (spec §4.1), truthfully: requests run at once = threads;
        # connections held = those being served plus the parked idle ones; a connection can
        # multiplex only if a second thread exists to run its second request.
        self.limits = Limits(
            max_conns=threads + MAX_IDLE_CONNS,
            max_reqs=threads,
            mpxs_conns=threads > 1,
            max_requests_per_conn=threads,
        )
        self._mpx = self.limits.mpxs_conns
        #: A web server used a request id other than 1: it multiplexes (HAProxy numbers its
        #: requests 1, 3, 5, ...; nginx, Apache, lighttpd, Caddy and h2o always use 1).
        self._mpx_seen = False
        self._family = listener.family
        self._tcp = listener.family in (socket.AF_INET, socket.AF_INET6)
        if self._tcp:
            # Inherited by every connection accepted from now on (in every process sharing
            # the socket). A response can end in a second small write (END_REQUEST after a
            # streamed body: every Django or Werkzeug response); with Nagle it then waited for
            # the web server's delayed ACK: 44 ms a request on nginx's kept connections.
            with contextlib.suppress(OSError):
                listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _nowait_io()
        self._lock = threading.Lock()
        # Connections owned by a thread + queued tasks = _work + the sum of the pool threads'
        # cell[0]; requests served = _served + the sum of their cell[1]. Each pool thread
        # counts in its own cell (one writer per cell, so no lock): the connections it accepts,
        # and the whole requests it answers on them (_serve_whole), which so take no lock at
        # all while nothing waits on the counts (a stop, --max-requests). Every other release
        # decrements _work and adds to _served under the lock it takes anyway. Read with
        # _busy() and _served_total().
        self._work = 0
        self._cells: list[list[int]] = []
        self._served = 0
        self._watched: dict[int, _Conn] = {}  # fd -> connection registered (armed) in the epoll
        self._idle_count = 0  # parked between requests (kept open by the web server)
        self._pending_count = 0  # parked owing a request (new, or stalled mid-request)
        self._tasks: collections.deque[Callable[[], None]] = collections.deque()
        self._accepting = True
        self._stop_requested = False
        self._graceful = True
        self._stopping = False
        #: When the coordinator will next wake by itself (inf: not before a signal/stop):
        #: whoever sets an earlier deadline (a parked connection, an app call) wakes it.
        self._main_wake_at = float("inf")
        #: App calls in flight (only with request_timeout): key -> (start, params), in start
        #: order, so the first one is the oldest.
        self._calls: dict[int, tuple[float, Params]] = {}
        self._call_seq = 0
        self._exit_code = 0
        self._first_wait_off_until = 0.0  # see _wait_first
        self._accept_down_since: float | None = None
        self._accept_logged_at = 0.0
        self._accept_failures = 0
        self._ep: select.epoll | None = None
        self._ctl_fd = -1
        self._stop_fd = -1
        self._task_fd = -1
        self._lfd = listener.fileno()
        self._pool: list[threading.Thread] = []
        self._sig_r = self._sig_w = -1  # see signal_wakeup_fd

    # -- public control -----------------------------------------------------------------------

    @property
    def served(self) -> int:
        """Requests completed so far (for tests and logs)."""
        return self._served_total()

    def stop(self, graceful: bool = True) -> None:
        """Ask the server to stop: finish in-flight requests (graceful) or leave at once.

        Safe from a signal handler and from any thread: it sets flags and writes an eventfd,
        takes no lock and allocates nothing that could deadlock.
        """
        if not graceful:
            self._graceful = False
        self._stop_requested = True
        self._wake_main()

    def _wake_main(self) -> None:
        fd = self._ctl_fd
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.eventfd_write(fd, 1)

    def serve_forever(self) -> int:
        """Run until stopped; returns the exit code: 0, or :data:`EXIT_REQUEST_TIMEOUT` after an
        app call overran ``request_timeout``."""
        self.listener.setblocking(False)
        self._ctl_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._task_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK | os.EFD_SEMAPHORE)
        ep = self._ep = select.epoll()
        ep.register(self._lfd, _EP_IN)
        ep.register(self._stop_fd, _EP_STOP)
        ep.register(self._task_fd, _EP_IN)
        ctl = select.poll()
        ctl.register(self._ctl_fd, select.POLLIN)
        if self._sig_r >= 0:
            ctl.register(self._sig_r, select.POLLIN)
        try:
            for i in range(self.threads):
                t = threading.Thread(target=self._worker, name=f"fcgispawn-{i}", daemon=True)
                t.start()
                self._pool.append(t)
            try:
                self._coordinate(ctl)
            except BaseException:
                # KeyboardInterrupt with Python's default SIGINT handler, or a bug: leave at
                # once rather than keep daemon threads serving behind the caller's back.
                self._graceful = False
                self._accepting = False
                os.eventfd_write(self._stop_fd, 1)
                for t in self._pool:
                    t.join(1.0)
                raise
            return self._shutdown(ctl)
        finally:
            # Threads abandoned after the graceful timeout may still touch these fds: then
            # they stay open (the process is about to exit) rather than be closed under them,
            # where a reused fd number could receive their writes.
            if not any(t.is_alive() for t in self._pool):
                ctl_fd, self._ctl_fd = self._ctl_fd, -1
                ep.close()
                for fd in (ctl_fd, self._stop_fd, self._task_fd):
                    os.close(fd)
            # (The signal pipe stays open until the caller has put its wakeup fd back.)

    # -- the coordinating (main) thread ----------------------------------------------------------

    def _coordinate(self, ctl: select.poll) -> None:
        """Sleep until stopped, waking only when a deadline passes: a parked connection's, or
        an app call's ``request_timeout`` (armed only while calls are in flight)."""
        while not self._stop_requested:
            timeout = self._reap()
            if self._stop_requested:
                break
            self._sleep(ctl, timeout)

    def _sleep(self, ctl: select.poll, timeout: float | None) -> None:
        """The coordinating thread waits (None: until woken) for the control eventfd, or for
        the signal wakeup pipe, then empties what woke it."""
        ctl.poll(None if timeout is None else max(1, int(timeout * 1000) + 1))
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._ctl_fd)
        if self._sig_r >= 0:
            with contextlib.suppress(OSError):
                while os.read(self._sig_r, 512):
                    pass

    def signal_wakeup_fd(self) -> int:
        """A non-blocking fd for ``signal.set_wakeup_fd`` while :meth:`serve_forever` runs.

        A signal that arrives just before the coordinating thread enters poll() has its C
        handler run at once but its Python handler (the one that calls :meth:`stop`) only at
        the next bytecode, after poll() returns: with nothing else to wake it, an idle worker
        slept through a TERM until the supervisor's KILL (1 in 30-200 stops under load). The
        byte the C handler writes here wakes it. Made on first call; closed by
        :meth:`close_signal_wakeup`.
        """
        if self._sig_w < 0:
            self._sig_r, self._sig_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        return self._sig_w

    def close_signal_wakeup(self) -> None:
        """Close the pipe of :meth:`signal_wakeup_fd` (after the caller put its old fd back)."""
        for fd in (self._sig_r, self._sig_w):
            if fd >= 0:
                os.close(fd)
        self._sig_r = self._sig_w = -1

    def _reap(self) -> float | None:
        """Close expired parked connections and check the oldest app call; return seconds
        until the next deadline (None: none, sleep until woken)."""
        now = time.monotonic()
        # Deadlines within this slack are handled now: one wakeup closes a whole burst of
        # connections parked together instead of one wakeup each.
        horizon = now + 0.05
        expired: list[_Conn] = []
        next_deadline = float("inf")
        hung: tuple[float, Params] | None = None
        with self._lock:
            for fd, conn in list(self._watched.items()):
                if not conn.idle:
                    continue
                deadline = conn.deadline
                if deadline <= horizon:
                    del self._watched[fd]
                    self._unpark_locked(conn)
                    expired.append(conn)
                elif deadline < next_deadline:
                    next_deadline = deadline
            if self._calls:
                oldest = next(iter(self._calls.values()))
                deadline = oldest[0] + self.request_timeout
                if deadline <= now:
                    hung = oldest
                elif deadline < next_deadline:
                    next_deadline = deadline
            self._main_wake_at = next_deadline
        for conn in expired:
            if conn.reqs or conn.fresh:
                self.log(
                    f"I/O timeout: the web server sent no complete request in "
                    f"{self.io_timeout:g} s; closing the connection"
                )
            _close(conn)
        if hung is not None:
            self._request_overrun(now, *hung)
        return None if next_deadline == float("inf") else next_deadline - now

    def _request_overrun(self, now: float, started: float, event: Params) -> None:
        """An app call overran request_timeout: say which one, then stop with the exit status
        that makes runtime.py end this process (the hung thread cannot be stopped otherwise)."""
        params = event.params  # decoded from the PARAMS block only now, off the hot path
        method = params.get(b"REQUEST_METHOD", b"").decode("latin-1") or "request"
        uri = params.get(b"REQUEST_URI")
        if uri is None:
            uri = params.get(b"SCRIPT_NAME", b"") + params.get(b"PATH_INFO", b"")
            query = params.get(b"QUERY_STRING")
            if query:
                uri += b"?" + query
        self.log(
            f"request timeout: {method} {uri.decode('latin-1')!s} has run for "
            f"{now - started:.1f} s (limit {self.request_timeout:g} s); ending this worker "
            f"with exit status {EXIT_REQUEST_TIMEOUT} so that a fresh one replaces it"
        )
        self._exit_code = EXIT_REQUEST_TIMEOUT
        self.stop(graceful=True)

    def _call_started(self, params: Params) -> int:
        """Register an app call for the request_timeout watchdog; wakes the coordinator only if
        its timer would otherwise fire too late (the first call after an idle spell)."""
        now = time.monotonic()
        with self._lock:
            key = self._call_seq = self._call_seq + 1
            self._calls[key] = (now, params)
            deadline = now + self.request_timeout
            wake = deadline < self._main_wake_at
            if wake:
                self._main_wake_at = deadline
        if wake:
            self._wake_main()
        return key

    def _call_ended(self, key: int) -> None:
        with self._lock:
            self._calls.pop(key, None)
            stopping = self._stopping
        if stopping:  # a drain after a request timeout waits for exactly this
            self._wake_main()

    def _shutdown(self, ctl: select.poll) -> int:
        """Stop accepting, close idle connections, drain in-flight work, release the threads."""
        graceful = self._graceful
        timed_out = self._exit_code == EXIT_REQUEST_TIMEOUT
        if timed_out:
            reason = "request timeout"
        elif self._max_reached():
            reason = "max-requests reached"
        else:
            reason = "stop requested"
        if reason != "stop requested" and self.on_retire is not None:
            try:
                self.on_retire()
            except Exception as exc:  # a notification must not stop the stop
                self.log(f"could not announce the stop: {exc!r}")
        self._accepting = False
        assert self._ep is not None
        with contextlib.suppress(OSError):
            self._ep.unregister(self._lfd)
        # On a graceful stop these stay parked for PENDING_DRAIN, and a request that comes on
        # one is served: a pending connection (accepted, its request not complete yet) is
        # being written by the web server right now, and closing would fail it (a 502 in the
        # middle of a reload); an idle one nginx keeps is in its keepalive cache, and under
        # load nginx sends its next request on it any moment: closing it now would meet that
        # request (a reset; a POST is not retried). Served during the stop, its response ends
        # with protocol.CLOSING_MARK, so nginx drops it rather than reusing it. Other web
        # servers' are kept the same way on TCP, where the last response's FIN leaves in its
        # segment (_fin_in_step; Apache checks a pooled connection for EOF before reusing it).
        # On a UNIX socket the FIN can only follow a last response, and Apache under load
        # reuses the connection in between, so those are closed now unless a request came on
        # one already (served): kept through the drain they measured no better (31-42 failed
        # requests in three reloads under load, against 12-20). A fast stop closes all now.
        idle: list[_Conn] = []
        with self._lock:
            self._stopping = True
            for fd, conn in list(self._watched.items()):
                if conn.idle and not (graceful and (conn.pending or _ends_cleanly(conn))):
                    del self._watched[fd]
                    self._unpark_locked(conn)
                    idle.append(conn)
        self._close_or_serve(idle)
        if self.release_listener:  # (after _stopping: a request ending wakes this thread)
            # Only in a final stop: in a reload or a recycle (this worker's own stop) the
            # replacements take the queue, and this one must not go on serving old code.
            if graceful and not timed_out and not self._max_reached() and self._retired():
                self._drain_backlog(ctl)
            _release_fd(self._lfd)
        # After a request timeout the hung call never ends: the others get what any request
        # may take (request_timeout) at most, so the replacement is not delayed needlessly.
        grace = self.graceful_timeout
        if timed_out:
            grace = min(grace, self.request_timeout)
        deadline = time.monotonic() + grace
        pending_until = time.monotonic() + min(PENDING_DRAIN, grace)
        if graceful:
            self.log(f"stopping ({reason}): finishing requests in progress")
            while True:
                with self._lock:
                    work = self._busy()
                    pending = self._pending_count + self._idle_count
                now = time.monotonic()
                if not self._graceful or (work == 0 and (not pending or now >= pending_until)):
                    break
                if timed_out:
                    with self._lock:
                        if len(self._calls) <= 1 and work <= 1:
                            break  # only the hung call is left
                left = deadline - now
                if left <= 0:
                    self.log(
                        f"graceful timeout ({grace:g} s) passed with "
                        f"{work} connection(s) still busy; leaving them"
                    )
                    break
                if work == 0:
                    left = min(left, pending_until - now)
                self._sleep(ctl, left)
        with self._lock:  # parked connections whose request never came
            leftover = [c for c in self._watched.values() if c.idle]
            for conn in leftover:
                del self._watched[conn.fd]
                self._unpark_locked(conn)
        # A request may have come on one since a pool thread last looked (nginx picks a kept
        # connection any moment): served, not reset. The rest are closed.
        if self._close_or_serve(leftover) and self._graceful:
            self._wait_idle(ctl, deadline)
        os.eventfd_write(self._stop_fd, 1)
        join_until = time.monotonic() + (1.0 if graceful else 0.0)
        for t in self._pool:
            t.join(max(0.0, join_until - time.monotonic()))
        return self._exit_code

    def _retired(self) -> bool:
        """Whether the socket is being retired (a final stop), as the supervisor says it: it
        removes the UNIX socket's file before it stops the workers. A TCP socket or an
        inherited one gives no such sign: False (its queued connections go to whoever holds
        it next, or are refused when the last copy goes)."""
        if self.listener.family != socket.AF_UNIX:
            return False
        try:
            path = self.listener.getsockname()
        except OSError:
            return False
        if not isinstance(path, str) or not path.startswith("/"):
            return False  # abstract or unnamed
        return not os.path.lexists(path)

    def _drain_backlog(self, ctl: select.poll) -> None:
        """Before this process gives up its copy of the listener, the connections already
        queued on it are served: when the last copy goes they would be reset (a web server's
        502: 28 of 32 under nginx load). The supervisor removed the socket file first (see
        _retired), so nothing new arrives; at most BACKLOG_DRAIN seconds. Taken ``threads``
        at a time, a round when this process is idle again: every stopping worker takes its
        share, none takes the whole queue."""
        accept = self.listener._accept  # type: ignore[attr-defined]
        until = time.monotonic() + min(BACKLOG_DRAIN, self.graceful_timeout)
        while True:
            for _ in range(self.threads):
                try:
                    fd, addr = accept()
                except OSError:  # EAGAIN: the queue is empty (or the listener is gone)
                    return
                with self._lock:
                    self._work += 1  # counted now: the drain must not end before it runs
                self._queue(functools.partial(self._serve_taken, fd, addr))
            if not self._wait_idle(ctl, until):
                return

    def _wait_idle(self, ctl: select.poll, until: float) -> bool:
        """Sleep until no connection or task is busy (True), or ``until`` passes (False)."""
        while True:
            with self._lock:
                if not self._busy():
                    return True
            left = until - time.monotonic()
            if left <= 0:
                return False
            self._sleep(ctl, left)

    def _serve_taken(self, fd: int, addr: Any) -> None:
        """A pool thread serves a connection _drain_backlog accepted, then uncounts it."""
        try:
            self._serve_new(fd, addr)
        finally:
            with self._lock:
                self._work -= 1
            self._wake_main()

    def _close_or_serve(self, conns: list[_Conn]) -> int:
        """Unparked connections, during a stop: one with a request waiting is served (by a
        pool thread, counted as work), the others closed. Returns how many are served."""
        served = 0
        for conn in conns:
            if self._graceful and _has_input(conn):
                with self._lock:
                    self._work += 1
                self._queue(functools.partial(self._pickup, conn))
                served += 1
            else:
                _close(conn)
        return served

    def _busy(self) -> int:
        """Connections owned by a thread + queued tasks (caller holds ``_lock``)."""
        work = self._work
        for cell in self._cells:
            work += cell[0]
        return work

    def _served_total(self) -> int:
        served = self._served
        for cell in self._cells:
            served += cell[1]
        return served

    def _max_reached(self) -> bool:
        return bool(self.max_requests) and self._served_total() >= self.max_requests

    # -- pool threads ---------------------------------------------------------------------------

    def _worker(self) -> None:
        """A pool thread: accept and serve inline; sleep in the shared epoll when idle."""
        signal.pthread_sigmask(signal.SIG_BLOCK, _ASYNC_SIGNALS)
        ep = self._ep
        assert ep is not None
        poll = ep.poll
        accept = self.listener._accept  # type: ignore[attr-defined]
        lfd, stop_fd, task_fd = self._lfd, self._stop_fd, self._task_fd
        tasks = self._tasks
        serve_new = self._serve_new
        batch = EVENTS_ONE_THREAD if self.threads == 1 else 1
        cell = [0, 0]  # this thread's counts (see Server._work)
        self._cells.append(cell)
        # Try accept() before sleeping only while the last try found a connection (or the
        # thread just took one from the listener): under load that skips epoll entirely; with
        # kept-alive connections (no new ones to accept) it saves a failing accept + exception
        # per request. A new connection always wakes a sleeper through the armed listener.
        try_accept = True
        # Accepts in a row without a look at the epoll. Under load accept() never says EAGAIN,
        # so a parked connection that became readable (a kept-open one with its next request,
        # a new one whose request came late) would wait for the backlog to run dry: while any
        # is parked, every FAIR_ACCEPTS-th turn looks at the epoll first, without sleeping.
        streak = 0
        while True:
            if tasks:
                try:
                    task = tasks.popleft()
                except IndexError:
                    pass
                else:
                    self._guard(task)
                    continue
            timeout = -1
            if try_accept and self._accepting:
                if streak < FAIR_ACCEPTS or not (self._pending_count or self._idle_count):
                    streak += 1
                    try:
                        fd, addr = accept()
                    except BlockingIOError:
                        try_accept = False
                    except OSError as exc:
                        # Retry through the epoll: the listener's one-shot event lets exactly
                        # one thread at a time back off and retry (see _accept_failed).
                        try_accept = False
                        self._accept_failed(exc)
                    else:
                        if self._accept_down_since is not None:
                            self._accept_recovered()
                        try:
                            serve_new(fd, addr, cell)
                        except BaseException as exc:
                            self._internal_error(exc)
                        continue
                else:
                    timeout = 0
            streak = 0
            try:
                events = poll(timeout, batch)
            except OSError as exc:  # EBADF at teardown after an abandoned drain
                if exc.errno == errno.EBADF:
                    return
                raise
            for fd, _ in events:
                if fd == lfd:
                    got = None
                    if self._accepting:
                        try:
                            got = accept()
                        except BlockingIOError:
                            pass
                        except OSError as exc:
                            self._accept_failed(exc)
                        # Re-arm only after accept(): a second pending connection then wakes
                        # the next sleeper instead of this thread racing a woken twin.
                        with contextlib.suppress(OSError):
                            ep.modify(lfd, _EP_IN)
                    if got is not None:
                        try_accept = True
                        if self._accept_down_since is not None:
                            self._accept_recovered()
                        try:
                            serve_new(got[0], got[1], cell)
                        except BaseException as exc:
                            self._internal_error(exc)
                elif fd == stop_fd:
                    return
                elif fd == task_fd:
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(task_fd)
                    # EFD_SEMAPHORE: re-arming with the counter still > 0 wakes the next thread
                    # for the next queued task.
                    with contextlib.suppress(OSError):
                        ep.modify(task_fd, _EP_IN)
                else:
                    with self._lock:
                        conn = self._watched.pop(fd, None)
                        idle = conn is not None and conn.idle
                        if conn is not None:
                            if idle:
                                conn.idle = False
                                self._unpark_locked(conn)
                                self._work += 1
                            else:
                                # Counted as a user while still under _lock: _leave_shared
                                # decides "last one out" under the same lock, so it can never
                                # release (park or close) a connection this thread now reads.
                                with conn.lock:
                                    conn.users += 1
                    if conn is None:
                        continue
                    try:
                        if idle:
                            self._pickup(conn)
                        else:
                            self._shared_event(conn)
                    except BaseException as exc:
                        self._internal_error(exc)

    def _internal_error(self, exc: BaseException) -> None:
        self.log("internal error in the responder:\n" + "".join(traceback.format_exception(exc)))

    def _guard(self, fn: Callable[[], None]) -> None:
        """Run one unit of work; a bug in it is logged, never kills the pool thread."""
        try:
            fn()
        except BaseException as exc:  # SystemExit from an app's close() etc. must not kill us
            self._internal_error(exc)

    def _accept_failed(self, exc: OSError) -> None:
        """EMFILE/ENFILE/ENOBUFS/ENOMEM: back off instead of spinning on the listener.

        The pending connection stays in the backlog and the listener stays readable, so an
        immediate retry would spin. The thread that got the listener's event sleeps
        ACCEPT_BACKOFF before re-arming it (the caller re-arms after we return): one thread
        retries at a time, ten times a second, while the others keep serving parked and
        running connections -- which is what frees fds. Logged when the outage starts and
        then once per ACCEPT_LOG_EVERY, not per retry.
        """
        if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EINTR, errno.EPERM):
            return  # that one connection is gone (or refused by a firewall): nothing to wait for
        if not self._accepting:
            return  # stopping: the listener may already be released (_release_fd)
        now = time.monotonic()
        with self._lock:
            self._accept_failures += 1
            if self._accept_down_since is None:
                self._accept_down_since = now
            # Rate-limited across outages too: fds hovering at the limit make accept() flap.
            due = now - self._accept_logged_at >= ACCEPT_LOG_EVERY or not self._accept_logged_at
            if due:
                self._accept_logged_at = now
            failures = self._accept_failures
        if due:
            what = (
                "out of file descriptors"
                if exc.errno in (errno.EMFILE, errno.ENFILE)
                else "out of resources"
            )
            hint = ""
            if exc.errno == errno.EMFILE:
                soft, _hard = _nofile_limit()
                hint = f" (RLIMIT_NOFILE {soft})"
            self.log(
                f"accept() failed: {exc.strerror or exc}{hint}: {what}; retrying every "
                f"{ACCEPT_BACKOFF:g} s ({failures} failure(s) so far), new connections wait "
                "in the listen backlog"
            )
        # Unknown errors back off too: a persistent one must not become a busy loop.
        time.sleep(ACCEPT_BACKOFF)

    def _accept_recovered(self) -> None:
        """accept() worked after failing: log it, unless the outage was a blip shorter than
        one backoff (then its failures are reported with the next real recovery)."""
        now = time.monotonic()
        with self._lock:
            since = self._accept_down_since
            failures = self._accept_failures
            self._accept_down_since = None
            if since is None or now - since < ACCEPT_BACKOFF:
                return
            self._accept_failures = 0
        if since is not None:
            self.log(
                f"accept() works again after {time.monotonic() - since:.2f} s "
                f"({failures} failed attempt(s))"
            )

    def _queue(self, task: Callable[[], None]) -> None:
        self._tasks.append(task)
        os.eventfd_write(self._task_fd, 1)

    def _release(self, conn: _Conn) -> None:
        """Nobody works on ``conn`` any more: close it, or park it until its next request."""
        nserved = conn.served
        conn.served = 0
        close = conn.dead or conn.proto.should_close or conn.stdin_incomplete
        wake_main = False
        evicted: _Conn | None = None
        work = 1
        with self._lock:
            self._work -= 1
            self._served += nserved
            stopping = self._stopping
            if stopping:
                work = self._busy()
            pending = False
            if not close:  # (a connection the web server lets us close skips all of this)
                pending = bool(conn.reqs) or conn.fresh
                if pending:
                    if self._pending_count >= MAX_PENDING_CONNS:
                        # A flood of silent connections must not lock new peers out: the
                        # oldest pending one makes room (a web server's request arrives within
                        # microseconds of its connect, so only silent peers grow old here).
                        evicted = self._evict_pending_locked()
                        close = evicted is None
                elif (stopping and not _ends_cleanly(conn)) or self._idle_count >= MAX_IDLE_CONNS:
                    close = True
                # Stopping, nginx's (and any on TCP): parked all the same. Its last response
                # went out before the stop (one after it made it dead, closed above), and the
                # web server may be sending the next request on it right now, which the drain
                # serves (_shutdown). Other web servers' UNIX ones are closed now (_shutdown).
            if not close:
                conn.idle = True
                # A connection owing (the rest of) a request gets io_timeout, a kept-open one
                # between requests idle_timeout. The deadline moves only when a record was
                # completed since the last park: bytes that complete nothing (a slowloris
                # trickle) do not buy time.
                if conn.progress or not conn.deadline:
                    limit = self.io_timeout if pending else self.idle_timeout
                    conn.deadline = time.monotonic() + limit
                    conn.progress = False
                conn.pending = pending
                if pending:
                    self._pending_count += 1
                else:
                    self._idle_count += 1
                if self._watch_locked(conn):
                    if conn.deadline < self._main_wake_at:
                        self._main_wake_at = conn.deadline
                        wake_main = True
                else:
                    close = True
            max_hit = bool(self.max_requests) and self._max_hit_locked()
            if close and conn.registered and self._watched.get(conn.fd) is conn:
                del self._watched[conn.fd]  # armed while shared; the close unregisters it
        if evicted is not None:
            _close(evicted)
        if close:
            _close(conn)
        elif wake_main:  # the coordinator sleeps without a deadline: give it this one
            self._wake_main()
        if max_hit or stopping:
            self._after_release(max_hit, stopping, work)

    def _done(self, nserved: int, *, counted: bool = False) -> None:
        """_release for a connection that was closed already (see _serve_whole); ``counted``:
        the caller took it off the counts itself, only the checks are left."""
        work = 1
        with self._lock:
            if not counted:
                self._work -= 1
                self._served += nserved
            stopping = self._stopping
            if not stopping and not self.max_requests:
                return  # nothing waits on this count: the common case, one lock section
            if stopping:
                work = self._busy()
            max_hit = self._max_hit_locked()
        self._after_release(max_hit, stopping, work)

    def _max_hit_locked(self) -> bool:
        """Whether --max-requests is reached (caller holds ``_lock``): then stop taking
        connections now, not when the coordinator gets the GIL -- the pool threads would
        otherwise accept (and serve) well past the limit."""
        max_hit = bool(self.max_requests) and self._served_total() >= self.max_requests
        if max_hit and self._accepting:
            self._accepting = False
            if self._ep is not None:
                with contextlib.suppress(OSError):
                    self._ep.unregister(self._lfd)
        return max_hit

    def _after_release(self, max_hit: bool, stopping: bool, work: int) -> None:
        if max_hit and not self._stop_requested:
            self.stop(graceful=True)
        if stopping and (work == 0 or self._exit_code):
            self._wake_main()

    def _unpark_locked(self, conn: _Conn) -> None:
        """Count a parked connection out of its pool (caller holds ``_lock``)."""
        if conn.pending:
            self._pending_count -= 1
        else:
            self._idle_count -= 1

    def _evict_pending_locked(self) -> _Conn | None:
        """Unpark the pending connection parked longest (caller holds ``_lock``)."""
        victim: _Conn | None = None
        for c in self._watched.values():
            if c.idle and c.pending and (victim is None or c.deadline < victim.deadline):
                victim = c
        if victim is not None:
            del self._watched[victim.fd]
            victim.idle = False
            self._unpark_locked(victim)
        return victim

    def _watch(self, conn: _Conn) -> None:
        with self._lock:
            self._watch_locked(conn)

    def _watch_locked(self, conn: _Conn) -> bool:
        """Arm ``conn`` in the shared epoll for one readiness event (caller holds ``_lock``).

        Under the lock so that the reaper, which pops from ``_watched`` under the same lock and
        closes afterwards, can never close the fd between our bookkeeping and the epoll_ctl
        (a reused fd number would otherwise be registered on behalf of a dead connection).
        """
        ep = self._ep
        assert ep is not None
        if conn.dead:
            return False
        try:
            if conn.registered:
                ep.modify(conn.fd, _EP_IN)
            else:
                ep.register(conn.fd, _EP_IN)
                conn.registered = True
        except OSError as exc:  # cannot happen short of a bug: do not lose it silently
            self.log(f"epoll registration of a connection failed: {exc}")
            conn.dead = True
            if conn.idle:
                conn.idle = False
                self._unpark_locked(conn)
            return False
        self._watched[conn.fd] = conn
        return True

    # -- serving a connection -------------------------------------------------------------------

    def _serve_new(self, fd: int, addr: Any, cell: list[int] | None = None) -> None:
        """A freshly accepted connection: filter the peer, then read and serve inline.

        ``cell``: the calling pool thread's own counters (see ``_work``); without them (a
        caller outside the pool) the connection is counted under the lock."""
        if self.allowed is not None and self._tcp and addr[0] not in self.allowed:
            os.close(fd)
            return
        if cell is not None:
            cell[0] += 1  # this thread is the cell's only writer
        else:
            with self._lock:
                self._work += 1
        # Non-blocking: under load the request is already there (one read); a peer that
        # connected but has not written yet gets FIRST_WAIT, then it is parked by _leave.
        data = None
        if _nowait:
            data = self._first_read(fd, cell)
            if data is None:
                data = self._wait_first(fd, cell)
        if data is _WHOLE:
            return
        conn = _Conn(fd, self.limits, self._family)
        try:
            if data is not None:
                self._feed(conn, data)
                self._drive(conn)
            elif not _nowait and self._read(conn, wait=False):
                self._drive(conn)
        finally:
            self._leave(conn)

    def _wait_first(self, fd: int, cell: list[int] | None) -> Buffer | None:
        """A new connection had nothing to read: wait FIRST_WAIT for its first bytes, then read
        as _first_read does (None: still nothing, the caller parks it). A wait that runs out
        turns waiting off for FIRST_WAIT_BACKOFF (one clock read per wait; the flag is a plain
        float shared by the pool threads: a lost update only costs one extra wait)."""
        now = time.monotonic()
        if now < self._first_wait_off_until:
            return None
        if _wait_fd(fd, _POLLIN, FIRST_WAIT):
            return self._first_read(fd, cell)
        self._first_wait_off_until = now + FIRST_WAIT_BACKOFF
        return None

    def _first_read(
        self, fd: int, cell: list[int] | None, conn: _Conn | None = None
    ) -> Buffer | None:
        """The first read of a request (RWF_NOWAIT): None if nothing is there yet, _WHOLE if it
        was one whole request, answered (_serve_whole; ``cell`` as there), else the bytes
        (``b""`` at EOF), a view of this thread's buffer for the caller to feed. ``conn``: the
        connection's _Conn if it has one (a parked one picked up); unless it is still fresh,
        this is its next request and it stays open (``kept`` in _serve_whole). A new
        connection's whole request that asks for FCGI_KEEP_CONN is answered too, and the
        connection (``conn``, or a new _Conn) is then released (parked for its next request)
        here: after _WHOLE the caller has nothing left to do with it."""
        kept = conn if conn is not None and not conn.fresh else None
        bufs: list[mmap.mmap]
        view: memoryview
        body: list[bytes]
        try:  # _read_buffer() inlined: this runs for every connection
            bufs, view, body = _tls.read
        except AttributeError:
            bufs, view, body = _read_buffer()
        try:
            n = os.preadv(fd, bufs, -1, _RWF_NOWAIT)
        except BlockingIOError:
            return None
        except OSError:
            return b""
        data = view[:n]
        # The kept connection of a web server that multiplexes takes the connection path,
        # where it is read while its request runs (see _drive).
        if (
            kept is not None
            and self._mpx
            # (_multiplexed's checks, the common case inline: a call costs 0.6 % a request)
            and (self._mpx_seen or kept.mpx or n < 4 or data[3] != 1 or data[2])
            and self._multiplexed(kept, data)
        ):
            return data
        whole = whole_responder_request(data, self.limits, body, kept is not None) if n else None
        if whole is None:
            if kept is not None or not asks_keep_conn(data):
                return data
            if self._mpx and self._multiplexed(conn, data):
                return data
            # The first request of a connection the web server keeps open (nginx with
            # fastcgi_keep_conn on, whose upstream keepalive pool opens new connections under
            # load): answered the same way, then the connection waits for its next request.
            whole = whole_responder_request(data, self.limits, body, True)
            if whole is None:
                return data
            kept = conn if conn is not None else _Conn(fd, self.limits, self._family)
            kept.fresh = False
            try:
                self._serve_whole(fd, whole, cell, body, kept)
            finally:
                self._leave(kept)
            return _WHOLE
        self._serve_whole(fd, whole, cell, body, kept)
        return _WHOLE

    def _serve_whole(
        self,
        fd: int,
        params: Params,
        cell: list[int] | None,
        body: list[bytes],
        kept: _Conn | None = None,
    ) -> None:
        """Answer the one request of a connection that carries nothing else, then close it:
        the same environ, app call and bytes as _run + _end, without the connection state.
        ``cell``: the counters of the pool thread that accepted the connection and counted it
        there (None: it was counted in ``_work``, as a parked one picked up). ``body``: the
        request body's chunks, all of which came with it (taken out of the list). ``kept``: the
        connection was kept open by the web server and stays so (FCGI_KEEP_CONN again): the
        response goes out the same way, and the caller counts it and parks the connection."""
        out = _Whole(self, fd, params.request_id, kept is None)
        status = 1
        environ: dict[str, Any] | None = None
        try:
            environ = build_environ_latin1(
                params.take_latin1(),
                _body_input(body) if body else _NO_BODY,
                ErrorStream(out.send_stderr, self.log),
                self.multithread,
                self.multiprocess,
            )
            if self.request_timeout:
                status = self._call(out, environ, params)
            else:  # _call without the watchdog, inlined
                status = run_app(self.app, environ, out.send, self.log, out)
        except BaseException as exc:
            self._app_escaped(exc)
            out.aborted = True
        if out.cut:
            out.cut = self._breaks_off(
                self._family,
                kept is not None,
                kept is not None and kept.mpx,
                kept is None and _marks_understood(environ),
            )
        last = False
        if kept is not None:
            if kept.markable is None:
                kept.markable = _marks_understood(environ)
            # Stopping: the connection is closed after this response (see _last_on).
            last = self._last_due()
            if last:
                out.closing = bool(kept.markable)
                _fin_in_step(kept)
        out.finish(status)
        if kept is not None:
            kept.served += 1
            kept.progress = True  # a request completed: a new idle deadline when parked
            if last:
                self._last_on(kept)
            elif out.aborted:
                self._kill(kept)  # closed by the caller's _leave, never parked again
            return
        if cell is None:
            self._done(1)
            return
        cell[0] -= 1
        cell[1] += 1
        # Counted before the flags are read: a stop that set _stopping earlier is seen here;
        # one that sets it later reads these counts under its lock (_busy). --max-requests is
        # looked at without the lock first (~1.5 us a request under it): the thread whose
        # request reaches the limit sees its own count, and a count another thread adds later
        # under the lock is checked by that thread (_release, _done).
        if self._stopping or (self.max_requests and self._max_reached()):
            self._done(0, counted=True)

    def _pickup(self, conn: _Conn) -> None:
        """A parked connection became readable: read without blocking, then serve inline.

        Non-blocking first: the event may be stale (the fd was reaped and reused) or spurious.
        """
        conn.users = 1
        conn.shared = False
        if (
            _nowait
            and conn._sock is None
            and not conn.proto.mid_record
            and (conn.fresh or not conn.reqs)
        ):
            # A web server that connected before writing (nginx does, often), or the next
            # request on a connection it keeps open (fastcgi_keep_conn): either may be a whole
            # one. Not after part of a record (those bytes belong to what comes now), and no
            # socket object may hold the fd that _serve_whole closes.
            fresh = conn.fresh
            data = self._first_read(conn.fd, None, conn)
            if data is _WHOLE and fresh:
                return  # answered and closed (or released, see _first_read) and counted
            try:
                if data is not None and data is not _WHOLE:
                    self._feed(conn, data)
                    self._drive(conn)
            finally:
                self._leave(conn)
            return
        try:
            if self._read(conn, wait=False):
                self._drive(conn)
        finally:
            self._leave(conn)

    def _read(self, conn: _Conn, *, wait: bool, answer: bool = True) -> bool:
        """Read once (the caller holds the read token or owns the connection) and dispatch.

        ``wait``: a running request needs this input, so wait for it (at most io_timeout,
        then the connection is closed and logged). Otherwise returns False at once if nothing
        is there. EOF, errors and protocol violations mark the connection dead and abort its
        requests.

        The first wait switches the connection to blocking reads bounded by SO_RCVTIMEO
        (_blocking_reads), used only by reads that wait: a body that trickles in (nginx
        passes an upload on in 8 KiB records as it comes) then costs one read per wake-up
        instead of a failing read, a BlockingIOError, a poll and the read again.
        """
        try:
            data = conn.recv_wait() if wait and conn.rblocking else conn.recv()
        except BlockingIOError:
            if not wait:
                return False
            if conn.rblocking:  # SO_RCVTIMEO ran out with nothing read
                return self._input_timeout(conn)
            if _nowait and _blocking_reads(conn.fd, self.io_timeout):
                conn.rblocking = True
                try:
                    data = conn.recv_wait()
                except BlockingIOError:
                    return self._input_timeout(conn)
                except OSError:
                    data = b""
            elif not _wait_fd(conn.fd, _POLLIN, self.io_timeout):
                return self._input_timeout(conn)
            else:
                try:
                    data = conn.recv()
                except BlockingIOError:  # spurious wakeup: the caller asks again
                    return True
                except OSError:
                    data = b""
        except OSError:
            data = b""
        self._feed(conn, data, answer=answer)
        return True

    def _input_timeout(self, conn: _Conn) -> bool:
        self.log(
            f"I/O timeout: the web server sent no request input for {self.io_timeout:g} s; "
            "closing the connection"
        )
        self._kill(conn)
        return True

    def _feed(self, conn: _Conn, data: Buffer, *, answer: bool = True) -> None:
        """Parse what was read (``b""``: EOF), answer what the protocol answers by itself, and
        dispatch the events; EOF and protocol violations mark the connection dead. ``answer``
        False (a read in the middle of a response write, see _Req.drainer): the protocol's
        own answers wait in it for the next read's."""
        if not data:
            self._kill(conn)
            return
        proto = conn.proto
        try:
            if conn.shared:
                with conn.lock:
                    events = proto.receive(data)
                    out = proto.pending_output()
            else:
                events = proto.receive(data)
                out = proto.pending_output() if answer else b""
        except ProtocolError as exc:
            self.log(f"FastCGI protocol error from the web server: {exc}; closing the connection")
            self._kill(conn)
            return
        if out:
            conn.progress = True
            conn.mpx = True  # management records or refused requests: see _multiplexed
            try:
                conn.write([out], self.io_timeout)
            except OSError:
                self._kill(conn)
                return
        if events:
            conn.progress = True
            conn.fresh = False
            self._dispatch(conn, events)

    def _dispatch(self, conn: _Conn, events: list[Any]) -> None:
        """Route events to their requests; requests whose PARAMS are complete become runnable."""
        reqs = conn.reqs
        for ev in events:
            t = type(ev)
            if t is Stdin:
                req = reqs.get(ev.request_id)
                if req is None:
                    continue
                if not ev.data:
                    req.stdin_done = True
                elif not req.discarding:
                    self._enqueue(conn, req, req.queue_for(False), ev.data)
            elif t is BeginRequest:
                reqs[ev.request_id] = _Req(self, conn, ev.request_id, ev.role, ev.keep_conn)
                if ev.request_id != 1:
                    self._mpx_seen = True  # see _multiplexed
            elif t is Params:
                req = reqs.get(ev.request_id)
                if req is not None:
                    req.params = ev
                    conn.runnable.append(req)
            elif t is Data:
                req = reqs.get(ev.request_id)
                if req is None:
                    continue
                if ev.data:
                    self._enqueue(conn, req, req.queue_for(True), ev.data)
                else:
                    req.data_done = True
            elif t is AbortRequest:
                req = reqs.get(ev.request_id)
                if req is not None:
                    req.aborted = True
                    req.chunks.clear()
                    req.data_chunks.clear()
                    if req.params is None:
                        # Not started yet: answer at once (spec §5.4), nothing to stop.
                        del reqs[req.rid]
                        self._end(conn, req, 0)
        if conn.shared:
            with conn.cond:
                conn.cond.notify_all()

    def _enqueue(
        self, conn: _Conn, req: _Req, queue: collections.deque[bytes], data: bytes
    ) -> None:
        """Queue input for ``req``; for multiplexed requests wait while its queue is full."""
        if conn.shared:
            with conn.cond:
                if req.queued + len(data) > STDIN_QUEUE_BYTES and req.queued:
                    ok = conn.cond.wait_for(
                        lambda: (
                            req.queued + len(data) <= STDIN_QUEUE_BYTES
                            or req.aborted
                            or req.rid not in conn.reqs
                        ),
                        STDIN_QUEUE_WAIT,
                    )
                    if not ok:
                        self.log(
                            f"request {req.rid}: its input was not read for "
                            f"{STDIN_QUEUE_WAIT:g} s while other requests on the same connection "
                            "needed the connection; aborting it"
                        )
                        req.aborted = True
                        req.chunks.clear()
                        req.data_chunks.clear()
                if req.aborted:
                    return
                req.queued += len(data)
                queue.append(data)
        else:
            req.queued += len(data)
            queue.append(data)

    def _drive(self, conn: _Conn) -> None:
        """Owner loop: run requests as they become runnable; return when the connection is
        done (dead / to be closed) or has nothing to do right now (to be parked)."""
        runnable = conn.runnable
        while not conn.dead:
            if runnable:
                req = runnable.pop(0)
                if runnable:  # multiplexed: other threads take the rest
                    self._hand_off(conn)
                elif (
                    req.keep_conn
                    and self._mpx
                    and (conn.mpx or self._mpx_seen)
                    and not conn.shared
                ):
                    # A web server that multiplexes (HAProxy with mpxs-conns) sends its next
                    # request, a GET_VALUES or an ABORT_REQUEST while this one runs, and
                    # nothing else would read the socket until the app read input or returned
                    # (a /hello sent 1 ms after a 2 s request took 2 s). Shared with no task
                    # yet: an epoll-woken thread reads what comes and hands off what is runnable.
                    self._hand_off(conn)
                self._run(req)
                if conn.shared:
                    return  # other actors exist: _leave() arms the connection for them
                continue
            if conn.reqs:
                if conn.shared:
                    return
                # A request was begun but its PARAMS are incomplete: read what is there; if
                # nothing is, park (io_timeout) rather than hold a thread for a slow peer.
                if not self._read(conn, wait=False):
                    return
                continue
            return

    def _hand_off(self, conn: _Conn) -> None:
        """Give every queued runnable request (if any) to another pool thread (the connection
        becomes shared: locks on, and the epoll watches it for input nobody is waiting for)."""
        runnable = conn.runnable
        conn.share()
        reqs: list[_Req] = []
        with conn.lock:
            conn.shared = True
            # pop(0) one by one: a reader may append concurrently (it does not take the lock
            # to append), and clear() after a copy could drop what it appended in between.
            while runnable:
                reqs.append(runnable.pop(0))
            conn.users += len(reqs)
        for req in reqs:
            self._queue(functools.partial(self._run_task, req))
        self._watch(conn)

    def _multiplexed(self, conn: _Conn | None, data: Buffer) -> bool:
        """Whether a kept connection (``conn``, or a new one whose first request asks for
        FCGI_KEEP_CONN) belongs to a web server that multiplexes, judging by what it sent so
        far and by ``data``, the start of what it sends now. Only those take the connection
        path, and are read while their request runs: nginx's kept connections stay on the
        whole-request path, which costs 27 us a request where the other costs 42 (nginx
        keepalive, --threads 2). A web server that multiplexes from its very first request
        with id 1 and without GET_VALUES is seen at its second request. HAProxy
        (mpxs-conns) asks GET_VALUES on every connection with get-values (conn.mpx) and
        numbers its requests 1, 3, 5, ... (_mpx_seen); nginx, Apache, lighttpd, Caddy and h2o
        never ask and always use request id 1."""
        if self._mpx_seen or (conn is not None and conn.mpx):
            return True
        rid = (data[2] << 8 | data[3]) if len(data) >= 4 else 1
        if rid == 1:
            return False
        if rid:
            self._mpx_seen = True
        elif conn is not None:
            conn.mpx = True  # a management record first (GET_VALUES)
        return True

    def _run_task(self, req: _Req) -> None:
        try:
            self._run(req)
        finally:
            self._leave_shared(req.conn, arm=True)

    def _leave(self, conn: _Conn) -> None:
        """The owner (accepting or picking-up thread) is done with ``conn``."""
        if conn.shared:
            self._leave_shared(conn, arm=True)
        else:
            self._release(conn)

    def _leave_shared(self, conn: _Conn, *, arm: bool) -> None:
        """One actor is done with a shared connection. The last one out releases it (park or
        close) unless a request is still arriving; otherwise the epoll watches it, so input
        for requests whose thread is not reading (and new BEGIN_REQUESTs) gets read."""
        # Everything under the lock epoll wakers pop under (see _worker). Two races made two
        # threads read one socket (records parsed out of order, "unsupported FastCGI version"):
        # a waker picking the connection up as shared after the last user released it, and a
        # non-last leaver arming it after the last one had parked it and a third thread had
        # picked it up as its sole owner.
        with self._lock:
            with conn.lock:
                conn.users -= 1
                last = conn.users == 0
            if last:
                if self._watched.get(conn.fd) is conn:
                    del self._watched[conn.fd]
            elif arm and not conn.dead:
                self._watch_locked(conn)
        if last:
            # Nobody works on it: requests still in conn.reqs have incomplete PARAMS (a
            # runnable one would hold a user), so it parks with io_timeout like any other
            # connection owing a request, and whoever picks it up reads it as sole owner.
            self._release(conn)

    def _shared_event(self, conn: _Conn) -> None:
        """An epoll-woken thread reads a shared connection (its requests run elsewhere)."""
        got = conn.rlock.acquire(blocking=False)
        try:
            if got:
                try:
                    self._read(conn, wait=False)
                finally:
                    conn.rlock.release()
                if conn.runnable:
                    self._hand_off(conn)
        finally:
            # Failing to get the read token means its holder is reading right now and arms
            # the connection when it lets go; arming here too would spin on unread data.
            self._leave_shared(conn, arm=got)

    def _await_input(self, conn: _Conn, req: _Req) -> bool:
        """Block until ``req`` has input (or its end) queued; False if the connection died.

        Owner of an unshared connection: just read the socket. Shared: take the read token if
        free and read (dispatching what belongs to others), else wait for the holder.
        """
        if conn.dead:
            return False
        if not conn.shared:
            self._read(conn, wait=True)
            if conn.runnable:  # a second request arrived while this one runs
                self._hand_off(conn)
            return not conn.dead
        if conn.rlock.acquire(blocking=False):
            try:
                self._read(conn, wait=True)
            finally:
                conn.rlock.release()
            if conn.runnable:
                self._hand_off(conn)
            with conn.cond:
                conn.cond.notify_all()
            self._watch(conn)
            return not conn.dead
        with conn.cond:
            conn.cond.wait_for(
                lambda: (
                    bool(req.chunks or req.data_chunks)
                    or req.stdin_done
                    or req.aborted
                    or conn.dead
                    or not conn.rlock.locked()
                ),
                1.0,
            )
        return not conn.dead

    def _kill(self, conn: _Conn) -> None:
        """The connection is unusable: abort its requests and wake anyone waiting on it."""
        conn.dead = True
        for req in list(conn.reqs.values()):
            req.aborted = True
        if conn.shared:
            with conn.cond:
                conn.cond.notify_all()
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)

    # -- running one request ----------------------------------------------------------------

    def _run(self, req: _Req) -> None:
        """Run the app for ``req`` and end the request (one sendmsg for a small list response)."""
        conn = req.conn
        params = req.params
        assert params is not None
        status = 1
        environ: dict[str, Any] | None = None
        if not req.aborted:
            try:
                environ = build_environ_latin1(
                    params.take_latin1(),
                    input=InputStream(req.read_stdin),
                    errors=ErrorStream(req.send_stderr, self.log),
                    multithread=self.multithread,
                    multiprocess=self.multiprocess,
                )
                if req.role is not _RESPONDER:
                    environ["fcgi.role"] = _ROLE_NAMES[req.role]
                    if req.role is _FILTER:
                        environ["fcgi.data"] = InputStream(req.read_data)
                status = self._call(req, environ, params)
            except BaseException as exc:
                self._app_escaped(exc)
                self._kill(conn)
        if not req.stdin_done and not conn.dead:
            if req.keep_conn:
                # The web server goes on sending this request's STDIN, or stops after its
                # ABORT_REQUEST; records for an ended request are ignored (spec §3.3), so the
                # connection stays usable. (Closing it after an abort lost the requests HAProxy
                # had multiplexed onto it meanwhile.)
                pass
            else:
                conn.stdin_incomplete = True
        if conn.shared:
            with conn.lock:
                conn.reqs.pop(req.rid, None)
        else:
            conn.reqs.pop(req.rid, None)
        if conn.markable is None and environ is not None:
            conn.markable = _marks_understood(environ)
        self._end(conn, req, status)

    def _call(self, out: _Output, environ: dict[str, Any], params: Params) -> int:
        """run_app for one request, registered with the request_timeout watchdog if any."""
        if not self.request_timeout:
            return run_app(self.app, environ, out.send, self.log, out)
        key = self._call_started(params)
        try:
            return run_app(self.app, environ, out.send, self.log, out)
        finally:
            self._call_ended(key)

    def _app_escaped(self, exc: BaseException) -> None:
        # run_app handles Exception itself; what gets here is SystemExit (an app calling
        # sys.exit()) or a bug. The response state is unknown: the caller drops the connection
        # (the web server reports a bad gateway) and keeps serving.
        self.log(
            "the WSGI application raised "
            f"{type(exc).__name__}; closing the connection:\n"
            + "".join(traceback.format_exception(exc))
        )

    def _end(self, conn: _Conn, req: _Req, status: int) -> None:
        """Send what is pending plus END_REQUEST; a dead connection just counts the request.
        A response cut short (see wsgi.Batching) gets what is pending and no END_REQUEST: the
        connection is closed, unless other requests share it or its web server multiplexes
        (then only its app status says so)."""
        if conn.shared:
            with conn.lock:
                conn.served += 1
        else:
            conn.served += 1
        if (
            req.cut
            and not conn.dead
            and not conn.reqs
            and self._breaks_off(conn.family, req.keep_conn, conn.mpx, conn.markable)
        ):
            if req.pending:
                rest = conn.frame(req.rid, b"".join(req.pending), stderr=False)
                with contextlib.suppress(OSError):
                    conn.write(rest, self.io_timeout)
            _break_off(conn.fd, conn.family)
            self._kill(conn)
        if conn.dead:
            with contextlib.suppress(ValueError):
                if conn.shared:
                    with conn.lock:
                        conn.proto.end_request(req.rid, status)
                else:
                    conn.proto.end_request(req.rid, status)
            return
        proto = conn.proto
        try:
            if conn.shared:
                with conn.lock:
                    out = (
                        proto.respond(req.rid, req.pending, status)
                        if req.pending
                        else proto.end_request(req.rid, status)
                    )
            else:
                out = (
                    proto.respond(req.rid, req.pending, status)
                    if req.pending
                    else proto.end_request(req.rid, status)
                )
        except ValueError:
            return
        unsent = bool(req.pending)
        req.pending = []
        closing = req.keep_conn and not conn.reqs and self._last_due()
        if closing:
            if conn.markable:  # stopping: tell nginx not to reuse it (CLOSING_MARK)
                out.append(CLOSING_MARK)
            else:
                _fin_in_step(conn)
        try:
            conn.write(out, self.io_timeout, req.drainer())  # type: ignore[arg-type]
        except OSError as exc:
            self._kill(conn)
            if unsent:
                self._unsent(exc)
        if closing:
            self._last_on(conn)

    def _breaks_off(self, family: int, keep_conn: bool, mpx: bool, nginx: bool | None) -> bool:
        """Whether a response cut short (see wsgi.Batching) ends with its connection broken
        off (_break_off), the one signal web servers pass on to the client, rather than with
        END_REQUEST and app status 1. Not on a kept connection of a web server that
        multiplexes (``mpx``: it asked GET_VALUES; or any seen, see _multiplexed): it may have
        sent its next request already, unread while every thread was busy, and a close lost
        it. Not for nginx without fastcgi_keep_conn over a UNIX socket (no reset exists there):
        it takes a close for the end of the response, but at END_REQUEST it checks the body
        against the Content-Length; given a close, its client waited for the rest of a short
        body until it timed out."""
        if keep_conn:
            return not (mpx or self._mpx_seen)
        return not (family == socket.AF_UNIX and nginx)

    def _unsent(self, exc: OSError) -> None:
        """The end of a response, with some of its body, could not be written: say so (as
        run_app does for what the app's own sends hit), or a web server's timeout would leave
        no trace here at all. Not when only END_REQUEST was left: lighttpd (and nginx for a
        HEAD) close the connection once they have the whole body, which is no failure (that
        logged 23,000 lines in 10 s of lighttpd load)."""
        self.log(
            "the web server closed the connection before the response was complete (it timed "
            f"out, or its client went away): {exc!r}"
        )

    def _last_due(self) -> bool:
        """Whether the response a kept connection is about to get is its last (then _last_on):
        a stop was asked for, or this is the request that reaches --max-requests. The stop
        that follows that one would close the connection only after the web server may have
        sent its next request on it. With more threads it is a guess (two may each take theirs
        for the last), which at worst closes a kept connection early."""
        if self._stop_requested:
            return True
        return bool(self.max_requests) and self._served_total() + 1 >= self.max_requests

    def _last_on(self, conn: _Conn) -> None:
        """The last response on a kept connection went out (see _last_due): nginx was told not
        to reuse it (CLOSING_MARK, in the same write); other web servers get our FIN right
        behind END_REQUEST (in the same segment on TCP, see _fin_in_step), before they can take
        the connection from their pool again (Apache checks it for EOF first). Then it is
        dead: its owner's _release closes it, never parks it."""
        if not conn.markable and not conn.dead:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_WR)
        self._kill(conn)


def _ends_cleanly(conn: _Conn) -> bool:
    """Whether a kept connection can be ended safely after a response (see _last_on): nginx's
    (CLOSING_MARK) and any on TCP (_fin_in_step). A stopping server keeps those parked through
    the drain and serves what comes on them; others are closed when the stop begins."""
    return bool(conn.markable) or conn.family != socket.AF_UNIX


def _fin_in_step(conn: _Conn) -> None:
    """Before the last response on a kept TCP connection of a web server that does not know
    protocol.CLOSING_MARK: cork the socket, so that the FIN _last_on sends after it leaves in
    the same segment as END_REQUEST. Apache (mod_proxy_fcgi, enablereuse=on) looks for EOF on
    a pooled connection before it reuses it, but a FIN sent a few microseconds after
    END_REQUEST came too late: the wake-up of Apache's thread by END_REQUEST preempts the
    worker between the two syscalls, Apache sends its next request, and it fails when the
    connection closes under it (1 in 250 requests with --max-requests 1000 under load; corked:
    1 in 1,300). Linux holds corked data for 200 ms at most: a worker kept off the CPU longer
    than that between the two sends the FIN apart again. A UNIX socket has nothing like it:
    there the FIN follows as closely as it can, and the README says so."""
    if conn.family != socket.AF_UNIX and not conn.dead:
        with contextlib.suppress(OSError):
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)


def _writev(fd: int, sock: socket.socket | None, bufs: Sequence[Buffer]) -> int:
    if sock is None:
        return os.pwritev(fd, bufs, -1, _RWF_NOWAIT)
    return sock.sendmsg(bufs, (), _DONTWAIT)


def _write_all(
    fd: int,
    bufs: list[Buffer],
    timeout: float,
    sock: socket.socket | None,
    blocking: bool = False,
    drain: Callable[[], bool] | None = None,
) -> bool:
    """Send every buffer (whole records) or raise OSError; one writev in the common case.

    The first try never blocks in the kernel: pwritev2(RWF_NOWAIT) on the bare fd (``sock``
    None, where the kernel supports it) or sendmsg(MSG_DONTWAIT) on ``sock``; a full socket
    buffer is _send_rest's. Returns whether the fd now takes blocking writes (see _send_rest):
    the caller passes that back as ``blocking`` for its next write on the same fd. With
    ``drain`` no write blocks: see _send_rest.
    """
    if len(bufs) <= _IOV_MAX:
        try:
            if blocking and drain is None:
                sent = os.writev(fd, bufs)
            elif sock is None:  # (_writev inlined: this is every response's write)
                sent = os.pwritev(fd, bufs, -1, _RWF_NOWAIT)
            else:
                sent = sock.sendmsg(bufs, (), _DONTWAIT)
        except BlockingIOError:
            if blocking and drain is None:  # SO_SNDTIMEO ran out with nothing sent
                raise _send_timeout(timeout) from None
            sent = 0
        if sent == sum(map(len, bufs)):
            return blocking
    else:
        sent = 0
    return _send_rest(fd, sock, bufs, sent, timeout, blocking, drain)


def _send_rest(
    fd: int,
    sock: socket.socket | None,
    bufs: list[Buffer],
    skip: int,
    timeout: float,
    blocking: bool = False,
    drain: Callable[[], bool] | None = None,
) -> bool:
    """Finish a partial (or oversized) write: skip ``skip`` bytes, send the rest in batches.

    On a bare fd the rest goes out in blocking writes that SO_SNDTIMEO bounds (``timeout`` of
    no progress, see _blocking_sends): the kernel puts the thread to sleep until there is room,
    as a blocking server's write does. Waiting in poll() and retrying instead cost a 100 MB
    download 10-15 ms of worker CPU against 8-11 (a failed write and a poll wake-up at every
    full socket buffer). With a socket object, or an fd that is not in blocking mode, the
    thread waits for room in poll(), ``timeout`` per wait. Either way a web server that takes
    no bytes for ``timeout`` seconds gets TimeoutError. Returns whether the fd now takes
    blocking writes."""
    views: list[memoryview] = []
    for b in bufs:
        mv = memoryview(b).cast("B") if not isinstance(b, memoryview) else b.cast("B")
        n = len(mv)
        if skip >= n:
            skip -= n
            continue
        views.append(mv[skip:] if skip else mv)
        skip = 0
    # With ``drain`` (the request's body is still coming, see _Req.drainer) no write blocks:
    # while there is no room the thread waits for room or input, and input goes to ``drain``
    # until it says there is nothing more to read.
    events = _POLLOUT if drain is None else _POLLOUT | _POLLIN
    if views and not blocking and sock is None and drain is None:
        blocking = _blocking_sends(fd, timeout)
    while views:
        batch = views[:_IOV_MAX]
        waits = blocking and events == _POLLOUT  # (a blocking write waits in the kernel)
        try:
            sent = os.writev(fd, batch) if waits else _writev(fd, sock, batch)
        except BlockingIOError:
            sent = 0
        if not sent:
            if waits:
                raise _send_timeout(timeout)
            ready = _wait_fd(fd, events, timeout)
            if not ready:
                raise _send_timeout(timeout)
            if ready & events & _POLLIN and drain is not None and not drain():
                events = _POLLOUT
            continue
        while sent:
            n = len(views[0])
            if sent >= n:
                sent -= n
                views.pop(0)
            else:
                views[0] = views[0][sent:]
                sent = 0
    return blocking


def _blocking_sends(fd: int, timeout: float) -> bool:
    """Let ``fd`` take blocking writes that give up after ``timeout`` seconds without progress
    (SO_SNDTIMEO, set once per connection: it outlives the response, and the next one's writes
    are bounded the same way). False where the fd is not in blocking mode (a socket object with
    a timeout makes it so) or the option cannot be set: the caller polls instead."""
    return _bound_blocking(fd, socket.SO_SNDTIMEO, timeout)


def _blocking_reads(fd: int, timeout: float) -> bool:
    """_blocking_sends for reads (SO_RCVTIMEO): a read that waits for a request's input sleeps
    in the kernel until bytes come, at most ``timeout``. See _read."""
    return _bound_blocking(fd, socket.SO_RCVTIMEO, timeout)


def _bound_blocking(fd: int, option: int, timeout: float) -> bool:
    sec = min(int(timeout), 2**31 - 1)
    usec = int((timeout - sec) * 1_000_000) if sec < 2**31 - 1 else 0
    try:
        if not os.get_blocking(fd):
            return False
        # (any family will do for setsockopt on the fd)
        sock = _socket_for(fd, socket.AF_UNIX)
        try:
            # (0 s would mean "no timeout": never ask for less than a microsecond)
            sock.setsockopt(
                socket.SOL_SOCKET, option, _TIMEVAL.pack(sec, max(usec, 0 if sec else 1))
            )
        finally:
            sock.detach()
    except OSError:
        return False
    return True


def _break_off(fd: int, family: int) -> None:
    """Make the close of a connection whose response was cut short (see wsgi.Batching) an
    abortive one on TCP: a reset, which every web server reports as an upstream error and
    passes on as a broken response. nginx without fastcgi_keep_conn takes a plain EOF there for
    the end of the response, and ended a chunked one as if whole. A UNIX socket has no reset."""
    if family == socket.AF_UNIX:
        return
    sock = socket.socket(family, socket.SOCK_STREAM, 0, fd)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass
    finally:
        sock.detach()


_LINGER_RESET = struct.pack("ii", 1, 0)


def _socket_for(fd: int, family: int) -> socket.socket:
    """A socket object for a connection's fd (blocking, as accept() made it) that leaves it
    blocking. With socket.setdefaulttimeout() in effect (apps set it to bound their outbound
    calls) a new socket object makes its fd non-blocking: blocking writes on it (see
    _send_rest) would then fail at once as timeouts. family/type/proto are given: without them
    CPython asks the kernel (2 getsockopt)."""
    sock = socket.socket(family, socket.SOCK_STREAM, 0, fd)
    if sock.gettimeout() is not None:
        sock.setblocking(True)
    return sock


def _send_timeout(timeout: float) -> TimeoutError:
    return TimeoutError(errno.ETIMEDOUT, f"the web server took no response bytes for {timeout:g} s")


def _nofile_limit() -> tuple[int, int]:
    """RLIMIT_NOFILE (soft, hard), for messages; (-1, -1) where unavailable."""
    try:
        import resource

        return resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return -1, -1


def _marks_understood(environ: dict[str, Any] | None) -> bool:
    """Whether the web server that sent this request drops a kept connection on
    protocol.CLOSING_MARK: nginx does (its SERVER_SOFTWARE, from fastcgi_params). Apache
    mod_proxy_fcgi (enablereuse) does not: it checks a pooled connection for EOF before reusing
    it, but data pending reads as alive, and it would take the mark for the first record of its
    next response ("bogus rid 0", measured: 37 failed requests in three reloads). Others get
    none either (unknown readers): their idle kept connections are closed when a stop begins
    (Apache then sees EOF and reconnects), a busy one after its response (see _last_on)."""
    return environ is not None and str(environ.get("SERVER_SOFTWARE", "")).startswith("nginx/")


def _release_fd(fd: int) -> None:
    """Close what ``fd`` refers to while keeping the number taken (by /dev/null): threads
    that may still use the number meet an error, never a file opened later."""
    try:
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.dup2(null, fd, inheritable=False)
    except OSError:
        pass
    finally:
        os.close(null)


def _has_input(conn: _Conn) -> bool:
    """Whether bytes wait on ``conn``'s socket (not at EOF), without reading them."""
    try:
        return bool(conn.sock.recv(1, _PEEK_DONTWAIT))
    except OSError:
        return False


def _close(conn: _Conn) -> None:
    """Close a connection; if the web server may still be sending (unread STDIN), shut our side
    first and drain briefly so that the close does not turn into a TCP RST that could destroy
    the response before the web server has read it."""
    if conn.stdin_incomplete and not conn.dead:
        sock = conn.sock
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(1.0)
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline and sock.recv(_RECV_ALLOC):
                pass
    try:  # noqa: SIM105 - contextlib.suppress costs ~0.5 us, on every request
        conn.close()
    except OSError:
        pass

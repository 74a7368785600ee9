"""The built-in worker program: find the listening socket, import the app, run the server.

``fcgispawn --wsgi MOD:APP`` workers are this program (through cli.py), started anew for each
worker so that a reload (HUP to the supervisor) imports fresh code and the supervisor itself
never holds user code. Where the socket comes from is decided here, not in server.py:

1. a socket the caller passes (``-s``/``-a -p``/``--fd`` in cli.py, or :func:`serve`);
2. systemd socket activation (``LISTEN_FDS``/``LISTEN_PID``): the fd named ``fcgi`` in
   ``LISTEN_FDNAMES`` if several are passed, else the first;
3. fd 0 if it is a listening socket: the FastCGI convention (spec §2.2) used by lighttpd's
   ``bin-path``, Apache mod_fcgid, spawn-fcgi and our own supervisor.

Signals (installed only when running in the main thread): TERM/INT -> graceful stop (finish
in-flight requests, bounded by ``graceful_timeout``), QUIT -> immediate stop, USR1 -> nothing
yet (placeholder for reopening logs; it must not kill the worker, which is USR1's default),
HUP -> ignored (the supervisor reloads by replacing workers; a worker must not die of it).
The handlers only call :meth:`Server.stop`, which sets a flag and writes an eventfd.

Timeouts (server.py says how each works): ``request_timeout`` (cli ``--request-timeout``) is
the longest one app call may run; when one overruns, the server logs it and stops, and
:func:`run` ends the process with :data:`~fcgispawn.server.EXIT_REQUEST_TIMEOUT` (124) at once
-- a hung thread cannot be stopped or joined, and the supervisor replaces the worker. The I/O
timeout for a stalled web server (:data:`~fcgispawn.server.IO_TIMEOUT`, 90 s) and the idle
timeout of kept-open connections (60 s) are fixed internal defaults.

File descriptors: every parked connection holds one (up to ``server.MAX_IDLE_CONNS`` kept-open
plus ``server.MAX_PENDING_CONNS`` not-yet-complete ones, 1024 each),
so :func:`run` raises the soft RLIMIT_NOFILE towards the hard limit when the soft one is
below what the server may hold (many distributions default to soft 1024). Only the worker
program does this, never :func:`serve` (a library must not change process-wide limits). The
cap :data:`NOFILE_TARGET` keeps ``select()``-using libraries' troubles (FD_SETSIZE) rare
enough to matter less than EMFILE: fds are allocated lowest-first, so they only see high
numbers under that many connections. If fds still run out, accept() backs off and serving
goes on (server.py).
"""

from __future__ import annotations

import contextlib
import gc
import os
import resource
import signal
import socket
import stat
import sys
from collections.abc import Callable, Iterator, Sequence
from types import FrameType
from typing import Any

from fcgispawn import sockets, systemd
from fcgispawn.errors import AppImportError, ConfigError, SocketError
from fcgispawn.server import EXIT_REQUEST_TIMEOUT, MAX_IDLE_CONNS, MAX_PENDING_CONNS, Server
from fcgispawn.template import TEMPLATE_FD_ENV, become_template
from fcgispawn.wsgi import WSGIApplication, WSGIAppLoadError, load_app

__all__ = ["NO_SOCKET_MESSAGE", "find_listener", "run", "serve"]

NO_SOCKET_MESSAGE = (
    "no listening socket: fd 0 is not a socket and LISTEN_FDS is not set; give -s, -a/-p or --fd"
)
#: The supervisor sets this when it runs more than one worker (-F > 1): wsgi.multiprocess.
MULTIPROCESS_ENV = "FCGISPAWN_MULTIPROCESS"
#: The systemd fd name preferred when several sockets are passed (cli's --fdname default).
FDNAME = "fcgi"
#: The soft RLIMIT_NOFILE the worker program raises itself to (never above the hard limit).
NOFILE_TARGET = 65536


def find_listener() -> socket.socket:
    """The inherited listening socket (systemd activation first, then fd 0), else SocketError."""
    fds = systemd.listen_fds()
    if fds:
        chosen = fds[0][0]
        if len(fds) > 1:
            for fd, name in fds:
                if name == FDNAME:
                    chosen = fd
                    break
        return sockets.adopt_fd(chosen)
    if sockets.is_listening_socket(0):
        return sockets.adopt_fd(0)
    raise SocketError(NO_SOCKET_MESSAGE)


def raise_nofile_limit(threads: int, log: Callable[[str], None]) -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE if it is below what the server may hold open; returns the
    (old, new) soft limit. Never fails: a limit we cannot change is logged, not fatal."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return -1, -1
    # Parked connections (both pools) + one per thread + the app's own files and sockets.
    needed = MAX_IDLE_CONNS + MAX_PENDING_CONNS + threads + 256
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return soft, soft
    target = NOFILE_TARGET if hard == resource.RLIM_INFINITY else min(hard, NOFILE_TARGET)
    if target <= soft:
        log(
            f"warning: RLIMIT_NOFILE is {soft} (hard {hard}), below the {needed} fds this "
            "worker may hold; beyond it new connections wait in the backlog"
        )
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError) as exc:
        log(f"warning: cannot raise RLIMIT_NOFILE from {soft} to {target}: {exc}")
        return soft, soft
    return soft, target


def import_app(app_spec: str) -> WSGIApplication:
    """``MODULE:CALLABLE`` -> the app; AppImportError with one line and the app's traceback."""
    try:
        return load_app(app_spec)
    except WSGIAppLoadError as exc:
        raise AppImportError(str(exc), detail=exc.traceback_text or "") from None


@contextlib.contextmanager
def _signals(server: Server) -> Iterator[None]:
    """Route stop signals to the server while it runs (main thread only), then restore."""
    if not _in_main_thread():
        yield
        return

    def graceful(signum: int, frame: FrameType | None) -> None:
        server.stop(graceful=True)

    def immediate(signum: int, frame: FrameType | None) -> None:
        server.stop(graceful=False)

    def ignore(signum: int, frame: FrameType | None) -> None:
        # USR1: reopen logs (nothing to reopen yet: we log to stderr / the journal).
        pass

    def hangup(signum: int, frame: FrameType | None) -> None:
        # gunicorn users send HUP to reload: say why nothing happens (supervisord's
        # [fcgi-program] runs this process alone, and HUP did nothing without a word).
        server.log(
            "SIGHUP ignored: a worker process does not reload itself; send HUP to fcgispawn's "
            "supervisor, or restart this process, to load new code"
        )

    table: dict[signal.Signals, Callable[[int, FrameType | None], Any] | int] = {
        signal.SIGTERM: graceful,
        signal.SIGINT: graceful,
        signal.SIGQUIT: immediate,
        signal.SIGUSR1: ignore,
        signal.SIGUSR2: ignore,  # the supervisor forwards it (multiwatch's convention)
        signal.SIGHUP: hangup,
    }
    # The server writes with os.writev (no MSG_NOSIGNAL): a peer gone mid-response must be
    # EPIPE, not a fatal SIGPIPE. CPython ignores SIGPIPE at startup; an app may have reset it.
    table[signal.SIGPIPE] = signal.SIG_IGN
    previous = {sig: signal.signal(sig, handler) for sig, handler in table.items()}
    # The C-level handler also writes to the server's wakeup pipe: a signal that lands just
    # before the coordinating thread sleeps in poll() still wakes it (see signal_wakeup_fd).
    previous_wakeup = signal.set_wakeup_fd(server.signal_wakeup_fd(), warn_on_full_buffer=False)
    try:
        yield
    finally:
        signal.set_wakeup_fd(previous_wakeup)
        for sig, old in previous.items():
            signal.signal(sig, old)
        server.close_signal_wakeup()


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _serve_app(
    app: WSGIApplication,
    listener: socket.socket,
    *,
    threads: int,
    max_requests: int,
    max_requests_jitter: int,
    graceful_timeout: float,
    request_timeout: float,
    web_server_addrs: Sequence[str] | str | None,
    multiprocess: bool | None,
    log: Callable[[str], None],
    on_start: Callable[[Server], None] | None = None,
    exit_on_request_timeout: bool = False,
    release_listener: bool = False,
    notify_socket: str | None = None,
) -> int:
    if web_server_addrs is None:
        web_server_addrs = os.environ.get("FCGI_WEB_SERVER_ADDRS") or None
    if multiprocess is None:
        multiprocess = os.environ.get(MULTIPROCESS_ENV) == "1"
    try:
        server = Server(
            app,
            listener,
            threads=threads,
            max_requests=max_requests,
            max_requests_jitter=max_requests_jitter,
            graceful_timeout=graceful_timeout,
            request_timeout=request_timeout,
            web_server_addrs=web_server_addrs,
            multiprocess=multiprocess,
            release_listener=release_listener,
            log=log,
            on_retire=lambda: _notify_via(notify_socket, "STOPPING=1"),
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    # Everything imported so far (the app, its framework) stays out of the cyclic GC's
    # generations: collections get cheaper and copy-on-write pages stay shared.
    gc.freeze()
    if on_start is not None:
        on_start(server)
    with _signals(server):
        # The listener already queues connections, so "ready" is true from here on. Under
        # fcgispawn's supervisor this is what ends a reload's overlap (Readiness.NOTIFY); under
        # systemd (Type=notify, in-process) it is the service's READY=1. No NOTIFY_SOCKET: no-op.
        _notify_via(notify_socket, "READY=1", f"MAINPID={os.getpid()}")
        rc = server.serve_forever()
    if rc == EXIT_REQUEST_TIMEOUT and exit_on_request_timeout:
        # The hung app thread holds whatever it holds (locks, the GIL between bytecodes):
        # interpreter shutdown could wait on it forever. Leave now; the log line is out.
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os._exit(rc)
    return rc


def _notify_via(notify_socket: str | None, *fields: str) -> None:
    """sd_notify ``fields``: to the embedder's NOTIFY_SOCKET as it is (None, serve()), or to the
    one run() took out of the environment before importing the app (an app that runs
    sd_notify code must not talk on it), set back for this one message; "" is none."""
    if notify_socket is None:
        systemd.notify(*fields)
    elif notify_socket:
        os.environ["NOTIFY_SOCKET"] = notify_socket
        try:
            systemd.notify(*fields)
        finally:
            # os.environ, not sd_notify's unset flag: that one leaves Python's copy.
            os.environ.pop("NOTIFY_SOCKET", None)


def run(
    app_spec: str,
    listener: socket.socket | None = None,
    *,
    threads: int = 1,
    max_requests: int = 0,
    max_requests_jitter: int = 0,
    graceful_timeout: float = 30.0,
    request_timeout: float = 0.0,
    web_server_addrs: Sequence[str] | str | None = None,
    multiprocess: bool | None = None,
    log: Callable[[str], None] = systemd.stderr_log,
) -> int:
    """The worker program: serve ``app_spec`` on ``listener`` (or the inherited socket).

    The socket is found before the app is imported, so a missing socket is reported without
    running user code. ``web_server_addrs`` None -> env FCGI_WEB_SERVER_ADDRS; ``multiprocess``
    None -> env FCGISPAWN_MULTIPROCESS=1. Returns the exit code (0 after a stop or recycling);
    raises SocketError / AppImportError / ConfigError for cli.py to report. An app call that
    overruns ``request_timeout`` ends the process with status 124 (EXIT_REQUEST_TIMEOUT).
    """
    if log is systemd.stderr_log:
        log = systemd.worker_log()  # a detached supervisor's worker: stderr is /dev/null
    sock = listener if listener is not None else find_listener()
    # Taken out of the environment before the app is imported: it is the supervisor's (or
    # systemd's) private channel to this process, and an app that runs sd_notify code or a
    # notify-aware child must not talk on it. READY=1 is sent to it once serving starts.
    notify_socket = os.environ.pop("NOTIFY_SOCKET", "")
    template_fd = _template_fd()
    raise_nofile_limit(threads, log)
    app = import_app(app_spec)
    if template_fd is not None and not become_template(template_fd, log):
        # Under the supervisor's preload mode this process was the template: it forked the
        # workers (they come back from become_template and serve) until the supervisor left.
        return 0
    return _serve_app(
        app,
        sock,
        threads=threads,
        max_requests=max_requests,
        max_requests_jitter=max_requests_jitter,
        graceful_timeout=graceful_timeout,
        request_timeout=request_timeout,
        web_server_addrs=web_server_addrs,
        multiprocess=multiprocess,
        log=log,
        exit_on_request_timeout=True,
        # The worker program's socket is shared (supervisor, web server, systemd): giving up
        # this copy when a stop begins lets a final stop refuse new connections at once.
        release_listener=True,
        notify_socket=notify_socket,
    )


def _template_fd() -> int | None:
    """The control fd the supervisor passed (preload mode), taken out of the environment."""
    value = os.environ.pop(TEMPLATE_FD_ENV, None)
    if value is None:
        return None
    if not value.isdigit():
        raise ConfigError(f"{TEMPLATE_FD_ENV}={value!r} is not an fd number")
    fd = int(value)
    try:
        is_socket = stat.S_ISSOCK(os.fstat(fd).st_mode)
    except OSError:
        is_socket = False
    if not is_socket:
        raise ConfigError(f"{TEMPLATE_FD_ENV}={fd} is not an open socket")
    return fd


def serve(
    app: WSGIApplication,
    address: str | socket.socket,
    *,
    threads: int = 2,
    max_requests: int = 0,
    max_requests_jitter: int = 0,
    graceful_timeout: float = 30.0,
    request_timeout: float = 0.0,
    web_server_addrs: Sequence[str] | str | None = None,
    multiprocess: bool = False,
    backlog: int = 1024,
    log: Callable[[str], None] = systemd.stderr_log,
    on_start: Callable[[Server], None] | None = None,
) -> int:
    """Library entry point (``fcgispawn.serve``): serve ``app`` until TERM/INT/QUIT.

    ``address`` is a listening socket, or text as cli's ``-s``/``-a``: ``unix:/run/app.sock``,
    ``/abs/path.sock``, ``127.0.0.1:9000``, ``[::1]:9000``, ``fd:N``. A socket we bind is
    closed (and its file removed) on return. Raises SocketError/ConfigError on bad input.
    ``on_start`` gets the :class:`Server` before it serves: an embedder running this outside
    the main thread (no signal handlers there) keeps it to call ``stop()``. An app call that
    overruns ``request_timeout`` makes this return EXIT_REQUEST_TIMEOUT (124); the hung
    thread is a daemon thread the embedder may want to exit over. ``threads`` defaults to 2
    here, not to the command line's 1: this one process is all there is, no -F adds more.
    """
    bound: sockets.Listener | None = None
    if isinstance(address, socket.socket):
        sock = address
    else:
        addr = sockets.parse_address(address)
        if isinstance(addr, sockets.FdAddress):
            sock = sockets.adopt_fd(addr.fd)
        else:
            bound = sockets.bind(addr, sockets.BindOptions(backlog=backlog))
            sock = bound.sock
    try:
        return _serve_app(
            app,
            sock,
            threads=threads,
            max_requests=max_requests,
            max_requests_jitter=max_requests_jitter,
            graceful_timeout=graceful_timeout,
            request_timeout=request_timeout,
            web_server_addrs=web_server_addrs,
            multiprocess=multiprocess,
            log=log,
            on_start=on_start,
        )
    finally:
        if bound is not None:
            bound.close()

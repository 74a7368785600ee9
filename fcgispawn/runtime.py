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
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import socket
import sys
from collections.abc import Callable, Iterator, Sequence
from types import FrameType
from typing import Any

from fcgispawn import sockets, systemd
from fcgispawn.errors import AppImportError, ConfigError, SocketError
from fcgispawn.server import Server
from fcgispawn.wsgi import WSGIApplication, WSGIAppLoadError, load_app

__all__ = ["NO_SOCKET_MESSAGE", "find_listener", "run", "serve"]

NO_SOCKET_MESSAGE = (
    "no listening socket: fd 0 is not a socket and LISTEN_FDS is not set; give -s, -a/-p or --fd"
)
#: The supervisor sets this when it runs more than one worker (-F > 1): wsgi.multiprocess.
MULTIPROCESS_ENV = "FCGISPAWN_MULTIPROCESS"
#: The systemd fd name preferred when several sockets are passed (cli's --fdname default).
FDNAME = "fcgi"


def _stderr_log(message: str) -> None:
    print(f"fcgispawn[{os.getpid()}]: {message}", file=sys.stderr, flush=True)


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

    table: dict[signal.Signals, Callable[[int, FrameType | None], Any] | int] = {
        signal.SIGTERM: graceful,
        signal.SIGINT: graceful,
        signal.SIGQUIT: immediate,
        signal.SIGUSR1: ignore,
        signal.SIGHUP: signal.SIG_IGN,
    }
    # The server writes with os.writev (no MSG_NOSIGNAL): a peer gone mid-response must be
    # EPIPE, not a fatal SIGPIPE. CPython ignores SIGPIPE at startup; an app may have reset it.
    table[signal.SIGPIPE] = signal.SIG_IGN
    previous = {sig: signal.signal(sig, handler) for sig, handler in table.items()}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


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
            log=log,
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
        systemd.notify("READY=1", f"MAINPID={os.getpid()}")
        return server.serve_forever()


def run(
    app_spec: str,
    listener: socket.socket | None = None,
    *,
    threads: int = 2,
    max_requests: int = 0,
    max_requests_jitter: int = 0,
    graceful_timeout: float = 30.0,
    request_timeout: float = 0.0,
    web_server_addrs: Sequence[str] | str | None = None,
    multiprocess: bool | None = None,
    log: Callable[[str], None] = _stderr_log,
) -> int:
    """The worker program: serve ``app_spec`` on ``listener`` (or the inherited socket).

    The socket is found before the app is imported, so a missing socket is reported without
    running user code. ``web_server_addrs`` None -> env FCGI_WEB_SERVER_ADDRS; ``multiprocess``
    None -> env FCGISPAWN_MULTIPROCESS=1. Returns the exit code (0 after a stop or recycling);
    raises SocketError / AppImportError / ConfigError for cli.py to report.
    """
    sock = listener if listener is not None else find_listener()
    app = import_app(app_spec)
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
    )


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
    log: Callable[[str], None] = _stderr_log,
    on_start: Callable[[Server], None] | None = None,
) -> int:
    """Library entry point (``fcgispawn.serve``): serve ``app`` until TERM/INT/QUIT.

    ``address`` is a listening socket, or text as cli's ``-s``/``-a``: ``unix:/run/app.sock``,
    ``/abs/path.sock``, ``127.0.0.1:9000``, ``[::1]:9000``, ``fd:N``. A socket we bind is
    closed (and its file removed) on return. Raises SocketError/ConfigError on bad input.
    ``on_start`` gets the :class:`Server` before it serves: an embedder running this outside
    the main thread (no signal handlers there) keeps it to call ``stop()``.
    """
    if isinstance(address, socket.socket):
        return _serve_app(
            app,
            address,
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
    addr = sockets.parse_address(address)
    if isinstance(addr, sockets.FdAddress):
        return serve(
            app,
            sockets.adopt_fd(addr.fd),
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
    bound = sockets.bind(addr, sockets.BindOptions(backlog=backlog))
    try:
        return _serve_app(
            app,
            bound.sock,
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
        bound.close()

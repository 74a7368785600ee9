"""Wiring a validated config into a running supervisor: socket, identities, detaching, pid file.

This sits between cli.py (parsing, printing) and supervisor.py (which must stay ignorant of
click, sockets' origins and pid files). It never prints: user-facing lines go through ``say``
and diagnostics through ``log``, both given by cli.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
from collections.abc import Callable

from fcgispawn import client, process, systemd
from fcgispawn.config import APP_LOAD_EXIT, WORKER_ENV, SpawnConfig
from fcgispawn.errors import CrashLoopError, FcgiSpawnError, SocketError
from fcgispawn.sockets import BindOptions, FdAddress, Listener, adopt_fd, bind, is_listening_socket
from fcgispawn.supervisor import PassMode, Policy, Readiness, Supervisor, WorkerSpec

Log = Callable[[str], None]

#: How long the foreground process waits for a detached supervisor to report its workers up.
#: Generous: a crash loop is only declared after --crash-window, and the error must still be
#: printed before we return.
STARTUP_TIMEOUT = 120.0


def inherited_listener(fdname: str) -> socket.socket:
    """The socket our parent gave us: systemd's LISTEN_FDS (by name), else a listening fd 0."""
    fds = systemd.listen_fds()
    if fds:
        chosen = next((fd for fd, name in fds if name == fdname), fds[0][0])
        return adopt_fd(chosen)
    if is_listening_socket(0):
        return adopt_fd(0)
    raise SocketError(
        "no listening socket: fd 0 is not a listening socket and LISTEN_FDS is not set",
        hint="give -s PATH, -p PORT or --fd N",
    )


def _socket_owner(
    cfg: SpawnConfig, creds: process.Credentials | None
) -> tuple[int | None, int | None]:
    """spawn-fcgi's rule: -U defaults to -u; -G defaults to -U's primary group, else -g."""
    import pwd

    uid: int | None = None
    gid: int | None = None
    if cfg.socket_user is not None:
        uid = process.resolve_uid(cfg.socket_user)
        with contextlib.suppress(KeyError):
            gid = pwd.getpwuid(uid).pw_gid
    elif creds is not None:
        uid = creds.uid
    if cfg.socket_group is not None:
        gid = process.resolve_gid(cfg.socket_group)
    elif gid is None and creds is not None:
        gid = creds.gid
    return uid, gid


def _listener(
    cfg: SpawnConfig, uid: int | None, gid: int | None
) -> tuple[socket.socket, Listener | None]:
    """The socket to hand to workers, and the Listener we own (to unlink on exit) if we bound it."""
    if cfg.address is None:
        return inherited_listener(cfg.fdname), None
    if isinstance(cfg.address, FdAddress):
        return adopt_fd(cfg.address.fd), None
    address = cfg.bind_address()
    assert address is not None
    options = BindOptions(backlog=cfg.bind.backlog, mode=cfg.bind.mode, uid=uid, gid=gid)
    owned = bind(address, options)
    return owned.sock, owned


def worker_argv(cfg: SpawnConfig) -> tuple[str, ...]:
    if cfg.runtime is not None:
        return (sys.executable, "-m", "fcgispawn", *cfg.runtime.worker_args())
    assert cfg.command is not None
    return cfg.command


def worker_env(cfg: SpawnConfig) -> dict[str, str]:
    env = dict(os.environ)
    env.update(cfg.extra_env)
    if cfg.runtime is not None:
        # wsgi.multiprocess must be truthful, and under a supervisor it is: TTIN can add a
        # sibling at any time, and a reload overlaps old and new workers.
        env["FCGISPAWN_MULTIPROCESS"] = "1"
        env[WORKER_ENV] = json.dumps(cfg.runtime.run_kwargs())
    return env


def spawn(cfg: SpawnConfig, *, log: Log, say: Log, daemon_log: Callable[[], Log]) -> int:
    """Bind, then supervise in the foreground (-n, inherited socket) or detached."""
    creds: process.Credentials | None = None
    if os.geteuid() == 0:
        if cfg.user is not None or cfg.group is not None:
            creds = process.resolve_credentials(cfg.user, cfg.group)
        if creds is None or creds.uid is None:
            log("warning: workers will run as root; give -u USER to drop privileges")
    else:
        # spawn-fcgi ignores these without root (silently); we ignore them too, but say so.
        ignored = [
            flag
            for flag, value in (
                ("-u", cfg.user),
                ("-g", cfg.group),
                ("-U", cfg.socket_user),
                ("-G", cfg.socket_group),
                ("-c", cfg.chroot),
            )
            if value is not None
        ]
        if cfg.bind_before_chroot:
            ignored.append("-S")
        if ignored:
            verb = "needs root and is" if len(ignored) == 1 else "need root and are"
            log(f"warning: {' '.join(ignored)} {verb} ignored")
            cfg = _without_root_flags(cfg)

    uid, gid = _socket_owner(cfg, creds) if os.geteuid() == 0 else (None, None)
    sock, owned = _listener(cfg, uid, gid)
    _warn_if_exposed(sock, cfg, log)
    detached = not (cfg.no_fork or cfg.inherited)
    env = worker_env(cfg)
    if detached and cfg.runtime is not None:
        env[systemd.DAEMON_LOG_ENV] = "daemon"  # their stderr will be /dev/null
    spec = WorkerSpec(
        argv=worker_argv(cfg),
        env=env,
        pass_mode=PassMode(cfg.pass_mode),
        fdname=cfg.fdname,
        credentials=creds,
        chroot=cfg.chroot,
        chdir=cfg.chdir,
        # The built-in runtime says READY=1 once it serves, so a reload of a slow-starting
        # app keeps the old workers until the new ones really answer.
        readiness=Readiness.NOTIFY if cfg.runtime is not None else Readiness.SETTLE,
        # Only the built-in runtime speaks template.py's fork protocol.
        template=cfg.runtime is not None and cfg.preload,
        cannot_start=(APP_LOAD_EXIT, "the WSGI application cannot be loaded (its error is above)")
        if cfg.runtime is not None
        else None,
    )
    policy = Policy(
        workers=cfg.workers,
        graceful_timeout=cfg.graceful_timeout,
        backoff_initial=min(0.1, cfg.backoff_max),
        backoff_max=cfg.backoff_max,
        crash_limit=cfg.crash_limit,
        crash_window=cfg.crash_window,
        reset_after=cfg.crash_window,
    )
    if not detached:
        return _supervise(sock, owned, spec, policy, cfg, log, on_ready=None)

    pipe = process.ReadinessPipe()
    if pipe.fork():
        if owned is not None:
            owned.close(unlink=False)
        else:
            sock.close()
        result = pipe.wait(timeout=STARTUP_TIMEOUT)
        if result.exit_code == 0:
            say(f"fcgispawn: supervisor started: PID: {result.pid}")
            return 0
        raise _Exit(result)
    # The child: become a daemon, supervise, report readiness (or the failure) to the waiter;
    # its exit status then goes back through cli.py like the foreground's.
    try:
        process.detach([sock.fileno()], readiness=pipe)
        return _supervise(sock, owned, spec, policy, cfg, daemon_log(), on_ready=pipe.ready)
    except CrashLoopError as error:
        # Detached workers write to /dev/null (a daemon must not keep the user's terminal):
        # point at the one way to see what they said.
        error.hint = "start it in the foreground with -n to see what the workers print"
        pipe.fail(str(error), error.exit_code)
        raise
    except FcgiSpawnError as error:
        pipe.fail(str(error), error.exit_code)
        raise
    except BaseException as error:
        pipe.fail(f"internal error: {error!r}", 1)  # never leave the waiter hanging
        raise
    finally:
        pipe.close()


class _Exit(FcgiSpawnError):
    """A detached supervisor's failure, carrying its own exit status to the foreground."""

    def __init__(self, result: process.ReadinessResult) -> None:
        super().__init__(result.message)
        self.exit_code = result.exit_code


def _supervise(
    sock: socket.socket,
    owned: Listener | None,
    spec: WorkerSpec,
    policy: Policy,
    cfg: SpawnConfig,
    log: Log,
    *,
    on_ready: Callable[[], None] | None,
) -> int:

    def release() -> None:
        """Close the listener (and remove the socket file we bound); safe twice: when a stop
        begins (Supervisor's on_stop) and on the way out."""
        if owned is not None:
            owned.close(unlink=True)
        else:
            sock.close()

    pid_written = False
    try:
        # Before any worker starts, as spawn-fcgi does: a pid file that cannot be written
        # (a symlink, a directory) fails the start instead of killing a running pool.
        if cfg.pid_file is not None:
            process.write_pid_file(cfg.pid_file, os.getpid())
            pid_written = True
        return Supervisor(
            sock, spec, policy, log=log, on_stop=release, probe=_prober(sock)
        ).run(on_ready)
    finally:
        if pid_written and cfg.pid_file is not None:
            with contextlib.suppress(FcgiSpawnError, OSError):
                process.remove_pid_file(cfg.pid_file, os.getpid())
        release()


def _prober(sock: socket.socket) -> Callable[[], client.Probe | None]:
    """The supervisor's pool probe (Supervisor._await_probe): an FCGI_GET_VALUES through the
    listener's own address (a wildcard TCP address through its loopback); None where nothing
    can connect to it (an unnamed socket, or once the stop closed it)."""

    def make() -> client.Probe | None:
        try:
            address = sock.getsockname()
        except OSError:
            return None
        if sock.family == socket.AF_UNIX:
            if not address:
                return None
        elif sock.family in (socket.AF_INET, socket.AF_INET6):
            host, port = address[0], address[1]
            if host in ("0.0.0.0", ""):
                host = "127.0.0.1"
            elif host == "::":
                host = "::1"
            address = (host, port)
        else:
            return None
        return client.Probe(address, sock.family)

    return make


def _without_root_flags(cfg: SpawnConfig) -> SpawnConfig:
    import dataclasses

    return dataclasses.replace(
        cfg,
        user=None,
        group=None,
        socket_user=None,
        socket_group=None,
        chroot=None,
        bind_before_chroot=False,
    )


def _warn_if_exposed(sock: socket.socket, cfg: SpawnConfig, log: Log) -> None:
    """A FastCGI port reachable from the network lets anyone forge CGI variables: warn."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    import ipaddress

    host = sock.getsockname()[0]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return
    allowed = "FCGI_WEB_SERVER_ADDRS" in cfg.extra_env or os.environ.get("FCGI_WEB_SERVER_ADDRS")
    if cfg.runtime is not None and cfg.runtime.web_server_addrs is not None:
        allowed = True
    if ip.is_loopback or allowed:
        return
    log(
        f"warning: listening on {host}, which is not loopback, with no FCGI_WEB_SERVER_ADDRS"
        " allow-list: anyone who reaches the port can send requests"
    )

"""Frozen configuration and the cross-field rules that no single option can check.

cli.py parses flags into ``Options`` (raw, as the user typed them) and calls ``build``; everything
after that sees only validated, typed values. Keeping the rules here, not in click callbacks,
lets them be unit-tested without a terminal and keeps cli.py to parsing and printing.
"""

from __future__ import annotations

import ipaddress
import math
import os
import shutil
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from fcgispawn.errors import ConfigError
from fcgispawn.sockets import (
    SUN_PATH_MAX,
    Address,
    BindOptions,
    FdAddress,
    TcpAddress,
    UnixAddress,
    parse_address,
)

PassMode = Literal["fd0", "systemd"]

#: One pool thread per worker, as uWSGI, gunicorn's sync workers and php-fpm serve: a second
#: one costs ~2.5 us/req (10 %) straight at the socket -- the two threads run at once on the two
#: cores and hand the interpreter lock (and its cache lines) back and forth at every system
#: call (bench/results/2026-11-29-first-wait.md). Concurrency comes from -F; --threads N is
#: there for apps that wait on I/O. With one thread, a connection parked before its request
#: arrived waits behind whatever that thread runs next; server.FIRST_WAIT gives a new
#: connection 5 ms to send before it is parked, so only peers that connect and stay silent
#: meet that (parked: 29 % of connections straight at the socket without the wait, 2 % with).
DEFAULT_THREADS = 1
#: Set by the spawner for --wsgi workers: JSON of ``RuntimeOptions.run_kwargs()``. ``python -m
#: fcgispawn`` then serves from it without parsing its command line (which stays, for ps): a
#: worker, and a preload template, never imports click and the option machinery.
WORKER_ENV = "FCGISPAWN_WORKER"

#: The exit status of a --wsgi worker (or template) started by fcgispawn's supervisor whose app
#: cannot be loaded: the supervisor then gives up at once instead of retrying a failure that
#: repeats (as gunicorn's master halts on its workers' status 3, "failed to boot"). A worker
#: program run by hand or by a web server exits 1 as documented.
APP_LOAD_EXIT: Final = 3


@dataclass(frozen=True, slots=True)
class Options:
    """The command line as typed, before any cross-field rule is applied."""

    command: tuple[str, ...] = ()
    app_path: str | None = None  # -f, the deprecated /bin/sh form
    wsgi: str | None = None
    chdir: str | None = None
    address: str | None = None
    port: int | None = None
    socket: str | None = None
    fd: int | None = None
    socket_mode: str | None = None
    socket_user: str | None = None
    socket_group: str | None = None
    php_children: int | None = None
    workers: int = 1
    backlog: int = 1024
    pid_file: str | None = None
    no_fork: bool = False
    chroot: str | None = None
    bind_before_chroot: bool = False
    user: str | None = None
    group: str | None = None
    pass_mode: PassMode = "fd0"
    fdname: str = "fcgi"
    graceful_timeout: float = 30.0
    crash_limit: int = 5
    crash_window: float = 10.0
    backoff_max: float = 10.0
    threads: int = DEFAULT_THREADS
    max_requests: int = 0
    max_requests_jitter: int = 0
    request_timeout: float = 0.0
    web_server_addrs: str | None = None
    preload: bool = True


@dataclass(frozen=True, slots=True)
class RuntimeOptions:
    """What the built-in responder needs; also what a --wsgi worker is re-run with."""

    app: str
    threads: int = DEFAULT_THREADS
    max_requests: int = 0
    max_requests_jitter: int = 0
    graceful_timeout: float = 30.0
    request_timeout: float = 0.0
    web_server_addrs: tuple[str, ...] | None = None

    def run_kwargs(self) -> dict[str, Any]:
        """``runtime.run``'s arguments, JSON-ready: the one mapping from options to the worker
        program, used in-process (cli.py) and through WORKER_ENV (__main__.py)."""
        return {
            "app_spec": self.app,
            "threads": self.threads,
            "max_requests": self.max_requests,
            "max_requests_jitter": self.max_requests_jitter,
            "graceful_timeout": self.graceful_timeout,
            "request_timeout": self.request_timeout,
            "web_server_addrs": (
                None if self.web_server_addrs is None else list(self.web_server_addrs)
            ),
        }

    def worker_args(self) -> tuple[str, ...]:
        """The flags that make ``fcgispawn`` serve this app on its inherited socket.

        Workers are started as a program rather than forked from the supervisor so that a
        reload (HUP) imports the app anew and the supervisor never holds user code.
        """
        args = ["--wsgi", self.app, "--threads", str(self.threads)]
        if self.max_requests:
            args += ["--max-requests", str(self.max_requests)]
        if self.max_requests_jitter:
            args += ["--max-requests-jitter", str(self.max_requests_jitter)]
        args += ["--graceful-timeout", _num(self.graceful_timeout)]
        if self.request_timeout:
            args += ["--request-timeout", _num(self.request_timeout)]
        if self.web_server_addrs is not None:
            args += ["--web-server-addrs", ",".join(self.web_server_addrs)]
        return tuple(args)


@dataclass(frozen=True, slots=True)
class SpawnConfig:
    """A validated run: where the socket is, what the workers are, how they are kept alive."""

    address: Address | None  # None: inherited (LISTEN_FDS or fd 0)
    bind: BindOptions
    socket_user: str | None
    socket_group: str | None
    bind_before_chroot: bool
    command: tuple[str, ...] | None  # None with --wsgi
    runtime: RuntimeOptions | None
    workers: int
    php_children: int | None
    user: str | None
    group: str | None
    chroot: str | None
    chdir: str | None
    pid_file: str | None
    no_fork: bool
    pass_mode: PassMode
    fdname: str
    graceful_timeout: float
    crash_limit: int
    crash_window: float
    backoff_max: float
    extra_env: dict[str, str] = field(default_factory=dict)
    #: --wsgi workers are forked from a preloaded template (supervisor.py, template.py).
    preload: bool = True
    #: Flags spawn-fcgi accepts and ignores in this combination: said once at start.
    warnings: tuple[str, ...] = ()

    @property
    def inherited(self) -> bool:
        return self.address is None

    @property
    def serves_in_process(self) -> bool:
        """A --wsgi run on an inherited socket with one worker needs no supervisor.

        Its parent (lighttpd, mod_fcgid, systemd, an fcgispawn supervisor) already manages
        the process, so a second layer of supervision would only add a fork. Unless the
        worker is meant to exit while the site runs (--max-requests, --request-timeout): the
        one process holding the listening socket would take it along, and lighttpd (bin-path)
        and mod_fcgid give the connections queued on it a reset, then mark the backend down
        until they respawn it (measured: 57 of 60 requests failed with --max-requests 3). A
        supervisor keeps the socket open and the backlog queued while it replaces the worker.
        """
        if self.runtime is None or not self.inherited or self.workers != 1:
            return False
        return not (self.runtime.max_requests or self.runtime.request_timeout)

    def bind_address(self) -> Address | None:
        """The address to bind, inside the chroot unless -S (spawn-fcgi's rule)."""
        addr = self.address
        if isinstance(addr, UnixAddress) and self.chroot and not self.bind_before_chroot:
            return UnixAddress(os.path.join(self.chroot, addr.path.lstrip("/")))
        return addr


def parse_mode(text: str) -> int:
    """-M takes octal like chmod; out-of-range values are refused, not truncated."""
    try:
        mode = int(text, 8)
    except ValueError:
        raise ConfigError(
            f"invalid socket mode {text!r}", hint="give an octal mode such as 0660"
        ) from None
    if not 0 <= mode <= 0o777:
        raise ConfigError(
            f"socket mode {text!r} is out of range", hint="give an octal mode from 0 to 0777"
        )
    return mode


def parse_web_server_addrs(text: str | None) -> tuple[str, ...] | None:
    """Checked here so a typo fails the start, not every worker in a loop."""
    if text is None:
        return None
    addrs = tuple(a.strip() for a in text.split(",") if a.strip())
    for addr in addrs:
        try:
            ipaddress.ip_address(addr)
        except ValueError:
            raise ConfigError(
                f"--web-server-addrs: {addr!r} is not an IP address",
                hint="give comma-separated IPv4/IPv6 addresses, e.g. 127.0.0.1,::1",
            ) from None
    return addrs


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


#: The longest timeout any option takes (~23 days): poll() and epoll count milliseconds in a
#: C int (24.8 days), and systemd's EXTEND_TIMEOUT_USEC wants a finite number.
MAX_SECONDS: Final = 2_000_000
#: The most workers and threads per worker: far beyond what one machine serves, low enough
#: that a typo (-F 99999999) is an error rather than a fork bomb.
MAX_WORKERS: Final = 4096
MAX_THREADS: Final = 1024
_C_INT_MAX: Final = 2**31 - 1


def _positive(
    name: str, value: int | float, minimum: int | float = 1, maximum: int | float = _C_INT_MAX
) -> None:
    """``value`` within [minimum, maximum] (and a number: nan and inf are refused)."""
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, not {value}")
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, not {value}")
    if value > maximum:
        raise ConfigError(f"{name} must be at most {maximum}, not {value}")


def build(opts: Options) -> SpawnConfig:
    """Apply every rule that involves more than one option; raise ConfigError on the first."""
    _positive("-F/--workers", opts.workers, 1, MAX_WORKERS)
    _positive("-b/--backlog", opts.backlog)
    _positive("--threads", opts.threads, 1, MAX_THREADS)
    if opts.php_children is not None:
        # 0 too: spawn-fcgi exports it, and php-cgi then serves in the one process.
        _positive("-C", opts.php_children, 0)
    _positive("--max-requests", opts.max_requests, 0, 2**62)
    _positive("--max-requests-jitter", opts.max_requests_jitter, 0, 2**62)
    for name, value, minimum in (
        ("--graceful-timeout", opts.graceful_timeout, 0.0),
        ("--request-timeout", opts.request_timeout, 0.0),
        ("--crash-window", opts.crash_window, 0.0),
        ("--backoff-max", opts.backoff_max, 0.1),  # the first restart delay is 0.1 s
    ):
        _positive(name, value, minimum, MAX_SECONDS)
    _positive("--crash-limit", opts.crash_limit)

    address = _address(opts)
    warnings: list[str] = []
    if opts.address is not None and opts.socket is not None:
        # spawn-fcgi ignores it the same way: an init script that passes both must still run.
        warnings.append(f"-a {opts.address} is ignored: it is the TCP address for -p, not -s")
    mode = 0o660
    if opts.socket_mode is not None:
        mode = parse_mode(opts.socket_mode)  # a typo is still reported, even where unused
        if not isinstance(address, UnixAddress):
            warnings.append("-M is ignored: it is the mode of a UNIX socket file (-s)")
            mode = 0o660

    command: tuple[str, ...] | None
    runtime: RuntimeOptions | None = None
    if opts.wsgi is not None:
        if opts.command:
            raise ConfigError(
                "give either --wsgi MODULE:CALLABLE or a COMMAND after --, not both",
                hint=f"got --wsgi {opts.wsgi} and {' '.join(opts.command)}",
            )
        _check_app_spec(opts.wsgi)
        command = None
        runtime = RuntimeOptions(
            app=opts.wsgi,
            threads=opts.threads,
            max_requests=opts.max_requests,
            max_requests_jitter=opts.max_requests_jitter,
            graceful_timeout=opts.graceful_timeout,
            request_timeout=opts.request_timeout,
            web_server_addrs=parse_web_server_addrs(opts.web_server_addrs),
        )
    elif opts.command:
        command = opts.command
    elif opts.app_path:
        # spawn-fcgi's deprecated -f form: the path goes through the shell, as there.
        command = ("/bin/sh", "-c", f"exec {opts.app_path}")
    else:
        raise ConfigError(
            "no FastCGI application given",
            hint="give -- COMMAND [ARG...] or --wsgi MODULE:CALLABLE",
        )

    # Without root -c is ignored (the spawner says so, as spawn-fcgi ignores it): the command
    # and -d are then looked up outside it.
    chroot = opts.chroot if os.geteuid() == 0 else None
    _check_directories(chroot, opts.chdir)
    if command is not None and not _executable(command[0], chroot, opts.chdir):
        raise ConfigError(
            f"cannot execute {command[0]!r}: not found or not executable",
            hint="COMMAND is looked up on PATH; give a full path",
        )

    extra_env: dict[str, str] = {}
    if opts.php_children is not None:
        extra_env["PHP_FCGI_CHILDREN"] = str(opts.php_children)
    if command is not None and opts.web_server_addrs is not None:
        # libfcgi and php-cgi read the allow-list from the environment (FastCGI spec 3.2).
        extra_env["FCGI_WEB_SERVER_ADDRS"] = ",".join(
            parse_web_server_addrs(opts.web_server_addrs) or ()
        )

    return SpawnConfig(
        address=address,
        bind=BindOptions(backlog=opts.backlog, mode=mode),
        socket_user=opts.socket_user,
        socket_group=opts.socket_group,
        bind_before_chroot=opts.bind_before_chroot,
        command=command,
        runtime=runtime,
        workers=opts.workers,
        php_children=opts.php_children,
        user=opts.user,
        group=opts.group,
        chroot=opts.chroot,
        chdir=opts.chdir,
        pid_file=opts.pid_file,
        no_fork=opts.no_fork,
        pass_mode=opts.pass_mode,
        fdname=opts.fdname,
        graceful_timeout=opts.graceful_timeout,
        crash_limit=opts.crash_limit,
        crash_window=opts.crash_window,
        backoff_max=opts.backoff_max,
        extra_env=extra_env,
        preload=opts.preload,
        warnings=tuple(warnings),
    )


def _address(opts: Options) -> Address | None:
    given = [
        name
        for name, value in (("-s", opts.socket), ("-p", opts.port), ("--fd", opts.fd))
        if value is not None
    ]
    if len(given) > 1:
        raise ConfigError(
            f"give one socket, not {' and '.join(given)}",
            hint="either a UNIX socket (-s), a TCP port (-p) or an open fd (--fd)",
        )
    if opts.address is not None and opts.port is None and opts.socket is None:
        raise ConfigError(f"-a {opts.address} needs -p PORT", hint="-a is the TCP bind address")
    if opts.socket is not None:
        if not opts.socket:
            raise ConfigError("-s needs a path")
        if len(os.fsencode(opts.socket)) > SUN_PATH_MAX:
            raise ConfigError(
                f"socket path is {len(os.fsencode(opts.socket))} bytes long,"
                f" longer than the {SUN_PATH_MAX} a UNIX socket allows: {opts.socket}"
            )
        return UnixAddress(opts.socket)
    if opts.port is not None:
        host = opts.address if opts.address is not None else "127.0.0.1"
        if not 1 <= opts.port <= 65535:
            raise ConfigError(f"port {opts.port} is out of range", hint="give 1 to 65535")
        text = (
            f"[{host}]:{opts.port}"
            if ":" in host and not host.startswith("[")
            else (f"{host}:{opts.port}")
        )
        addr = parse_address(text)
        assert isinstance(addr, TcpAddress)
        return addr
    if opts.fd is not None:
        if not 0 <= opts.fd <= _C_INT_MAX:
            raise ConfigError(f"--fd {opts.fd} is not a file descriptor")
        return FdAddress(opts.fd)
    return None


def _check_directories(chroot: str | None, chdir: str | None) -> None:
    """A missing -c or -d directory would only show up as every worker failing at start."""
    if chroot is not None and not os.path.isdir(chroot):
        raise ConfigError(f"-c {chroot}: no such directory")
    if chdir is not None:
        path = os.path.join(chroot, chdir.lstrip("/")) if chroot else chdir
        if not os.path.isdir(path):
            raise ConfigError(
                f"-d {chdir}: no such directory" + (f" in {chroot}" if chroot else "")
            )


def _check_app_spec(spec: str) -> None:
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise ConfigError(
            f"--wsgi {spec!r} is not MODULE:CALLABLE", hint="for example --wsgi myapp:app"
        )


def _executable(program: str, chroot: str | None, chdir: str | None) -> bool:
    """Checked before forking so that a typo fails in the foreground, not in a detached worker.

    Inside a chroot the program is looked up relative to it; PATH lookups there cannot be
    checked reliably, so a bare name under -c is left to the worker's exec to report.
    """
    if chroot:
        if "/" not in program:
            return True
        base = chdir or "/"
        path = os.path.join(chroot, os.path.join(base, program).lstrip("/"))
        return os.access(path, os.X_OK)
    if "/" in program:
        path = program if os.path.isabs(program) or not chdir else os.path.join(chdir, program)
        return os.path.isfile(path) and os.access(path, os.X_OK)
    return shutil.which(program) is not None

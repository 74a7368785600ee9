"""A thin layer on systemd-python: socket activation, sd_notify, watchdog, journal.

Why a layer at all: systemd-python's API is untyped, reports names as ``"unknown"`` when
``LISTEN_FDNAMES`` is absent, raises ``OSError`` from ``notify()`` when the manager's socket is
gone, and -- subtle -- clears ``LISTEN_*`` with C ``unsetenv()``, which Python's ``os.environ``
does not see, so a worker spawned with ``os.environ`` would inherit stale ``LISTEN_FDS``. This
module turns all of that into typed functions that never surprise the supervisor.

Pure-Python fallbacks exist only where the import fails (systemd-python is a C extension that
needs libsystemd at build time) or a feature is missing from an old release; each says so.
Imports nothing of fcgispawn but :mod:`fcgispawn.errors`.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import os
import re
import socket
import sys
import syslog
import time
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Final

from fcgispawn.errors import SocketError

__all__ = [
    "DAEMON_LOG_ENV",
    "LISTEN_FDS_START",
    "booted",
    "daemon_log",
    "journal_log",
    "listen_env",
    "listen_fds",
    "notify",
    "priority",
    "stderr_log",
    "watchdog_usec",
    "worker_log",
]

#: The first fd systemd passes (sd_listen_fds(3)): 0-2 are stdio.
LISTEN_FDS_START = 3

_LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def _optional_import(name: str) -> ModuleType | None:
    """systemd-python is a C extension built against libsystemd; where it is not installed
    (e.g. a pip install without libsystemd-dev) the pure fallbacks below take over."""
    try:
        return importlib.import_module(name)
    except ImportError:  # pragma: no cover - the package is a dependency; kept for odd installs
        return None


_daemon = _optional_import("systemd.daemon")


def listen_fds(*, unset_environment: bool = True) -> list[tuple[int, str | None]]:
    """The sockets systemd (or any LISTEN_FDS-speaking parent) passed us, as ``(fd, name)``.

    Honors ``LISTEN_PID``: variables meant for another process (e.g. our parent, when they
    leaked through an exec) yield ``[]``. ``name`` comes from ``LISTEN_FDNAMES`` and is
    ``None`` when that variable is absent. The fds get close-on-exec, as sd_listen_fds(3)
    does. With ``unset_environment`` the three variables are removed from ``os.environ`` too,
    so workers started later cannot misread them. Malformed values raise :class:`SocketError`.
    """
    had_names = "LISTEN_FDNAMES" in os.environ
    try:
        if _daemon is not None and hasattr(_daemon, "listen_fds_with_names"):
            try:
                named: dict[int, str] = _daemon.listen_fds_with_names(unset_environment)
            except OSError as exc:
                raise SocketError(
                    f"invalid socket activation variables ({_describe_env()}): "
                    f"{exc.strerror or exc}",
                    errno=exc.errno,
                    hint="LISTEN_FDS must be a count, LISTEN_PID a pid and LISTEN_FDNAMES "
                    "one name per fd, separated by ':'",
                ) from None
            result = sorted(named.items())
        else:  # pragma: no cover - exercised through _listen_fds_fallback in the tests
            # Older systemd-python releases lack listen_fds_with_names (and without the
            # package there is nothing to call): our own parser gives the same semantics.
            result = [(fd, name) for fd, name in _listen_fds_fallback()]
    finally:
        if unset_environment:
            for var in _LISTEN_VARS:
                os.environ.pop(var, None)
    if not had_names:
        return [(fd, None) for fd, _ in result]
    return [(fd, name) for fd, name in result]


def _describe_env() -> str:
    return ", ".join(f"{var}={os.environ.get(var)!r}" for var in _LISTEN_VARS)


def _listen_fds_fallback() -> list[tuple[int, str]]:
    """sd_listen_fds_with_names(3) semantics, in Python (see :func:`listen_fds`)."""
    pid_text = os.environ.get("LISTEN_PID")
    count_text = os.environ.get("LISTEN_FDS")
    if pid_text is None or count_text is None:
        return []
    try:
        pid = int(pid_text)
        count = int(count_text)
    except ValueError:
        raise SocketError(
            f"invalid socket activation variables ({_describe_env()})",
            errno=errno.EINVAL,
        ) from None
    if pid != os.getpid() or count <= 0:
        return []
    names_text = os.environ.get("LISTEN_FDNAMES")
    names = names_text.split(":") if names_text is not None else ["unknown"] * count
    if len(names) != count:
        raise SocketError(
            f"LISTEN_FDNAMES names {len(names)} fds but LISTEN_FDS is {count}",
            errno=errno.EINVAL,
        )
    fds = list(range(LISTEN_FDS_START, LISTEN_FDS_START + count))
    for fd in fds:
        try:
            os.set_inheritable(fd, False)
        except OSError as exc:
            raise SocketError(
                f"LISTEN_FDS={count} but fd {fd} is not open", errno=exc.errno
            ) from None
    return list(zip(fds, names, strict=True))


def listen_env(names: Sequence[str], pid: int | None = None) -> dict[str, str]:
    """The ``LISTEN_*`` variables that pass ``len(names)`` fds (from fd 3) to ``pid``.

    Call it in the child after ``fork()`` (``pid`` defaults to ``os.getpid()``): the pid is
    only known there, and ``LISTEN_PID`` must name the process that reads it.
    """
    for name in names:
        if ":" in name or not name.isprintable() or len(name) > 255:
            raise SocketError(
                f"invalid fd name {name!r}", hint="use at most 255 printable characters and no ':'"
            )
    return {
        "LISTEN_PID": str(os.getpid() if pid is None else pid),
        "LISTEN_FDS": str(len(names)),
        "LISTEN_FDNAMES": ":".join(names),
    }


def notify(*fields: str) -> bool:
    """Send ``fields`` (``"READY=1"``, ``"STATUS=..."``) to the service manager in one datagram.

    Returns ``False`` when ``NOTIFY_SOCKET`` is unset (not started by systemd with
    ``Type=notify``) or the message could not be delivered: a lost status line must never
    stop the supervisor. Abstract (``@``) sockets work.
    """
    if not fields or not os.environ.get("NOTIFY_SOCKET"):
        return False
    message = "\n".join(fields)
    if _daemon is not None:
        try:
            return bool(_daemon.notify(message))
        except OSError:
            return False
    return _notify_fallback(message)  # pragma: no cover


def _notify_fallback(message: str) -> bool:
    """sd_notify(3) in Python, for when systemd-python is not importable."""
    target = os.environ.get("NOTIFY_SOCKET", "")
    if target.startswith("@"):
        address = "\0" + target[1:]
    elif target.startswith("/"):
        address = target
    else:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto(message.encode(), address)
        except OSError:
            return False
    return True


def watchdog_usec() -> int | None:
    """The watchdog interval systemd expects ``WATCHDOG=1`` within, or ``None``.

    Pure Python: systemd-python does not wrap sd_watchdog_enabled(3). Like it, the value is
    ignored when ``WATCHDOG_PID`` names another process (a worker must not ping for us).
    """
    usec_text = os.environ.get("WATCHDOG_USEC")
    if not usec_text:
        return None
    pid_text = os.environ.get("WATCHDOG_PID")
    if pid_text:
        try:
            if int(pid_text) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        usec = int(usec_text)
    except ValueError:
        return None
    return usec if usec > 0 else None


def booted() -> bool:
    """Whether systemd is PID 1 here (sd_booted(3))."""
    if _daemon is not None:
        try:
            return bool(_daemon.booted())
        except OSError:  # pragma: no cover
            return False
    return os.path.isdir("/run/systemd/system")  # pragma: no cover - sd_booted's own test


def journal_log(message: str, priority: int, **fields: str) -> None:
    """Send one structured entry to the journal; silently dropped when there is none.

    ``priority`` is syslog's 0 (emerg) .. 7 (debug); ``fields`` become upper-case journal
    fields. Logging must never raise into the supervisor's loop.
    """
    # Imported here, not at module load: every worker imports this module (LISTEN_FDS, READY)
    # and systemd.journal alone costs ~8 ms of a worker's start; only a detached supervisor logs.
    _journal = _optional_import("systemd.journal")
    if _journal is None:  # pragma: no cover
        return
    extra = {key.upper(): value for key, value in fields.items()}
    with contextlib.suppress(OSError, ValueError):
        _journal.send(message, PRIORITY=str(priority), **extra)


_stamped: bool | None = None


def _stamps() -> bool:
    """Whether log lines carry their own time: yes, unless stderr is the journal, which
    stamps every line itself (systemd names the stream it connected in JOURNAL_STREAM). A log
    file, supervisord's capture or lighttpd's error log take the lines as they are, and an
    operator needs to know when a worker died. Decided once per process (forks inherit it)."""
    global _stamped
    if _stamped is None:
        dev, _, ino = os.environ.get("JOURNAL_STREAM", "").partition(":")
        try:
            st = os.fstat(2)
            _stamped = not (st.st_dev == int(dev) and st.st_ino == int(ino))
        except (OSError, ValueError):
            _stamped = True
    return _stamped


def stderr_log(message: str) -> None:
    """The log of a supervisor and its workers on stderr: ``[TIME ]fcgispawn[PID]: MESSAGE``."""
    # One write per line: print() writes the text and the newline separately, so lines from
    # two pool threads (or the workers sharing the supervisor's stderr) could interleave.
    # FastCGI's initial state (spec 2) has stdout and stderr closed: Python then has no
    # sys.stderr, and logging must never be what stops a worker.
    if sys.stderr is None:
        return
    line = f"fcgispawn[{os.getpid()}]: {message}\n"
    if _stamps():
        now = time.time()
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
        line = f"{stamp}.{int(now % 1 * 1000):03d} {line}"
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.write(line)
        sys.stderr.flush()


#: Set (to "daemon") for the workers of a detached supervisor: their stderr is /dev/null, so
#: they log where it does (daemon_log), or an app's tracebacks and wsgi.errors were lost.
DAEMON_LOG_ENV = "FCGISPAWN_LOG"


def worker_log() -> Callable[[str], None]:
    """The log of a worker program: where a detached supervisor logs (daemon_log) when
    DAEMON_LOG_ENV says so, else stderr. The variable is taken out of the environment: the
    app's own children must not inherit it."""
    if os.environ.pop(DAEMON_LOG_ENV, "") == "daemon":
        return daemon_log()
    return stderr_log


def daemon_log() -> Callable[[str], None]:
    """The log of a process without a terminal (a detached supervisor and its workers): the
    journal when there is one, else syslog (facility daemon, tagged fcgispawn[PID]), each
    line at the priority its wording gives (see priority)."""
    if os.path.exists("/run/systemd/journal/socket"):

        def journal(message: str) -> None:
            journal_log(message, priority(message))

        return journal
    syslog.openlog("fcgispawn", syslog.LOG_PID, syslog.LOG_DAEMON)

    def to_syslog(message: str) -> None:
        syslog.syslog(priority(message), message)

    return to_syslog


#: Beginnings of fcgispawn's own lines that report a failure (ERR) or something an operator
#: should look at (WARNING); anything else is INFO.
_ERR_STARTS: Final = (
    "giving up",
    "internal error",
    "error",
    "FastCGI protocol error",
    "the WSGI application raised",
    "cannot load WSGI application",
    "template failed",
    "reload aborted",
    "accept() failed",
    "epoll registration",
)
_WARNING_STARTS: Final = (
    "warning:",
    "cannot",
    "I/O timeout",
    "request timeout",
    "graceful timeout",
    "client went away",
    "the web server",
    "the request ended before",
    "worker for slot",
    "could not announce",
    "releasing the listening socket failed",
    "sd_notify failed",
)
_FAILED_EXIT = re.compile(
    r"(exit status [1-9]|killed by signal|did not die|SIGKILL|sent no READY)"
)


def priority(message: str) -> int:
    """The syslog priority of one of fcgispawn's log lines, from its wording: a detached
    supervisor's log goes to the journal or syslog, where operators filter by priority
    (journalctl -p warning); everything at INFO hid a crash loop among routine lines. The
    stderr log has no priorities (its lines say "warning:" or "error" themselves)."""
    if "Traceback (most recent call last)" in message or message.startswith(_ERR_STARTS):
        return syslog.LOG_ERR
    if message.startswith(_WARNING_STARTS):
        return syslog.LOG_WARNING
    if _FAILED_EXIT.search(message) and "(stopped)" not in message:
        return syslog.LOG_WARNING
    return syslog.LOG_INFO

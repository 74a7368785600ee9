"""Preloaded workers: the template process's side of the fork protocol, and its wire contract.

Why a template: a ``--wsgi`` worker started by fork+exec pays for an interpreter, fcgispawn and
the app's imports every time (60-120 ms here; seconds for a large framework) and holds its own
private copy of all of it. A *template* is one exec'd worker program that imports the app and
then, instead of serving, forks a worker on each request from the supervisor: a replacement
after a crash is serving within a few milliseconds, and the workers share the template's
memory copy-on-write (``gc.freeze()`` keeps the collector from touching those pages). A reload
(HUP) starts a *new* template, exec'd afresh, so new code is still picked up -- unlike a
master that imported the app itself (gunicorn ``--preload``). The supervisor itself still never
holds user code.

Protocol, over a ``SOCK_SEQPACKET`` socketpair whose template end is the fd named by
:data:`TEMPLATE_FD_ENV` (one message per packet, ASCII):

* template -> supervisor, once: ``ready`` -- the app is imported; fork requests may come.
* supervisor -> template: ``fork``; the answer is ``pid N`` (the new worker) or ``error TEXT``.

Each worker is forked *twice* (template -> intermediate -> worker) and the intermediate exits
at once: the worker is then re-parented to the supervisor, which is a child subreaper
(``PR_SET_CHILD_SUBREAPER``), so the supervisor reaps it and sees its exit status exactly as
for an exec'd worker -- the restart policy does not care how a worker was made. The worker
arms ``PR_SET_PDEATHSIG`` only after that re-parenting (armed earlier, the intermediate's exit
would fire it).

A template serves no requests, so it holds nothing a stop must wait for: SIGTERM ends it at
once (default disposition), and EOF on its socket (the supervisor is gone) ends it too.
"""

from __future__ import annotations

import ctypes
import gc
import os
import signal
import socket
import time
from collections.abc import Callable
from typing import Final

__all__ = ["FORK", "READY", "TEMPLATE_COMM", "TEMPLATE_FD_ENV", "become_template"]

#: Names the fd of the template's end of the control socket; unset in the worker program's
#: own environment as soon as it is read (the app must not inherit it into its children).
TEMPLATE_FD_ENV: Final = "FCGISPAWN_TEMPLATE_FD"
READY: Final = b"ready"
FORK: Final = b"fork"
PID_PREFIX: Final = b"pid "
ERROR_PREFIX: Final = b"error "

#: The template's /proc/PID/comm (what ``ps -e``, ``top`` and the journal's _COMM show), so
#: an operator can tell it from the workers, whose command lines it shares. 15 bytes at most.
TEMPLATE_COMM: Final = b"fcgispawn-tmpl"

_PR_SET_PDEATHSIG: Final = 1
_PR_SET_NAME: Final = 15
#: How long a new worker waits for its intermediate parent to be gone. The intermediate exits
#: right after one send(), so this is never reached unless the machine is thrashing.
_REPARENT_TIMEOUT: Final = 10.0


def _prctl(option: int, arg: int | bytes) -> None:
    """prctl(2) by ctypes: the stdlib has no wrapper, and systemd-python does not offer one.
    Best effort: without it a worker only lacks PDEATHSIG, a template its name."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        value = ctypes.c_char_p(arg) if isinstance(arg, bytes) else ctypes.c_ulong(arg)
        libc.prctl(option, value, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _comm() -> bytes:
    try:
        with open("/proc/self/comm", "rb") as f:
            return f.read().rstrip(b"\n")[:15]
    except OSError:
        return b""


def become_template(ctl_fd: int, log: Callable[[str], None]) -> bool:
    """Serve fork requests on ``ctl_fd`` until the supervisor closes it.

    Called by the worker program after the app is imported and before any thread exists (a
    fork copies only the calling thread). Returns True in a forked worker, which is already a
    child of the supervisor with PR_SET_PDEATHSIG armed and goes on to serve; False in the
    template once the supervisor is gone (its caller then ends the process).
    """
    ctl = socket.socket(fileno=ctl_fd)
    # Blocking, whatever the app did: an app that calls socket.setdefaulttimeout() at import
    # (to bound its outbound calls) gave this socket that timeout, and the template died with
    # TimeoutError each time no fork was asked for that long.
    ctl.settimeout(None)
    ctl.set_inheritable(False)
    supervisor = os.getppid()
    worker_comm = _comm()
    _prctl(_PR_SET_NAME, TEMPLATE_COMM)
    # Nothing but the fork loop runs here: the supervisor stops a template with SIGTERM, and
    # CPython's KeyboardInterrupt handler for SIGINT would print a traceback instead.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    gc.collect()
    gc.freeze()  # the imported app's objects: never scanned, so their pages stay shared
    ctl.send(READY)
    while True:
        try:
            message = ctl.recv(64)
        except InterruptedError:  # pragma: no cover - PEP 475 retries; kept for clarity
            continue
        if not message:
            return False
        if message != FORK:
            log(f"template: unexpected message {message[:32]!r} ignored")
            continue
        if _fork_worker(ctl, supervisor):
            if worker_comm:
                _prctl(_PR_SET_NAME, worker_comm)  # a worker looks like an exec'd one again
            return True


def _fork_worker(ctl: socket.socket, supervisor: int) -> bool:
    """One fork request: True only in the new worker, which then goes on to serve."""
    try:
        middle = os.fork()
    except OSError as exc:
        ctl.send(ERROR_PREFIX + f"cannot fork: {exc.strerror}".encode())
        return False
    if middle:
        # The intermediate exits right after its one send(); reaping it is a short wait.
        os.waitpid(middle, 0)
        return False
    try:
        worker = os.fork()
    except OSError as exc:
        ctl.send(ERROR_PREFIX + f"cannot fork: {exc.strerror}".encode())
        os._exit(1)
    if worker:
        ctl.send(PID_PREFIX + str(worker).encode())
        os._exit(0)
    ctl.close()
    _await_reparent(supervisor)
    return True


def _await_reparent(supervisor: int) -> None:
    """Wait until the intermediate has exited and we belong to the supervisor, then arm
    PR_SET_PDEATHSIG. A short poll: there is no event for "my parent changed", and the
    intermediate is gone within microseconds of its send()."""
    deadline = time.monotonic() + _REPARENT_TIMEOUT
    while os.getppid() != supervisor:
        if time.monotonic() > deadline:
            os._exit(1)  # not the supervisor's child: it could never reap or stop us
        time.sleep(0.0002)
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != supervisor:  # the supervisor died before prctl took effect
        os._exit(1)

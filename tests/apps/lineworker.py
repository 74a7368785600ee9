#!/usr/bin/env python3
"""A stand-in for a FastCGI worker: accepts on the inherited socket, answers one line.

Not FastCGI on purpose: supervisor tests need a program whose behaviour they can steer (answer
its pid, hold a request, ignore TERM, exit at once) without a protocol in the way. Standard
library only, so it runs under any python3 and never imports fcgispawn.

The socket is fd 0, or fd 3 when ``LISTEN_FDS``/``LISTEN_PID`` name this process. One
connection at a time: read one line, answer, close. Requests:

* ``pid``          -> ``<pid>``
* ``sleep SECS``   -> sleeps, then ``<pid>`` (a long request in flight)
* ``hold SECS``    -> ``<pid>`` at once, then keeps the connection (and this worker) busy for
                      SECS and sends ``done``: the test knows which worker is busy
* ``info``         -> JSON: pid, ppid, LISTEN_* variables, the fd it serves on
* ``exit``         -> ``<pid>``, then exits 0 (a voluntary recycle, like --max-requests)
* ``retire SECS``  -> ``<pid>``, sends ``STOPPING=1`` (as the --wsgi runtime does when it stops
                      by itself), then drains for SECS and exits 0

Options: ``--ignore-term`` (TERM does nothing), ``--exit N`` (exit with N at once),
``--exit-if-exists PATH`` (exit 3 at once when PATH exists: a "broken deploy"),
``--record PATH`` (append ``<pid> <signal>`` on USR1, USR2 and TERM), ``--notify-after SECS``
(a slow start: sleep SECS before READY=1 and accepting), ``--no-notify`` (never send READY=1).

With ``NOTIFY_SOCKET`` set (the supervisor's Readiness.NOTIFY) it sends ``READY=1`` once its
signal handlers are installed and it is about to accept.

TERM: an idle worker exits 0 at once; a busy one finishes the request first (graceful drain).
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import sys
import time
from types import FrameType

_stop = False
_record: str | None = None


def _note(what: str) -> None:
    if _record:
        with open(_record, "a") as f:
            f.write(f"{os.getpid()} {what}\n")


def _on_term(signum: int, frame: FrameType | None) -> None:
    # Only a flag: the loop stops at a safe point, so a connection accepted just before the
    # signal is still answered (raising here could drop it between accept() and serving).
    global _stop
    _note("SIGTERM")
    _stop = True


def _on_usr1(signum: int, frame: FrameType | None) -> None:
    _note("SIGUSR1")


def _on_usr2(signum: int, frame: FrameType | None) -> None:
    _note("SIGUSR2")


def _notify_ready(message: bytes = b"READY=1\nSTATUS=accepting") -> None:
    target = os.environ.get("NOTIFY_SOCKET", "")
    address = "\0" + target[1:] if target.startswith("@") else target
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(message, address)


def _listen_fd() -> int:
    if os.environ.get("LISTEN_PID") == str(os.getpid()) and os.environ.get("LISTEN_FDS") == "1":
        return 3
    return 0


def _serve(conn: socket.socket, fd: int) -> None:
    global _stop
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(4096)
        if not chunk:
            return
        data += chunk
    word, _, arg = data.decode().strip().partition(" ")
    pid = str(os.getpid()).encode()
    if word == "sleep":
        time.sleep(float(arg))
        conn.sendall(pid + b"\n")
    elif word == "hold":
        conn.sendall(pid + b"\n")
        time.sleep(float(arg))
        conn.sendall(b"done\n")
    elif word == "exit":
        conn.sendall(pid + b"\n")
        _stop = True
    elif word == "retire":
        conn.sendall(pid + b"\n")
        _notify_ready(b"STOPPING=1")
        time.sleep(float(arg))
        _stop = True
    elif word == "info":
        info = {
            "pid": os.getpid(),
            "ppid": os.getppid(),
            "fd": fd,
            "env": {k: v for k, v in os.environ.items() if k.startswith(("LISTEN_", "NOTIFY"))},
        }
        conn.sendall(json.dumps(info).encode() + b"\n")
    else:
        conn.sendall(pid + b"\n")


def main(argv: list[str]) -> int:
    global _record
    args = iter(argv)
    ignore_term = False
    notify_after: float | None = None
    for arg in args:
        if arg == "--ignore-term":
            ignore_term = True
        elif arg == "--exit":
            return int(next(args))
        elif arg == "--exit-if-exists":
            if os.path.exists(next(args)):
                return 3
        elif arg == "--record":
            _record = next(args)
        elif arg == "--notify-after":
            notify_after = float(next(args))
        elif arg == "--no-notify":
            os.environ.pop("NOTIFY_SOCKET", None)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGTERM, signal.SIG_IGN if ignore_term else _on_term)
    signal.signal(signal.SIGUSR1, _on_usr1)
    signal.signal(signal.SIGUSR2, _on_usr2)
    fd = _listen_fd()
    listener = socket.socket(fileno=fd)
    # Non-blocking (in the shared open file description: every copy of this program copes
    # with EAGAIN) so that a sibling winning the race for a connection cannot leave this one
    # stuck in accept() where TERM would not reach the loop.
    listener.setblocking(False)
    if os.environ.get("NOTIFY_SOCKET"):
        # Only now, with the handlers installed: a signal forwarded to a "ready" worker must
        # meet them, not the default action.
        time.sleep(notify_after or 0)  # a slow import; connections wait in the backlog
        _notify_ready()
    while not _stop:
        ready, _, _ = select.select([listener.fileno(), wake_r], [], [])
        if wake_r in ready:
            os.read(wake_r, 512)
            continue
        try:
            conn, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            continue
        conn.setblocking(True)
        try:
            with conn:
                _serve(conn, fd)
        except OSError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

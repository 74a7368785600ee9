"""Starting and stopping the processes a test owns.

Each process starts in its own session and is stopped by pid (its process group), never by
name, as the repo contract asks. A test that leaks a process still gets it killed at teardown.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(os.environ.get("FCGISPAWN_VENV", REPO / ".venv")).resolve() / "bin"


def fcgispawn_argv() -> list[str]:
    """The installed console script when the venv has it, else ``python -m fcgispawn``."""
    script = VENV_BIN / "fcgispawn"
    if script.exists():
        return [str(script)]
    import sys

    return [sys.executable, "-m", "fcgispawn"]


class ProcessGroup:
    """Owns every process a test started and stops them all, by pid, at teardown."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(
        self,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        stdin: int | None = subprocess.DEVNULL,
        stdout: int | None = subprocess.PIPE,
        stderr: int | None = subprocess.PIPE,
        pass_fds: Sequence[int] = (),
    ) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            list(argv),
            env=env,
            cwd=cwd,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            pass_fds=tuple(pass_fds),
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 5.0) -> int:
        """TERM the process group, then KILL it after ``timeout``; returns the exit status.

        The leader is waited for with WNOWAIT first and reaped only after its group got the
        final KILL: while it is an unreaped zombie its pid (the group id) cannot be reused, so
        the killpg can never hit another test's processes.
        """
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            if not _wait_nowait(proc.pid, timeout):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                _wait_nowait(proc.pid, 5.0)
            # Whatever the leader left behind in its group (workers) goes too.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
        return proc.returncode

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()


def _wait_nowait(pid: int, timeout: float) -> bool:
    """Wait until ``pid`` has exited without reaping it; False on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | os.WNOHANG)
        except ChildProcessError:
            return True  # already reaped (e.g. by proc.poll()); nothing more to wait for
        if info is not None:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)


@contextlib.contextmanager
def process_group() -> Iterator[ProcessGroup]:
    group = ProcessGroup()
    try:
        yield group
    finally:
        group.stop_all()


def wait_for(
    predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02, what: str = ""
) -> None:
    """Poll ``predicate`` until it is true; tests only (the product never polls)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what or predicate}")


def can_connect_unix(path: str | os.PathLike[str]) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(os.fspath(path))
        except OSError:
            return False
        return True


def can_connect_tcp(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def stdout_until_eof(sock: socket.socket) -> bytes:
    """The STDOUT bytes of every FastCGI response on ``sock``, read until the server closes
    it (for tests that speak raw records instead of going through the client)."""
    from fcgispawn.protocol import ClientConnection, StdoutData

    conn = ClientConnection()
    out = b""
    while chunk := sock.recv(65536):
        for ev in conn.receive(chunk):
            if isinstance(ev, StdoutData):
                out += ev.data
    return out


def merge_body_chunks(events: Sequence[object]) -> list[object]:
    """``events`` with each run of non-empty STDIN (or FCGI_DATA) chunks of one request joined
    into one event: ServerConnection hands a body on as it arrives, so how a body is split into
    events depends on how the bytes were read; everything else must not."""
    from fcgispawn.protocol import Data, Stdin

    out: list[object] = []
    for ev in events:
        prev = out[-1] if out else None
        if isinstance(ev, Stdin | Data) and ev.data and type(prev) is type(ev):
            assert isinstance(prev, Stdin | Data)
            if prev.request_id == ev.request_id and prev.data:
                out[-1] = type(ev)(ev.request_id, prev.data + ev.data)
                continue
        out.append(ev)
    return out

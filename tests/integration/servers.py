"""Launchers for the real web servers and FastCGI tools the integration tests drive.

Everything here starts real programs (nginx, lighttpd, Apache, spawn-fcgi, cgi-fcgi,
systemd-socket-activate, php-cgi, a C libfcgi app, fcgispawn) on loopback or UNIX sockets in a
private directory, waits for them with bounded timeouts, keeps their output in log files (shown
when a test fails, see conftest.py) and stops only what it started, by pid:

- every long-running process goes through a ``tests.procs.ProcessGroup`` (own session, stopped by
  process group id);
- every process also carries ``FCGISPAWN_TEST_MARK=<uuid>`` in its environment, so what escapes
  its process group (a daemonized supervisor and its workers) is found in /proc by that exact
  marker and killed by pid at teardown. Nothing is ever killed by name.

The quirks these configurations work around are in /work/shared/reference/real-servers.md.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fcgispawn.template import TEMPLATE_COMM, TEMPLATE_FD_ENV
from tests.procs import (
    REPO,
    ProcessGroup,
    can_connect_tcp,
    can_connect_unix,
    fcgispawn_argv,
    process_group,
)

APP = "tests.integration.apps_integration:app"
MARK_VAR = "FCGISPAWN_TEST_MARK"
READY_TIMEOUT = 15.0
SETUP_HINT = "run `bash scripts/setup.sh` (as root) to install it"


class ServerStartError(AssertionError):
    """A launched program died or never became ready; the message carries its logs."""


# --------------------------------------------------------------------------------------------
# Binaries


def require_binary(name: str, package: str) -> str:
    """The path of ``name``, or a LOUD skip: these are installed by scripts/setup.sh."""
    found = shutil.which(name)
    if found is None:
        for directory in ("/usr/sbin", "/sbin", "/usr/bin"):
            candidate = Path(directory) / name
            if candidate.exists():
                found = str(candidate)
                break
    if found is None:
        pytest.skip(
            f"!!! SETUP IS BROKEN: `{name}` not found (Debian package {package}); {SETUP_HINT}. "
            "This integration test cannot run without it !!!"
        )
    return found


def require_file(path: str, package: str) -> str:
    if not Path(path).exists():
        pytest.skip(
            f"!!! SETUP IS BROKEN: {path} not found (Debian package {package}); {SETUP_HINT} !!!"
        )
    return path


def base_env(**extra: str) -> dict[str, str]:
    """A small, explicit environment: PATH, PYTHONPATH=repo (so the test apps import from any
    cwd — lighttpd, for one, changes into the program's directory) and LANG."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"),
        "PYTHONPATH": str(REPO),
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    env.update(extra)
    return env


# --------------------------------------------------------------------------------------------
# Logs


@dataclass
class LogBook:
    """The log files of everything a test started; their tails are shown when it fails."""

    files: list[tuple[str, Path]] = field(default_factory=list)

    def add(self, label: str, path: Path) -> Path:
        self.files.append((label, path))
        return path

    def tails(self, limit: int = 8000) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for label, path in self.files:
            try:
                data = path.read_bytes()
            except OSError:
                continue  # never written: the program did not get that far
            if not data:
                continue
            cut = len(data) > limit
            text = data[-limit:].decode("utf-8", "replace")
            out.append((f"{label} ({path})", ("[...]\n" if cut else "") + text))
        return out

    def dump(self, limit: int = 8000) -> str:
        parts = [f"----- {label} -----\n{text}" for label, text in self.tails(limit)]
        return "\n".join(parts) if parts else "(no log output)"


# --------------------------------------------------------------------------------------------
# Waiting


def wait_ready(
    check: Callable[[], bool],
    *,
    what: str,
    logbook: LogBook,
    proc: subprocess.Popen[bytes] | None = None,
    timeout: float = READY_TIMEOUT,
) -> None:
    """Poll ``check`` until true; fail at once with the logs if ``proc`` exits meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        if proc is not None and proc.poll() is not None:
            raise ServerStartError(
                f"{what}: process {proc.pid} exited with status {proc.returncode} before it was "
                f"ready\n{logbook.dump()}"
            )
        if time.monotonic() > deadline:
            raise ServerStartError(f"{what}: not ready after {timeout}s\n{logbook.dump()}")
        time.sleep(0.02)


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    """Like tests.procs.wait_for but returns False instead of raising (for assertions)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


# --------------------------------------------------------------------------------------------
# /proc helpers


def _read_stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of ``pid``, or None if it is gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = data[data.rindex(")") + 2 :].split()
    return fields[0], int(fields[1])


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    st = _read_stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def children_of(pid: int, *, templates: bool = False) -> list[int]:
    """Live (non-zombie) children of ``pid``, from /proc: a supervisor's workers. Its
    preload templates (comm ``fcgispawn-tmpl``) only with ``templates``."""
    kids: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        st = _read_stat(int(entry.name))
        live_child = st is not None and st[1] == pid and st[0] not in ("Z", "X")
        if live_child and (templates or not is_template(int(entry.name))):
            kids.append(int(entry.name))
    return sorted(kids)


def cmdline(pid: int) -> bytes:
    """/proc/PID/cmdline (b"" once the process is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def workers_of(
    supervisor: int,
    count: int,
    *,
    exclude: frozenset[int] | set[int] = frozenset(),
    timeout: float = 10.0,
    exact: bool = False,
) -> list[int]:
    """The supervisor's children once ``count`` (exactly, with ``exact``) of them, not in
    ``exclude``, have exec'd their program: their cmdline is no longer the supervisor's, so
    set-up, privilege drop and dup2 are done."""
    found: list[int] = []

    def enough() -> bool:
        nonlocal found
        # Read each time: right after Popen the supervisor itself may not have exec'd yet, and
        # its cmdline then is the test runner's, which its own pre-exec children do not share.
        parent = cmdline(supervisor)
        # Exec'd first, template second: a child still before its exec has the supervisor's
        # environment, in which a preload template is not recognisable yet; checked in the
        # other order, one that exec'd in between passed for a worker (seen in CI).
        found = [
            p
            for p in children_of(supervisor, templates=True)
            if p not in exclude and cmdline(p) not in (b"", parent) and not is_template(p)
        ]
        return len(found) == count if exact else len(found) >= count

    assert wait_until(enough, timeout), (
        f"supervisor {supervisor}: {len(found)} worker(s) after {timeout}s, wanted {count} "
        f"(children now: {children_of(supervisor)})"
    )
    return found


def is_template(pid: int) -> bool:
    """Whether ``pid`` is a preload template: named so by template.py once the app is
    imported, and from its exec on recognisable by the SOCK_SEQPACKET control socket on the fd
    its environment names (the workers forked from it share that environment, but have
    closed the fd before they become the supervisor's children)."""
    try:
        if Path(f"/proc/{pid}/comm").read_bytes().rstrip(b"\n") == TEMPLATE_COMM:
            return True
        fd = proc_environ(pid).get(TEMPLATE_FD_ENV)
        if fd is None:
            return False
        target = os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return False
    match = re.fullmatch(r"socket:\[(\d+)\]", target)
    if match is None:
        return False
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 7 and fields[6] == match.group(1):
            return fields[4] == "0005"  # SOCK_SEQPACKET
    return False


def templates_of(pid: int) -> list[int]:
    return [kid for kid in children_of(pid, templates=True) if is_template(kid)]


def proc_ids(pid: int) -> tuple[int, int]:
    """(real uid, real gid) of ``pid`` from /proc/PID/status."""
    uid = gid = -1
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            uid = int(line.split()[1])
        elif line.startswith("Gid:"):
            gid = int(line.split()[1])
    return uid, gid


def proc_environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    env: dict[str, str] = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            env[key.decode("latin-1")] = value.decode("latin-1")
    return env


def marked_pids(mark: str) -> list[int]:
    """Live processes whose environment carries ``FCGISPAWN_TEST_MARK=mark``: ours, exactly."""
    needle = f"{MARK_VAR}={mark}".encode()
    found: list[int] = []
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            raw = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in raw.split(b"\0") and pid_alive(int(entry.name)):
            found.append(int(entry.name))
    return sorted(found)


def kill_marked(mark: str) -> list[int]:
    """SIGKILL, by pid, every live process carrying our marker; returns those pids."""
    pids = marked_pids(mark)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


def socket_inode(pid: int, fd: int = 0) -> int:
    """The sockfs inode of ``pid``'s ``fd`` (``socket:[N]``), which ss prints for UNIX sockets."""
    target = os.readlink(f"/proc/{pid}/fd/{fd}")
    m = re.fullmatch(r"socket:\[(\d+)\]", target)
    if m is None:
        raise AssertionError(f"fd {fd} of {pid} is not a socket: {target}")
    return int(m.group(1))


def listen_queue(*, unix_inode: int | None = None, tcp_local: str | None = None) -> int | None:
    """Send-Q (the listen backlog) of a listening socket as ``ss -l`` shows it.

    A UNIX socket is found by its sockfs inode, not its path: ss shows the address the socket
    was *bound* to, and a socket bound to a temporary name and renamed into place shows that
    temporary name. A TCP socket is found by its local ``ADDR:PORT``."""
    ss = require_binary("ss", "iproute2")
    args = [ss, "-Hln", "-x" if unix_inode is not None else "-t"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=10, check=True).stdout
    for line in out.splitlines():
        cols = line.split()
        # -x: "u_str LISTEN 0 1024 /path 12345 * 0"; -t: "LISTEN 0 1024 127.0.0.1:9000 0.0.0.0:*"
        if "LISTEN" not in cols:
            continue
        idx = cols.index("LISTEN")
        if unix_inode is not None and len(cols) > idx + 4 and cols[idx + 4] == str(unix_inode):
            return int(cols[idx + 2])
        if tcp_local is not None and len(cols) > idx + 3 and cols[idx + 3] == tcp_local:
            return int(cols[idx + 2])
    return None


def tcp_listen_addresses(port: int) -> list[str]:
    """Local addresses (``127.0.0.1:PORT``, ``[::1]:PORT``) listening on ``port``, from ss."""
    ss = require_binary("ss", "iproute2")
    out = subprocess.run(
        [ss, "-Hltn"], capture_output=True, text=True, timeout=10, check=True
    ).stdout
    found: list[str] = []
    for line in out.splitlines():
        cols = line.split()
        for col in cols:
            if col.endswith(f":{port}") and col not in found:
                found.append(col)
                break
    return found


def unix_connections(path: Path) -> int:
    """How many accepted (server-side) connections the listener at ``path`` holds, from ss."""
    ss = require_binary("ss", "iproute2")
    out = subprocess.run(
        [ss, "-Hxn", "state", "connected"], capture_output=True, text=True, timeout=10, check=True
    ).stdout
    return sum(1 for line in out.splitlines() if str(path) in line.split())


# --------------------------------------------------------------------------------------------
# HTTP and FastCGI clients


@dataclass(frozen=True)
class HttpResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.header_all(name)
        return values[0] if values else None

    def header_all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


def http_request(
    host: str,
    port: int,
    method: str,
    target: str,
    *,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 30.0,
) -> HttpResponse:
    """One HTTP/1.1 request on a fresh connection with stdlib http.client, bounded by timeout."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, target, body=body, headers=dict(headers or {}))
        resp = conn.getresponse()
        data = resp.read()
        return HttpResponse(resp.status, resp.getheaders(), data)
    finally:
        conn.close()


def parse_cgi_response(raw: bytes) -> HttpResponse:
    """A CGI response (``Status:`` head, headers, blank line, body) as an HttpResponse."""
    ends = [(raw.find(sep), len(sep)) for sep in (b"\r\n\r\n", b"\n\n") if raw.find(sep) >= 0]
    if not ends:
        raise AssertionError(f"no end of CGI header block in {raw[:300]!r}")
    cut, seplen = min(ends)
    head, body = raw[:cut], raw[cut + seplen :]
    status = 200
    headers: list[tuple[str, str]] = []
    for line in head.replace(b"\r\n", b"\n").split(b"\n"):
        name, sep, value = line.decode("latin-1").partition(":")
        if not sep:
            raise AssertionError(f"malformed CGI header line {line!r} in {raw[:300]!r}")
        if name.strip().lower() == "status":
            status = int(value.split()[0])
        headers.append((name.strip(), value.strip()))
    return HttpResponse(status, headers, body)


def cgi_fcgi(
    connect: str,
    method: str = "GET",
    path: str = "/",
    *,
    query: str = "",
    body: bytes = b"",
    headers: Mapping[str, str] | None = None,
    timeout: float = 30.0,
) -> HttpResponse:
    """One request through ``cgi-fcgi -bind -connect ADDR`` with a CGI environment.

    ``connect`` is a UNIX socket path or ``host:port``. cgi-fcgi reads CONTENT_LENGTH bytes of
    stdin as the body and prints the raw CGI response, which is parsed here.
    """
    tool = require_binary("cgi-fcgi", "libfcgi-bin")
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "GATEWAY_INTERFACE": "CGI/1.1",
        "SERVER_SOFTWARE": "cgi-fcgi",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "SERVER_NAME": "localhost",
        "SERVER_PORT": "80",
        "REMOTE_ADDR": "127.0.0.1",
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": "",
        "PATH_INFO": path,
        "QUERY_STRING": query,
        "REQUEST_URI": path + (f"?{query}" if query else ""),
    }
    if body or method in ("POST", "PUT"):
        env["CONTENT_LENGTH"] = str(len(body))
        env["CONTENT_TYPE"] = "application/octet-stream"
    for name, value in (headers or {}).items():
        key = name.upper().replace("-", "_")
        if key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            env[key] = value
        else:
            env[f"HTTP_{key}"] = value
    done = subprocess.run(
        [tool, "-bind", "-connect", connect],
        input=body,
        env=env,
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0 and not done.stdout:
        raise AssertionError(
            f"cgi-fcgi -connect {connect} exited {done.returncode}: "
            f"{done.stderr.decode('utf-8', 'replace')}"
        )
    return parse_cgi_response(done.stdout)


# --------------------------------------------------------------------------------------------
# Servers


@dataclass
class HttpServer:
    """A running web server (nginx, lighttpd, Apache) listening on 127.0.0.1:port."""

    name: str
    port: int
    proc: subprocess.Popen[bytes]
    prefix: Path
    error_log: Path
    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def request(
        self,
        method: str,
        target: str,
        *,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 30.0,
    ) -> HttpResponse:
        return http_request(
            self.host, self.port, method, target, body=body, headers=headers, timeout=timeout
        )

    def get(self, target: str, *, timeout: float = 30.0) -> HttpResponse:
        return self.request("GET", target, timeout=timeout)


C_HELLO_SOURCE = r"""
/* Written by tests/integration/servers.py: a plain libfcgi responder.
 * QUERY_STRING "sleep_ms=N" makes it hold the request N ms (to keep a worker busy). */
#include <fcgi_stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int main(void)
{
    while (FCGI_Accept() >= 0) {
        const char *q = getenv("QUERY_STRING");
        if (q != NULL && strncmp(q, "sleep_ms=", 9) == 0)
            usleep(1000 * (useconds_t)atoi(q + 9));
        printf("Content-Type: text/plain\r\n\r\nhello from C pid %d\n", (int)getpid());
    }
    return 0;
}
"""

PHP_SOURCE = """<?php
header("Content-Type: text/plain");
echo "hello from php pid ", getmypid(), "\\n";
echo "PHP_FCGI_CHILDREN=", getenv("PHP_FCGI_CHILDREN"), "\\n";
"""


def compile_c_hello(directory: Path) -> Path:
    """Compile the libfcgi hello app into ``directory`` (0755, so www-data/nobody can run it)."""
    gcc = require_binary("gcc", "gcc")
    require_file("/usr/include/fcgi_stdio.h", "libfcgi-dev")
    src = directory / "hello.c"
    out = directory / "hello"
    src.write_text(C_HELLO_SOURCE)
    done = subprocess.run(
        [gcc, "-O2", "-Wall", "-Werror", "-o", str(out), str(src), "-lfcgi"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise ServerStartError(f"compiling the C libfcgi app failed:\n{done.stderr}")
    out.chmod(0o755)
    return out


def _fastcgi_target(backend: str) -> str:
    """nginx's spelling of a backend: ``unix:/p`` stays, ``/p`` becomes ``unix:/p``."""
    return f"unix:{backend}" if backend.startswith("/") else backend


class Servers:
    """Starts real servers and FastCGI programs in ``workdir``; stops only what it started.

    Use it through the ``servers`` fixture (function scope), or ``open_servers()`` anywhere else.
    """

    def __init__(self, procs: ProcessGroup, workdir: Path, logbook: LogBook | None = None) -> None:
        self.procs = procs
        self.workdir = workdir
        self.logbook = logbook if logbook is not None else LogBook()
        self.mark = uuid.uuid4().hex
        self._counter = 0
        self._logs: dict[int, tuple[Path, Path]] = {}

    # ---- generic -----------------------------------------------------------------------------

    def unique(self, stem: str) -> str:
        self._counter += 1
        return f"{stem}{self._counter}"

    def env(self, **extra: str) -> dict[str, str]:
        """base_env() plus this instance's marker (see module docstring)."""
        return base_env(**{MARK_VAR: self.mark, **extra})

    def start(
        self,
        label: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        stdin: int | None = subprocess.DEVNULL,
        cwd: Path | None = None,
        pass_fds: Sequence[int] = (),
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` in its own session, stdout/stderr to log files in workdir."""
        name = self.unique(label)
        out_path = self.logbook.add(f"{name} stdout", self.workdir / f"{name}.out")
        err_path = self.logbook.add(f"{name} stderr", self.workdir / f"{name}.err")
        full_env = dict(env) if env is not None else self.env()
        full_env.setdefault(MARK_VAR, self.mark)
        with out_path.open("wb") as out, err_path.open("wb") as err:
            proc = self.procs.start(
                argv,
                env=full_env,
                cwd=cwd,
                stdin=stdin,
                stdout=out.fileno(),
                stderr=err.fileno(),
                pass_fds=pass_fds,
            )
        self._logs[proc.pid] = (out_path, err_path)
        return proc

    def output(self, proc: subprocess.Popen[bytes]) -> tuple[str, str]:
        """(stdout, stderr) that a process started by ``start`` has written so far."""
        out_path, err_path = self._logs[proc.pid]
        return (
            out_path.read_text(errors="replace") if out_path.exists() else "",
            err_path.read_text(errors="replace") if err_path.exists() else "",
        )

    def wait_unix(
        self,
        path: Path,
        *,
        what: str,
        proc: subprocess.Popen[bytes] | None = None,
        timeout: float = READY_TIMEOUT,
    ) -> None:
        wait_ready(
            lambda: can_connect_unix(path),
            what=what,
            logbook=self.logbook,
            proc=proc,
            timeout=timeout,
        )

    def wait_tcp(
        self,
        host: str,
        port: int,
        *,
        what: str,
        proc: subprocess.Popen[bytes] | None = None,
        timeout: float = READY_TIMEOUT,
    ) -> None:
        wait_ready(
            lambda: can_connect_tcp(host, port),
            what=what,
            logbook=self.logbook,
            proc=proc,
            timeout=timeout,
        )

    def listening_unix_socket(self, name: str = "app.sock", backlog: int = 128) -> socket.socket:
        """A UNIX listening socket bound by the test, to hand to a runtime as fd 0."""
        path = self.workdir / name
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
        path.chmod(0o666)
        sock.listen(backlog)
        return sock

    def close(self) -> None:
        """Stop everything: the process groups, then whatever still carries our marker."""
        self.procs.stop_all()
        kill_marked(self.mark)

    # ---- FastCGI backends --------------------------------------------------------------------

    def fcgispawn(
        self,
        args: Sequence[str],
        *,
        label: str = "fcgispawn",
        env: Mapping[str, str] | None = None,
        stdin: int | None = subprocess.DEVNULL,
        wait_unix: Path | None = None,
        wait_tcp: tuple[str, int] | None = None,
        timeout: float = READY_TIMEOUT,
    ) -> subprocess.Popen[bytes]:
        """Start ``fcgispawn ARGS`` (the venv's console script); wait for its socket if asked."""
        proc = self.start(label, [*fcgispawn_argv(), *args], env=env, stdin=stdin, cwd=REPO)
        if wait_unix is not None:
            self.wait_unix(
                wait_unix, what=f"fcgispawn {' '.join(args)}", proc=proc, timeout=timeout
            )
        if wait_tcp is not None:
            self.wait_tcp(*wait_tcp, what=f"fcgispawn {' '.join(args)}", proc=proc, timeout=timeout)
        return proc

    def run_fcgispawn(
        self, args: Sequence[str], *, timeout: float = 30.0, env: Mapping[str, str] | None = None
    ) -> tuple[int, str, str]:
        """Run ``fcgispawn ARGS`` to completion (bounded): (exit status, stdout, stderr).

        Output goes to files, not pipes, so a detached supervisor that kept them open cannot
        hang the test; it is still in our process group and carries our marker."""
        proc = self.fcgispawn(args, label="fcgispawn-run", env=env)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            out, err = self.output(proc)
            raise AssertionError(
                f"fcgispawn {' '.join(args)} did not return within {timeout}s\n"
                f"stdout: {out}\nstderr: {err}"
            ) from exc
        out, err = self.output(proc)
        return proc.returncode, out, err

    def tcp_listening_socket(self, host: str = "127.0.0.1", backlog: int = 128) -> socket.socket:
        """A TCP listening socket on a free loopback port, to hand to a runtime as fd 0."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, 0))
        sock.listen(backlog)
        return sock

    def runtime_on_fd0(
        self,
        app: str = APP,
        *,
        extra: Sequence[str] = (),
        sock: socket.socket | None = None,
        name: str = "app.sock",
    ) -> tuple[subprocess.Popen[bytes], str]:
        """``fcgispawn --wsgi APP`` serving a listening socket the test bound, given as fd 0.

        ``sock`` defaults to a new UNIX socket ``name`` (mode 0666) in workdir. Returns the
        process and the address (UNIX path, or ``HOST:PORT``). Ready means the runtime itself
        accepted and closed a probe connection (the kernel alone would only queue it)."""
        if sock is None:
            sock = self.listening_unix_socket(name)
        bound = sock.getsockname()
        address = bound if isinstance(bound, str) else f"{bound[0]}:{bound[1]}"
        try:
            proc = self.fcgispawn(["--wsgi", app, *extra], label="runtime", stdin=sock.fileno())
        finally:
            sock.close()  # the child holds its own copy on fd 0
        wait_ready(
            lambda: _probe_closes(address),
            what=f"fcgispawn --wsgi {app} on fd 0",
            logbook=self.logbook,
            proc=proc,
        )
        return proc, address

    def spawn_fcgi(
        self,
        argv: Sequence[str],
        *,
        socket_path: Path | None = None,
        port: int | None = None,
        mode: str = "0666",
        extra: Sequence[str] = (),
    ) -> subprocess.Popen[bytes]:
        """The reference spawner: ``spawn-fcgi -n -s SOCK -M MODE -- APP`` (execs the app in
        place, so the pid is the app's and it stays in our process group) or ``-a/-p``."""
        tool = require_binary("spawn-fcgi", "spawn-fcgi")
        where: list[str]
        if socket_path is not None:
            where = ["-s", str(socket_path), "-M", mode]
        elif port is not None:
            where = ["-a", "127.0.0.1", "-p", str(port)]
        else:
            raise ValueError("spawn_fcgi needs socket_path or port")
        proc = self.start("spawn-fcgi", [tool, "-n", *where, *extra, "--", *argv])
        if socket_path is not None:
            self.wait_unix(socket_path, what="spawn-fcgi", proc=proc)
        else:
            assert port is not None
            self.wait_tcp("127.0.0.1", port, what="spawn-fcgi", proc=proc)
        return proc

    def socket_activate(
        self,
        socket_path: Path,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        fdname: str = "fcgi",
    ) -> subprocess.Popen[bytes]:
        """``systemd-socket-activate -l SOCK --fdname=NAME -E VAR=VALUE... ARGV``.

        It binds, then execs ARGV (same pid) at the first connection with the socket on fd 3
        and LISTEN_FDS=1; it passes on only what ``-E`` names, so the environment is spelled
        out. Readiness: the socket is connectable (that first probe triggers the exec)."""
        tool = require_binary("systemd-socket-activate", "systemd")
        pass_env = dict(env) if env is not None else self.env()
        pass_env.setdefault(MARK_VAR, self.mark)
        e_args = [f"-E{k}={v}" for k, v in pass_env.items()]
        proc = self.start(
            "socket-activate",
            [tool, "-l", str(socket_path), f"--fdname={fdname}", *e_args, *argv],
            env=pass_env,
        )
        self.wait_unix(socket_path, what="systemd-socket-activate", proc=proc)
        # After the first connection it execs the program; wait until that program accepts.
        wait_ready(
            lambda: _probe_closes(socket_path),
            what=f"{argv[0]} under systemd-socket-activate",
            logbook=self.logbook,
            proc=proc,
        )
        return proc

    # ---- web servers -------------------------------------------------------------------------

    def _prefix(self, name: str) -> Path:
        prefix = self.workdir / self.unique(name)
        prefix.mkdir(mode=0o755)
        return prefix

    def nginx(
        self,
        backend: str,
        *,
        keep_conn: bool = False,
        php_root: Path | None = None,
        read_timeout: int = 60,
    ) -> HttpServer:
        """A private nginx (own prefix, ``user root;``) passing everything to ``backend``.

        ``backend``: a UNIX socket path, ``unix:/path``, ``127.0.0.1:PORT`` or ``[::1]:PORT``.
        ``keep_conn``: ``fastcgi_keep_conn on`` with an upstream ``keepalive`` pool (the only
        way nginx sends FCGI_KEEP_CONN). ``php_root``: serve ``*.php`` files from that root with
        SCRIPT_FILENAME (for php-cgi); otherwise SCRIPT_NAME="" and PATH_INFO=the URI path, as
        WSGI apps expect. Debian's fastcgi_params is included either way."""
        binary = require_binary("nginx", "nginx-light")
        prefix = self._prefix("nginx")
        port = _free_port()
        error_log = self.logbook.add("nginx error.log", prefix / "error.log")
        target = _fastcgi_target(backend)
        upstream = ""
        keep = ""
        if keep_conn:
            upstream = f"upstream backend {{ server {target}; keepalive 8; }}"
            target = "backend"
            keep = "fastcgi_keep_conn on;"
        params = require_file("/etc/nginx/fastcgi_params", "nginx-common")
        if php_root is not None:
            script = (
                f"root {php_root};\n"
                f"include {params};\n"
                "fastcgi_param SCRIPT_FILENAME $document_root$fastcgi_script_name;\n"
            )
        else:
            # The shipped recipe's shape (examples/nginx.conf): an empty script part makes
            # fastcgi_params' SCRIPT_NAME "" (no duplicate param), the whole URI is PATH_INFO.
            script = (
                "fastcgi_split_path_info ^()(.*)$;\n"
                f"include {params};\n"
                "fastcgi_param PATH_INFO $fastcgi_path_info;\n"
            )
        temp = "\n".join(
            f"{kind}_temp_path {prefix}/{kind}_temp;"
            for kind in ("client_body", "fastcgi", "proxy", "uwsgi", "scgi")
        )
        conf = prefix / "nginx.conf"
        conf.write_text(
            f"""
user root;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {error_log} notice;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    {temp}
    client_max_body_size 64m;
    client_body_buffer_size 1m;
    {upstream}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            fastcgi_pass {target};
            {keep}
            {script}
            fastcgi_buffering on;
            fastcgi_buffers 16 64k;
            fastcgi_read_timeout {read_timeout}s;
            fastcgi_send_timeout {read_timeout}s;
        }}
    }}
}}
"""
        )
        proc = self.start(
            "nginx",
            [
                binary,
                "-p",
                f"{prefix}/",
                "-e",
                str(error_log),
                "-c",
                str(conf),
                "-g",
                "daemon off;",
            ],
        )
        self.wait_tcp("127.0.0.1", port, what="nginx", proc=proc)
        return HttpServer("nginx", port, proc, prefix, error_log)

    def lighttpd(
        self,
        socket_path: Path,
        *,
        bin_path: Sequence[str] | None = None,
        bin_environment: Mapping[str, str] | None = None,
        max_procs: int = 1,
    ) -> HttpServer:
        """A private lighttpd with mod_fastcgi on ``/`` (``check-local`` disabled).

        With ``bin_path`` lighttpd binds ``socket_path`` itself (as SOCK-0, SOCK-1...) and
        spawns that program with the listening socket on fd 0 and ``bin_environment`` (it
        changes into the program's directory, hence PYTHONPATH). Without it, lighttpd only
        connects to an existing ``socket_path``."""
        binary = require_binary("lighttpd", "lighttpd")
        prefix = self._prefix("lighttpd")
        (prefix / "htdocs").mkdir()
        (prefix / "upload").mkdir()
        port = _free_port()
        error_log = self.logbook.add("lighttpd error.log", prefix / "error.log")
        options = [
            f'"socket" => "{socket_path}"',
            '"check-local" => "disable"',
            '"fix-root-scriptname" => "enable"',
        ]
        if bin_path is not None:
            env = dict(bin_environment) if bin_environment is not None else self.env()
            env.setdefault(MARK_VAR, self.mark)
            env_items = ", ".join(f'"{k}" => "{v}"' for k, v in env.items())
            options += [
                f'"bin-path" => "{" ".join(bin_path)}"',
                f'"bin-environment" => ( {env_items} )',
                f'"max-procs" => {max_procs}',
            ]
        conf = prefix / "lighttpd.conf"
        conf.write_text(
            f"""
server.modules = ( "mod_fastcgi" )
server.document-root = "{prefix}/htdocs"
server.bind = "127.0.0.1"
server.port = {port}
server.errorlog = "{error_log}"
server.pid-file = "{prefix}/lighttpd.pid"
server.upload-dirs = ( "{prefix}/upload" )
server.max-request-size = 65536
server.max-connections = 512
fastcgi.debug = 0
fastcgi.server = ( "/" => ( "backend" => ( {", ".join(options)} ) ) )
"""
        )
        proc = self.start("lighttpd", [binary, "-D", "-f", str(conf)])
        self.wait_tcp("127.0.0.1", port, what="lighttpd", proc=proc)
        return HttpServer("lighttpd", port, proc, prefix, error_log)

    def _apache(self, name: str, body: str, *, modules: Sequence[str]) -> HttpServer:
        binary = require_binary("apache2", "apache2")
        prefix = self._prefix(name)
        for sub in ("htdocs", "run", "mutex"):
            (prefix / sub).mkdir(mode=0o755)
        port = _free_port()
        error_log = self.logbook.add(f"{name} error_log", prefix / "error.log")
        mods = "/usr/lib/apache2/modules"
        loads = "\n".join(
            f"LoadModule {m}_module {require_file(f'{mods}/mod_{m}.so', 'apache2')}"
            for m in ("mpm_event", "authz_core", *modules)
        )
        conf = prefix / "httpd.conf"
        conf.write_text(
            f"""
ServerRoot "{prefix}"
{loads}
ServerName localhost
Listen 127.0.0.1:{port}
PidFile "{prefix}/run/httpd.pid"
DefaultRuntimeDir "{prefix}/run"
Mutex file:{prefix}/mutex default
ErrorLog "{error_log}"
LogLevel {" ".join(["warn", *(f"{m}:info" for m in modules if "fcgi" in m)])}
User www-data
Group www-data
DocumentRoot "{prefix}/htdocs"
LimitRequestBody 0
StartServers 1
ServerLimit 2
ThreadsPerChild 64
MaxRequestWorkers 128
<Directory />
    Require all granted
</Directory>
{body}
"""
        )
        proc = self.start(
            name,
            [binary, "-f", str(conf), "-DFOREGROUND"],
            env=self.env(APACHE_RUN_DIR=str(prefix / "run")),
        )
        self.wait_tcp("127.0.0.1", port, what=name, proc=proc)
        return HttpServer(name, port, proc, prefix, error_log)

    def apache_proxy(self, backend: str, *, reuse: bool = False) -> HttpServer:
        """Apache 2.4 mod_proxy_fcgi: ``ProxyPass / fcgi://127.0.0.1:PORT/`` for TCP, or
        ``unix:/path|fcgi://localhost/`` for a UNIX socket (connectable by www-data!).
        ``reuse``: ``enablereuse=on`` (kept connections, FCGI_KEEP_CONN)."""
        if backend.startswith("unix:") or backend.startswith("/"):
            url = f"unix:{backend.removeprefix('unix:')}|fcgi://localhost/"
        else:
            url = f"fcgi://{backend}/"
        options = " enablereuse=on" if reuse else ""
        return self._apache(
            "apache-proxy",
            f'ProxyPass "/" "{url}"{options}\nProxyTimeout 60\n',
            modules=("proxy", "proxy_fcgi"),
        )

    def apache_fcgid(
        self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, max_procs: int = 4
    ) -> HttpServer:
        """Apache 2.4 mod_fcgid spawning ``argv`` (through a wrapper script) with the socket on
        fd 0, as **www-data**: the wrapper, the program, its interpreter and everything it reads
        must be readable and executable by www-data. This checks that up front and skips LOUDLY
        when it is impossible (e.g. a venv under /root)."""
        prefix_env = dict(env) if env is not None else self.env()
        prefix_env.setdefault(MARK_VAR, self.mark)
        problem = _unreadable_for_www_data(
            [Path(argv[0]), *_interpreter(Path(argv[0])), REPO / "tests" / "integration"]
        )
        if problem is not None:
            pytest.skip(
                f"!!! mod_fcgid runs its programs as www-data, which cannot use "
                f"{problem}; put the venv in a world-readable place (scripts/setup.sh "
                f"makes it with Debian's /usr/bin/python3 under the repo) !!!"
            )
        wrapper = self.workdir / self.unique("fcgid-wrapper")
        wrapper.write_text("#!/bin/sh\nexec " + shlex.join(argv) + "\n")
        wrapper.chmod(0o755)
        ipc = self.workdir / self.unique("fcgid-ipc")
        ipc.mkdir(mode=0o755)
        shutil.chown(ipc, "www-data", "www-data")
        initial_env = "\n".join(f"FcgidInitialEnv {k} {v}" for k, v in prefix_env.items())
        body = f"""
FcgidIPCDir "{ipc}"
FcgidProcessTableFile "{self.workdir}/{self.unique("fcgid-shm")}"
FcgidMaxRequestLen 67108864
FcgidMaxProcessesPerClass {max_procs}
FcgidMinProcessesPerClass 0
FcgidIOTimeout 60
FcgidConnectTimeout 20
{initial_env}
<Location "/">
    SetHandler fcgid-script
    Options +ExecCGI
    FcgidWrapper "{wrapper}" virtual
</Location>
"""
        return self._apache("apache-fcgid", body, modules=("fcgid",))


def _interpreter(program: Path) -> list[Path]:
    """The ``#!`` interpreter of a script (a venv's console script runs the venv's python)."""
    try:
        with program.open("rb") as f:
            first = f.readline(512)
    except OSError:
        return []
    if not first.startswith(b"#!"):
        return []
    words = first[2:].decode("utf-8", "replace").split()
    return [Path(words[0])] if words else []


def _unreadable_for_www_data(paths: Sequence[Path]) -> str | None:
    """The first path (or a parent, or a symlink target) www-data cannot reach, else None."""
    for path in paths:
        chain = [path, *path.parents]
        resolved = path.resolve()
        chain += [resolved, *resolved.parents]
        for part in chain:
            try:
                st = part.stat()
            except OSError:
                return str(part)
            if stat.S_ISDIR(st.st_mode):
                if not st.st_mode & stat.S_IXOTH:
                    return f"{part} (directory mode {stat.S_IMODE(st.st_mode):o})"
            elif not st.st_mode & stat.S_IROTH:
                return f"{part} (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _probe_closes(address: str | Path) -> bool:
    """Connect to a UNIX path or ``HOST:PORT``, half-close, and wait briefly for the peer to
    close too: a FastCGI app that accepted sees EOF before any record and hangs up."""
    text = str(address)
    if text.startswith("/"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target: str | tuple[str, int] = text
    else:
        host, _, port = text.rpartition(":")
        host = host.strip("[]")
        s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        target = (host, int(port))
    with s:
        s.settimeout(0.5)
        try:
            s.connect(target)
            s.shutdown(socket.SHUT_WR)
            s.recv(1)
        except OSError:  # includes the timeout: nobody accepted yet
            return False
        return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# --------------------------------------------------------------------------------------------
# wrk


@dataclass(frozen=True)
class WrkResult:
    requests: int
    non_2xx: int
    socket_errors: dict[str, int]
    output: str


def parse_wrk(output: str) -> WrkResult:
    """Read wrk's summary without a Lua script: it prints ``Non-2xx or 3xx responses: N`` and
    ``Socket errors: connect N, read N, write N, timeout N`` only when they are non-zero."""
    m = re.search(r"^\s*(\d+) requests in ", output, re.M)
    if m is None:
        raise AssertionError(f"wrk printed no request count:\n{output}")
    non = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", output)
    errors = {"connect": 0, "read": 0, "write": 0, "timeout": 0}
    se = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    if se is not None:
        errors = dict(zip(errors, (int(g) for g in se.groups()), strict=True))
    return WrkResult(int(m.group(1)), int(non.group(1)) if non else 0, errors, output)


@contextlib.contextmanager
def open_servers(workdir: Path | None = None) -> Iterator[Servers]:
    """Servers outside pytest fixtures: a temp dir and a process group, both cleaned up."""
    own = workdir is None
    path = workdir if workdir is not None else Path(tempfile.mkdtemp(prefix="fs-", dir="/tmp"))
    path.chmod(0o755)
    with process_group() as group:
        servers = Servers(group, path)
        try:
            yield servers
        finally:
            servers.close()
            if own:
                shutil.rmtree(path, ignore_errors=True)

"""Shared machinery of the benchmark scripts: processes, CPU accounting, nginx, the C tools.

Why one module: bench.py, large.py and supervisor.py must start, account for and stop backends
the same way, or their numbers are not comparable. Rules kept here:
- every process we start is stopped by pid (its tree), never by name;
- we are a child subreaper, so a launcher that forks and exits (spawn-fcgi) leaves its workers
  with us, where we can find, account for and reap them;
- only UNIX sockets in a private temp dir and loopback TCP are ever bound.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
VENV = Path(os.environ.get("FCGISPAWN_VENV", REPO / ".venv")).resolve()
VENV_BIN = VENV / "bin"
VENV_PYTHON = VENV_BIN / "python"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PR_SET_CHILD_SUBREAPER = 36


def log(message: str) -> None:
    """Progress goes to stderr so stdout stays the report."""
    print(message, file=sys.stderr, flush=True)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def become_subreaper() -> None:
    """Orphans of our launchers (spawn-fcgi's children) are re-parented to us, not to init.

    Also makes SIGINT and SIGTERM raise KeyboardInterrupt (even when started in the background,
    where a shell leaves SIGINT ignored), so the scripts' `finally` blocks stop what they started.
    """
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        log(f"warning: prctl(PR_SET_CHILD_SUBREAPER) failed: errno {ctypes.get_errno()}")


def make_workdir() -> Path:
    """A short private directory: UNIX socket paths must fit in 108 bytes."""
    return Path(tempfile.mkdtemp(prefix="fcgib-", dir="/tmp"))


# ---- compiling the C tools ---------------------------------------------------------------


def compile_c(source: Path, output: Path, libs: Sequence[str] = ()) -> Path:
    """gcc -O2 into the temp dir: binaries are never written into the repo."""
    argv = ["gcc", "-O2", "-Wall", "-o", str(output), str(source), *libs]
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"bench: compiling {source.name} failed:\n{result.stderr}")
    return output


# ---- /proc accounting ----------------------------------------------------------------------


def _read_stat(pid: int) -> tuple[int, int, int] | None:
    """(ppid, utime, stime in ticks) of one process, or None if it is gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: split after the last ')'.
    fields = data[data.rindex(b")") + 2 :].split()
    # fields[0] is state (field 3); ppid is field 4, utime 14, stime 15 (1-based).
    return int(fields[1]), int(fields[11]), int(fields[12])


def process_table() -> dict[int, int]:
    """pid -> ppid for every process we can see."""
    table: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _read_stat(int(entry))
            if stat is not None:
                table[int(entry)] = stat[0]
    return table


def descendants(roots: Iterable[int], table: Mapping[int, int] | None = None) -> set[int]:
    """The roots that are alive and all their descendants."""
    table = process_table() if table is None else table
    children: dict[int, list[int]] = {}
    for pid, ppid in table.items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    todo = [pid for pid in roots if pid in table]
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        found.add(pid)
        todo.extend(children.get(pid, ()))
    return found


class Cpu(NamedTuple):
    """CPU time in seconds, split: user space (the backend's own code, and for Python peers the
    interpreter) and kernel (syscalls, wake-ups). The split tells which side a gap is on."""

    user: float
    system: float

    @property
    def total(self) -> float:
        return self.user + self.system


def cpu_ticks(pids: Iterable[int]) -> dict[int, tuple[int, int]]:
    """(utime, stime) (all threads) of each pid still alive."""
    out: dict[int, tuple[int, int]] = {}
    for pid in pids:
        stat = _read_stat(pid)
        if stat is not None:
            out[pid] = stat[1], stat[2]
    return out


def cpu_between(
    before: Mapping[int, tuple[int, int]], after: Mapping[int, tuple[int, int]]
) -> Cpu:
    """CPU the processes alive in both samples used in between (a process that died is lost)."""
    alive = [pid for pid in before if pid in after]
    user = sum(after[pid][0] - before[pid][0] for pid in alive)
    system = sum(after[pid][1] - before[pid][1] for pid in alive)
    return Cpu(user / CLK_TCK, system / CLK_TCK)


def cpu_ns(pids: Iterable[int]) -> int:
    """Scheduler run time (ns) of every live thread of pids, from /proc/PID/task/*/schedstat.

    Nanosecond-precise where /proc/PID/stat counts 10 ms ticks; but a thread that exits takes
    its time with it, so use it only for short windows with a fixed set of threads.
    """
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError, ValueError, IndexError):
                    text = Path(f"/proc/{pid}/task/{task}/schedstat").read_text()
                    total += int(text.split()[0])
    return total


def status_fields(pid: int) -> dict[str, str]:
    """/proc/PID/status as a dict (VmHWM, VmRSS, voluntary_ctxt_switches, ...)."""
    out: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            out[name] = value.strip()
    return out


def kib(value: str) -> int:
    """'1234 kB' -> 1234."""
    return int(value.split(maxsplit=1)[0]) if value else 0


# ---- machine idleness ------------------------------------------------------------------------


def _cpu_totals() -> tuple[int, int]:
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return idle, sum(fields[:8])


def idle_fraction(seconds: float = 1.0) -> float:
    """Share of all CPUs idle over the next ``seconds`` (from /proc/stat)."""
    idle0, total0 = _cpu_totals()
    time.sleep(seconds)
    idle1, total1 = _cpu_totals()
    return (idle1 - idle0) / max(1, total1 - total0)


def check_idle(what: str, *, threshold: float = 0.90, wait: float = 0.0) -> str:
    """Samples /proc/stat over 1 s (again, up to ``wait`` seconds, while the machine is busy).

    Returns a warning (also logged) when the machine never was idle: this machine may be
    shared, and a busy neighbour makes every figure of that run suspect.
    """
    deadline = time.monotonic() + wait
    idle = idle_fraction()
    while idle < threshold and time.monotonic() < deadline:
        idle = idle_fraction()
    if idle < threshold:
        load1 = Path("/proc/loadavg").read_text().split()[0]
        warning = f"machine not idle before {what}: {idle:.0%} idle over 1 s (loadavg {load1})"
        log("WARNING: " + warning)
        return warning
    return ""


# ---- processes ---------------------------------------------------------------------------------


# Every pid this run started itself (launchers, nginx, load generators): a child of ours that
# is not in here is an orphan a launcher left with us.
OWN_PIDS: set[int] = set()


@dataclass
class Launched:
    """A process tree we started: the launcher and the orphans it left with us."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    adopts_orphans: bool = True  # False for nginx: its workers stay its children

    def pids(self) -> set[int]:
        """The launcher's tree plus orphans re-parented to us (we are a subreaper).

        Only one backend runs at a time, so any orphan of ours is that backend's.
        """
        table = process_table()
        roots = [self.proc.pid]
        if self.adopts_orphans:
            me = os.getpid()
            roots += [p for p, pp in table.items() if pp == me and p not in OWN_PIDS]
        return descendants(roots, table)

    def log_tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


def popen(argv: Sequence[str], **kwargs: object) -> subprocess.Popen[bytes]:
    """subprocess.Popen that records the pid as ours (see OWN_PIDS)."""
    proc: subprocess.Popen[bytes] = subprocess.Popen(list(argv), **kwargs)  # type: ignore[call-overload]
    OWN_PIDS.add(proc.pid)
    return proc


def run_tool(argv: Sequence[str], timeout: float) -> tuple[int, str, str]:
    """Runs a load generator to completion: (exit status, stdout, stderr)."""
    proc = popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


class Processes:
    """Everything this run started, so it can all be stopped by pid at the end."""

    def __init__(self) -> None:
        self.started: list[Launched] = []

    def launch(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        adopts_orphans: bool = True,
    ) -> Launched:
        """Starts argv in its own session, output to log_path."""
        with open(log_path, "wb") as out:
            proc = popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=True,
            )
        launched = Launched(name, proc, log_path, adopts_orphans)
        self.started.append(launched)
        return launched

    def stop(self, launched: Launched, first: signal.Signals = signal.SIGINT) -> None:
        """Signals the launcher, then TERM and finally KILL whatever of its tree is left.

        SIGINT first: uWSGI 2.0 treats SIGTERM to its master as "reload", and flup's prefork
        parent only notices its stop flag when a child goes away.
        """
        pids = launched.pids()
        if launched.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(launched.proc.pid, first)
        if not _wait_gone(pids, 3.0):
            for pid in launched.pids() | pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            if not _wait_gone(pids, 3.0):
                for pid in launched.pids() | pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                _wait_gone(pids, 3.0)
        with contextlib.suppress(subprocess.TimeoutExpired):
            launched.proc.wait(1.0)
        reap_orphans()

    def stop_all(self) -> None:
        """Stops every tree still running, last started first (nginx's workers included)."""
        for launched in reversed(self.started):
            if launched.proc.poll() is None or launched.pids():
                self.stop(launched)
        reap_orphans()


def reap_orphans() -> None:
    """Collects adopted children that have exited (we are their subreaper).

    Only orphans: our own Popen children are left to subprocess, which wants their status.
    """
    me = os.getpid()
    for pid, ppid in process_table().items():
        if ppid == me and pid not in OWN_PIDS and not is_alive(pid):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)


def _wait_gone(pids: Iterable[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    pids = set(pids)
    while time.monotonic() < deadline:
        reap_orphans()
        alive = {p for p in pids if is_alive(p)}
        if not alive:
            return True
        time.sleep(0.05)
    return False


def is_alive(pid: int) -> bool:
    """True while pid exists and is not a zombie."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return data[data.rindex(b")") + 2 : data.rindex(b")") + 3] != b"Z"


# ---- FastCGI probe ------------------------------------------------------------------------------


def _record(rtype: int, content: bytes) -> bytes:
    pad = -len(content) % 8
    return struct.pack("!BBHHBx", 1, rtype, 1, len(content), pad) + content + b"\0" * pad


def _pairs(pairs: Mapping[str, str]) -> bytes:
    out = bytearray()
    for name, value in pairs.items():
        for item in (name, value):
            n = len(item.encode())
            out += bytes([n]) if n < 128 else struct.pack("!I", n | 0x80000000)
        out += name.encode() + value.encode()
    return bytes(out)


def fastcgi_get(path: str, uri: str = "/", timeout: float = 5.0) -> bytes:
    """One GET over a fresh connection; returns the raw STDOUT stream (b'' on failure)."""
    params = {
        "REQUEST_METHOD": "GET",
        "SCRIPT_NAME": "",
        "PATH_INFO": uri.partition("?")[0],
        "QUERY_STRING": uri.partition("?")[2],
        "REQUEST_URI": uri,
        "SERVER_NAME": "localhost",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "GATEWAY_INTERFACE": "CGI/1.1",
        "REMOTE_ADDR": "127.0.0.1",
    }
    request = (
        _record(1, struct.pack("!HB5x", 1, 0))
        + _record(4, _pairs(params))
        + _record(4, b"")
        + _record(5, b"")
    )
    stdout = bytearray()
    buf = bytearray()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.sendall(request)
            while True:
                data = sock.recv(65536)
                if not data:
                    return b""
                buf += data
                while len(buf) >= 8:
                    _, rtype, _, clen, plen = struct.unpack_from("!BBHHB", buf)
                    if len(buf) < 8 + clen + plen:
                        break
                    if rtype == 6:
                        stdout += buf[8 : 8 + clen]
                    elif rtype == 3:
                        return bytes(stdout)
                    del buf[: 8 + clen + plen]
    except OSError:
        return b""


def wait_serving(
    path: Path, launched: Launched, expect: bytes, timeout: float, uri: str = "/"
) -> bool:
    """Polls until a full request over path answers with expect (or the launcher dies)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and expect in fastcgi_get(str(path), uri, timeout=1.0):
            return True
        if launched.proc.poll() is not None and not (launched.pids() - {launched.proc.pid}):
            return False
        time.sleep(0.05)
    return False


def wait_procs(launched: Launched, count: int, timeout: float) -> bool:
    """Waits until the backend's tree has at least count live processes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len({p for p in launched.pids() if is_alive(p)}) >= count:
            return True
        time.sleep(0.05)
    return False


# ---- nginx ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


NGINX_CONF = """\
worker_processes 1;
user root;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    client_max_body_size 0;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            include /etc/nginx/fastcgi_params;
            fastcgi_pass unix:{socket};
{extra}
        }}
    }}
{kept}}}
"""

#: A second server block for start_nginx(keepalive_port=...): the same backend through an
#: upstream that keeps connections open (nginx's recipe for fewer connects; fcgispawn honours
#: FCGI_KEEP_CONN). keepalive 64: at least the requests in flight (wrk -c32), or nginx closes
#: and reopens connections all the time.
NGINX_KEPT_SERVER = """    upstream kept {{
        server unix:{socket};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            include /etc/nginx/fastcgi_params;
            fastcgi_pass kept;
            fastcgi_keep_conn on;
{extra}
        }}
    }}
"""


def start_nginx(
    procs: Processes,
    prefix: Path,
    socket_path: Path,
    *,
    extra: str = "",
    keepalive_port: int | None = None,
) -> tuple[Launched, int]:
    """A private nginx: one worker, access_log off, everything under prefix, loopback only.
    With ``keepalive_port``, a second server there reaches the backend through connections
    nginx keeps open (NGINX_KEPT_SERVER)."""
    prefix.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = prefix / "nginx.conf"
    kept = (
        NGINX_KEPT_SERVER.format(port=keepalive_port, socket=socket_path, extra=extra)
        if keepalive_port is not None
        else ""
    )
    conf.write_text(
        NGINX_CONF.format(prefix=prefix, port=port, socket=socket_path, extra=extra, kept=kept)
    )
    launched = procs.launch(
        "nginx",
        ["nginx", "-p", str(prefix), "-c", str(conf)],
        prefix / "nginx.out",
        adopts_orphans=False,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return launched, port
        if launched.proc.poll() is not None:
            break
        time.sleep(0.05)
    raise SystemExit(f"bench: nginx did not start:\n{launched.log_tail()}")


# ---- misc --------------------------------------------------------------------------------------


def median_range(values: Sequence[float]) -> tuple[float, float, float]:
    """(median, min, max); NaNs for an empty list."""
    if not values:
        nan = float("nan")
        return nan, nan, nan
    return statistics.median(values), min(values), max(values)


def command_output(argv: Sequence[str]) -> str:
    """First line of a version command's output (stdout or stderr), or why it failed."""
    if shutil.which(argv[0]) is None and not Path(argv[0]).exists():
        return "not installed"
    try:
        result = subprocess.run(list(argv), capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    text = (result.stdout + result.stderr).strip()
    return text.splitlines()[0] if text else f"exit {result.returncode}"


def backend_env() -> dict[str, str]:
    """The environment every backend runs with: the repo on PYTHONPATH, the venv first."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '/usr/bin:/bin')}"
    env["VIRTUAL_ENV"] = str(VENV)
    env.pop("PYTHONHOME", None)
    return env


def fcgispawn_status() -> str:
    """'' when fcgispawn's CLI is installed and offers --wsgi, else why not."""
    script = VENV_BIN / "fcgispawn"
    if not script.exists():
        return f"{script} does not exist"
    try:
        result = subprocess.run(
            [str(script), "--help"],
            capture_output=True,
            text=True,
            timeout=30,
            env=backend_env(),
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`fcgispawn --help` failed: {exc}"
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or [""]
        return f"`fcgispawn --help` exited {result.returncode}: {tail[0]}"
    if "--wsgi" not in result.stdout:
        return "`fcgispawn --help` does not offer --wsgi yet"
    return ""


def write_results_file(label: str, title: str, body: str, command: str) -> Path:
    """bench/results/YYYY-MM-DD-<label>.md with a title, the command and the body."""
    directory = BENCH / "results"
    directory.mkdir(parents=True, exist_ok=True)
    now = time.gmtime()
    path = directory / f"{time.strftime('%Y-%m-%d', now)}-{label}.md"
    python = os.path.realpath(VENV_PYTHON)
    version = command_output([str(VENV_PYTHON), "-c", "import sys; print(sys.version)"])
    git = command_output(["git", "-C", str(REPO), "describe", "--always", "--dirty"])
    path.write_text(
        f"# {title}, {time.strftime('%Y-%m-%d %H:%M', now)} UTC\n\n"
        f"Command: `{command}` (fcgispawn git {git})\n\n"
        f"Interpreter of every Python peer: {python}: {version}\n\n"
        f"{body}\n"
    )
    return path

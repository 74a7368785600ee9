"""The built-in worker program (fcgispawn.runtime) in real subprocesses.

Each test starts ``python -c`` running :func:`fcgispawn.runtime.run` the way a supervisor or a
web server would: the listening socket on fd 0, or through systemd-socket-activate's
LISTEN_FDS, or nothing at all. The runner below maps FcgiSpawnError to a message and an exit
status the way cli.py does, so the tests see what a user sees.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fcgispawn.client import ClientError, FastCGIClient
from fcgispawn.runtime import NO_SOCKET_MESSAGE
from tests.procs import REPO, ProcessGroup, can_connect_unix, wait_for

pytestmark = pytest.mark.timeout(90)

RUNNER = """
import sys
from fcgispawn.errors import FcgiSpawnError
from fcgispawn.runtime import run
try:
    sys.exit(run(sys.argv[1], threads=int(sys.argv[2]), max_requests=int(sys.argv[3]),
                 graceful_timeout=float(sys.argv[4])))
except FcgiSpawnError as exc:
    print(f"fcgispawn: {exc}", file=sys.stderr)
    detail = getattr(exc, "detail", "")
    if detail:
        print(detail, file=sys.stderr)
    sys.exit(exc.exit_code)
"""

HELLO = "tests.apps.wsgi_apps:app"


def _argv(
    app: str = HELLO, threads: int = 2, max_requests: int = 0, grace: float = 30
) -> list[str]:
    return [sys.executable, "-c", RUNNER, app, str(threads), str(max_requests), str(grace)]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    env["PYTHONPATH"] = str(REPO)
    env["PYTHONFAULTHANDLER"] = "1"  # a worker that hangs dumps its threads on SIGABRT
    env.pop("FCGI_WEB_SERVER_ADDRS", None)
    env.update(extra)
    return env


def _exit_status(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """The worker's exit status; if it has not exited within ``timeout``, fail with every
    thread's stack (faulthandler, on SIGABRT) and what it logged, not just a timeout."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        proc.wait(5)
        err = proc.stderr.read().decode("utf-8", "replace") if proc.stderr else ""
        pytest.fail(f"the worker did not exit within {timeout:g} s; its stderr:\n{err}")


def _listener(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(64)
    return sock


def _start_on_fd0(
    procs: ProcessGroup, path: Path, *, env: dict[str, str] | None = None, **kw: object
) -> subprocess.Popen[bytes]:
    listener = _listener(path)
    try:
        return procs.start(
            _argv(**kw),  # type: ignore[arg-type]
            stdin=listener.fileno(),
            env=env or _env(),
            cwd=REPO,
        )
    finally:
        listener.close()  # the child holds its own copy on fd 0


def _get(path: str, query: str = "") -> dict[str, str]:
    return {"REQUEST_METHOD": "GET", "SCRIPT_NAME": "", "PATH_INFO": path, "QUERY_STRING": query}


def test_a_detached_supervisors_worker_logs_where_the_supervisor_does(
    procs: ProcessGroup, sockdir: Path
) -> None:
    """A detached supervisor's workers have /dev/null as stderr: with DAEMON_LOG_ENV (set by
    the spawner) they log where the supervisor does (systemd.daemon_log: the journal, else
    syslog), so an app's tracebacks and wsgi.errors are not lost. Here daemon_log is pointed
    at a file."""
    path, logfile = sockdir / "d.sock", sockdir / "daemon.log"
    runner = (
        "import fcgispawn.systemd as s\n"
        f"s.daemon_log = lambda: (lambda m: open({str(logfile)!r}, 'a').write(m + '\\n'))\n"
        + RUNNER
    )
    listener = _listener(path)
    try:
        proc = procs.start(
            [sys.executable, "-c", runner, HELLO, "1", "0", "30"],
            stdin=listener.fileno(),
            env=_env(FCGISPAWN_LOG="daemon"),
            cwd=REPO,
        )
    finally:
        listener.close()
    client = FastCGIClient(path, timeout=20)
    assert client.request(_get("/stderr")).stderr == b"logged to wsgi.errors\n"
    assert client.request(_get("/raises")).status == 500
    assert procs.stop(proc) == 0
    logged = logfile.read_text()
    assert "logged to wsgi.errors" in logged and "boom" in logged, logged
    assert proc.stderr is not None and b"boom" not in proc.stderr.read()


def test_serves_on_inherited_fd0(procs: ProcessGroup, sockdir: Path) -> None:
    path = sockdir / "a.sock"
    proc = _start_on_fd0(procs, path)
    resp = FastCGIClient(path, timeout=20).request(_get("/hello"))
    assert resp.body == b"Hello, World!"
    assert proc.poll() is None
    assert procs.stop(proc) == 0


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None, reason="needs systemd")
def test_serves_on_systemd_socket_activation(procs: ProcessGroup, sockdir: Path) -> None:
    path = sockdir / "sd.sock"
    activate = shutil.which("systemd-socket-activate")
    assert activate is not None
    proc = procs.start(
        [activate, "-l", str(path), "--fdname=fcgi", "-E", "PYTHONPATH", *_argv()],
        env=_env(),
        cwd=REPO,
    )
    wait_for(path.exists, 10, what="systemd-socket-activate to bind")
    # The first connection makes systemd-socket-activate exec the runtime with LISTEN_FDS.
    resp = FastCGIClient(path, timeout=30).request(_get("/environ"))
    environ = json.loads(resp.body)
    assert environ["pid"] == proc.pid  # exec'd in place
    assert "LISTEN_FDS" not in environ  # unset for the app and its children
    assert procs.stop(proc) == 0


def test_no_socket_exits_1_with_one_clear_line(procs: ProcessGroup) -> None:
    proc = procs.start(_argv(), env=_env(), cwd=REPO, stdin=subprocess.DEVNULL)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    lines = err.decode().strip().splitlines()
    assert lines == [f"fcgispawn: {NO_SOCKET_MESSAGE}"]


def test_app_import_error_exits_1_naming_the_app(procs: ProcessGroup, sockdir: Path) -> None:
    (sockdir / "brokenapp.py").write_text("import no_such_module_xyz\napp = None\n")
    proc = _start_on_fd0(
        procs,
        sockdir / "b.sock",
        env=_env(PYTHONPATH=f"{REPO}:{sockdir}"),
        app="brokenapp:app",
    )
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    text = err.decode()
    first = text.splitlines()[0]
    assert first.startswith("fcgispawn: ")
    assert "brokenapp:app" in first
    assert "Traceback" in text and "no_such_module_xyz" in text


def test_mistyped_app_module_exits_1_with_one_line_and_no_traceback(
    procs: ProcessGroup, sockdir: Path
) -> None:
    proc = _start_on_fd0(procs, sockdir / "m.sock", app="no_such_app_module_xyz:app")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert "no_such_app_module_xyz:app" in lines[0] and "PYTHONPATH" in lines[0]


def test_missing_callable_exits_1(procs: ProcessGroup, sockdir: Path) -> None:
    proc = _start_on_fd0(procs, sockdir / "c.sock", app="tests.apps.wsgi_apps:nope")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert "tests.apps.wsgi_apps:nope" in err.decode().splitlines()[0]


def test_sigterm_drains_a_slow_request_then_exits_0(procs: ProcessGroup, sockdir: Path) -> None:
    path = sockdir / "t.sock"
    proc = _start_on_fd0(procs, path)
    assert FastCGIClient(path, timeout=20).request(_get("/hello")).status == 200  # warm
    out: list[bytes] = []
    t = threading.Thread(
        target=lambda: out.append(
            FastCGIClient(path, timeout=20).request(_get("/slow", "s=1.5")).body
        )
    )
    t.start()
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _exit_status(proc, 20)
    t.join(10)
    assert out == [b"slept"]
    assert proc.returncode == 0


def test_sigterm_when_idle_exits_at_once(procs: ProcessGroup, sockdir: Path) -> None:
    path = sockdir / "i.sock"
    proc = _start_on_fd0(procs, path)
    FastCGIClient(path, timeout=20).request(_get("/hello"))
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert _exit_status(proc, 10) == 0
    assert time.monotonic() - t0 < 2


def test_sigquit_stops_without_waiting(procs: ProcessGroup, sockdir: Path) -> None:
    path = sockdir / "q.sock"
    proc = _start_on_fd0(procs, path)
    FastCGIClient(path, timeout=20).request(_get("/hello"))
    errors: list[Exception] = []

    def slow_request() -> None:
        try:
            FastCGIClient(path, timeout=20).request(_get("/slow", "s=10"))
        except ClientError as exc:  # expected: the worker leaves without answering
            errors.append(exc)

    t = threading.Thread(target=slow_request, daemon=True)
    t.start()
    time.sleep(0.5)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGQUIT)
    _exit_status(proc, 10)
    assert time.monotonic() - t0 < 5
    t.join(10)
    assert len(errors) == 1


def test_sigusr1_sigusr2_and_sighup_do_not_kill_the_worker(
    procs: ProcessGroup, sockdir: Path
) -> None:
    path = sockdir / "u.sock"
    proc = _start_on_fd0(procs, path)
    FastCGIClient(path, timeout=20).request(_get("/hello"))
    proc.send_signal(signal.SIGUSR1)
    proc.send_signal(signal.SIGUSR2)  # forwarded by the supervisor, as multiwatch does
    proc.send_signal(signal.SIGHUP)
    time.sleep(0.3)
    assert proc.poll() is None
    assert FastCGIClient(path, timeout=20).request(_get("/hello")).status == 200


def test_sighup_says_why_it_does_not_reload(procs: ProcessGroup, sockdir: Path) -> None:
    """gunicorn users send HUP to reload; a lone worker (supervisord's [fcgi-program], a web
    server's bin-path) did nothing without a word."""
    path = sockdir / "h.sock"
    proc = _start_on_fd0(procs, path)
    FastCGIClient(path, timeout=20).request(_get("/hello"))
    proc.send_signal(signal.SIGHUP)
    assert FastCGIClient(path, timeout=20).request(_get("/hello")).status == 200
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert "SIGHUP ignored: a worker process does not reload itself" in err.decode()


def test_max_requests_recycles_with_exit_0(procs: ProcessGroup, sockdir: Path) -> None:
    path = sockdir / "m.sock"
    proc = _start_on_fd0(procs, path, max_requests=3)
    client = FastCGIClient(path, timeout=20)
    pids = {json.loads(client.request(_get("/environ")).body)["pid"] for _ in range(3)}
    assert pids == {proc.pid}
    assert _exit_status(proc, 10) == 0


def test_multiprocess_flag_comes_from_the_environment(procs: ProcessGroup, sockdir: Path) -> None:
    path = sockdir / "mp.sock"
    _start_on_fd0(procs, path, env=_env(FCGISPAWN_MULTIPROCESS="1"))
    environ = json.loads(FastCGIClient(path, timeout=20).request(_get("/environ")).body)
    assert environ["wsgi.multiprocess"] is True
    assert environ["wsgi.multithread"] is True


def test_web_server_addrs_from_the_environment(procs: ProcessGroup) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    try:
        procs.start(
            _argv(),
            stdin=listener.fileno(),
            env=_env(FCGI_WEB_SERVER_ADDRS="127.0.0.1"),
            cwd=REPO,
        )
    finally:
        listener.close()
    ok = FastCGIClient(("127.0.0.1", port), timeout=20).request(_get("/hello"))
    assert ok.body == b"Hello, World!"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.bind(("127.0.0.2", 0))
        sock.connect(("127.0.0.1", port))
        assert sock.recv(1) == b""  # closed at once, before anything is sent


def test_serve_library_entry_point_binds_an_address(sockdir: Path) -> None:
    from fcgispawn.runtime import serve
    from fcgispawn.server import Server
    from tests.apps.wsgi_apps import hello

    path = sockdir / "lib.sock"
    result: list[int] = []
    servers: list[Server] = []
    t = threading.Thread(
        target=lambda: result.append(
            serve(hello, f"unix:{path}", threads=1, log=lambda m: None, on_start=servers.append)
        ),
        daemon=True,
    )
    t.start()
    wait_for(lambda: can_connect_unix(path), 10, what="serve() to bind")
    assert FastCGIClient(path, timeout=10).request(_get("/")).body == b"Hello, World!"
    servers[0].stop()
    t.join(10)
    assert result == [0]
    assert not path.exists()  # the socket serve() bound is removed again


def _vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_large_upload_streams_through_in_flat_memory(procs: ProcessGroup, sockdir: Path) -> None:
    """256 MiB through wsgi.input: the worker's peak RSS grows by far less than the body."""
    import hashlib

    from fcgispawn.protocol import (
        RecordType,
        encode_begin_request,
        encode_pairs,
        encode_record,
    )

    path = sockdir / "up.sock"
    proc = _start_on_fd0(procs, path)
    FastCGIClient(path, timeout=20).request(_get("/hello"))  # imported and warm
    before = _vm_hwm_kib(proc.pid)
    chunk = bytes(range(256)) * 255  # 65280 bytes: one STDIN record
    count = (256 << 20) // len(chunk)
    digest = hashlib.sha256()
    for _ in range(count):
        digest.update(chunk)
    params = {
        b"PATH_INFO": b"/echo_sha256",
        b"REQUEST_METHOD": b"POST",
        b"CONTENT_LENGTH": str(count * len(chunk)).encode(),
    }
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(60)
        sock.connect(str(path))
        sock.sendall(
            encode_begin_request(1)
            + encode_record(RecordType.PARAMS, 1, encode_pairs(params))
            + encode_record(RecordType.PARAMS, 1, b"")
        )
        record = encode_record(RecordType.STDIN, 1, chunk)
        for _ in range(count):
            sock.sendall(record)
        sock.sendall(encode_record(RecordType.STDIN, 1, b""))
        answer = b""
        while data := sock.recv(65536):
            answer += data
    assert f"{count * len(chunk)} {digest.hexdigest()}".encode() in answer
    grown_mib = (_vm_hwm_kib(proc.pid) - before) / 1024
    assert grown_mib < 16, f"peak RSS grew by {grown_mib:.1f} MiB for a 256 MiB upload"


def test_invalid_web_server_addrs_is_a_usage_error(procs: ProcessGroup, sockdir: Path) -> None:
    proc = _start_on_fd0(
        procs, sockdir / "w.sock", env=_env(FCGI_WEB_SERVER_ADDRS="127.0.0.1,not-an-ip")
    )
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert err.decode().splitlines() == [
        "fcgispawn: FCGI_WEB_SERVER_ADDRS: 'not-an-ip' is not an IPv4 or IPv6 address"
    ]

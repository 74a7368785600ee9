"""fcgispawn.systemd: socket activation, sd_notify, watchdog, journal -- against real sockets."""

from __future__ import annotations

import json
import os
import pickle
import re
import socket
import subprocess
import sys
import syslog
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fcgispawn import systemd
from fcgispawn.errors import SocketError
from tests.procs import REPO, ProcessGroup, wait_for

LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in (*LISTEN_VARS, "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(var, raising=False)


def in_child(func: Callable[[], Any]) -> Any:
    """Run ``func`` in a forked child (it may clobber fds 3+ and the environment) and return
    its pickled result; an exception in the child is re-raised here."""
    r, w = os.pipe()
    # move the write end far away from 3, 4, 5, which the child overwrites
    high = os.dup2(w, 900)
    os.close(w)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(r)
            try:
                payload = pickle.dumps(("ok", func()))
            except BaseException as exc:
                payload = pickle.dumps(("exc", exc))
            with os.fdopen(high, "wb") as out:
                out.write(payload)
        finally:
            os._exit(0)
    os.close(high)
    with os.fdopen(r, "rb") as inp:
        data = inp.read()
    os.waitpid(pid, 0)
    kind, value = pickle.loads(data)
    if kind == "exc":
        raise value
    return value


def put_listeners_on_3_and_4() -> None:
    """Two real listening sockets on fds 3 and 4, the way systemd passes them."""
    for target in (3, 4):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        os.dup2(s.fileno(), target)
        s.close()


# --------------------------------------------------------------------------- listen_fds


def test_listen_fds_returns_fds_and_names_and_clears_the_environment() -> None:
    def child() -> tuple[list[tuple[int, str | None]], dict[str, str | None], bool, bool]:
        put_listeners_on_3_and_4()
        os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="2", LISTEN_FDNAMES="a:b")
        fds = systemd.listen_fds()
        env = {var: os.environ.get(var) for var in LISTEN_VARS}
        # the C-level environment (what a spawned process gets) is clean too
        seen = subprocess.run(["env"], check=False, capture_output=True, text=True).stdout
        return fds, env, "LISTEN_FDS" in seen, os.get_inheritable(3)

    fds, env, leaked, inheritable = in_child(child)
    assert fds == [(3, "a"), (4, "b")]
    assert env == dict.fromkeys(LISTEN_VARS)
    assert not leaked
    assert not inheritable  # close-on-exec, as sd_listen_fds(3) sets it


def test_listen_fds_without_names_gives_none() -> None:
    def child() -> list[tuple[int, str | None]]:
        put_listeners_on_3_and_4()
        os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="2")
        return systemd.listen_fds()

    assert in_child(child) == [(3, None), (4, None)]


def test_listen_fds_for_another_pid_is_ignored_and_unset() -> None:
    def child() -> tuple[list[tuple[int, str | None]], str | None]:
        put_listeners_on_3_and_4()
        os.environ.update(LISTEN_PID=str(os.getppid()), LISTEN_FDS="2", LISTEN_FDNAMES="a:b")
        return systemd.listen_fds(), os.environ.get("LISTEN_FDS")

    assert in_child(child) == ([], None)


def test_listen_fds_can_keep_the_environment() -> None:
    def child() -> tuple[list[tuple[int, str | None]], str | None]:
        put_listeners_on_3_and_4()
        os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1", LISTEN_FDNAMES="fcgi")
        return systemd.listen_fds(unset_environment=False), os.environ.get("LISTEN_FDS")

    assert in_child(child) == ([(3, "fcgi")], "1")


def test_listen_fds_with_nothing_passed_is_empty() -> None:
    assert systemd.listen_fds() == []


@pytest.mark.parametrize(
    "env",
    [
        {"LISTEN_FDS": "2", "LISTEN_FDNAMES": "only-one"},
        {"LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b:c"},
        {"LISTEN_FDS": "two"},
    ],
)
def test_listen_fds_refuses_malformed_variables(env: dict[str, str]) -> None:
    def child() -> tuple[str, str | None]:
        put_listeners_on_3_and_4()
        os.environ.update(LISTEN_PID=str(os.getpid()), **env)
        try:
            systemd.listen_fds()
        except SocketError as exc:
            return str(exc), os.environ.get("LISTEN_FDS")
        return "no error", None

    message, left = in_child(child)
    assert "LISTEN_" in message
    assert left is None


@pytest.mark.parametrize("use_fallback", [False, True])
def test_fallback_parser_has_the_same_semantics(use_fallback: bool) -> None:
    """The pure parser (used only when systemd-python is missing) agrees with the library."""

    def child() -> list[object]:
        put_listeners_on_3_and_4()
        if use_fallback:
            systemd._daemon = None
        results: list[object] = []
        for env in (
            {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "x:y"},
            {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "2"},
            {"LISTEN_PID": "1", "LISTEN_FDS": "2"},
            {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "x"},
        ):
            os.environ.update(env)
            try:
                results.append(systemd.listen_fds())
            except SocketError:
                results.append("error")
            results.append(any(var in os.environ for var in LISTEN_VARS))
        return results

    assert in_child(child) == [
        [(3, "x"), (4, "y")],
        False,
        [(3, None), (4, None)],
        False,
        [],
        False,
        "error",
        False,
    ]


def test_listen_env_names_the_child() -> None:
    assert systemd.listen_env(["fcgi"], pid=1234) == {
        "LISTEN_PID": "1234",
        "LISTEN_FDS": "1",
        "LISTEN_FDNAMES": "fcgi",
    }
    assert systemd.listen_env(["a", "b"])["LISTEN_PID"] == str(os.getpid())
    with pytest.raises(SocketError, match="invalid fd name"):
        systemd.listen_env(["a:b"])


@pytest.mark.integration
def test_systemd_socket_activate_passes_a_named_listening_socket(
    sockdir: Path, procs: ProcessGroup
) -> None:
    path = sockdir / "act.sock"
    program = (
        "import json, socket\n"
        "from fcgispawn import systemd, sockets\n"
        "fds = systemd.listen_fds()\n"
        "s = sockets.adopt_fd(fds[0][0])\n"
        "print(json.dumps({'fds': fds, 'family': int(s.family), 'name': s.getsockname()}),"
        " flush=True)\n"
        "conn, _ = s.accept(); conn.sendall(b'hello'); conn.close()\n"
    )
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO)}
    proc = procs.start(
        [
            "systemd-socket-activate",
            "-l",
            str(path),
            "--fdname=fcgi",
            "-E",
            "PYTHONPATH",
            sys.executable,
            "-c",
            program,
        ],
        env=env,
    )
    wait_for(path.exists, timeout=10, what="systemd-socket-activate to bind")
    # this connection triggers the exec; it waits in the backlog and is the one accepted
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(20)
        client.connect(str(path))
        assert proc.stdout is not None
        report = json.loads(proc.stdout.readline())
        received = client.recv(16)
    assert received == b"hello"
    assert report["fds"] == [[3, "fcgi"]]
    assert report["family"] == socket.AF_UNIX
    assert report["name"] == str(path)


# --------------------------------------------------------------------------- notify


@pytest.fixture
def notify_socket(sockdir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    path = sockdir / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield sock


def test_notify_sends_one_datagram(notify_socket: socket.socket) -> None:
    assert systemd.notify("READY=1", "STATUS=2 workers up") is True
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=2 workers up"


def test_notify_reaches_an_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"fcgispawn-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.notify("STOPPING=1")
        assert sock.recv(4096) == b"STOPPING=1"


def test_notify_without_notify_socket_is_false() -> None:
    assert systemd.notify("READY=1") is False


def test_notify_to_a_missing_socket_is_false_not_an_error(
    sockdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(sockdir / "gone"))
    assert systemd.notify("READY=1") is False


def test_notify_fallback_sends_the_same_bytes(notify_socket: socket.socket) -> None:
    assert systemd._notify_fallback("READY=1\nSTATUS=x")
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=x"


def test_notify_with_no_fields_sends_nothing(notify_socket: socket.socket) -> None:
    assert systemd.notify() is False


# --------------------------------------------------------------------------- watchdog etc.


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        (None, None, None),
        ("5000000", None, 5_000_000),
        ("5000000", "self", 5_000_000),
        ("5000000", "other", None),
        ("0", None, None),
        ("junk", None, None),
        ("5000000", "junk", None),
    ],
)
def test_watchdog_usec(
    monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: int | None
) -> None:
    if usec is not None:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid is not None:
        value = {"self": str(os.getpid()), "other": str(os.getpid() + 1)}.get(pid, pid)
        monkeypatch.setenv("WATCHDOG_PID", value)
    assert systemd.watchdog_usec() == expected


def test_booted_is_a_bool() -> None:
    assert systemd.booted() is os.path.isdir("/run/systemd/system")


def test_journal_log_never_raises() -> None:
    systemd.journal_log("fcgispawn test entry", 7, worker="1", fcgi_code="x")


@pytest.mark.parametrize("journal", [False, True])
def test_stderr_log_lines_carry_their_time_unless_stderr_is_the_journal(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], journal: bool
) -> None:
    """A log file, supervisord's capture or lighttpd's error log keep lines as they come, and
    an operator needs to know when a worker died; journald stamps lines itself (systemd says
    which stream is its in JOURNAL_STREAM)."""
    st = os.fstat(2)
    stream = f"{st.st_dev}:{st.st_ino}" if journal else f"{st.st_dev}:{st.st_ino + 1}"
    monkeypatch.setenv("JOURNAL_STREAM", stream)
    monkeypatch.setattr(systemd, "_stamped", None)
    systemd.stderr_log("hello")
    line = capsys.readouterr().err
    stamped = re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} fcgispawn\[\d+\]: hello\n", line)
    assert (stamped is None) is journal, line
    assert line.endswith(f"fcgispawn[{os.getpid()}]: hello\n")


@pytest.mark.parametrize(
    ("message", "level"),
    [
        ("giving up: workers keep dying: last exit status 1 (pid 12); 5 startup failures", "ERR"),
        ("cannot load WSGI application 'x:app': no module named 'x'", "ERR"),
        ("error in the WSGI application, answering 500: RuntimeError: boom\nTraceback (most "
         "recent call last):\n  ...", "ERR"),
        ("internal error in the responder:\nTraceback (most recent call last):", "ERR"),
        ("reload aborted: new template 9 exit status 3 after 0.1s; keeping the running workers",
         "ERR"),
        ("warning: workers will run as root; give -u USER to drop privileges", "WARNING"),
        ("worker 123 exit status 1 after 0.52s; replacing it", "WARNING"),
        ("worker 123 killed by signal SIGKILL after 3.00s; replacing it", "WARNING"),
        ("request timeout: GET /x has run for 31.0 s (limit 30 s); ending this worker", "WARNING"),
        ("client went away before the response was complete: BrokenPipeError(32)", "WARNING"),
        ("worker 123 exit status 0 after 12.00s (stopped)", "INFO"),
        ("worker 123 killed by signal SIGTERM after 0.10s (stopped)", "INFO"),
        ("worker 124 started (slot 0, generation 1)", "INFO"),
        ("reload done: new workers [1, 2], draining [3, 4]", "INFO"),
        ("ready: 4 of 4 workers up", "INFO"),
    ],
)
def test_detached_log_lines_get_the_priority_their_wording_gives(message: str, level: str) -> None:
    """A detached supervisor logs to the journal or syslog, where operators filter by
    priority (journalctl -p warning): all at INFO, a crash loop hid among routine lines."""
    assert systemd.priority(message) == getattr(syslog, f"LOG_{level}")


def test_daemon_log_sends_each_line_at_its_priority(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[tuple[str, int]] = []
    monkeypatch.setattr(os.path, "exists", lambda path: True)  # a journal is there
    monkeypatch.setattr(systemd, "journal_log", lambda m, p, **f: sent.append((m, p)))
    log = systemd.daemon_log()
    log("worker 1 started (slot 0, generation 1)")
    log("giving up: the WSGI application cannot be loaded (its error is above)")
    assert [p for _, p in sent] == [syslog.LOG_INFO, syslog.LOG_ERR]

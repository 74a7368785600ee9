"""fcgispawn.process: credentials, privilege drop, child hygiene, pid files, detaching.

Process-wide changes are made in forked children or subprocesses and checked from the
outside through /proc, as an administrator would see them.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import resource
import signal
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fcgispawn import process
from fcgispawn.errors import ProcessError
from fcgispawn.process import (
    Credentials,
    ReadinessPipe,
    ReadinessResult,
    drop_privileges,
    read_pid_file,
    remove_pid_file,
    reset_child_state,
    resolve_credentials,
    resolve_gid,
    resolve_uid,
    write_pid_file,
)
from tests.procs import REPO, ProcessGroup, wait_for

NOBODY = 65534
NOGROUP = 65534
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def proc_status(pid: int) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def sigset(mask_hex: str) -> set[int]:
    mask = int(mask_hex, 16)
    return {bit + 1 for bit in range(64) if mask >> bit & 1}


def open_fds(pid: int) -> set[int]:
    return {int(name) for name in os.listdir(f"/proc/{pid}/fd")}


@contextlib.contextmanager
def paused_child(action: Callable[[], None]) -> Iterator[tuple[int, str]]:
    """Fork a child that runs ``action`` and then waits; yields (pid, outcome) for /proc checks.

    ``outcome`` is "ok" or the ProcessError message. The child is killed by pid at the end.
    """
    report_r, report_w = os.pipe()
    hold_r, hold_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(report_r)
            os.close(hold_w)
            try:
                action()
                outcome = "ok"
            except ProcessError as exc:
                outcome = f"error: {exc}"
            os.write(report_w, outcome.encode())
            os.close(report_w)
            os.read(hold_r, 1)  # until the parent is done looking
        finally:
            os._exit(0)
    os.close(report_w)
    os.close(hold_r)
    try:
        with os.fdopen(report_r, "rb") as report:
            outcome = report.read().decode()
        yield pid, outcome
    finally:
        os.close(hold_w)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


# --------------------------------------------------------------------------- credentials


@pytest.mark.parametrize(
    ("user", "group", "expected"),
    [
        (None, None, Credentials(None, None, None)),
        ("nobody", None, Credentials(NOBODY, NOGROUP, "nobody")),
        ("nobody", "nogroup", Credentials(NOBODY, NOGROUP, "nobody")),
        ("65534", None, Credentials(NOBODY, NOGROUP, "nobody")),
        ("nobody", "65534", Credentials(NOBODY, NOGROUP, "nobody")),
        (None, "nogroup", Credentials(None, NOGROUP, None)),
        ("54321", "nogroup", Credentials(54321, NOGROUP, None)),
    ],
)
def test_resolve_credentials(user: str | None, group: str | None, expected: Credentials) -> None:
    assert resolve_credentials(user, group) == expected


@pytest.mark.parametrize(
    ("user", "group", "message"),
    [
        ("root", None, "will not set uid to 0: user 'root'"),
        ("0", None, "will not set uid to 0: user '0'"),
        ("nobody", "root", "will not set gid to 0: group 'root'"),
        ("nobody", "0", "will not set gid to 0: group '0'"),
        (None, "root", "will not set gid to 0"),
        ("no-such-user-x", None, "unknown user 'no-such-user-x'"),
        ("nobody", "no-such-group-x", "unknown group 'no-such-group-x'"),
        ("54321", None, "uid 54321 (from '54321') has no passwd entry"),
        ("", None, "empty user name"),
        ("nobody", "", "empty group name"),
    ],
)
def test_resolve_credentials_refusals_name_the_value(
    user: str | None, group: str | None, message: str
) -> None:
    with pytest.raises(ProcessError) as info:
        resolve_credentials(user, group)
    assert message in str(info.value)
    assert info.value.exit_code == 1


def test_a_user_whose_primary_group_is_root_needs_an_explicit_group(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = pwd.struct_passwd(("svc", "x", 4242, 0, "", "/", "/bin/false"))
    monkeypatch.setattr(pwd, "getpwnam", lambda name: fake if name == "svc" else None)
    monkeypatch.setattr(pwd, "getpwuid", lambda uid: fake)
    with pytest.raises(ProcessError, match="primary group of user 'svc' is root's group"):
        resolve_credentials("svc", None)
    assert resolve_credentials("svc", "nogroup") == Credentials(4242, NOGROUP, "svc")


def test_resolve_uid_and_gid_allow_root_for_socket_owners() -> None:
    assert resolve_uid("root") == 0
    assert resolve_uid("0") == 0
    assert resolve_uid("12345") == 12345
    assert resolve_gid("root") == 0
    assert resolve_gid("nogroup") == NOGROUP
    with pytest.raises(ProcessError, match="unknown user 'x-nope'"):
        resolve_uid("x-nope")
    with pytest.raises(ProcessError, match="unknown group 'x-nope'"):
        resolve_gid("x-nope")


# --------------------------------------------------------------------------- privilege drop


@root_only
def test_drop_privileges_sets_uid_gid_and_only_the_users_groups(tmp_path: Path) -> None:
    os.setgroups([0, 4, 24])  # supplementary groups the supervisor has; must not leak
    try:
        creds = resolve_credentials("nobody", None)
        with paused_child(lambda: drop_privileges(creds, chroot=None, chdir="/tmp")) as (
            pid,
            outcome,
        ):
            assert outcome == "ok"
            status = proc_status(pid)
            assert status["Uid"].split() == [str(NOBODY)] * 4
            assert status["Gid"].split() == [str(NOGROUP)] * 4
            assert status["Groups"].split() == [str(NOGROUP)]
            assert os.readlink(f"/proc/{pid}/cwd") == "/tmp"
    finally:
        os.setgroups([])


@root_only
def test_drop_privileges_with_only_a_group_clears_supplementary_groups() -> None:
    os.setgroups([0, 4])
    try:
        creds = Credentials(None, NOGROUP, None)
        with paused_child(lambda: drop_privileges(creds, chroot=None, chdir=None)) as (
            pid,
            outcome,
        ):
            assert outcome == "ok"
            status = proc_status(pid)
            assert status["Gid"].split() == [str(NOGROUP)] * 4
            assert status["Groups"] == ""
            assert status["Uid"].split() == ["0"] * 4
    finally:
        os.setgroups([])


@root_only
def test_chroot_happens_before_setuid_and_chdir_is_inside_the_new_root(tmp_path: Path) -> None:
    jail = tmp_path / "jail"
    (jail / "srv").mkdir(parents=True)
    tmp_path.chmod(0o755)
    jail.chmod(0o755)
    creds = resolve_credentials("nobody", None)
    with paused_child(lambda: drop_privileges(creds, chroot=str(jail), chdir="/srv")) as (
        pid,
        outcome,
    ):
        assert outcome == "ok"
        assert os.readlink(f"/proc/{pid}/root") == str(jail)
        assert os.readlink(f"/proc/{pid}/cwd") == str(jail / "srv")
        assert proc_status(pid)["Uid"].split()[0] == str(NOBODY)


@root_only
def test_chdir_happens_after_setuid_so_it_is_checked_as_the_user(tmp_path: Path) -> None:
    """spawn-fcgi's order: -d is entered as the worker user, not as root."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    tmp_path.chmod(0o755)
    creds = resolve_credentials("nobody", None)
    with paused_child(lambda: drop_privileges(creds, chroot=None, chdir=str(private))) as (
        _pid,
        outcome,
    ):
        assert outcome.startswith(f"error: chdir({str(private)!r}) failed: Permission denied")


def test_drop_privileges_without_root_fails_with_a_clear_error() -> None:
    def action() -> None:
        if os.geteuid() == 0:
            os.setgroups([])
            os.setgid(NOGROUP)
            os.setuid(NOBODY)
        drop_privileges(Credentials(NOBODY + 1, NOGROUP + 1, None), chroot=None, chdir=None)

    with paused_child(action) as (_pid, outcome):
        assert outcome.startswith("error: setgid(65535) failed")
        assert "this needs root" in outcome


def test_drop_privileges_with_nothing_to_do_only_changes_directory() -> None:
    with paused_child(
        lambda: drop_privileges(Credentials(None, None, None), chroot=None, chdir="/")
    ) as (pid, outcome):
        assert outcome == "ok"
        assert proc_status(pid)["Uid"].split()[0] == str(os.getuid())
        assert os.readlink(f"/proc/{pid}/cwd") == "/"


def test_missing_chroot_directory_is_named(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("chroot needs root")
    missing = str(tmp_path / "nope")
    with paused_child(
        lambda: drop_privileges(Credentials(None, None, None), chroot=missing, chdir=None)
    ) as (_pid, outcome):
        assert outcome.startswith(f"error: chroot({missing!r}) failed")


# --------------------------------------------------------------------------- child hygiene


def test_reset_child_state_gives_exec_a_clean_slate(tmp_path: Path) -> None:
    """Checked after exec, where it matters: dispositions, mask and fds of `sleep`."""
    assert signal.getsignal(signal.SIGPIPE) == signal.SIG_IGN  # CPython's own doing
    leak_r, leak_w = os.pipe()
    os.set_inheritable(leak_r, True)
    os.set_inheritable(leak_w, True)
    leaked_file = open(tmp_path / "f", "w")  # noqa: SIM115 - closed below
    os.set_inheritable(leaked_file.fileno(), True)
    keep = os.dup(leak_w)  # non-inheritable: reset_child_state must make it survive exec
    saved_hup = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    saved_usr1 = signal.signal(signal.SIGUSR1, lambda *_: None)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2, signal.SIGTERM})
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            try:
                reset_child_state([keep])
                os.execv("/bin/sleep", ["sleep", "30"])
            finally:
                os._exit(127)
        try:
            wait_for(
                lambda: (
                    os.readlink(f"/proc/{pid}/exe") == "/usr/bin/sleep"
                    or os.readlink(f"/proc/{pid}/exe") == "/bin/sleep"
                ),
                timeout=10,
                what="the child to exec sleep",
            )
            status = proc_status(pid)
            assert sigset(status["SigIgn"]) == set()
            assert sigset(status["SigBlk"]) == set()
            assert sigset(status["SigCgt"]) == set()
            assert open_fds(pid) == {0, 1, 2, keep}
        finally:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        signal.signal(signal.SIGHUP, saved_hup)
        signal.signal(signal.SIGUSR1, saved_usr1)
        for fd in (leak_r, leak_w, keep):
            os.close(fd)
        leaked_file.close()


def test_reset_child_state_in_process_without_exec() -> None:
    """The Python-visible state too, for a child that runs Python before exec."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})
    spare_r, spare_w = os.pipe()
    try:

        def action() -> None:
            reset_child_state([spare_w])
            problems = []
            if signal.getsignal(signal.SIGPIPE) != signal.SIG_DFL:
                problems.append("SIGPIPE")
            if signal.getsignal(signal.SIGINT) != signal.SIG_DFL:
                problems.append("SIGINT")
            if signal.pthread_sigmask(signal.SIG_BLOCK, []):
                problems.append("mask")
            fds = {int(n) for n in os.listdir("/proc/self/fd")}
            # listdir's own fd may show up; everything else above 2 must be the kept one
            extra = {fd for fd in fds if fd > 2 and fd != spare_w}
            if len(extra) > 1:
                problems.append(f"fds {sorted(extra)}")
            os.write(spare_w, (",".join(problems) or "clean").encode())

        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            try:
                action()
            finally:
                os._exit(0)
        os.close(spare_w)
        spare_w = -1
        with os.fdopen(spare_r, "rb") as inp:
            spare_r = -1
            assert inp.read() == b"clean"
        os.waitpid(pid, 0)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        for fd in (spare_r, spare_w):
            if fd >= 0:
                os.close(fd)


# --------------------------------------------------------------------------- pid file


def test_write_pid_file_writes_pid_newline_mode_0644(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        write_pid_file(str(tmp_path / "app.pid"), 4321)
    finally:
        os.umask(old)
    path = tmp_path / "app.pid"
    assert path.read_text() == "4321\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert read_pid_file(str(path)) == 4321
    assert os.listdir(tmp_path) == ["app.pid"]


def test_write_pid_file_replaces_a_stale_file_atomically(tmp_path: Path) -> None:
    path = tmp_path / "app.pid"
    path.write_text("999999\n")
    old_inode = path.stat().st_ino
    write_pid_file(str(path), 42)
    assert path.read_text() == "42\n"
    assert path.stat().st_ino != old_inode  # a new file renamed over, never truncated
    assert os.listdir(tmp_path) == ["app.pid"]


def test_write_pid_file_never_writes_through_a_hard_link(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("important\n")
    os.link(victim, tmp_path / "app.pid")
    write_pid_file(str(tmp_path / "app.pid"), 42)
    assert victim.read_text() == "important\n"
    assert (tmp_path / "app.pid").read_text() == "42\n"


@pytest.mark.parametrize("pointee", ["file", "nowhere"])
def test_write_pid_file_refuses_a_symlink(tmp_path: Path, pointee: str) -> None:
    target = tmp_path / "target"
    if pointee == "file":
        target.write_text("keep\n")
    link = tmp_path / "app.pid"
    link.symlink_to(target)
    with pytest.raises(ProcessError, match="it exists and is a symbolic link"):
        write_pid_file(str(link), 42)
    assert link.is_symlink()
    if pointee == "file":
        assert target.read_text() == "keep\n"
    else:
        assert not target.exists()
    assert sorted(os.listdir(tmp_path)) == sorted(["app.pid", *(["target"] * (pointee == "file"))])


@pytest.mark.parametrize("kind", ["dir", "fifo"])
def test_write_pid_file_refuses_non_regular_files(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "app.pid"
    if kind == "dir":
        path.mkdir()
    else:
        os.mkfifo(path)
    with pytest.raises(ProcessError, match="not a regular file"):
        write_pid_file(str(path), 42)


def test_write_pid_file_refuses_a_world_writable_directory_without_sticky_bit(
    tmp_path: Path,
) -> None:
    tmp_path.chmod(0o777)
    with pytest.raises(ProcessError, match="world-writable without the sticky bit"):
        write_pid_file(str(tmp_path / "app.pid"), 42)
    tmp_path.chmod(0o777 | stat.S_ISVTX)
    write_pid_file(str(tmp_path / "app.pid"), 42)
    assert read_pid_file(str(tmp_path / "app.pid")) == 42


def test_write_pid_file_in_a_missing_directory_names_it(tmp_path: Path) -> None:
    with pytest.raises(ProcessError, match=r"directory .*nope") as info:
        write_pid_file(str(tmp_path / "nope" / "app.pid"), 42)
    assert info.value.hint == "create the directory first"


def test_remove_pid_file_only_removes_our_pid(tmp_path: Path) -> None:
    path = tmp_path / "app.pid"
    write_pid_file(str(path), 42)
    remove_pid_file(str(path), 43)  # a newer instance's file
    assert path.exists()
    remove_pid_file(str(path), 42)
    assert not path.exists()
    remove_pid_file(str(path), 42)  # missing: fine


def test_remove_pid_file_does_not_follow_symlinks(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_text("42\n")
    link = tmp_path / "app.pid"
    link.symlink_to(target)
    remove_pid_file(str(link), 42)
    assert link.is_symlink()
    assert target.exists()


@pytest.mark.parametrize("content", ["", "abc\n", "12 13\n", "-5\n"])
def test_read_pid_file_rejects_garbage(tmp_path: Path, content: str) -> None:
    path = tmp_path / "app.pid"
    path.write_text(content)
    assert read_pid_file(str(path)) is None


# --------------------------------------------------------------------------- readiness pipe


@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        (b"PID 77\nOK 77\n", ReadinessResult(0, "supervisor running as pid 77", 77)),
        (b"OK 77\n", ReadinessResult(0, "supervisor running as pid 77", 77)),
        (b"PID 77\nERR 3 bad\\nthing\n", ReadinessResult(3, "bad\nthing", 77)),
        (b"ERR x oops\n", ReadinessResult(1, "x oops", None)),
        (b"PID 77\n", ReadinessResult(1, "the supervisor exited before it was ready", 77)),
        (b"", ReadinessResult(1, "the supervisor exited before it was ready", None)),
    ],
)
def test_readiness_pipe_reports_what_the_child_sent(sent: bytes, expected: ReadinessResult) -> None:
    pipe = ReadinessPipe()
    if not pipe.fork():  # pragma: no cover - child
        try:
            assert pipe.write_fd is not None
            os.write(pipe.write_fd, sent)
        finally:
            os._exit(0)
    assert pipe.wait(timeout=10) == expected


def test_readiness_pipe_methods_write_the_protocol() -> None:
    pipe = ReadinessPipe()
    if not pipe.fork():  # pragma: no cover - child
        try:
            pipe.announce(1234)
            pipe.fail("no\\way\nat all", exit_code=2)
            pipe.ready(1234)  # ignored: the final line was already sent
        finally:
            os._exit(0)
    assert pipe.wait(timeout=10) == ReadinessResult(2, "no\\way\nat all", 1234)


def test_readiness_pipe_reports_a_child_that_died_with_its_status() -> None:
    pipe = ReadinessPipe()
    if not pipe.fork():  # pragma: no cover - child
        os._exit(9)
    result = pipe.wait(timeout=10)
    assert result.exit_code == 1
    assert "exited with status 9 before it was ready" in result.message


def test_readiness_pipe_times_out() -> None:
    pipe = ReadinessPipe()
    if not pipe.fork():  # pragma: no cover - child
        try:
            pipe.announce()
            time.sleep(5)
        finally:
            os._exit(0)
    started = time.monotonic()
    result = pipe.wait(timeout=0.3)
    assert time.monotonic() - started < 3
    assert result.exit_code == 1
    assert result.message.startswith("timed out after 0.3s")
    assert result.pid is not None and result.pid != os.getpid()
    os.kill(result.pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(result.pid, 0)


def test_readiness_pipe_fds_do_not_leak_into_exec() -> None:
    pipe = ReadinessPipe()
    try:
        assert pipe.write_fd is not None
        assert not os.get_inheritable(pipe.write_fd)
    finally:
        pipe.close()
    assert pipe.write_fd is None


# --------------------------------------------------------------------------- detach, end to end

DETACH_SCRIPT = textwrap.dedent(
    """
    import json, os, resource, socket, sys, time
    from fcgispawn.process import ReadinessPipe, detach, write_pid_file
    from fcgispawn.sockets import is_listening_socket

    mode, timeout, report = sys.argv[1], float(sys.argv[2]), sys.argv[3]
    os.umask(0o027)
    _, core_hard = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (core_hard, core_hard))  # python-daemon sets 0
    core_before = resource.getrlimit(resource.RLIMIT_CORE)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    stray = open(report + ".stray", "w")          # not preserved: python-daemon closes it
    os.set_inheritable(stray.fileno(), True)
    pipe = ReadinessPipe()
    if pipe.fork():
        result = pipe.wait(timeout=timeout)
        print(f"{result.exit_code}|{result.pid}|{result.message}", flush=True)
        sys.exit(result.exit_code)
    original_sid = os.getsid(0)
    detach([listener.fileno()], readiness=pipe)
    if mode == "die":
        os._exit(7)
    write_pid_file(report + ".pid", os.getpid())
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except FileNotFoundError:
            pass  # listdir's own fd, closed by now
    info = {
        "pid": os.getpid(), "ppid": os.getppid(), "sid": os.getsid(0),
        "original_sid": original_sid, "cwd": os.getcwd(),
        "umask": os.umask(0o027), "fds": fds, "listener": listener.fileno(),
        "listening": is_listening_socket(listener.fileno()), "pipe": pipe.write_fd,
        "core_kept": resource.getrlimit(resource.RLIMIT_CORE) == core_before,
        "stdin": os.readlink("/proc/self/fd/0"), "stdout": os.readlink("/proc/self/fd/1"),
    }
    with open(report + ".tmp", "w") as out:
        json.dump(info, out)
    os.rename(report + ".tmp", report)
    if mode == "ok":
        pipe.ready()
        time.sleep(60)
    elif mode == "err":
        pipe.fail("cannot start workers:\\nboom", exit_code=3)
    elif mode == "slow":
        time.sleep(60)
    """
)


@pytest.fixture
def daemons() -> Iterator[list[int]]:
    """Pids of detached processes a test created (not in any group we own): killed by pid."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def run_detach(
    procs: ProcessGroup, tmp_path: Path, mode: str, timeout: float
) -> tuple[int, str, Path]:
    report = tmp_path / "report.json"
    proc = procs.start(
        [sys.executable, "-c", DETACH_SCRIPT, mode, str(timeout), str(report)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    out, err = proc.communicate(timeout=30)
    assert err == b"", err.decode()
    return proc.returncode, out.decode().strip(), report


def test_detach_returns_once_ready_and_the_daemon_keeps_running(
    procs: ProcessGroup, tmp_path: Path, daemons: list[int]
) -> None:
    code, out, report = run_detach(procs, tmp_path, "ok", 20)
    assert code == 0, out
    status, pid_text, message = out.split("|", 2)
    pid = int(pid_text)
    daemons.append(pid)
    assert (status, message) == ("0", f"supervisor running as pid {pid}")
    os.kill(pid, 0)  # alive after the original process returned
    info = json.loads(report.read_text())
    assert info["pid"] == pid
    assert read_pid_file(str(tmp_path / "report.json.pid")) == pid
    assert info["sid"] != info["original_sid"]  # a new session: no controlling terminal
    assert info["sid"] != pid  # double fork: not a session leader, cannot reacquire a tty
    assert info["cwd"] == str(tmp_path)  # python-daemon would have gone to /
    assert info["umask"] == 0o027  # python-daemon would have set 0
    assert info["listening"]
    assert info["core_kept"]  # python-daemon would have disabled core dumps
    assert info["stdin"] == info["stdout"] == "/dev/null"
    # only stdio, the preserved listener and the readiness pipe survive python-daemon
    assert sorted(map(int, info["fds"])) == sorted({0, 1, 2, info["listener"], info["pipe"]})
    assert not any(target.endswith(".stray") for target in info["fds"].values())
    ignored = sigset(proc_status(pid)["SigIgn"])
    assert not ignored & {signal.SIGTTIN, signal.SIGTTOU, signal.SIGTSTP}
    assert proc_status(pid)["PPid"] != "0"


def test_detach_reports_a_startup_error_with_its_exit_status(
    procs: ProcessGroup, tmp_path: Path, daemons: list[int]
) -> None:
    code, out, report = run_detach(procs, tmp_path, "err", 20)
    status, pid_text, message = out.split("|", 2)
    daemons.append(int(pid_text))
    assert code == 3
    assert status == "3"
    assert message == "cannot start workers:\nboom"
    assert json.loads(report.read_text())["pid"] == int(pid_text)


def test_detach_reports_a_daemon_that_died_before_ready(
    procs: ProcessGroup, tmp_path: Path, daemons: list[int]
) -> None:
    code, out, _ = run_detach(procs, tmp_path, "die", 20)
    _status, pid_text, message = out.split("|", 2)
    if pid_text != "None":
        daemons.append(int(pid_text))
    assert code == 1
    assert message == "the supervisor exited before it was ready"


def test_detach_timeout_names_the_still_running_daemon(
    procs: ProcessGroup, tmp_path: Path, daemons: list[int]
) -> None:
    code, out, _ = run_detach(procs, tmp_path, "slow", 1)
    _status, pid_text, message = out.split("|", 2)
    pid = int(pid_text)
    daemons.append(pid)
    assert code == 1
    assert (
        message == f"timed out after 1s waiting for the workers to start (pid {pid}, still running)"
    )
    os.kill(pid, 0)


def test_module_exports_are_present() -> None:
    for name in process.__all__:
        assert hasattr(process, name), name


def test_subprocess_helper_sanity() -> None:
    # the venv's python can import the package from the repo root used by the detach tests
    out = subprocess.run(
        [sys.executable, "-c", "import fcgispawn.process"],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    assert out.returncode == 0


def test_reset_child_state_works_in_a_child_forked_from_another_thread() -> None:
    """The supervisor may fork from any thread; the child's only thread is its main thread."""
    import threading

    result: list[bytes] = []
    r, w = os.pipe()

    def fork_here() -> None:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            try:
                reset_child_state([w])
                ok = signal.getsignal(signal.SIGPIPE) == signal.SIG_DFL
                os.write(w, b"clean" if ok else b"dirty")
            except BaseException as exc:
                os.write(w, repr(exc).encode())
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        result.append(os.read(r, 100))

    thread = threading.Thread(target=fork_here)
    thread.start()
    thread.join(20)
    os.close(r)
    os.close(w)
    assert result == [b"clean"]


def test_readiness_pipe_works_with_fds_above_fd_setsize() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 2048:
        pytest.skip("the hard fd limit is too low")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2048), hard))
    try:
        _readiness_above_fd_setsize()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _readiness_above_fd_setsize() -> None:
    pipe = ReadinessPipe()
    assert pipe._read_fd is not None and pipe._write_fd is not None
    # move both ends above 1024, where select() would fail
    for attr, target in (("_read_fd", 1500), ("_write_fd", 1501)):
        old = getattr(pipe, attr)
        os.dup2(old, target, inheritable=False)
        os.close(old)
        setattr(pipe, attr, target)
    if not pipe.fork():  # pragma: no cover - child
        try:
            pipe.ready(99)
        finally:
            os._exit(0)
    assert pipe.wait(timeout=10) == ReadinessResult(0, "supervisor running as pid 99", 99)

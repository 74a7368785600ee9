"""The supervisor with real processes and real signals (no mocked fork).

Each test runs ``tests/apps/supervise.py`` (the Supervisor in its own process, bound to a UNIX
socket in ``sockdir``) with ``tests/apps/lineworker.py`` as the worker: a program that accepts
on fd 0 (or fd 3 with LISTEN_FDS) and answers one line with its pid. Worker pids come from
/proc (children of the supervisor), never from the supervisor's own word. Everything a test
starts is stopped by pid (its process group) by the ``procs`` fixture.

The pure parts of the restart policy (classification, backoff, crash window) are pinned first,
table-driven, without processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fcgispawn.supervisor import (
    CrashWindow,
    ExitKind,
    Phase,
    Policy,
    Supervisor,
    SupervisorStatus,
    WorkerSpec,
    WorkerState,
    WorkerStatus,
    classify_exit,
    describe_exit,
    next_backoff,
)
from tests.procs import ProcessGroup, wait_for

pytestmark = pytest.mark.timeout(30)

APPS = Path(__file__).resolve().parent / "apps"
REPO = APPS.parent.parent
WORKER = [sys.executable, str(APPS / "lineworker.py")]


# -------------------------------------------------------------------------------- pure policy


def _exited(code: int) -> int:
    return code << 8


def _signaled(sig: int) -> int:
    return sig


POLICY = Policy(reset_after=10.0)


@pytest.mark.parametrize(
    ("status", "lifetime", "requested", "was_up", "kind"),
    [
        (_exited(3), 0.01, False, False, ExitKind.CRASHED),
        (_exited(0), 0.01, False, False, ExitKind.CRASHED),  # `true` as COMMAND is a crash
        (_exited(0), 2.0, False, True, ExitKind.RECYCLED),  # --max-requests style exit
        (_exited(1), 2.0, False, True, ExitKind.LOST),  # was serving: not a startup failure
        (_signaled(signal.SIGKILL), 2.0, False, True, ExitKind.LOST),  # kill -9, OOM killer
        (_signaled(signal.SIGKILL), 10.0, False, True, ExitKind.DIED),
        (_exited(0), 30.0, False, True, ExitKind.DIED),
        (_exited(3), 0.01, True, False, ExitKind.REQUESTED),
        (_signaled(signal.SIGTERM), 50.0, True, True, ExitKind.REQUESTED),
    ],
)
def test_classify_exit_table(
    status: int, lifetime: float, requested: bool, was_up: bool, kind: ExitKind
) -> None:
    assert (
        classify_exit(status, lifetime, requested=requested, was_up=was_up, policy=POLICY) is kind
    )


def test_backoff_doubles_up_to_the_cap() -> None:
    policy = Policy(backoff_initial=0.1, backoff_max=0.5)
    delays = [policy.backoff_initial]
    for _ in range(4):
        delays.append(next_backoff(delays[-1], policy))
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])


def test_crash_window_counts_only_recent_crashes() -> None:
    window = CrashWindow(10.0)
    assert [window.record(t) for t in (0.0, 1.0, 2.0)] == [1, 2, 3]
    assert window.record(10.5) == 3  # 0.0 fell out of the window
    assert window.record(30.0) == 1


@pytest.mark.parametrize(
    ("status", "text"),
    [
        (_exited(3), "exit status 3"),
        (_signaled(signal.SIGKILL), "killed by signal SIGKILL"),
        (_signaled(signal.SIGSEGV) | 0x80, "killed by signal SIGSEGV (core dumped)"),
    ],
)
def test_describe_exit(status: int, text: str) -> None:
    assert describe_exit(status) == text


@pytest.mark.parametrize(
    "kwargs",
    [
        {"workers": 0},
        {"crash_limit": 0},
        {"backoff_initial": 0},
        {"backoff_initial": 2, "backoff_max": 1},
        {"graceful_timeout": -1},
    ],
)
def test_policy_rejects_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="Policy"):
        Policy(**kwargs)  # type: ignore[arg-type]


def test_status_summary_names_pids_restarts_and_last_exit() -> None:
    worker = WorkerStatus(
        pid=12, slot=0, generation=1, state=WorkerState.UP, started_at=0, uptime=1, restarts=2
    )
    draining = WorkerStatus(
        pid=9,
        slot=None,
        generation=0,
        state=WorkerState.STOPPING,
        started_at=0,
        uptime=5,
        restarts=0,
    )
    status = SupervisorStatus(
        phase=Phase.RUNNING,
        generation=1,
        target=2,
        workers=(worker, draining),
        restarts=2,
        last_exit="exit status 3 (pid 7)",
    )
    assert status.summary() == (
        "1/2 workers (pids 12), 1 draining, 2 restarts, last exit: exit status 3 (pid 7)"
    )


# -------------------------------------------------------------------------------- helpers


def children(pid: int) -> set[int]:
    """Live (non-zombie) children of ``pid``, from /proc."""
    found: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        if fields[0] != "Z" and int(fields[1]) == pid:
            found.add(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def ask(path: Path, line: str = "pid", timeout: float = 5.0) -> str:
    """One request: connect, send a line, read the answer to EOF."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(line.encode() + b"\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    return data.decode().strip()


@dataclass
class Sup:
    """A supervisor process under test, with its stderr log collected by a thread."""

    proc: subprocess.Popen[bytes]
    sock: Path
    lines: list[str] = field(default_factory=list)
    ready: threading.Event = field(default_factory=threading.Event)
    reader: threading.Thread | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def workers(self) -> set[int]:
        return children(self.pid)

    def wait_workers(
        self, n: int, *, exclude: AbstractSet[int] = frozenset(), timeout: float = 5
    ) -> set[int]:
        result: set[int] = set()

        def ok() -> bool:
            nonlocal result
            result = self.workers()
            return len(result) == n and not result & exclude

        wait_for(ok, timeout=timeout, what=f"{n} workers (log:\n{self.log})")
        return result

    def wait_log(self, text: str, timeout: float = 5) -> None:
        wait_for(lambda: text in self.log, timeout=timeout, what=f"{text!r} in log:\n{self.log}")

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait(self, timeout: float = 10) -> int:
        """The exit status, once the whole log has been read (stderr at EOF)."""
        rc = self.proc.wait(timeout)
        if self.reader is not None:
            self.reader.join(5)
        return rc


def start(
    procs: ProcessGroup,
    sockdir: Path,
    *,
    argv: list[str] | None = None,
    workers: int = 1,
    wait_ready: bool = True,
    env: dict[str, str] | None = None,
    policy: dict[str, float] | None = None,
    **extra: object,
) -> Sup:
    """Starts supervise.py; ``extra`` goes into its config (pass_mode, leak_fd, ...)."""
    sock = sockdir / "sock"
    config = {
        "socket": str(sock),
        "argv": argv or WORKER,
        "policy": {"workers": workers, **(policy or {})},
        **extra,
    }
    if env is not None:
        config["env"] = env
    proc = procs.start(
        [sys.executable, str(APPS / "supervise.py"), json.dumps(config)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
    )
    sup = Sup(proc, sock)

    def read_stderr() -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            sup.lines.append(raw.decode(errors="replace").rstrip("\n"))

    def read_stdout() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            if raw.startswith(b"READY"):
                sup.ready.set()

    sup.reader = threading.Thread(target=read_stderr, daemon=True)
    sup.reader.start()
    threading.Thread(target=read_stdout, daemon=True).start()
    if wait_ready:
        assert sup.ready.wait(10), f"supervisor not ready; log:\n{sup.log}"
    return sup


def socket_inode(pid: int, fd: int) -> str:
    return os.readlink(f"/proc/{pid}/fd/{fd}")


class Hammer:
    """Sends ``pid`` requests back to back from a thread; counts answers and failures."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.pids: set[int] = set()
        self.ok = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.pids.add(int(ask(self.path, timeout=5)))
                self.ok += 1
            except (OSError, ValueError) as exc:
                self.errors.append(repr(exc))

    @contextlib.contextmanager
    def running(self) -> Iterator[Hammer]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(10)


# -------------------------------------------------------------------------------- in-process


def _listener(sockdir: Path) -> socket.socket:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sockdir / "sock"))
    listener.listen(16)
    return listener


def test_run_in_process_calls_on_ready_once_and_restores_signal_state(sockdir: Path) -> None:
    """run() borrows process-wide state (handlers, wakeup fd) and must give it back."""
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
    seen: list[set[int]] = []
    logs: list[str] = []
    with _listener(sockdir) as listener:
        sup = Supervisor(
            listener,
            WorkerSpec(argv=tuple(WORKER), env=dict(os.environ)),
            Policy(workers=2),
            log=logs.append,
        )

        def on_ready() -> None:
            seen.append({w.pid for w in sup.status().workers})
            assert sup.phase is Phase.RUNNING
            os.kill(os.getpid(), signal.SIGTERM)  # arrives as an event, not an exception

        assert sup.run(on_ready) == 0
    assert len(seen) == 1 and len(seen[0]) == 2
    assert not any(alive(pid) for pid in seen[0])
    assert sup.phase is Phase.STOPPED and sup.status().workers == ()
    assert {sig: signal.getsignal(sig) for sig in before} == before
    assert signal.set_wakeup_fd(-1) == -1  # no wakeup fd left behind
    with pytest.raises(RuntimeError, match="only be called once"):
        sup.run()


def test_an_exception_in_on_ready_kills_every_worker(sockdir: Path) -> None:
    pids: set[int] = set()
    with _listener(sockdir) as listener:
        sup = Supervisor(
            listener,
            WorkerSpec(argv=tuple(WORKER), env=dict(os.environ)),
            Policy(workers=2),
            log=lambda _: None,
        )

        def on_ready() -> None:
            pids.update(w.pid for w in sup.status().workers)
            raise OSError("cannot write the pid file")

        with pytest.raises(OSError, match="pid file"):
            sup.run(on_ready)
    assert len(pids) == 2 and not any(alive(pid) for pid in pids)


# -------------------------------------------------------------------------------- start-up


def test_workers_share_the_supervisors_listener_on_fd0(procs: ProcessGroup, sockdir: Path) -> None:
    sup = start(procs, sockdir, workers=3)
    pids = sup.wait_workers(3)
    inodes = {socket_inode(pid, 0) for pid in pids}
    assert len(inodes) == 1 and next(iter(inodes)).startswith("socket:[")
    held = {os.readlink(f"/proc/{sup.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{sup.pid}/fd")}
    assert inodes <= held  # the supervisor keeps the socket open: no refusal on restarts
    answered = {int(ask(sup.sock)) for _ in range(30)}
    assert answered <= pids and answered


def test_missing_command_is_a_clear_startup_error(procs: ProcessGroup, sockdir: Path) -> None:
    sup = start(procs, sockdir, argv=["no-such-command-fcgispawn"], workers=2, wait_ready=False)
    assert sup.wait(5) == 1
    wait_for(lambda: "error:" in sup.log)
    assert "cannot execute 'no-such-command-fcgispawn': No such file or directory" in sup.log
    assert not sup.ready.is_set()


def test_non_executable_command_is_a_clear_startup_error(
    procs: ProcessGroup, sockdir: Path
) -> None:
    target = sockdir / "not-executable"
    target.write_text("#!/bin/sh\n")
    target.chmod(0o644)
    sup = start(procs, sockdir, argv=[str(target)], wait_ready=False)
    assert sup.wait(5) == 1
    wait_for(lambda: "error:" in sup.log)
    assert f"cannot execute '{target}': Permission denied" in sup.log


def test_crash_loop_gives_up_with_exit_1_and_the_reason(procs: ProcessGroup, sockdir: Path) -> None:
    policy = {"crash_limit": 4, "backoff_initial": 0.05, "crash_window": 10}
    sup = start(procs, sockdir, argv=[*WORKER, "--exit", "3"], policy=policy, wait_ready=False)
    assert sup.wait(10) == 1
    wait_for(lambda: "error:" in sup.log)
    assert "workers keep dying: last exit status 3 (pid " in sup.log
    starts = [float(line.split()[0]) for line in sup.lines if " started (slot" in line]
    exits = [float(line.split()[0]) for line in sup.lines if "exit status 3 after" in line]
    assert len(starts) == 4 and len(exits) == 4  # gave up: no fifth start
    gaps = [start - died for died, start in zip(exits, starts[1:], strict=False)]
    assert gaps[0] >= 0.04 and gaps[1] >= 0.09 and gaps[2] >= 0.19  # 0.05, 0.1, 0.2 backoff
    assert not sup.ready.is_set()


def test_workers_start_with_clean_fds_and_default_signal_state(
    procs: ProcessGroup, sockdir: Path
) -> None:
    # `sleep`, not Python: CPython would set SIGPIPE to ignored again by itself.
    sup = start(procs, sockdir, argv=["sleep", "60"], leak_fd=True, block_signal=True)
    (pid,) = sup.wait_workers(1)
    assert os.path.exists(f"/proc/{sup.pid}/fd/40")  # the supervisor does hold the leaky fd
    assert sorted(int(fd) for fd in os.listdir(f"/proc/{pid}/fd")) == [0, 1, 2]
    assert socket_inode(pid, 0).startswith("socket:[")
    status = proc_status(pid)
    assert int(status["SigIgn"], 16) == 0, status["SigIgn"]  # SIGPIPE back to default
    assert int(status["SigBlk"], 16) == 0, status["SigBlk"]
    assert int(proc_status(sup.pid)["SigBlk"], 16) & (1 << (signal.SIGUSR2 - 1))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop privileges")
def test_workers_drop_privileges_and_still_die_with_the_supervisor(
    procs: ProcessGroup, sockdir: Path
) -> None:
    import pwd

    nobody = pwd.getpwnam("nobody")
    sup = start(procs, sockdir, argv=["sleep", "60"], user="nobody", chdir="/tmp", workers=2)
    pids = sup.wait_workers(2)
    for pid in pids:
        status = proc_status(pid)
        assert status["Uid"].split() == [str(nobody.pw_uid)] * 4
        assert status["Gid"].split() == [str(nobody.pw_gid)] * 4
        assert "0" not in status["Groups"].split()  # root's supplementary groups are gone
        assert os.readlink(f"/proc/{pid}/cwd") == "/tmp"
    # PDEATHSIG is set after setuid (a credential change clears it): it must still work.
    sup.signal(signal.SIGKILL)
    sup.wait(5)
    wait_for(lambda: not any(alive(pid) for pid in pids), timeout=3, what="orphans to exit")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chroot")
def test_failed_chroot_is_a_clear_startup_error(procs: ProcessGroup, sockdir: Path) -> None:
    missing = sockdir / "no-such-root"
    sup = start(procs, sockdir, argv=["sleep", "60"], chroot=str(missing), wait_ready=False)
    assert sup.wait(5) == 1
    wait_for(lambda: "error:" in sup.log)
    assert f"chroot('{missing}') failed: No such file or directory" in sup.log


def test_systemd_pass_mode_gives_fd3_and_listen_variables_for_the_worker(
    procs: ProcessGroup, sockdir: Path
) -> None:
    env = {"NOTIFY_SOCKET": str(sockdir / "nowhere"), "LISTEN_FDS": "7", "PATH": os.environ["PATH"]}
    sup = start(procs, sockdir, pass_mode="systemd", fdname="web", env=env)
    info = json.loads(ask(sup.sock, "info"))
    pid = info["pid"]
    assert info["fd"] == 3
    assert info["env"] == {"LISTEN_FDS": "1", "LISTEN_PID": str(pid), "LISTEN_FDNAMES": "web"}
    assert os.readlink(f"/proc/{pid}/fd/0") == "/dev/null"
    assert socket_inode(pid, 3).startswith("socket:[")


def test_idle_supervisor_does_not_wake_up(procs: ProcessGroup, sockdir: Path) -> None:
    """0 wakeups over 10 s (issue 3), where peers wake once a second."""
    sup = start(procs, sockdir, workers=2)
    time.sleep(0.4)  # past the settle timers
    before = proc_status(sup.pid)["voluntary_ctxt_switches"]
    time.sleep(float(os.environ.get("FCGISPAWN_IDLE_SECONDS", "10")))
    after = proc_status(sup.pid)["voluntary_ctxt_switches"]
    assert before == after


# -------------------------------------------------------------------------------- restarts


def test_killed_worker_is_replaced_within_1s_while_the_other_keeps_serving(
    procs: ProcessGroup, sockdir: Path
) -> None:
    sup = start(procs, sockdir, workers=2, policy={"reset_after": 0.3})
    pids = sup.wait_workers(2)
    time.sleep(0.35)  # both lived reset_after: the first restart is immediate
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as held:
        held.settimeout(5)
        held.connect(str(sup.sock))
        held.sendall(b"hold 1.5\n")
        busy = int(held.recv(64).split()[0])  # this worker is now busy for 1.5 s
        (victim,) = pids - {busy}
        t0 = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        replacement = int(ask(sup.sock, timeout=3))  # only the replacement can accept it
        latency = time.monotonic() - t0
        assert replacement not in pids
        assert latency < 1.0, latency
        rest = b""
        while chunk := held.recv(64):
            rest += chunk
        assert rest.strip() == b"done"  # the busy worker was never disturbed
    assert sup.workers() == {busy, replacement}
    sup.wait_log(f"worker {victim} killed by signal SIGKILL")
    print(f"replacement latency after kill -9: {latency * 1000:.1f} ms")


def test_serving_worker_killed_is_replaced_at_once_then_with_backoff_if_it_repeats(
    procs: ProcessGroup, sockdir: Path
) -> None:
    sup = start(procs, sockdir, policy={"backoff_initial": 0.3, "reset_after": 60})
    (pid,) = sup.wait_workers(1)
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    (pid2,) = sup.wait_workers(1, exclude={pid})
    assert time.monotonic() - t0 < 0.29  # the first loss: no delay
    time.sleep(0.3)  # let it be up
    t1 = time.monotonic()
    os.kill(pid2, signal.SIGKILL)
    sup.wait_workers(1, exclude={pid, pid2})
    delay = time.monotonic() - t1
    assert 0.59 <= delay < 2.0, delay  # a repeat within reset_after backs off (doubled)
    sup.wait_log("replacing it in 0.60s")


def test_worker_dying_before_it_is_up_is_restarted_after_the_backoff(
    procs: ProcessGroup, sockdir: Path
) -> None:
    marker = sockdir / "die-at-start"
    marker.touch()
    sup = start(
        procs,
        sockdir,
        argv=[*WORKER, "--exit-if-exists", str(marker)],
        wait_ready=False,
        policy={"backoff_initial": 0.3, "reset_after": 60},
    )
    sup.wait_log("restarting slot 0 in 0.30s")
    marker.unlink()
    sup.wait_workers(1)


def test_worker_exiting_0_after_startup_is_recycled_not_a_crash(
    procs: ProcessGroup, sockdir: Path
) -> None:
    sup = start(procs, sockdir, policy={"crash_limit": 2, "settle": 0.1, "reset_after": 60})
    seen: set[int] = set()
    for _ in range(3):
        (pid,) = sup.wait_workers(1, exclude=seen)
        time.sleep(0.15)  # up (settle 0.1): its exit is a recycle
        assert int(ask(sup.sock, "exit")) == pid
        seen.add(pid)
    sup.wait_workers(1, exclude=seen)
    assert sup.proc.poll() is None
    wait_for(lambda: sup.log.count("exit status 0 after") == 3)
    assert "giving up" not in sup.log


def test_a_worker_that_says_it_is_retiring_is_replaced_before_it_exits(
    procs: ProcessGroup, sockdir: Path
) -> None:
    """STOPPING=1 from a worker (the --wsgi runtime at --max-requests) starts its replacement
    at once: it drains its kept connections first, up to a second, and a pool whose workers
    recycle about together had every slot draining (Apache enablereuse, --max-requests 500:
    62,000 -> 23,700 requests in 6 s, stalls of 0.85 s). Its own exit is then no event."""
    sup = start(procs, sockdir, workers=1, readiness="notify")
    (old,) = sup.wait_workers(1)
    assert int(ask(sup.sock, "retire 1.5")) == old
    sup.wait_log(f"worker {old} exit status 0")  # it drained for 1.5 s...
    log = sup.log
    started = log.index(f"worker {old} is retiring: starting its replacement now")
    (new,) = {int(m) for m in re.findall(r"worker (\d+) started", log[started:])}
    assert log.index(f"worker {new} started") < log.index(f"worker {old} exit status 0")
    assert sup.workers() == {new} and int(ask(sup.sock)) == new  # ...its replacement serves
    assert "restarting" not in log and "giving up" not in log


def _quick_exits(sup: Sup, settle: float, exit_text: str) -> int:
    """How many workers the log shows ending ``exit_text`` younger than ``settle``."""
    lifetimes = [
        float(line.rsplit(" after ", 1)[1].split("s", 1)[0])
        for line in sup.lines
        if exit_text in line and " after " in line
    ]
    return sum(1 for t in lifetimes if t < settle)


@pytest.mark.parametrize("how", ["exit 0", "SIGKILL"])
def test_replacements_dying_before_they_settle_never_make_a_proven_pool_give_up(
    procs: ProcessGroup, sockdir: Path, how: str
) -> None:
    # A replacement meets the backlog at once: php-cgi recycling itself under load
    # (PHP_FCGI_MAX_REQUESTS, status 0) or a request that crashes the app ends it long before
    # it settles. Counted as startup failures, 5 of those made fcgispawn give up on a pool
    # that had been serving, and remove its socket.
    settle = 1.0
    policy = {"crash_limit": 2, "settle": settle, "backoff_initial": 0.05, "reset_after": 60}
    sup = start(procs, sockdir, policy=policy)  # ready: the first worker lived `settle`
    seen: set[int] = set()
    for _ in range(4):
        (pid,) = sup.wait_workers(1, exclude=seen)
        if how == "exit 0":
            assert int(ask(sup.sock, "exit")) == pid  # served a request, then exits
        else:
            os.kill(pid, signal.SIGKILL)
        seen.add(pid)
    sup.wait_workers(1, exclude=seen)
    assert int(ask(sup.sock)) not in seen  # the pool serves
    assert sup.proc.poll() is None, sup.log
    assert "giving up" not in sup.log
    text = "exit status 0" if how == "exit 0" else "killed by signal SIGKILL"
    wait_for(lambda: _quick_exits(sup, settle, text) >= 3, what=f"quick exits in:\n{sup.log}")


# -------------------------------------------------------------------------------- signals


def test_term_stops_all_workers_within_the_grace_period_and_exits_0(
    procs: ProcessGroup, sockdir: Path
) -> None:
    sup = start(procs, sockdir, workers=2, policy={"graceful_timeout": 5})
    pids = sup.wait_workers(2)
    answer: list[str] = []
    slow = threading.Thread(target=lambda: answer.append(ask(sup.sock, "sleep 0.8")))
    slow.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    sup.signal(signal.SIGTERM)
    assert sup.wait(5) == 0
    elapsed = time.monotonic() - t0
    slow.join(5)
    assert answer and int(answer[0]) in pids  # the request in flight completed
    assert elapsed < 5
    assert not any(alive(pid) for pid in pids)
    assert "after the grace period" not in sup.log


def test_worker_ignoring_term_is_killed_after_graceful_timeout(
    procs: ProcessGroup, sockdir: Path
) -> None:
    argv = [*WORKER, "--ignore-term"]
    policy = {"graceful_timeout": 0.5}
    sup = start(procs, sockdir, argv=argv, policy=policy, readiness="notify")
    (pid,) = sup.wait_workers(1)
    t0 = time.monotonic()
    sup.signal(signal.SIGTERM)
    assert sup.wait(5) == 0
    elapsed = time.monotonic() - t0
    assert 0.5 <= elapsed < 2.5, elapsed
    assert not alive(pid)
    assert f"worker {pid} killed by signal SIGKILL" in sup.log


@pytest.mark.parametrize("how", ["second TERM", "QUIT"])
def test_fast_stop_kills_stubborn_workers_after_fast_timeout(
    procs: ProcessGroup, sockdir: Path, how: str
) -> None:
    policy = {"graceful_timeout": 30, "fast_timeout": 0.3}
    sup = start(procs, sockdir, argv=[*WORKER, "--ignore-term"], policy=policy, readiness="notify")
    (pid,) = sup.wait_workers(1)
    t0 = time.monotonic()
    if how == "QUIT":
        sup.signal(signal.SIGQUIT)
    else:
        sup.signal(signal.SIGTERM)
        sup.wait_log("graceful stop")
        sup.signal(signal.SIGTERM)
    assert sup.wait(5) == 0
    assert time.monotonic() - t0 < 2
    assert not alive(pid)


def test_workers_exit_when_the_supervisor_is_sigkilled(procs: ProcessGroup, sockdir: Path) -> None:
    sup = start(procs, sockdir, workers=2)
    pids = sup.wait_workers(2)
    sup.signal(signal.SIGKILL)
    sup.wait(5)
    wait_for(lambda: not any(alive(pid) for pid in pids), timeout=3, what="orphans to exit")


def test_ttin_and_ttou_add_and_remove_one_worker_never_below_one(
    procs: ProcessGroup, sockdir: Path
) -> None:
    sup = start(procs, sockdir, workers=1)
    (first,) = sup.wait_workers(1)
    sup.signal(signal.SIGTTIN)
    two = sup.wait_workers(2)
    assert first in two
    sup.signal(signal.SIGTTOU)
    (left,) = sup.wait_workers(1)
    sup.signal(signal.SIGTTOU)
    sup.wait_log("SIGTTOU ignored")
    assert sup.workers() == {left}
    assert int(ask(sup.sock)) == left


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGUSR2])
def test_usr1_and_usr2_are_forwarded_to_every_worker(
    procs: ProcessGroup, sockdir: Path, signum: signal.Signals
) -> None:
    """USR2 as multiwatch forwards it: left at its default action, a logrotate script's USR2
    ended the supervisor at once, without a drain, leaving its pid and socket files."""
    record = sockdir / "record"
    argv = [*WORKER, "--record", str(record)]
    sup = start(procs, sockdir, argv=argv, workers=2, readiness="notify")  # handlers installed
    pids = sup.wait_workers(2)
    sup.signal(signum)
    expected = {f"{pid} {signum.name}" for pid in pids}
    wait_for(
        lambda: record.exists() and set(record.read_text().splitlines()) == expected,
        what=f"{expected} in {record} (log:\n{sup.log})",
    )
    assert sup.workers() == pids


def test_sigalrm_is_ignored_not_fatal(procs: ProcessGroup, sockdir: Path) -> None:
    sup = start(procs, sockdir)
    (pid,) = sup.wait_workers(1)
    sup.signal(signal.SIGALRM)
    sup.wait_log("SIGALRM ignored")
    assert sup.proc.poll() is None and sup.workers() == {pid}


# -------------------------------------------------------------------------------- reload


def test_hup_replaces_workers_without_failing_a_request(procs: ProcessGroup, sockdir: Path) -> None:
    sup = start(procs, sockdir, workers=2, policy={"graceful_timeout": 5})
    generations = [sup.wait_workers(2)]
    slow_answer: list[str] = []
    with Hammer(sup.sock).running() as hammer:
        for _ in range(2):
            old = generations[-1]
            slow = threading.Thread(target=lambda: slow_answer.append(ask(sup.sock, "sleep 1")))
            slow.start()
            time.sleep(0.2)  # accepted by an old worker: in flight at the HUP
            t0 = time.monotonic()
            sup.signal(signal.SIGHUP)
            new = sup.wait_workers(2, exclude=old)  # old ones gone: the slow one drained
            print(
                f"reload: old {sorted(old)} gone, new {sorted(new)} serving after "
                f"{time.monotonic() - t0:.2f}s"
            )
            slow.join(5)
            assert slow_answer and int(slow_answer.pop()) in old
            generations.append(new)
        time.sleep(0.2)
    assert hammer.errors == []
    assert hammer.ok > 50
    assert hammer.pids & generations[-1]
    wait_for(lambda: sup.log.count("reload done") == 2)


def test_reload_keeps_old_workers_when_new_ones_die_at_once(
    procs: ProcessGroup, sockdir: Path
) -> None:
    broken = sockdir / "broken"
    # NOTIFY: "up" means past the --exit-if-exists check, even on a loaded machine.
    argv = [*WORKER, "--exit-if-exists", str(broken)]
    sup = start(procs, sockdir, argv=argv, workers=2, readiness="notify")
    old = sup.wait_workers(2)
    broken.touch()
    sup.signal(signal.SIGHUP)
    sup.wait_log("reload aborted")
    time.sleep(0.3)
    assert sup.workers() == old, sup.log
    assert {int(ask(sup.sock)) for _ in range(10)} <= old
    broken.unlink()
    sup.signal(signal.SIGHUP)
    sup.wait_workers(2, exclude=old)
    assert sup.proc.poll() is None


def test_after_an_aborted_reload_a_replacement_that_cannot_start_never_stops_the_pool(
    procs: ProcessGroup, sockdir: Path
) -> None:
    # The aborted reload's generation number stayed current: the running workers' losses
    # were replaced as that unproven generation, their failures counted as startup failures,
    # and 5 made fcgispawn give up -- stopping the healthy workers and removing the socket.
    broken = sockdir / "broken"
    argv = [*WORKER, "--exit-if-exists", str(broken)]
    policy = {"crash_limit": 2, "backoff_initial": 0.05, "backoff_max": 0.2, "reset_after": 60}
    sup = start(procs, sockdir, argv=argv, workers=2, readiness="notify", policy=policy)
    old = sup.wait_workers(2)
    broken.touch()
    sup.signal(signal.SIGHUP)
    sup.wait_log("reload aborted")
    victim, survivor = sorted(old)
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: sup.log.count("exit status 3") >= 5, what=f"retries in:\n{sup.log}")
    assert sup.proc.poll() is None and "giving up" not in sup.log
    assert int(ask(sup.sock)) == survivor  # still serving
    broken.unlink()
    sup.wait_workers(2, exclude={victim})


def test_a_command_that_cannot_be_executed_any_more_is_retried_while_the_pool_serves(
    procs: ProcessGroup, sockdir: Path
) -> None:
    # A package upgrade can leave the binary missing or not executable for a moment: a slot
    # whose replacement cannot even be exec'd is retried with its backoff; the pool serves on.
    program = sockdir / "worker.sh"
    program.write_text(f"#!/bin/sh\nexec {' '.join(WORKER)}\n")
    program.chmod(0o755)
    policy = {"crash_limit": 2, "backoff_initial": 0.05, "backoff_max": 0.2, "reset_after": 60}
    sup = start(procs, sockdir, argv=[str(program)], workers=2, policy=policy)
    victim, survivor = sorted(sup.wait_workers(2))
    program.chmod(0o644)
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: sup.log.count("failed to start") >= 5, what=f"retries in:\n{sup.log}")
    assert sup.proc.poll() is None and "giving up" not in sup.log
    assert int(ask(sup.sock)) == survivor
    program.chmod(0o755)
    sup.wait_workers(2, exclude={victim})


def test_hup_during_a_reload_restarts_it_and_ttin_joins_it(
    procs: ProcessGroup, sockdir: Path
) -> None:
    sup = start(procs, sockdir, workers=1, policy={"settle": 0.5})
    (old,) = sup.wait_workers(1)
    sup.signal(signal.SIGHUP)
    sup.wait_log("reloading:")
    first = sup.wait_workers(2)  # old + the first successor
    sup.signal(signal.SIGHUP)  # before the successor is up (settle 0.5 s)
    sup.wait_log("SIGHUP during reload")
    sup.signal(signal.SIGTTIN)
    final = sup.wait_workers(2, exclude=first)
    assert old not in final
    wait_for(lambda: sup.log.count("reload done") == 1)
    assert {int(ask(sup.sock)) for _ in range(20)} <= final


def test_notify_readiness_keeps_old_workers_serving_until_new_ones_are_ready(
    procs: ProcessGroup, sockdir: Path
) -> None:
    """A slow-starting program (1 s "import") under Readiness.NOTIFY: no gap at the reload."""
    sup = start(
        procs, sockdir, argv=[*WORKER, "--notify-after", "0.8"], readiness="notify", workers=1
    )
    (old,) = sup.wait_workers(1)
    sup.wait_log(f"worker {old} ready after ")  # READY=1 from the worker, not the settle timer
    sup.signal(signal.SIGHUP)
    sup.wait_log("reloading:")
    t0 = time.monotonic()
    while time.monotonic() - t0 < 0.6:  # the successor is still "importing"
        t = time.monotonic()
        assert int(ask(sup.sock)) == old
        assert time.monotonic() - t < 0.1  # served at once, not queued behind a dead worker
        time.sleep(0.05)
    (new,) = sup.wait_workers(1, exclude={old})
    assert int(ask(sup.sock)) == new
    sup.wait_log("reload done")
    done = next(float(line.split()[0]) for line in sup.lines if "reload done" in line)
    began = next(float(line.split()[0]) for line in sup.lines if "reloading:" in line)
    assert done - began >= 0.75


def test_notify_readiness_falls_back_to_ready_timeout(procs: ProcessGroup, sockdir: Path) -> None:
    argv = [*WORKER, "--no-notify"]
    sup = start(procs, sockdir, argv=argv, readiness="notify", policy={"ready_timeout": 0.4})
    sup.wait_log("sent no READY=1 within 0.4s; taking it as up")
    assert int(ask(sup.sock)) in sup.workers()


def test_sd_notify_ready_reloading_stopping_and_watchdog(
    procs: ProcessGroup, sockdir: Path
) -> None:
    notify_path = sockdir / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        notify.settimeout(0.05)
        env = {"NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "400000"}
        sup = start(procs, sockdir, workers=1, env=env)
        messages: list[dict[str, str]] = []

        def receive_until(key: str, timeout: float = 5) -> dict[str, str]:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    data = notify.recv(4096).decode()
                    fields = dict(line.partition("=")[::2] for line in data.splitlines())
                    messages.append(fields)
                    if key in fields:
                        return fields
            raise AssertionError(f"no {key} in {messages}")

        ready = receive_until("READY")
        assert ready["MAINPID"] == str(sup.pid) and "1/1 workers" in ready["STATUS"]
        sup.signal(signal.SIGHUP)
        reloading = receive_until("RELOADING")
        assert int(reloading["MONOTONIC_USEC"]) > 0
        receive_until("READY")
        sup.signal(signal.SIGTERM)
        stopping = receive_until("STOPPING")
        assert int(stopping["EXTEND_TIMEOUT_USEC"]) > 30_000_000  # graceful_timeout 30 s
        assert sup.wait(5) == 0
    pings = sum(1 for m in messages if "WATCHDOG" in m)
    assert pings >= 2, messages


# -------------------------------------------------------------------------------- preload mode
# The real template (the --wsgi runtime) is exercised in tests/integration/test_preload.py; these
# pin the supervisor's side against templates that fail in each way a program can.

NONSENSE_TEMPLATE = """
import os, socket
ctl = socket.socket(fileno=int(os.environ["FCGISPAWN_TEMPLATE_FD"]))
ctl.send(b"ready")
while ctl.recv(64):
    ctl.send(b"nonsense")
"""


@pytest.mark.parametrize("template", [True, False])
def test_a_program_that_says_it_cannot_start_is_given_up_at_once(
    procs: ProcessGroup, sockdir: Path, template: bool
) -> None:
    """The status WorkerSpec.cannot_start names (a --wsgi app that does not import) ends a
    generation that never served at once, with its message: retrying a failure that repeats
    took 2-3 s of backoff, and supervisord (startsecs=1) restarted fcgispawn forever. Other
    statuses still count towards the crash limit."""
    policy = {"crash_limit": 3, "backoff_initial": 0.05, "crash_window": 10}
    argv = [sys.executable, "-c", "raise SystemExit(3)"]
    sup = start(
        procs, sockdir, argv=argv, template=template, policy=policy, wait_ready=False,
        cannot_start=[3, "the app cannot be loaded (its error is above)"],
    )  # fmt: skip
    assert sup.wait(10) == 1
    wait_for(lambda: "error:" in sup.log)
    assert "error: the app cannot be loaded (its error is above)" in sup.log
    assert sum(" started " in line for line in sup.lines) <= (1 if template else 2)
    assert "restarting slot" not in sup.log and "new template" not in sup.log
    (sockdir / "other").mkdir()
    other = start(
        procs, sockdir / "other", argv=[sys.executable, "-c", "raise SystemExit(4)"],
        template=template,
        policy=policy, wait_ready=False, cannot_start=[3, "the app cannot be loaded"],
    )  # fmt: skip
    assert other.wait(10) == 1
    wait_for(lambda: "error:" in other.log)
    assert "workers keep dying" in other.log


def test_template_exiting_before_ready_is_a_crash_loop_that_names_the_template(
    procs: ProcessGroup, sockdir: Path
) -> None:
    policy = {"crash_limit": 3, "backoff_initial": 0.05, "crash_window": 10}
    argv = [sys.executable, "-c", "raise SystemExit(3)"]
    sup = start(procs, sockdir, argv=argv, template=True, policy=policy, wait_ready=False)
    assert sup.wait(10) == 1
    wait_for(lambda: "error:" in sup.log)
    assert "workers keep dying: last exit status 3 (template " in sup.log
    assert sum(" template " in line and " started " in line for line in sup.lines) == 3
    assert not any("worker " in line and " started " in line for line in sup.lines)


def test_template_that_cannot_be_executed_is_a_clear_startup_error(
    procs: ProcessGroup, sockdir: Path
) -> None:
    argv = ["no-such-template-fcgispawn"]
    sup = start(procs, sockdir, argv=argv, template=True, workers=2, wait_ready=False)
    assert sup.wait(5) == 1
    wait_for(lambda: "error:" in sup.log)
    assert "cannot execute 'no-such-template-fcgispawn': No such file or directory" in sup.log


def test_template_answering_nonsense_is_killed_and_counted_until_the_supervisor_gives_up(
    procs: ProcessGroup, sockdir: Path
) -> None:
    policy = {"crash_limit": 2, "backoff_initial": 0.05, "crash_window": 10}
    argv = [sys.executable, "-c", NONSENSE_TEMPLATE]
    sup = start(procs, sockdir, argv=argv, template=True, policy=policy, wait_ready=False)
    assert sup.wait(10) == 1
    wait_for(lambda: "error:" in sup.log)
    assert "unexpected answer b'nonsense'; starting it anew" in sup.log
    assert "killed by signal SIGKILL (template " in sup.log
    assert not any("worker " in line and " started " in line for line in sup.lines)

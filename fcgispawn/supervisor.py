"""The arbiter: keeps N copies of a program alive on one listening socket.

A worker is an argv and an env. The supervisor never imports user code and knows nothing of
FastCGI: it forks, hands the socket over (fd 0, or fd 3 with ``LISTEN_FDS``), execs, and then
only watches exit statuses and signals. That is what lets it supervise php-cgi, a C libfcgi app
and fcgispawn's own ``--wsgi`` runtime alike.

Event model (why it looks like this):

* Signals become bytes: every handled signal gets a no-op Python handler, and
  :func:`signal.set_wakeup_fd` makes the C-level handler write the signal number into a
  non-blocking socketpair. The selector loop reads those bytes and acts on them. Nothing runs in
  a signal handler, so there are no re-entrancy bugs and no logging from handlers.
* Timers (restart backoff, settle time, graceful deadlines, watchdog pings) are just the
  selector's timeout. An idle supervisor blocks in ``epoll_wait`` with no timeout at all: zero
  wakeups per second (peers wake once a second).
* Children are reaped with ``waitpid(-1, WNOHANG)`` after every wakeup, so a coalesced SIGCHLD
  (two children dying at once deliver one signal) loses nothing.

Policy definitions (kept in one place, see :func:`classify_exit`):

* A worker is **up** once it has stayed alive for ``Policy.settle`` seconds. With fd 0 hand-off
  the supervisor cannot see a worker enter ``accept()``, so survival is the readiness signal.
  A program that can say when it is ready (``WorkerSpec.readiness = Readiness.NOTIFY``) gets a
  private ``NOTIFY_SOCKET`` and is up when it sends ``READY=1`` (sd_notify(3) protocol, so any
  sd_notify-aware program works); one that stays silent is taken as up after
  ``Policy.ready_timeout``. This matters for reloads of slow-starting apps: old workers keep
  serving until the new ones really accept, instead of for a fixed 0.2 s.
* An exit the supervisor did not ask for is a **startup failure** ("crash") when the worker died
  before it was up and no worker of its generation (the same program, env and code) has been
  up yet. A crash is restarted after the slot's backoff delay (``backoff_initial``, doubling,
  capped at ``backoff_max``). A worker that was up -- or whose generation was -- and died
  younger than ``reset_after`` is **lost** (kill -9, OOM killer, a crash on some request):
  replaced at once the first time, after the slot's doubling delay if it keeps happening, and
  never counted towards giving up -- the app demonstrably starts, so the pool must stay. (A
  replacement meets the backlog at once: a request that crashes the app kills it long before
  it could settle.) Status 0 after that is a voluntary recycle (``--max-requests``, php-cgi's
  ``PHP_FCGI_MAX_REQUESTS``, which under load comes within milliseconds), replaced at once. A
  worker that lived ``reset_after`` seconds or more is replaced at once and its slot's
  backoff is reset.
* Status 0 before a COMMAND worker (readiness: survival) was up, while its generation is not
  proven, is ambiguous: php-cgi started into waiting load serves its 500 requests in 0.06 s,
  ``true`` serves nothing. The pool is asked (an injected :class:`PoolProbe`; the spawner's
  sends FCGI_GET_VALUES to the listener, so this module still knows no FastCGI): an answer
  within ``PROBE_TIMEOUT`` proves the generation, and such exits were recycles; no answer and
  they count as startup failures. An exit 0 that leaves a process running (re-parented to us,
  the child subreaper) is a COMMAND that daemonizes itself: a startup failure, logged as such.
  In a reload, a successor's quick exit 0 while the running generation recycles as young
  proves the new generation instead of aborting the reload.
* ``crash_limit`` crashes (all slots together: they run the same program) within
  ``crash_window`` seconds is a crash loop: every worker is stopped and :meth:`Supervisor.run`
  raises :class:`~fcgispawn.errors.CrashLoopError` naming the last exit reason.

* A COMMAND that cannot be executed (reported by the child through a close-on-exec pipe) is
  fatal before the first generation is up (:class:`~fcgispawn.errors.ProcessError`: retrying a
  missing binary only delays the message); later it is retried with the slot's backoff, and
  counts as a crash only while the running generation has not been up (a template that fails
  to import the app alike): the serving workers are never stopped for it.
* An aborted reload (or one superseded by another HUP) leaves the generation number of the
  running workers current: their replacements belong to the proven generation.

Signals:

* TERM/INT: graceful stop -- workers get TERM, KILL after ``graceful_timeout``; exit 0.
* QUIT: fast stop -- TERM, KILL after ``fast_timeout`` (1 s). Workers get TERM, not QUIT: for an
  arbitrary program QUIT's default action is a core dump. A second stop request during a
  graceful stop turns it into a fast one; one during a fast stop KILLs at once.
* HUP: overlapping reload. One successor per slot starts on the same socket; once all are up the
  old workers get TERM (and ``graceful_timeout``). A successor that dies before the hand-over
  aborts the reload and the old workers keep serving (a broken deploy does not take the site
  down). A HUP during a reload restarts it (a newer deploy may have landed).
* TTIN/TTOU: one worker more/less, never fewer than one. (If the supervisor writes to a terminal
  from a background process group with ``stty tostop``, the kernel's own SIGTTOU would read as
  a TTOU request: run it detached or under a service manager.)
* USR1: forwarded to every worker (reopen logs).

Workers stay in the supervisor's process group and session: ``kill -- -PGID`` and a service
manager's cgroup see them, and PR_SET_PDEATHSIG (TERM) ends them if the supervisor is killed
with SIGKILL. Their environment is ``WorkerSpec.env`` without the supervisor's own systemd
variables (``LISTEN_*``, ``NOTIFY_SOCKET``, ``WATCHDOG_*``).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno as errno_mod
import fcntl
import os
import selectors
import signal
import socket
import struct
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from enum import Enum
from types import FrameType
from typing import Final, NoReturn, Protocol, assert_never

from fcgispawn import systemd
from fcgispawn.errors import CrashLoopError, FcgiSpawnError, ProcessError
from fcgispawn.process import Credentials, drop_privileges, reset_child_state
from fcgispawn.template import ERROR_PREFIX, FORK, PID_PREFIX, READY, TEMPLATE_FD_ENV

__all__ = [
    "CrashWindow",
    "ExitKind",
    "PassMode",
    "Phase",
    "Policy",
    "Readiness",
    "Supervisor",
    "SupervisorStatus",
    "WorkerSpec",
    "WorkerState",
    "WorkerStatus",
    "classify_exit",
    "describe_exit",
    "next_backoff",
]

#: Signals the supervisor turns into events. SIGCHLD needs a (no-op) handler too: with the
#: default disposition the kernel would discard it and the wakeup fd would never see it.
HANDLED_SIGNALS: Final[tuple[int, ...]] = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGHUP,
    signal.SIGTTIN,
    signal.SIGTTOU,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGALRM,
    signal.SIGCHLD,
)

#: Variables that describe the supervisor's own relation to systemd. Passed on, they would make
#: a worker adopt fds meant for us, or send READY=1/WATCHDOG=1 in our name.
_SUPERVISOR_ONLY_ENV: Final = frozenset(
    {"LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"}
)

_SD_LISTEN_FDS_START: Final = 3
#: Where a template finds its end of the control socket (after fd 0 or fd 3, the listener).
_TEMPLATE_CTL_FD: Final = 4
#: The longest the supervisor waits for a template to answer one fork request; a template
#: that does not answer in time is killed and started anew.
_TEMPLATE_REPLY_TIMEOUT: Final = 5.0
_PR_SET_PDEATHSIG: Final = 1
_PR_SET_CHILD_SUBREAPER: Final = 36
#: How long to keep waiting for a worker that was sent SIGKILL before forgetting it (a process
#: stuck in uninterruptible sleep must not keep the supervisor from ever exiting).
_ABANDON_AFTER_KILL: Final = 5.0
#: The error pipe's write end is moved at least this high in the child, so that placing the
#: listener on fd 0 or fd 3 can never overwrite it.
_CHILD_ERRFD_MIN: Final = 10


class PassMode(Enum):
    """How a worker receives the listening socket."""

    FD0 = "fd0"  # FastCGI convention (FCGI_LISTENSOCK_FILENO): the socket is stdin
    SYSTEMD = "systemd"  # fd 3 with LISTEN_FDS=1, LISTEN_PID, LISTEN_FDNAMES; stdin is /dev/null


class Readiness(Enum):
    """How the supervisor learns that a new worker is up (see the module docstring)."""

    SETTLE = "settle"  # alive for Policy.settle seconds: works for any program
    NOTIFY = "notify"  # sent READY=1 to the NOTIFY_SOCKET it was given


class PoolProbe(Protocol):
    """A question put to the pool through its own listener, driven by the selector loop: the
    spawner's is a FastCGI FCGI_GET_VALUES (client.Probe); the supervisor only knows that an
    answer means "whoever accepts there serves"."""

    retry_at: float | None

    def fileno(self) -> int: ...

    @property
    def wants_write(self) -> bool: ...

    def step(self) -> bool | None: ...

    def close(self) -> None: ...


#: Makes a PoolProbe, or None when the listener cannot be reached (see _await_probe).
ProbeFactory = Callable[[], "PoolProbe | None"]
#: How long the pool may take to answer a probe (it may wait behind a full backlog).
PROBE_TIMEOUT: Final = 2.0


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What to run: everything a worker is, with no knowledge of what it does."""

    argv: tuple[str, ...]
    env: Mapping[str, str]
    pass_mode: PassMode = PassMode.FD0
    fdname: str = "fcgi"
    credentials: Credentials | None = None
    chroot: str | None = None
    chdir: str | None = None
    readiness: Readiness = Readiness.SETTLE
    #: The program can be a fork template (template.py's protocol): it is started once per
    #: generation with TEMPLATE_FD_ENV set, and every worker is forked from it.
    template: bool = False
    #: (status, message): the exit status with which the program says it cannot start at all
    #: (a --wsgi worker whose app does not import), and what to tell the user. In a generation
    #: that never served, the supervisor then gives up at once with the message.
    cannot_start: tuple[int, str] | None = None

    def __post_init__(self) -> None:
        if not self.argv or not self.argv[0]:
            raise ValueError("WorkerSpec.argv needs a command")


@dataclass(frozen=True, slots=True)
class Policy:
    """Restart, crash-loop and stop timing. See the module docstring for the definitions."""

    workers: int = 1
    graceful_timeout: float = 30.0
    backoff_initial: float = 0.1
    backoff_max: float = 10.0
    reset_after: float = 10.0
    crash_limit: int = 5
    crash_window: float = 10.0
    #: A new worker counts as up after living this long (readiness, reload hand-over).
    settle: float = 0.2
    #: Grace given by a fast stop (QUIT, or a second TERM) before KILL.
    fast_timeout: float = 1.0
    #: Readiness.NOTIFY: a worker silent this long is taken as up anyway (and a warning logged).
    ready_timeout: float = 60.0

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError("Policy.workers must be at least 1")
        if self.crash_limit < 1:
            raise ValueError("Policy.crash_limit must be at least 1")
        if self.backoff_initial <= 0 or self.backoff_max < self.backoff_initial:
            raise ValueError("Policy needs 0 < backoff_initial <= backoff_max")
        for name in (
            "graceful_timeout",
            "reset_after",
            "crash_window",
            "settle",
            "fast_timeout",
            "ready_timeout",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"Policy.{name} must not be negative")


class Phase(Enum):
    """The supervisor's life cycle."""

    STARTING = "starting"  # first generation not up yet; on_ready not called yet
    RUNNING = "running"
    RELOADING = "reloading"  # successors started, old workers still serving
    STOPPING = "stopping"  # no more spawns; waiting for workers to exit
    STOPPED = "stopped"


_PHASE_TRANSITIONS: Final[Mapping[Phase, frozenset[Phase]]] = {
    Phase.STARTING: frozenset({Phase.RUNNING, Phase.STOPPING}),
    Phase.RUNNING: frozenset({Phase.RELOADING, Phase.STOPPING}),
    Phase.RELOADING: frozenset({Phase.RUNNING, Phase.STOPPING}),
    Phase.STOPPING: frozenset({Phase.STOPPED}),
    Phase.STOPPED: frozenset(),
}


class WorkerState(Enum):
    """One worker process's life cycle (until it is reaped)."""

    STARTING = "starting"  # forked and exec'd, not yet up (settled or READY=1)
    UP = "up"
    STOPPING = "stopping"  # sent TERM by us: its exit is expected


_WORKER_TRANSITIONS: Final[Mapping[WorkerState, frozenset[WorkerState]]] = {
    WorkerState.STARTING: frozenset({WorkerState.UP, WorkerState.STOPPING}),
    WorkerState.UP: frozenset({WorkerState.STOPPING}),
    WorkerState.STOPPING: frozenset(),
}


class ExitKind(Enum):
    """What an exit means for the restart policy."""

    REQUESTED = "requested"  # we sent TERM/KILL: never restarted by itself
    DIED = "died"  # lived reset_after or longer: replaced at once, backoff reset
    RECYCLED = "recycled"  # status 0 after being up, younger: replaced at once, not a failure
    LOST = "lost"  # died after being up, younger than reset_after: replaced at once the first
    #               time (a kill -9, the OOM killer), with backoff if it keeps happening; not a
    #               startup failure, so it never makes the supervisor give up on a working app
    CRASHED = "crashed"  # died before it was up: counts towards the crash limit, backoff


def classify_exit(
    status: int, lifetime: float, *, requested: bool, was_up: bool, policy: Policy
) -> ExitKind:
    """The restart policy in one pure function, so the table of cases is testable on its own."""
    if requested:
        return ExitKind.REQUESTED
    if lifetime >= policy.reset_after:
        return ExitKind.DIED
    if not was_up:
        return ExitKind.CRASHED
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
        return ExitKind.RECYCLED
    return ExitKind.LOST


def next_backoff(delay: float, policy: Policy) -> float:
    """Exponential backoff: the delay after ``delay``, doubling up to ``backoff_max``."""
    return min(delay * 2, policy.backoff_max)


def describe_exit(status: int) -> str:
    """``exit status 3`` / ``killed by signal SIGKILL`` (+ core dump), for logs and errors."""
    if os.WIFEXITED(status):
        code = os.WEXITSTATUS(status)
        # 124 is the runtime's --request-timeout exit (timeout(1)'s convention): say so.
        return f"exit status {code}" + (" (request timeout)" if code == 124 else "")
    if os.WIFSIGNALED(status):
        num = os.WTERMSIG(status)
        try:
            name = signal.Signals(num).name
        except ValueError:
            name = str(num)
        core = " (core dumped)" if os.WCOREDUMP(status) else ""
        return f"killed by signal {name}{core}"
    return f"wait status {status:#x}"


class CrashWindow:
    """Timestamps of recent crashes; answers "how many within the last window seconds"."""

    def __init__(self, window: float) -> None:
        self._window = window
        self._times: deque[float] = deque()

    def record(self, now: float) -> int:
        """Adds a crash at ``now`` and returns the number of crashes inside the window."""
        self._times.append(now)
        while self._times and self._times[0] <= now - self._window:
            self._times.popleft()
        return len(self._times)


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    """One live worker, as shown in logs, ``STATUS=`` and a future status endpoint."""

    pid: int
    slot: int | None  # None: draining, no longer counted as capacity
    generation: int
    state: WorkerState
    started_at: float  # wall clock (time.time()), for humans
    uptime: float
    restarts: int  # of its slot


@dataclass(frozen=True, slots=True)
class SupervisorStatus:
    """A snapshot of the supervisor, cheap enough to build on every change."""

    phase: Phase
    generation: int
    target: int
    workers: tuple[WorkerStatus, ...]
    restarts: int
    last_exit: str | None

    def summary(self) -> str:
        """One line for sd_notify ``STATUS=`` and logs."""
        serving = [w for w in self.workers if w.slot is not None]
        text = f"{len(serving)}/{self.target} workers"
        if serving:
            text += " (pids " + ", ".join(str(w.pid) for w in serving) + ")"
        draining = len(self.workers) - len(serving)
        if draining:
            text += f", {draining} draining"
        text += f", {self.restarts} restarts"
        if self.last_exit:
            text += f", last exit: {self.last_exit}"
        if self.phase is not Phase.RUNNING:
            text += f" [{self.phase.value}]"
        return text


@dataclass(slots=True, eq=False)
class _Worker:
    pid: int
    generation: int
    started: float  # monotonic
    started_wall: float
    slot: _Slot | None
    state: WorkerState = WorkerState.STARTING
    kill_at: float | None = None  # when to send KILL (set once TERM was sent)
    abandon_at: float | None = None  # when to stop waiting after KILL

    def move(self, new: WorkerState) -> None:
        assert new in _WORKER_TRANSITIONS[self.state], (self.state, new)
        self.state = new


@dataclass(slots=True, eq=False)
class _Slot:
    """One unit of capacity. Backoff and restart counts belong to the slot, not the process."""

    index: int
    delay: float
    worker: _Worker | None = None
    successor: _Worker | None = None  # during a reload
    restart_at: float | None = None
    restarts: int = 0
    #: Preload mode: a worker (or successor) is wanted but its template is not up yet.
    awaiting: bool = False
    awaiting_successor: bool = False


@dataclass(slots=True, eq=False)
class _Template:
    """A preloaded process the workers of one generation are forked from (template.py)."""

    pid: int
    generation: int
    started: float  # monotonic
    ctl: socket.socket  # the supervisor's end of the control socketpair
    up: bool = False  # said ``ready``
    stopping: bool = False
    kill_at: float | None = None
    abandon_at: float | None = None


@dataclass(slots=True)
class _ChildFailure:
    """Why a forked child never reached exec (sent through the CLOEXEC error pipe)."""

    stage: str
    errno: int
    message: str


#: The selector data of the pool probe's socket (see Supervisor._await_probe).
_PROBE: Final = object()

_Handler = Callable[[int, FrameType | None], object] | int | signal.Handlers


def _noop_handler(signum: int, frame: FrameType | None) -> None:
    """Exists only so the C-level handler runs and writes ``signum`` to the wakeup fd."""


class _Prctl:
    """``prctl(2)`` through ctypes, resolved in the parent so the child does no dlopen."""

    def __init__(self) -> None:
        self._fn: Callable[..., int] | None
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            self._fn = libc.prctl
        except (OSError, AttributeError):  # not glibc/musl-like: workers just lack PDEATHSIG
            self._fn = None

    def set_pdeathsig(self, signum: int) -> bool:
        if self._fn is None:
            return False
        return self._fn(_PR_SET_PDEATHSIG, ctypes.c_ulong(signum), 0, 0, 0) == 0

    def set_child_subreaper(self) -> bool:
        if self._fn is None:
            return False
        return self._fn(_PR_SET_CHILD_SUBREAPER, ctypes.c_ulong(1), 0, 0, 0) == 0


class Supervisor:
    """Runs ``policy.workers`` copies of ``spec`` on ``listener`` until told to stop.

    ``listener`` stays open in the supervisor until a stop begins: that is why a reload or a
    restart never refuses a connection (connections queue in the backlog meanwhile). When a
    stop begins, ``on_stop`` is called once (the spawner closes its copy and removes the socket
    file it bound): the workers, which give up theirs too as they start draining, will accept
    nothing more, and a web server must be told at once -- a refused connection, which nginx
    passes to its next upstream server -- not after ``graceful_timeout`` with a reset.
    """

    def __init__(
        self,
        listener: socket.socket,
        spec: WorkerSpec,
        policy: Policy,
        *,
        log: Callable[[str], None],
        on_stop: Callable[[], None] | None = None,
        probe: ProbeFactory | None = None,
    ) -> None:
        self._listener = listener
        self._on_stop = on_stop
        # Quick exits with status 0 of a generation not yet proven (see _await_probe): the
        # probe that decides whether they were recycles or startup failures, and their reasons.
        self._probe_factory = probe
        self._probe: PoolProbe | None = None
        self._probe_generation = -1
        self._probe_deadline = 0.0
        self._probe_exits: list[str] = []
        #: When a worker of a proven generation last exited 0 before it would have counted as
        #: up: the workload recycles workers that fast (see _exited, reload hand-over).
        self._quick_recycle_at = -float("inf")
        self._spec = spec
        self._policy = policy
        self._user_log = log
        self._phase = Phase.STARTING
        self._target = policy.workers
        self._slots: list[_Slot] = []
        self._workers: dict[int, _Worker] = {}
        self._generation = 0
        self._crashes = CrashWindow(policy.crash_window)
        self._restarts = 0
        self._last_exit: str | None = None
        self._failure: FcgiSpawnError | None = None
        self._stop_fast = False
        self._on_ready: Callable[[], None] | None = None
        self._watchdog_interval: float | None = None
        self._watchdog_next: float | None = None
        self._ran = False
        self._prctl = _Prctl()
        self._notify_sock: socket.socket | None = None
        #: How long a STARTING worker waits to count as up without a READY=1.
        self._settle = policy.ready_timeout if spec.readiness is Readiness.NOTIFY else policy.settle
        #: The newest generation a worker of which has been up: its program demonstrably
        #: starts, so its workers' later exits are never startup failures (see _exited).
        self._proven_generation = -1
        self._child_env = {k: v for k, v in spec.env.items() if k not in _SUPERVISOR_ONLY_ENV}
        # Preload mode (spec.template): the template of the running generation, the one being
        # started by a reload, and when to start the running generation's anew after it died.
        self._use_template = spec.template
        self._templates: dict[int, _Template] = {}
        self._template: _Template | None = None
        self._next_template: _Template | None = None
        self._template_delay = policy.backoff_initial
        self._template_restart_at: float | None = None
        self._sel: selectors.BaseSelector | None = None
        if spec.pass_mode is PassMode.SYSTEMD:
            systemd.listen_env([spec.fdname], pid=0)  # SocketError now, not in every child
        # O_NONBLOCK lives in the open file description the workers share: a listener left
        # non-blocking by whoever created it would make blocking accept() loops spin on EAGAIN.
        listener.setblocking(True)

    # ----------------------------------------------------------------------------------------
    # public

    @property
    def phase(self) -> Phase:
        return self._phase

    def status(self) -> SupervisorStatus:
        now = time.monotonic()
        workers = tuple(
            WorkerStatus(
                pid=w.pid,
                slot=None if w.slot is None else w.slot.index,
                generation=w.generation,
                state=w.state,
                started_at=w.started_wall,
                uptime=now - w.started,
                restarts=0 if w.slot is None else w.slot.restarts,
            )
            for w in sorted(self._workers.values(), key=lambda w: w.started)
        )
        return SupervisorStatus(
            phase=self._phase,
            generation=self._generation,
            target=self._target,
            workers=workers,
            restarts=self._restarts,
            last_exit=self._last_exit,
        )

    def run(self, on_ready: Callable[[], None] | None = None) -> int:
        """Supervises until stopped; returns 0 after a clean stop.

        Must be called from the main thread (signal handlers, and PDEATHSIG follows the
        forking *thread*). Raises CrashLoopError after a crash loop and ProcessError when the
        command cannot be executed at startup; no worker outlives either.
        """
        if self._ran:
            raise RuntimeError("Supervisor.run() can only be called once")
        self._ran = True
        self._on_ready = on_ready
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        sel = self._sel = selectors.DefaultSelector()
        sel.register(wake_r, selectors.EVENT_READ)
        if self._spec.readiness is Readiness.NOTIFY:
            self._notify_sock = self._open_ready_socket()
            sel.register(self._notify_sock, selectors.EVENT_READ)
        # A child subreaper: forked workers (preload mode) are re-parented to us, and so is
        # whatever a COMMAND leaves running when it exits (see _strays).
        if not self._prctl.set_child_subreaper() and self._use_template:
            # Forked workers could not be re-parented to us, so we could not reap them.
            self._log("cannot become a child subreaper: starting every worker by exec")
            self._use_template = False
        try:
            with self._signals_to(wake_w):
                try:
                    self._start()
                    while self._phase is not Phase.STOPPED:
                        timeout = self._timeout(time.monotonic())
                        for key, _ in sel.select(timeout):
                            if key.fileobj is wake_r:
                                self._dispatch(self._drain(wake_r))
                            elif isinstance(key.data, _Template):
                                self._template_message(key.data)
                            elif key.data is _PROBE:
                                self._probe_step()
                            else:
                                self._read_ready_messages()
                        self._reap()
                        self._fire_timers(time.monotonic())
                        self._progress()
                except BaseException:
                    self._kill_all_now()
                    raise
        finally:
            self._end_probe()
            sel.close()
            self._sel = None
            for template in self._templates.values():
                template.ctl.close()
            wake_r.close()
            wake_w.close()
            if self._notify_sock is not None:
                self._notify_sock.close()
        if self._failure is not None:
            raise self._failure
        return 0

    # ----------------------------------------------------------------------------------------
    # set-up

    @contextlib.contextmanager
    def _signals_to(self, wake_w: socket.socket) -> Iterator[None]:
        previous: dict[int, _Handler] = {}
        old_fd = signal.set_wakeup_fd(wake_w.fileno())
        try:
            for sig in HANDLED_SIGNALS:
                old = signal.signal(sig, _noop_handler)
                # None: installed by C code, cannot be restored from Python; use the default.
                previous[sig] = signal.SIG_DFL if old is None else old
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            signal.set_wakeup_fd(old_fd)

    def _start(self) -> None:
        usec = systemd.watchdog_usec()
        if usec:
            self._watchdog_interval = usec / 2_000_000
            self._watchdog_next = time.monotonic()
        self._generation = 1
        preload = ", forked from a preloaded template" if self._use_template else ""
        self._log(
            f"supervisor {os.getpid()} starting {self._target} worker(s): "
            f"{' '.join(self._spec.argv)} (socket on {self._pass_label()}{preload})"
        )
        if self._use_template:
            self._template = self._start_template(self._generation)
            if self._template is None:  # exec failure: already given up
                return
        for _ in range(self._target):
            slot = self._new_slot()
            self._spawn_into(slot)
            if self._phase is Phase.STOPPING:  # exec failure: no point forking the rest
                break

    def _pass_label(self) -> str:
        match self._spec.pass_mode:
            case PassMode.FD0:
                return "fd 0"
            case PassMode.SYSTEMD:
                return f"fd 3, LISTEN_FDNAMES={self._spec.fdname}"
            case _ as unreachable:
                assert_never(unreachable)

    def _new_slot(self) -> _Slot:
        slot = _Slot(index=len(self._slots), delay=self._policy.backoff_initial)
        self._slots.append(slot)
        return slot

    # ----------------------------------------------------------------------------------------
    # spawning

    def _spawn_into(self, slot: _Slot, *, successor: bool = False) -> None:
        """Spawns a worker for ``slot`` (or its successor); handles an exec failure.

        In preload mode the worker is forked by its generation's template; while that template
        is not up yet, the slot is marked as awaiting and filled when it says ``ready``.
        """
        slot.restart_at = None
        result: _Worker | _ChildFailure
        if self._use_template:
            template = self._next_template if successor else self._template
            if template is None or not template.up:
                self._await_template(slot, successor=successor)
                return
            forked = self._fork_from(template)
            if isinstance(forked, _ChildFailure):
                # The template misbehaves (gone, or no answer): replace it; the slot waits.
                self._log(f"template {template.pid}: {forked.message}; starting it anew")
                self._signal_pid(template.pid, signal.SIGKILL)
                template.up = False
                self._await_template(slot, successor=successor)
                return
            result = self._register(forked, slot, template.generation, template.pid)
        else:
            spawned = self._fork_exec(None)
            result = (
                spawned
                if isinstance(spawned, _ChildFailure)
                else self._register(spawned, slot, self._generation, None)
            )
        if isinstance(result, _Worker):
            if successor:
                slot.successor = result
                slot.awaiting_successor = False
            else:
                slot.worker = result
                slot.awaiting = False
            return
        reason = self._failure_text(result)
        self._last_exit = reason
        self._log(f"worker for slot {slot.index} failed to start: {reason}")
        if self._phase is Phase.STARTING:
            self._fail(self._start_error(result, reason))
        elif self._phase is Phase.RELOADING and successor:
            self._abort_reload(reason)
        else:
            # Once the running program has been up, a failed start is passing (a package
            # upgrade replacing the binary): retried with the slot's backoff while the other
            # workers serve, never a reason to stop them.
            self._crashed(slot, f"start failure ({reason})", count=not self._proven())

    @staticmethod
    def _start_error(failure: _ChildFailure, reason: str) -> ProcessError:
        """A failure before the first generation is up is final (missing binary, bad chroot):
        retrying only delays the message."""
        hint = "check COMMAND and PATH (inside --chroot)" if failure.stage == "exec" else None
        return ProcessError(reason, hint=hint)

    def _failure_text(self, failure: _ChildFailure) -> str:
        match failure.stage:
            case "exec":
                return f"cannot execute {self._spec.argv[0]!r}: {os.strerror(failure.errno)}"
            case "fork":
                return f"cannot fork: {os.strerror(failure.errno)}"
            case _:
                return f"cannot start worker ({failure.stage}): {failure.message}"

    @staticmethod
    def _await_template(slot: _Slot, *, successor: bool) -> None:
        """The slot's worker (or successor) is forked once its template says ready."""
        if successor:
            slot.awaiting_successor = True
        else:
            slot.awaiting = True

    def _register(self, pid: int, slot: _Slot, generation: int, template: int | None) -> _Worker:
        worker = _Worker(
            pid=pid,
            generation=generation,
            started=time.monotonic(),
            started_wall=time.time(),
            slot=slot,
        )
        self._workers[pid] = worker
        origin = f", forked from template {template}" if template is not None else ""
        self._log(f"worker {pid} started (slot {slot.index}, generation {generation}{origin})")
        if self._spec.readiness is Readiness.SETTLE and self._proven(generation):
            # Its program demonstrably serves; survival proves nothing more, and a worker the
            # load recycles within Policy.settle (php-cgi) would otherwise never count as up.
            worker.move(WorkerState.UP)
        return worker

    def _fork_exec(self, ctl: socket.socket | None) -> int | _ChildFailure:
        """fork + exec, reporting pre-exec failures through a CLOEXEC pipe; returns the pid.

        The pipe's write end closes on a successful exec, so the parent reads EOF; on failure
        the child writes ``stage\\0errno\\0message`` first. All signals are blocked across
        fork() so that no handler runs in the child before it resets dispositions (it would
        write into the parent's wakeup socketpair).
        """
        err_r, err_w = os.pipe()  # O_CLOEXEC (PEP 446)
        parent = os.getpid()
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        try:
            pid = os.fork()
        except OSError as exc:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            os.close(err_r)
            os.close(err_w)
            return _ChildFailure("fork", exc.errno or 0, str(exc))
        if pid == 0:
            os.close(err_r)
            self._child(err_w, parent, ctl)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        os.close(err_w)
        try:
            data = b""
            while chunk := os.read(err_r, 4096):
                data += chunk
        finally:
            os.close(err_r)
        if data:
            # The child is exiting right now; reap it here so the SIGCHLD path never sees it.
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            stage, _, rest = data.decode("utf-8", "replace").partition("\0")
            num, _, message = rest.partition("\0")
            return _ChildFailure(stage, int(num) if num.isdigit() else 0, message)
        return pid

    def _child(self, err_w: int, parent: int, ctl: socket.socket | None) -> NoReturn:
        """Runs in the forked child: hand over the socket, reset state, drop privileges, exec.

        Never returns and never raises: every failure is written to the error pipe and the
        child leaves with ``os._exit(127)`` (no atexit handlers, no flushing of the parent's
        buffers a second time).
        """
        stage = "setup"
        err_fd = err_w
        try:
            signal.set_wakeup_fd(-1)
            for sig in HANDLED_SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            err_fd = fcntl.fcntl(err_w, fcntl.F_DUPFD_CLOEXEC, _CHILD_ERRFD_MIN)
            ctl_fd = None
            if ctl is not None:  # moved out of the way of fds 0 and 3, placed after them
                ctl_fd = fcntl.fcntl(ctl.fileno(), fcntl.F_DUPFD_CLOEXEC, _CHILD_ERRFD_MIN)
            listen_fd = self._listener.fileno()
            keep = [err_fd]
            match self._spec.pass_mode:
                case PassMode.FD0:
                    os.dup2(listen_fd, 0)
                    os.set_inheritable(0, True)  # dup2(0, 0) keeps the old flags
                case PassMode.SYSTEMD:
                    os.dup2(listen_fd, _SD_LISTEN_FDS_START)
                    os.set_inheritable(_SD_LISTEN_FDS_START, True)
                    devnull = os.open(os.devnull, os.O_RDONLY)
                    if devnull != 0:
                        os.dup2(devnull, 0)
                        os.close(devnull)
                    os.set_inheritable(0, True)
                    keep.append(_SD_LISTEN_FDS_START)
                case _ as unreachable:
                    assert_never(unreachable)
            if ctl_fd is not None:
                os.dup2(ctl_fd, _TEMPLATE_CTL_FD)  # inheritable: dup2 clears FD_CLOEXEC
                keep.append(_TEMPLATE_CTL_FD)
            stage = "reset"
            reset_child_state(keep)
            os.set_inheritable(err_fd, False)  # reset_child_state makes kept fds inheritable
            env = dict(self._child_env)
            if ctl_fd is not None:
                env[TEMPLATE_FD_ENV] = str(_TEMPLATE_CTL_FD)
            if self._spec.pass_mode is PassMode.SYSTEMD:
                # LISTEN_PID must be our own pid, known only after fork.
                env.update(systemd.listen_env([self._spec.fdname]))
            spec = self._spec
            if spec.credentials is not None or spec.chroot or spec.chdir:
                stage = "privileges"
                creds = spec.credentials or Credentials(uid=None, gid=None, username=None)
                drop_privileges(creds, chroot=spec.chroot, chdir=spec.chdir)
            # After the privilege drop: a credential change clears PDEATHSIG.
            stage = "pdeathsig"
            self._prctl.set_pdeathsig(signal.SIGTERM)
            if os.getppid() != parent:  # the supervisor died before prctl took effect
                os._exit(1)
            stage = "exec"
            os.execvpe(spec.argv[0], list(spec.argv), env)
        except BaseException as exc:
            num = exc.errno if isinstance(exc, OSError) and exc.errno else errno_mod.EINVAL
            msg = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            with contextlib.suppress(BaseException):
                os.write(err_fd, f"{stage}\0{num}\0{msg}".encode("utf-8", "replace"))
        os._exit(127)

    # ----------------------------------------------------------------------------------------
    # preload mode: templates (template.py has the other side and the why)

    def _start_template(self, generation: int) -> _Template | None:
        """Exec a template for ``generation``; None after an exec failure (already handled)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            result = self._fork_exec(theirs)
        finally:
            theirs.close()
        if isinstance(result, _ChildFailure):
            ours.close()
            reason = self._failure_text(result)
            self._last_exit = reason
            self._log(f"template failed to start: {reason}")
            if self._phase is Phase.STARTING:
                self._fail(self._start_error(result, reason))
            elif self._phase is Phase.RELOADING and generation > self._current_generation():
                self._abort_reload(reason)
            else:
                self._template_failed(None, f"start failure ({reason})", crashed=True)
            return None
        ours.settimeout(_TEMPLATE_REPLY_TIMEOUT)
        template = _Template(pid=result, generation=generation, started=time.monotonic(), ctl=ours)
        self._templates[result] = template
        if self._sel is not None:
            self._sel.register(ours, selectors.EVENT_READ, template)
        self._log(f"template {result} started (generation {generation}): importing the app")
        return template

    def _current_generation(self) -> int:
        """The generation the running workers belong to (a reload's successors are newer)."""
        if self._phase is Phase.RELOADING:
            return self._generation - 1
        return self._generation

    def _template_message(self, template: _Template) -> None:
        """The one unsolicited message a template sends: ``ready`` (or EOF: it died)."""
        try:
            message = template.ctl.recv(64)
        except (BlockingIOError, InterruptedError, TimeoutError):
            return
        except OSError:
            message = b""
        self._unwatch(template)
        if message != READY or template.stopping:
            return  # EOF: the exit status follows through SIGCHLD
        template.up = True
        self._log(f"template {template.pid} ready after {time.monotonic() - template.started:.2f}s")
        self._feed_awaiting()

    def _unwatch(self, template: _Template) -> None:
        if self._sel is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(template.ctl)

    def _feed_awaiting(self) -> None:
        """Forks the workers that slots have been waiting for, from templates now up."""
        for slot in list(self._slots):
            if self._stopping():
                return
            if slot.awaiting and self._template is not None and self._template.up:
                slot.awaiting = False
                if slot.worker is None:
                    self._spawn_into(slot)
            nxt = self._next_template
            if slot.awaiting_successor and nxt is not None and nxt.up:
                slot.awaiting_successor = False
                if slot.successor is None and self._phase is Phase.RELOADING:
                    self._spawn_into(slot, successor=True)

    def _fork_from(self, template: _Template) -> int | _ChildFailure:
        """Asks ``template`` for one worker; its pid, or why not. Blocks for one round trip
        (a fork: about a millisecond); a template that does not answer in time is dropped."""
        try:
            template.ctl.send(FORK)
            reply = template.ctl.recv(256)
        except TimeoutError:
            return _ChildFailure("template", errno_mod.ETIMEDOUT, "no answer to a fork request")
        except OSError as exc:
            return _ChildFailure("template", exc.errno or 0, f"control socket: {exc}")
        if reply.startswith(PID_PREFIX) and reply[len(PID_PREFIX) :].isdigit():
            return int(reply[len(PID_PREFIX) :])
        if reply.startswith(ERROR_PREFIX):
            text = reply[len(ERROR_PREFIX) :].decode("utf-8", "replace")
            return _ChildFailure("template", 0, text)
        if not reply:
            return _ChildFailure("template", 0, "it exited")
        return _ChildFailure("template", 0, f"unexpected answer {reply[:32]!r}")

    def _template_exited(self, template: _Template, status: int) -> None:
        self._unwatch(template)
        template.ctl.close()
        now = time.monotonic()
        lifetime = now - template.started
        reason = describe_exit(status)
        desc = f"template {template.pid} {reason} after {lifetime:.2f}s"
        if template.stopping or self._stopping():
            self._log(f"{desc} (stopped)")
            return
        self._last_exit = f"{reason} (template {template.pid})"
        if template is self._next_template:
            self._next_template = None
            self._log(f"{desc} during reload")
            self._abort_reload(f"new template {template.pid} {reason} after {lifetime:.2f}s")
            return
        if template is not self._template:
            self._log(desc)
            return
        self._template = None
        self._log(desc)
        if not template.up and self._cannot_start(status, template.generation):
            return
        self._template_failed(template, self._last_exit, crashed=not template.up)

    def _template_failed(self, template: _Template | None, reason: str, *, crashed: bool) -> None:
        """The running generation's template is gone: start another, as for a worker slot."""
        now = time.monotonic()
        initial = self._policy.backoff_initial
        if crashed:  # never got up: a startup failure, as for a worker (counts, backs off)
            # ... unless its generation's workers were up: then they serve on, and giving up
            # would stop them (the app no longer imports from disk, say, without a reload).
            if not self._proven() and self._count_crash(reason):
                return
            delay = self._template_delay
            self._template_delay = next_backoff(delay, self._policy)
        elif template is not None and now - template.started >= self._policy.reset_after:
            delay = 0.0  # lived long: a lone failure, start over with a clean backoff
            self._template_delay = initial
        else:  # was up and died young (kill -9, OOM): at once, backing off only on repeats
            delay = 0.0 if self._template_delay <= initial else self._template_delay
            self._template_delay = next_backoff(self._template_delay, self._policy)
        self._template_restart_at = now + delay
        self._log(f"starting a new template in {delay:.2f}s")

    def _restart_template(self) -> None:
        self._template_restart_at = None
        template = self._start_template(self._current_generation())
        if template is not None:
            self._template = template

    def _stop_template(self, template: _Template, timeout: float) -> None:
        """TERM a template (it serves nothing, so it ends at once) and arm its KILL."""
        self._unwatch(template)
        if not template.stopping:
            template.stopping = True
            self._signal_pid(template.pid, signal.SIGTERM)
            template.kill_at = time.monotonic() + timeout
        if template is self._template:
            self._template = None
        if template is self._next_template:
            self._next_template = None

    # ----------------------------------------------------------------------------------------
    # readiness notifications from workers (Readiness.NOTIFY)

    def _open_ready_socket(self) -> socket.socket:
        """A private sd_notify endpoint; SO_PASSCRED tells which worker a READY=1 is from.

        Abstract namespace: nothing to create or clean up on disk, and a chroot cannot hide
        it. Anyone on the host could send to it, but the worst a forged message can do is
        make a reload hand over early -- it cannot start, stop or address a process.
        """
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        # os.urandom, which is what secrets.token_hex reads: importing secrets loads OpenSSL's
        # libcrypto (through hashlib), ~4 MiB of the supervisor's memory for nothing.
        name = f"fcgispawn/{os.getpid()}/{os.urandom(8).hex()}"
        sock.bind("\0" + name)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        sock.setblocking(False)
        self._child_env["NOTIFY_SOCKET"] = "@" + name
        return sock

    def _read_ready_messages(self) -> None:
        assert self._notify_sock is not None
        creds_size = struct.calcsize("iII")
        while True:
            try:
                data, ancdata, _, _ = self._notify_sock.recvmsg(4096, socket.CMSG_SPACE(creds_size))
            except (BlockingIOError, InterruptedError):
                return
            pid = None
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("iII", payload[:creds_size])[0]
            worker = self._workers.get(pid) if pid is not None else None
            fields = data.split(b"\n")
            if worker is not None and b"STOPPING=1" in fields:
                self._retiring(worker)
                continue
            if worker is None or b"READY=1" not in fields:
                continue
            if worker.state is WorkerState.STARTING:
                self._mark_up(worker)
                uptime = time.monotonic() - worker.started
                self._log(f"worker {worker.pid} ready after {uptime:.2f}s")

    # ----------------------------------------------------------------------------------------
    # the loop's steps

    @staticmethod
    def _drain(wake_r: socket.socket) -> list[int]:
        signums: list[int] = []
        while True:
            try:
                data = wake_r.recv(4096)
            except (BlockingIOError, InterruptedError):
                return signums
            if not data:
                return signums
            signums.extend(data)

    def _dispatch(self, signums: list[int]) -> None:
        for num in signums:
            match num:
                case signal.SIGTERM | signal.SIGINT:
                    self._request_stop(fast=False, why=signal.Signals(num).name)
                case signal.SIGQUIT:
                    self._request_stop(fast=True, why="SIGQUIT")
                case signal.SIGHUP:
                    self._begin_reload()
                case signal.SIGTTIN:
                    self._scale(+1)
                case signal.SIGTTOU:
                    self._scale(-1)
                case signal.SIGUSR1 | signal.SIGUSR2:
                    # USR2 too, as multiwatch forwards it: left at its default, a logrotate
                    # script's USR2 ended the supervisor at once (no drain, files left).
                    name = signal.Signals(num).name
                    self._log(f"forwarding {name} to {len(self._workers)} worker(s)")
                    for worker in list(self._workers.values()):
                        self._signal(worker, num)
                case signal.SIGALRM:
                    self._log("SIGALRM ignored")
                case _:
                    pass  # SIGCHLD: reaping happens after every wakeup anyway

    def _timeout(self, now: float) -> float | None:
        deadlines: list[float] = []
        for slot in self._slots:
            if slot.restart_at is not None:
                deadlines.append(slot.restart_at)
        for worker in self._workers.values():
            if worker.state is WorkerState.STARTING:
                deadlines.append(worker.started + self._settle)
            if worker.kill_at is not None:
                deadlines.append(worker.kill_at)
            if worker.abandon_at is not None:
                deadlines.append(worker.abandon_at)
        for template in self._templates.values():
            if template.kill_at is not None:
                deadlines.append(template.kill_at)
            if template.abandon_at is not None:
                deadlines.append(template.abandon_at)
        if self._template_restart_at is not None:
            deadlines.append(self._template_restart_at)
        if self._watchdog_next is not None:
            deadlines.append(self._watchdog_next)
        if self._probe is not None:
            deadlines.append(self._probe_deadline)
            if self._probe.retry_at is not None:
                deadlines.append(self._probe.retry_at)
        if not deadlines:
            return None  # idle: sleep until a signal arrives
        return max(0.0, min(deadlines) - now)

    def _fire_timers(self, now: float) -> None:
        if self._probe is not None:
            if now >= self._probe_deadline:
                self._probe_done(False, f"did not answer within {PROBE_TIMEOUT:g}s")
            elif self._probe.retry_at is not None and now >= self._probe.retry_at:
                self._probe_step()
        interval = self._watchdog_interval
        if self._watchdog_next is not None and interval is not None and now >= self._watchdog_next:
            self._notify("WATCHDOG=1")
            self._watchdog_next = now + interval
        for worker in list(self._workers.values()):
            if worker.state is WorkerState.STARTING and now >= worker.started + self._settle:
                self._mark_up(worker)
                if self._spec.readiness is Readiness.NOTIFY:
                    self._log(
                        f"worker {worker.pid} sent no READY=1 within {self._settle:g}s; "
                        "taking it as up"
                    )
            if worker.kill_at is not None and now >= worker.kill_at:
                self._log(f"worker {worker.pid} still running after the grace period: SIGKILL")
                self._signal(worker, signal.SIGKILL)
                worker.kill_at = None
                worker.abandon_at = now + _ABANDON_AFTER_KILL
            elif worker.abandon_at is not None and now >= worker.abandon_at:
                self._log(f"worker {worker.pid} did not die after SIGKILL; no longer waiting")
                self._workers.pop(worker.pid, None)
        for template in list(self._templates.values()):
            if template.kill_at is not None and now >= template.kill_at:
                self._signal_pid(template.pid, signal.SIGKILL)
                template.kill_at = None
                template.abandon_at = now + _ABANDON_AFTER_KILL
            elif template.abandon_at is not None and now >= template.abandon_at:
                self._log(f"template {template.pid} did not die after SIGKILL; no longer waiting")
                self._templates.pop(template.pid, None)
                template.ctl.close()
        if self._stopping():
            return
        if self._template_restart_at is not None and now >= self._template_restart_at:
            self._restart_template()
        for slot in list(self._slots):
            if self._stopping():  # a failed restart may have just given up
                break
            if slot.restart_at is not None and now >= slot.restart_at:
                slot.restarts += 1
                self._restarts += 1
                self._spawn_into(slot)

    def _progress(self) -> None:
        """Moves the phase forward once what it waits for has happened."""
        match self._phase:
            case Phase.STARTING:
                if self._all_up(successors=False):
                    self._become_ready()
            case Phase.RELOADING:
                if self._all_up(successors=True):
                    self._commit_reload()
            case Phase.STOPPING:
                if not self._workers and not self._templates:
                    self._move(Phase.STOPPED)
                    self._log("all workers stopped")
            case Phase.RUNNING | Phase.STOPPED:
                pass
            case _ as unreachable:
                assert_never(unreachable)

    def _all_up(self, *, successors: bool) -> bool:
        for slot in self._slots:
            if slot.awaiting_successor if successors else slot.awaiting:
                return False  # its template is not up yet
            worker = slot.successor if successors else slot.worker
            if successors and worker is None and slot.worker is not None:
                continue  # cannot happen after _begin_reload, but a slot with a worker is fine
            if worker is None or worker.state is not WorkerState.UP:
                return False
        return True

    # ----------------------------------------------------------------------------------------
    # reaping and the restart policy

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self._workers.pop(pid, None)
            if worker is not None:
                self._exited(worker, status)
            template = self._templates.pop(pid, None)
            if template is not None:
                self._template_exited(template, status)
            # Anything else is an orphan re-parented to us as subreaper: reaped, nothing more.

    def _exited(self, worker: _Worker, status: int) -> None:
        now = time.monotonic()
        lifetime = now - worker.started
        reason = describe_exit(status)
        slot = worker.slot
        requested = worker.state is WorkerState.STOPPING or self._phase is Phase.STOPPING
        kind = classify_exit(
            status,
            lifetime,
            requested=requested,
            # By age too: the settle timer may not have run yet in this loop iteration. And by
            # its generation: a replacement that takes a request from the backlog at once may
            # exit (php-cgi's PHP_FCGI_MAX_REQUESTS) or die of it (a request that crashes the
            # app) long before it settles; counted as startup failures, a few such requests
            # made the supervisor give up on a working pool.
            was_up=(
                worker.state is WorkerState.UP
                or lifetime >= self._settle
                or self._proven(worker.generation)
            ),
            policy=self._policy,
        )
        desc = f"worker {worker.pid} {reason} after {lifetime:.2f}s"
        if kind is ExitKind.REQUESTED or slot is None:
            self._log(f"{desc} (stopped)")
            return
        last = self._last_exit = f"{reason} (pid {worker.pid})"
        if slot.successor is worker:
            slot.successor = None
            self._log(f"{desc} during reload")
            recycling = now - self._quick_recycle_at < self._policy.crash_window
            if recycling and self._ended_normally(worker, status):
                # The running workers end that young under this load too (php-cgi's
                # PHP_FCGI_MAX_REQUESTS): the new one served and recycled, it did not fail.
                self._prove(worker.generation, "its workers recycle as fast as the running ones")
                self._spawn_into(slot, successor=True)
                return
            self._abort_reload(f"new worker {worker.pid} {reason} after {lifetime:.2f}s")
            return
        assert slot.worker is worker
        slot.worker = None
        match kind:
            case ExitKind.RECYCLED:
                self._log(f"{desc}; replacing it")
                if lifetime < self._settle:
                    self._quick_recycle_at = now
                self._restart_now(slot)
            case ExitKind.DIED:
                self._log(f"{desc}; replacing it")
                slot.delay = self._policy.backoff_initial
                self._restart_now(slot)
            case ExitKind.LOST:
                self._lost(slot, desc)
            case ExitKind.CRASHED:
                self._log(desc)
                if self._cannot_start(status, worker.generation):
                    return
                if self._ended_normally(worker, status) and self._await_probe(
                    worker.generation, last
                ):
                    self._crashed(slot, last, count=False)  # counted if the probe fails
                else:
                    self._crashed(slot, last)
            case ExitKind.REQUESTED:
                raise AssertionError("handled above")
            case _ as unreachable:
                assert_never(unreachable)
        if self._phase is Phase.RELOADING and slot.successor is not None:
            slot.restart_at = None  # the successor takes this slot over; no restart needed
        self._notify_status()

    def _mark_up(self, worker: _Worker) -> None:
        worker.move(WorkerState.UP)
        self._proven_generation = max(self._proven_generation, worker.generation)

    def _restart_now(self, slot: _Slot) -> None:
        slot.restart_at = time.monotonic()

    def _ended_normally(self, worker: _Worker, status: int) -> bool:
        """Exit status 0 of a program whose readiness is its survival (a COMMAND): its own
        decision to end, which may come before Policy.settle when the load recycles it --
        unless it left a process behind: a COMMAND that daemonizes itself (forks, and the
        parent exits 0) would otherwise be restarted into one more daemon each time."""
        if not (
            self._spec.readiness is Readiness.SETTLE
            and os.WIFEXITED(status)
            and os.WEXITSTATUS(status) == 0
        ):
            return False
        strays = self._strays()
        if strays:
            self._log(
                f"worker {worker.pid} exited 0 and left {', '.join(map(str, strays))} running: "
                "the COMMAND daemonizes itself; run it in the foreground (php-fpm: -F)"
            )
        return not strays

    def _strays(self) -> list[int]:
        """Our children that are neither workers nor templates: what a worker that forked and
        exited left behind (re-parented to us, the child subreaper). Empty when /proc cannot
        tell."""
        pids: list[int] = []
        try:
            for tid in os.listdir("/proc/self/task"):
                with open(f"/proc/self/task/{tid}/children", encoding="ascii") as f:
                    pids.extend(int(p) for p in f.read().split())
        except (OSError, ValueError):
            return []
        return [p for p in pids if p not in self._workers and p not in self._templates]

    def _unprove_above(self, generation: int) -> None:
        """A generation number above ``generation`` is handed out again (an aborted or
        superseded reload): whatever proved the attempt that had it says nothing of the next."""
        self._proven_generation = min(self._proven_generation, generation)

    def _prove(self, generation: int, why: str) -> None:
        """Generation ``generation`` serves: its workers are up, their exits never startup
        failures."""
        if generation <= self._proven_generation:
            return
        self._proven_generation = generation
        self._log(f"generation {generation} serves: {why}")
        for worker in self._workers.values():
            if worker.generation == generation and worker.state is WorkerState.STARTING:
                self._mark_up(worker)

    def _await_probe(self, generation: int, reason: str) -> bool:
        """A worker of a generation not yet proven exited 0 before it counted as up: php-cgi
        serving its PHP_FCGI_MAX_REQUESTS (500) within 0.06 s when the supervisor starts into
        waiting load, or a program that is no FastCGI server at all (exits at once, or
        daemonizes itself). The pool is asked (the probe): an answer proves the generation and
        the exit was a recycle; no answer and the exits waiting for it count as startup
        failures. False (counted now as before) when no probe can be made."""
        if self._probe is not None and self._probe_generation == generation:
            self._probe_exits.append(reason)
            return True
        if self._probe_factory is None or self._sel is None or self._probe is not None:
            return False
        try:
            probe = self._probe_factory()
        except OSError:
            probe = None
        if probe is None:
            return False
        self._probe = probe
        self._probe_generation = generation
        self._probe_deadline = time.monotonic() + PROBE_TIMEOUT
        self._probe_exits = [reason]
        self._probe_watch(probe)
        self._log(
            f"a worker of generation {generation} exited 0 before it counted as up: "
            "asking the pool whether it serves (FCGI_GET_VALUES)"
        )
        return True

    def _probe_watch(self, probe: PoolProbe) -> None:
        """Watch the probe's socket for what it waits for; not at all while it waits to try
        its connect again (retry_at, a timer): an unconnected socket would wake the loop
        without end."""
        sel = self._sel
        if sel is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            sel.unregister(probe)
        if probe.retry_at is None:
            events = selectors.EVENT_WRITE if probe.wants_write else selectors.EVENT_READ
            sel.register(probe, events, _PROBE)

    def _probe_step(self) -> None:
        probe = self._probe
        if probe is None:
            return
        answer = probe.step()
        if answer is None:
            self._probe_watch(probe)
            return
        self._probe_done(answer, "answered" if answer else "refused or closed the connection")

    def _probe_done(self, answered: bool, how: str) -> None:
        generation, exits = self._probe_generation, self._probe_exits
        self._end_probe()
        if answered:
            self._prove(
                generation,
                f"the pool {how} a FastCGI probe; {len(exits)} quick exit(s) with status 0 "
                "were recycles",
            )
            now = time.monotonic()
            for slot in self._slots:  # waiting on a startup-failure back-off: not owed
                if slot.restart_at is not None and slot.restart_at > now:
                    slot.restart_at = now
                slot.delay = self._policy.backoff_initial
            return
        self._log(
            f"the pool {how} (a FastCGI probe): {len(exits)} exit(s) with status 0 of "
            f"generation {generation} count as startup failures"
        )
        for reason in exits:
            if self._count_crash(reason):
                return

    def _end_probe(self) -> None:
        probe, self._probe = self._probe, None
        self._probe_exits = []
        if probe is None:
            return
        if self._sel is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(probe)
        probe.close()

    def _lost(self, slot: _Slot, desc: str) -> None:
        """A worker that was serving died young: replace it now, back off only on a repeat.

        A slot whose delay is still the initial one has had no failure since it last lived
        long enough, so the replacement starts at once (the socket keeps queueing meanwhile);
        each further loss before that waits the slot's doubling delay.
        """
        if slot.delay <= self._policy.backoff_initial:
            self._log(f"{desc}; replacing it")
            self._restart_now(slot)
        else:
            slot.restart_at = time.monotonic() + slot.delay
            self._log(f"{desc}; replacing it in {slot.delay:.2f}s")
        slot.delay = next_backoff(slot.delay, self._policy)

    def _cannot_start(self, status: int, generation: int) -> bool:
        """A worker or template of a generation that never served exited with the status that
        says its program cannot start at all (spec.cannot_start): give up now. Retrying a
        failure that repeats only delayed the verdict by the backoff (2-3 s for a mistyped
        --wsgi module), long enough for supervisord (startsecs=1) to take fcgispawn for
        started and restart it forever, 51 tracebacks in 22 s; gunicorn halts at once."""
        spec = self._spec.cannot_start
        if (
            spec is None
            or self._proven(generation)
            or not os.WIFEXITED(status)
            or os.WEXITSTATUS(status) != spec[0]
        ):
            return False
        self._fail(CrashLoopError(spec[1]))
        return True

    def _count_crash(self, reason: str) -> bool:
        """Records a startup failure; True if that makes a crash loop (and we gave up)."""
        count = self._crashes.record(time.monotonic())
        if count >= self._policy.crash_limit:
            self._fail(
                CrashLoopError(
                    f"workers keep dying: last {reason}; {count} startup failures within "
                    f"{self._policy.crash_window:g}s",
                    hint="run the worker command by hand to see why it exits",
                )
            )
            return True
        return False

    def _proven(self, generation: int | None = None) -> bool:
        """Whether a worker of ``generation`` (default: the running one) has been up."""
        if generation is None:
            generation = self._current_generation()
        return generation <= self._proven_generation

    def _crashed(self, slot: _Slot, reason: str, *, count: bool = True) -> None:
        if count and self._count_crash(reason):
            return
        now = time.monotonic()
        slot.restart_at = now + slot.delay
        self._log(f"restarting slot {slot.index} in {slot.delay:.2f}s")
        slot.delay = next_backoff(slot.delay, self._policy)

    def _fail(self, error: FcgiSpawnError) -> None:
        self._log(f"giving up: {error.message}")
        if self._failure is None:
            self._failure = error
        self._notify(f"STATUS={error.message}")
        self._request_stop(fast=False, why="giving up")

    # ----------------------------------------------------------------------------------------
    # readiness and reload

    def _become_ready(self) -> None:
        self._move(Phase.RUNNING)
        self._log(f"ready: {self.status().summary()}")
        if self._on_ready is not None:
            self._on_ready()
        self._notify("READY=1", f"MAINPID={os.getpid()}", f"STATUS={self.status().summary()}")

    def _begin_reload(self) -> None:
        match self._phase:
            case Phase.STARTING:
                self._log("SIGHUP ignored: workers are still starting")
                return
            case Phase.STOPPING | Phase.STOPPED:
                return
            case Phase.RELOADING:
                # A newer deploy may have landed since: replace the pending successors too.
                self._log("SIGHUP during reload: restarting the reload")
                self._drop_successors()
                self._generation -= 1  # the superseded attempt never ran (see _abort_reload)
                self._unprove_above(self._generation)
            case Phase.RUNNING:
                self._move(Phase.RELOADING)
            case _ as unreachable:
                assert_never(unreachable)
        self._generation += 1
        mono = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._notify("RELOADING=1", f"MONOTONIC_USEC={mono}", "STATUS=reloading")
        self._log(
            f"reloading: starting {len(self._slots)} new worker(s) (generation {self._generation})"
        )
        if self._use_template:
            # A fresh template, exec'd anew: this is what makes a reload load new code.
            if self._next_template is not None:
                self._stop_template(self._next_template, self._policy.fast_timeout)
            self._next_template = self._start_template(self._generation)
            if self._next_template is None:
                return  # the reload was aborted
        for slot in self._slots:
            if self._phase is not Phase.RELOADING:
                return  # aborted by an exec failure
            self._spawn_into(slot, successor=True)

    def _commit_reload(self) -> None:
        old: list[int] = []
        for slot in self._slots:
            if slot.successor is None:
                continue
            if slot.worker is not None:
                old.append(slot.worker.pid)
                slot.worker.slot = None
                self._stop_worker(slot.worker, self._policy.graceful_timeout)
            slot.worker = slot.successor
            slot.successor = None
            slot.restart_at = None
            slot.awaiting = slot.awaiting_successor = False
        if self._use_template:
            old_template, self._template = self._template, self._next_template
            self._next_template = None
            if old_template is not None:
                self._stop_template(old_template, self._policy.fast_timeout)
            self._template_restart_at = None
            self._template_delay = self._policy.backoff_initial
        self._move(Phase.RUNNING)
        new = [s.worker.pid for s in self._slots if s.worker is not None]
        self._log(f"reload done: new workers {new}, draining {old}")
        self._notify("READY=1", f"STATUS={self.status().summary()}")

    def _abort_reload(self, reason: str) -> None:
        """A new worker died before the hand-over: keep the old ones serving."""
        if self._phase is not Phase.RELOADING:
            return
        self._log(f"reload aborted: {reason}; keeping the running workers")
        # The aborted generation never ran: the running one is current again, and the workers
        # that replace its losses belong to it (a number above it is not proven to start).
        self._generation -= 1
        self._unprove_above(self._generation)
        self._drop_successors()
        if self._next_template is not None:
            self._stop_template(self._next_template, self._policy.fast_timeout)
        for slot in self._slots:
            if slot.worker is None and slot.restart_at is None:
                self._restart_now(slot)
        self._move(Phase.RUNNING)
        self._notify("READY=1", f"STATUS=reload failed: {reason}")

    def _drop_successors(self) -> None:
        """Ends the pending hand-over: successors drain, unless one is all its slot has."""
        for slot in self._slots:
            slot.awaiting_successor = False
            successor = slot.successor
            if successor is None:
                continue
            slot.successor = None
            if slot.worker is None:
                slot.worker = successor  # keep it serving; a later commit replaces it
            else:
                successor.slot = None
                self._stop_worker(successor, self._policy.graceful_timeout)

    def _scale(self, delta: int) -> None:
        if self._stopping():
            return
        if delta > 0:
            self._target += 1
            slot = self._new_slot()
            self._log(f"SIGTTIN: {self._target} worker(s)")
            self._spawn_into(slot, successor=self._phase is Phase.RELOADING)
        else:
            if self._target <= 1:
                self._log("SIGTTOU ignored: keeping at least one worker")
                return
            self._target -= 1
            slot = self._slots.pop()
            self._log(f"SIGTTOU: {self._target} worker(s)")
            for worker in (slot.worker, slot.successor):
                if worker is not None:
                    worker.slot = None
                    self._stop_worker(worker, self._policy.graceful_timeout)
        self._notify_status()

    # ----------------------------------------------------------------------------------------
    # stopping

    def _request_stop(self, *, fast: bool, why: str) -> None:
        now = time.monotonic()
        if self._phase is Phase.STOPPED:
            return
        if self._phase is Phase.STOPPING:
            if self._stop_fast:
                self._log(f"{why} during fast stop: killing the workers now")
                for worker in list(self._workers.values()):
                    worker.kill_at = now
                return
            fast = True  # a second stop request escalates
        self._stop_fast = self._stop_fast or fast
        self._end_probe()
        timeout = self._policy.fast_timeout if fast else self._policy.graceful_timeout
        if self._phase is not Phase.STOPPING:
            self._move(Phase.STOPPING)
            if self._on_stop is not None:
                try:
                    self._on_stop()  # nothing is spawned from here on: no use for the socket
                except Exception as exc:
                    self._log(f"releasing the listening socket failed: {exc!r}")
            # EXTEND_TIMEOUT_USEC: a graceful timeout longer than the unit's TimeoutStopSec=
            # must not end in systemd SIGKILLing us (and every request) half-way.
            extend = int((timeout + _ABANDON_AFTER_KILL + 1) * 1_000_000)
            self._notify("STOPPING=1", f"EXTEND_TIMEOUT_USEC={extend}")
        if self._workers:
            self._log(
                f"{why}: {'fast' if fast else 'graceful'} stop of {len(self._workers)} "
                f"worker(s), SIGKILL after {timeout:g}s"
            )
        for slot in self._slots:
            slot.restart_at = None
            slot.awaiting = slot.awaiting_successor = False
        self._template_restart_at = None
        for worker in list(self._workers.values()):
            self._stop_worker(worker, timeout)
        for template in list(self._templates.values()):
            self._stop_template(template, min(timeout, self._policy.fast_timeout))

    def _retiring(self, worker: _Worker) -> None:
        """A worker said STOPPING=1: it stops by itself (--max-requests, --request-timeout) and
        drains first, which with kept connections takes up to a second (PENDING_DRAIN). Its
        replacement starts now, not when it exits: waiting cost the pool that worker's share
        of capacity, and with all workers recycling about together every slot could be
        draining at once (Apache enablereuse with --max-requests 500: 62,000 -> 23,700
        requests in 6 s, stalls of 0.85 s)."""
        slot = worker.slot
        if slot is None or slot.worker is not worker or self._stopping():
            return  # a reload's old worker, a successor, or a stop: already being replaced
        worker.slot = None
        slot.worker = None
        self._stop_worker(worker, self._policy.graceful_timeout, signal_it=False)
        self._log(f"worker {worker.pid} is retiring: starting its replacement now")
        self._restart_now(slot)

    def _stop_worker(self, worker: _Worker, timeout: float, *, signal_it: bool = True) -> None:
        """TERM a worker (once; not one stopping by itself) and arm its KILL deadline (only
        ever moved earlier)."""
        deadline = time.monotonic() + timeout
        if worker.state is not WorkerState.STOPPING:
            worker.move(WorkerState.STOPPING)
            if signal_it:
                self._signal(worker, signal.SIGTERM)
        if worker.abandon_at is None and (worker.kill_at is None or deadline < worker.kill_at):
            worker.kill_at = deadline

    def _kill_all_now(self) -> None:
        """Last resort when run() unwinds on an exception: no worker may outlive us.

        Bounded (a process in uninterruptible sleep is left behind after a few seconds) and
        polling, which is fine here: this runs once, on the way out.
        """
        pending = set(self._workers) | set(self._templates)
        for pid in pending:
            self._signal_pid(pid, signal.SIGKILL)
        deadline = time.monotonic() + _ABANDON_AFTER_KILL
        while pending and time.monotonic() < deadline:
            for pid in list(pending):
                try:
                    done, _ = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    done = pid
                if done:
                    pending.discard(pid)
            if pending:
                time.sleep(0.01)
        self._workers.clear()
        for template in self._templates.values():
            template.ctl.close()
        self._templates.clear()

    # ----------------------------------------------------------------------------------------
    # helpers

    def _log(self, message: str) -> None:
        # A log sink that fails (stderr a closed pipe: ``fcgispawn -n ... | head``) must not
        # take the workers down with it.
        with contextlib.suppress(OSError, ValueError):
            self._user_log(message)

    def _signal(self, worker: _Worker, signum: int) -> None:
        self._signal_pid(worker.pid, signum)

    @staticmethod
    def _signal_pid(pid: int, signum: int) -> None:
        # The pid cannot have been reused: it stays a zombie until we reap it.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    def _stopping(self) -> bool:
        return self._phase in (Phase.STOPPING, Phase.STOPPED)

    def _move(self, new: Phase) -> None:
        assert new in _PHASE_TRANSITIONS[self._phase], (self._phase, new)
        self._phase = new

    def _notify_status(self) -> None:
        if self._phase in (Phase.RUNNING, Phase.RELOADING):
            self._notify(f"STATUS={self.status().summary()}")

    def _notify(self, *fields: str) -> None:
        try:
            systemd.notify(*fields)
        except OSError as exc:  # the manager went away; supervising matters more
            self._log(f"sd_notify failed: {exc}")

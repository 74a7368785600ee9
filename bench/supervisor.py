"""Supervisor metrics for issue 6: idle wakeups, worker replacement latency, startup to READY.

- Idle wakeups: context switches (voluntary + nonvoluntary, summed over all threads, from
  /proc/PID/task/*/status) of the supervisor and of each worker over a quiet window, per second.
  A supervisor that polls wakes up; one that blocks on signals and child exits does not.
- Replacement: with ``-F 1`` only the replacement can answer, so after ``kill -9`` of the worker
  we time a fresh connection + full FastCGI request until it succeeds (it sits in the listen
  backlog until the new worker accepts it). Median over N kills; kills are spaced by
  ``--interval`` (default 11 s, beyond fcgispawn's 10 s reset_after) so each kill is a lone
  crash and the crash-loop backoff is not what we measure.
- Startup: time from exec of ``fcgispawn -n -F 8 --wsgi ...`` to ``READY=1`` on a
  NOTIFY_SOCKET this script binds, and to the first served request.

uWSGI (``--master``) is measured the same way, for comparison.

Usage: python -m bench.supervisor [--kills 20] [--idle-seconds 10] [--startups 5]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shlex
import shutil
import signal
import socket
import statistics
import sys
import time
from pathlib import Path

from bench import common
from bench.common import BENCH, REPO, VENV_BIN, log

HELLO = b"Hello, World!"
PEERS = ("fcgispawn", "fcgispawn-no-preload", "uwsgi")
#: /proc/PID/comm of fcgispawn's preload template (fcgispawn.template.TEMPLATE_COMM).
TEMPLATE_COMM = b"fcgispawn-tmpl"


EXTRA_ARGS: list[str] = []


def argv_for(name: str, sock: Path, workers: int) -> list[str]:
    if name.startswith("fcgispawn"):
        preload = ["--no-preload"] if name == "fcgispawn-no-preload" else []
        return [
            str(VENV_BIN / "fcgispawn"),
            "-n",
            "-s",
            str(sock),
            "-F",
            str(workers),
            "--wsgi",
            "bench.apps:app",
            *preload,
            *EXTRA_ARGS,
        ]
    return [
        str(VENV_BIN / "uwsgi"),
        "--master",
        "--processes",
        str(workers),
        "--fastcgi-socket",
        str(sock),
        "--wsgi-file",
        str(BENCH / "apps.py"),
        "--disable-logging",
    ]


def ctxt_switches(pid: int) -> int:
    """Voluntary + nonvoluntary context switches of every thread of pid (0 if gone)."""
    total = 0
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            fields = _task_status(pid, task)
            total += int(fields.get("voluntary_ctxt_switches", "0"))
            total += int(fields.get("nonvoluntary_ctxt_switches", "0"))
    return total


def _task_status(pid: int, task: str) -> dict[str, str]:
    out: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/task/{task}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            out[name] = value.strip()
    return out


def start(
    procs: common.Processes,
    name: str,
    workdir: Path,
    workers: int,
    env: dict[str, str] | None = None,
) -> tuple[common.Launched, Path]:
    sock = workdir / f"{name}.sock"
    sock.unlink(missing_ok=True)
    launched = procs.launch(
        name,
        argv_for(name, sock, workers),
        workdir / f"{name}.log",
        env=env or common.backend_env(),
        cwd=REPO,
    )
    return launched, sock


def _is_template(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_bytes().rstrip(b"\n") == TEMPLATE_COMM
    except OSError:
        return False


def templates_of(launched: common.Launched) -> set[int]:
    """fcgispawn's preload template(s): neither supervisor nor worker."""
    return {pid for pid in launched.pids() if _is_template(pid)}


def workers_of(launched: common.Launched) -> set[int]:
    return launched.pids() - {launched.proc.pid} - templates_of(launched)


def wait_workers(launched: common.Launched, count: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len({p for p in workers_of(launched) if common.is_alive(p)}) >= count:
            return True
        time.sleep(0.05)
    return False


# ---- idle wakeups --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Idle:
    """Quiet-window wakeups per second and memory (PSS, KiB) of the supervisor and workers."""

    supervisor_rate: float
    worker_rates: list[float]
    supervisor_pss: int
    worker_pss: list[int]
    template_pss: int  # fcgispawn's preload template; 0 for the others

    def total_per_worker(self) -> float:
        """Everything the backend holds (master/supervisor and template too) per worker."""
        total = self.supervisor_pss + self.template_pss + sum(self.worker_pss)
        return total / max(1, len(self.worker_pss))


def pss_kib(pid: int) -> int:
    """Proportional set size: shared pages split among sharers (what a worker really costs)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def idle_wakeups(procs: common.Processes, name: str, workdir: Path, seconds: float) -> Idle | str:
    """Wakeups/s over a quiet window, then PSS after 200 requests; or why not."""
    launched, sock = start(procs, name, workdir, 2)
    try:
        if not common.wait_serving(sock, launched, HELLO, 30.0):
            return "did not serve: " + launched.log_tail(3).replace("\n", " ")
        wait_workers(launched, 2, 10.0)
        time.sleep(2.0)  # let start-up settle
        sup = launched.proc.pid
        workers = sorted(workers_of(launched))
        before = {pid: ctxt_switches(pid) for pid in [sup, *workers]}
        time.sleep(seconds)
        after = {pid: ctxt_switches(pid) for pid in before}
        rate = {pid: (after[pid] - before[pid]) / seconds for pid in before}
        for _ in range(200):
            common.fastcgi_get(str(sock))
        return Idle(
            rate[sup],
            [rate[w] for w in workers],
            pss_kib(sup),
            [pss_kib(w) for w in workers],
            sum(pss_kib(t) for t in templates_of(launched)),
        )
    finally:
        procs.stop(launched)


# ---- replacement after kill -9 -------------------------------------------------------------------


def replacement_times(
    procs: common.Processes, name: str, workdir: Path, kills: int, interval: float
) -> list[float] | str:
    """Seconds from SIGKILL of the only worker until a new request is served, per kill."""
    launched, sock = start(procs, name, workdir, 1)
    times: list[float] = []
    try:
        if not common.wait_serving(sock, launched, HELLO, 30.0):
            return "did not serve: " + launched.log_tail(3).replace("\n", " ")
        wait_workers(launched, 1, 10.0)
        for i in range(kills):
            workers = workers_of(launched)
            if len(workers) != 1:
                time.sleep(0.5)
                workers = workers_of(launched)
            if len(workers) != 1:
                return f"kill {i + 1}: expected 1 worker, found {sorted(workers)}; times {times}"
            (victim,) = workers
            t0 = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            while True:
                if HELLO in common.fastcgi_get(str(sock), timeout=5.0):
                    times.append(time.monotonic() - t0)
                    break
                if time.monotonic() - t0 > 10 or launched.proc.poll() is not None:
                    done = " ".join(f"{t * 1000:.0f}" for t in times)
                    return (
                        f"kill {i + 1}: no replacement served within 10 s "
                        f"(launcher exit {launched.proc.poll()}; ms so far: {done}): "
                        + launched.log_tail(1).replace("\n", " ")
                    )
                time.sleep(0.001)
            time.sleep(interval)
        return times
    finally:
        procs.stop(launched)


# ---- startup to READY ----------------------------------------------------------------------------


def startup_times(
    procs: common.Processes, name: str, workdir: Path, workers: int
) -> tuple[float | None, float | None, str]:
    """(seconds to READY=1, seconds to the first served request, note) for one start."""
    notify_path = workdir / "notify.sock"
    notify_path.unlink(missing_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        env = common.backend_env()
        env["NOTIFY_SOCKET"] = str(notify_path)
        t0 = time.monotonic()
        launched, sock = start(procs, name, workdir, workers, env)
        ready: float | None = None
        served: float | None = None
        note = ""
        try:
            deadline = t0 + 30.0
            notify.settimeout(0.005)
            while time.monotonic() < deadline and (ready is None or served is None):
                with contextlib.suppress(TimeoutError, BlockingIOError):
                    message = notify.recv(4096)
                    if ready is None and b"READY=1" in message.split(b"\n"):
                        ready = time.monotonic() - t0
                if (
                    served is None
                    and sock.exists()
                    and HELLO in common.fastcgi_get(str(sock), timeout=1.0)
                ):
                    served = time.monotonic() - t0
                if launched.proc.poll() is not None:
                    note = f"exited {launched.proc.returncode}: " + launched.log_tail(2)
                    break
            if served is not None and ready is None:
                note = note or "no READY=1 within 30 s"
            if ready is not None:
                count = len(workers_of(launched))
                if count < workers:
                    note = f"only {count} worker processes at READY"
        finally:
            procs.stop(launched)
            notify_path.unlink(missing_ok=True)
        return ready, served, note


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.supervisor", description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument(
        "--interval",
        type=float,
        default=11.0,
        help="seconds between kills. fcgispawn's default policy backs off (0.1 s doubling) "
        "for a worker that dies within 10 s of its start and gives up after 5 such deaths in "
        "10 s; 11 s measures a lone crash, shorter intervals measure the backoff",
    )
    parser.add_argument(
        "--fcgispawn-args", default="", help="extra fcgispawn options, e.g. '--crash-limit 100'"
    )
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--startups", type=int, default=5)
    parser.add_argument("--workers", type=int, default=8, help="workers for the startup test")
    parser.add_argument("--peers", default=",".join(PEERS))
    parser.add_argument(
        "--label",
        default="supervisor",
        help="results file bench/results/DATE-LABEL.md; 'none' skips",
    )
    args = parser.parse_args(argv)
    peers = [p for p in args.peers.split(",") if p]
    EXTRA_ARGS[:] = shlex.split(args.fcgispawn_args)
    if any(p not in PEERS for p in peers):
        parser.error(f"peers are {', '.join(PEERS)}")
    if "fcgispawn" in peers:
        why = common.fcgispawn_status()
        if why:
            log(f"NOTE: fcgispawn is not measured: {why}")
            peers.remove("fcgispawn")
    if not peers:
        return 1

    common.become_subreaper()
    workdir = common.make_workdir()
    procs = common.Processes()
    lines: list[str] = []
    try:
        for name in peers:
            log(f"{name}: idle wakeups over {args.idle_seconds:g} s")
            common.check_idle(f"{name} idle", wait=10.0)
            idle = idle_wakeups(procs, name, workdir, args.idle_seconds)
            if isinstance(idle, str):
                lines.append(f"| {name} | idle wakeups/s | failed: {idle} |")
            else:
                lines.append(
                    f"| {name} | idle wakeups/s, supervisor (master) | {idle.supervisor_rate:.1f} "
                    f"(workers: {', '.join(f'{w:.1f}' for w in idle.worker_rates)}) |"
                )
                template = idle.template_pss / 1024
                lines.append(
                    f"| {name} | PSS after 200 requests, supervisor (master) | "
                    f"{idle.supervisor_pss / 1024:.1f} MiB (workers: "
                    f"{', '.join(f'{w / 1024:.1f}' for w in idle.worker_pss)} MiB"
                    + (f"; template {template:.1f} MiB" if template else "")
                    + f"); all processes / workers: {idle.total_per_worker() / 1024:.1f} MiB |"
                )
            log(f"{name}: {args.kills} x kill -9 of the only worker")
            times = replacement_times(procs, name, workdir, args.kills, args.interval)
            if isinstance(times, str):
                lines.append(f"| {name} | replacement after kill -9 | failed: {times} |")
            else:
                ms = [t * 1000 for t in times]
                lines.append(
                    f"| {name} | replacement after kill -9, {len(ms)} kills | median "
                    f"{statistics.median(ms):.1f} ms (min {min(ms):.1f}, max {max(ms):.1f}; "
                    f"series {' '.join(f'{x:.0f}' for x in ms)}) |"
                )
            log(f"{name}: {args.startups} x startup of {args.workers} workers")
            readies: list[float] = []
            serves: list[float] = []
            notes: set[str] = set()
            for _ in range(args.startups):
                ready, served, note = startup_times(procs, name, workdir, args.workers)
                if ready is not None:
                    readies.append(ready * 1000)
                if served is not None:
                    serves.append(served * 1000)
                if note:
                    notes.add(note.replace("\n", " ")[:160])
            ready_text = (
                f"READY median {statistics.median(readies):.0f} ms "
                f"({min(readies):.0f}-{max(readies):.0f})"
                if readies
                else "no READY=1"
            )
            serve_text = (
                f"first request served median {statistics.median(serves):.0f} ms"
                if serves
                else "never served"
            )
            lines.append(
                f"| {name} | startup of {args.workers} workers, {args.startups} starts "
                f"| {ready_text}; {serve_text}"
                + (f"; notes: {'; '.join(sorted(notes))}" if notes else "")
                + " |"
            )
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    table = ["| backend | metric | value |", "|---|---|---|", *lines]
    print()
    print("\n".join(table))
    if args.label != "none" and lines:
        path = common.write_results_file(
            args.label,
            "Supervisor metrics (issue 6)",
            "\n".join(table),
            "python -m bench.supervisor " + " ".join(sys.argv[1:] if argv is None else argv),
        )
        print(f"\nresults written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Chaos run (issue 5): wrk through nginx against ``fcgispawn -n -F 4 --wsgi`` while workers are
``kill -9``-ed at random (every ~2 s) and the supervisor is HUP-reloaded five times.

What it shows: a killed worker loses only the requests it had in flight (nginx answers those
502); connections waiting in the shared listen backlog are served by the other workers, and
reloads lose nothing. It prints wrk's totals (requests, non-2xx, socket errors), the kills and
reloads done, and the supervisor's restart lines, so the loss per kill can be read off.

    python -m bench.chaos                    # 60 s, 4 workers, kill every ~2 s, 5 HUPs
    python -m bench.chaos --duration 15 --reloads 2

Not a test (it takes a minute and its numbers depend on the machine). It starts its own private
nginx (loopback only) through bench/common.py, stops everything it started by pid, and needs
nginx and wrk (scripts/setup.sh).

A worker that was serving and is killed is replaced at once and never counts towards
``--crash-limit``, so the run uses fcgispawn's default limit: the supervisor must survive it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench import common

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"
APP = "tests.apps.wsgi_apps:app"

#: Location lines for common.start_nginx: the app is mounted at "/".
WSGI_PARAMS = """\
            fastcgi_param SCRIPT_NAME "";
            fastcgi_param PATH_INFO $uri;"""


@dataclass
class Wrk:
    requests: int
    non_2xx: int
    socket_errors: dict[str, int]
    output: str


def parse_wrk(output: str) -> Wrk:
    """wrk prints "Non-2xx" and "Socket errors" lines only when they are non-zero."""
    m = re.search(r"^\s*(\d+) requests in ", output, re.M)
    if m is None:
        raise SystemExit(f"chaos: wrk printed no request count:\n{output}")
    non = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", output)
    errors = {"connect": 0, "read": 0, "write": 0, "timeout": 0}
    se = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    if se is not None:
        errors = dict(zip(errors, (int(g) for g in se.groups()), strict=True))
    return Wrk(int(m.group(1)), int(non.group(1)) if non else 0, errors, output)


def children(pid: int) -> list[int]:
    """Live children of ``pid`` (from /proc), excluding zombies."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{entry}/stat").read_text()
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(entry))
    return out


def cmdline(pid: int) -> bytes:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    return b""


def workers_of(supervisor: int) -> list[int]:
    """Children that have exec'd the worker program (a fresh fork still shows our cmdline)."""
    parent = cmdline(supervisor)
    return [p for p in children(supervisor) if cmdline(p) not in (b"", parent)]


def wait(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(predicate) and predicate():
            return
        time.sleep(0.05)
    raise SystemExit(f"chaos: timed out waiting for {what}")


def start(argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
            start_new_session=True,
        )


def stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """TERM the process (its session's own leader), then KILL it; by pid only."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--duration", type=float, default=60.0, help="wrk run, seconds (60)")
    ap.add_argument("--workers", type=int, default=4, help="fcgispawn -F (4)")
    ap.add_argument("--threads", type=int, default=2, help="--threads per worker (2)")
    ap.add_argument("--kill-every", type=float, default=2.0, help="mean seconds between kills")
    ap.add_argument("--reloads", type=int, default=5, help="HUPs spread over the run (5)")
    ap.add_argument("--connections", type=int, default=32, help="wrk -c (32)")
    ap.add_argument("--crash-limit", type=int, default=5, help="fcgispawn --crash-limit (5)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the work directory and logs")
    args = ap.parse_args(argv)
    for tool in ("nginx", "wrk"):
        if shutil.which(tool) is None:
            raise SystemExit(f"chaos: {tool} is not installed (bash scripts/setup.sh)")
    rng = random.Random(args.seed)
    workdir = Path(tempfile.mkdtemp(prefix="fs-chaos-", dir="/tmp"))
    workdir.chmod(0o755)
    sock = workdir / "app.sock"
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO)
    fcgispawn = str(VENV_BIN / "fcgispawn")
    procs: list[subprocess.Popen[bytes]] = []
    nginx_procs = common.Processes()
    try:
        sup = start(
            [
                fcgispawn,
                "-n",
                "-F",
                str(args.workers),
                "--threads",
                str(args.threads),
                "-s",
                str(sock),
                "--crash-limit",
                str(args.crash_limit),
                "--wsgi",
                APP,
            ],
            workdir / "fcgispawn.log",
            env,
        )
        procs.append(sup)
        wait(lambda: len(workers_of(sup.pid)) >= args.workers, 20, "the workers")
        _, port = common.start_nginx(nginx_procs, workdir / "nginx", sock, extra=WSGI_PARAMS)
        url = f"http://127.0.0.1:{port}/hello"
        wrk = subprocess.Popen(
            [
                "wrk",
                "-t1",
                f"-c{args.connections}",
                f"-d{args.duration:g}s",
                "--timeout",
                "5s",
                url,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        procs.append(wrk)
        t0 = time.monotonic()
        reload_at = [args.duration * (i + 1) / (args.reloads + 1) for i in range(args.reloads)]
        kills = reloads = 0
        next_kill = rng.uniform(0.5, 1.5) * args.kill_every
        while wrk.poll() is None:
            now = time.monotonic() - t0
            if now >= args.duration - 0.5:
                time.sleep(0.05)
                continue
            if reload_at and now >= reload_at[0]:
                reload_at.pop(0)
                os.kill(sup.pid, signal.SIGHUP)
                reloads += 1
            if now >= next_kill:
                live = workers_of(sup.pid)
                if live:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(rng.choice(live), signal.SIGKILL)
                        kills += 1
                next_kill = now + rng.uniform(0.5, 1.5) * args.kill_every
            time.sleep(0.02)
        out = (wrk.stdout.read() if wrk.stdout else b"").decode(errors="replace")
        result = parse_wrk(out)
        alive = sup.poll() is None
        log = (workdir / "fcgispawn.log").read_text(errors="replace")
        replaced = len(re.findall(r"\]: worker \d+ killed by signal SIGKILL", log))
        failed = result.non_2xx + sum(result.socket_errors.values())
        print(
            f"chaos: {args.duration:g} s wrk -c{args.connections} through nginx against "
            f"fcgispawn -F {args.workers} --threads {args.threads}"
        )
        print(f"  requests:       {result.requests}")
        print(f"  non-2xx:        {result.non_2xx}")
        print(f"  socket errors:  {result.socket_errors}")
        print(f"  kill -9:        {kills} (supervisor saw {replaced} SIGKILLed workers)")
        print(f"  HUP reloads:    {reloads}")
        per_kill = failed / kills if kills else float("nan")
        print(f"  failed/kill:    {per_kill:.2f} (in-flight requests per worker <= {args.threads})")
        print(f"  supervisor:     {'alive' if alive else 'EXITED ' + str(sup.returncode)}")
        gave_up = [x for x in log.splitlines() if "giving up" in x]
        if gave_up:
            print(f"  note: {gave_up[0]}")
        if args.keep:
            print(f"  logs in {workdir}")
        return 0 if alive else 1
    finally:
        for proc in reversed(procs):
            stop(proc)
        nginx_procs.stop_all()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

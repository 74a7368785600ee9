"""Hello-app benchmark: fcgispawn --wsgi against uWSGI, flup and a C libfcgi app.

What it measures and why (see issues 2 and 6): every backend serves the same hello app with 2
worker processes on a UNIX socket; each is loaded (a) through a private nginx (one worker,
access_log off) by ``wrk -t1 -c32`` and (b) straight at the socket by our C generator
``fcgiload -c32``; ``--modes nginx-ka`` adds (c) through the same nginx with an upstream
keepalive pool and ``fastcgi_keep_conn on`` (connections stay open between requests). On these
2-core machines nginx saturates a core first, so req/s bunches up;
the backend's own CPU time per request (utime+stime of ALL its processes from /proc, sampled
before and after the load window, divided by completed requests) is what separates backends.
Backends are interleaved over R repetitions (order rotated each round), the machine is checked
for idleness before every run, and we report medians with min-max and ratios against fcgispawn.

Usage: python -m bench.bench [--duration S] [--repetitions R] [--peers a,b] [--label L] ...
(bench/run.sh sets up the peers first; `make bench` runs it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench import common
from bench.common import BENCH, REPO, VENV_BIN, VENV_PYTHON, log

HELLO = b"Hello, World!"
PEERS = (
    "fcgispawn", "fcgispawn-2t", "uwsgi", "uwsgi-logging", "flup-fork", "flup-threaded", "c-app",
    "floor",
)
#: Run unless --peers says otherwise; "floor" is a measurement aid (bench/floor.py), not a peer.
DEFAULT_PEERS = ("fcgispawn", "fcgispawn-2t", "uwsgi", "flup-fork", "flup-threaded", "c-app")
#: Load modes: the table title of each ({c}: connections).
MODES: dict[str, str] = {
    "nginx": "through nginx (1 worker) + wrk -t1 -c{c}",
    "nginx-ka": (
        "through nginx (1 worker, upstream keepalive 64, fastcgi_keep_conn on) + wrk -t1 -c{c}"
    ),
    "direct": "straight at the socket, fcgiload -c{c}",
}
NGINX_MODES = ("nginx", "nginx-ka")
#: The modes issue 6 sets goals for.
GOAL_MODES = ("nginx", "direct")


@dataclass(frozen=True)
class Tools:
    """Paths of the compiled C tools and the per-run scratch directory."""

    workdir: Path
    fcgiload: Path
    hello_c: Path


@dataclass(frozen=True)
class Backend:
    """One peer: how to start it on a socket and how many processes its tree should hold."""

    name: str
    description: str
    argv: Callable[[Path, Tools], list[str]]
    processes: int


def _uwsgi_argv(sock: Path, *extra: str) -> list[str]:
    """uWSGI with 2 workers on ``sock`` serving bench/apps.py, plus ``extra``."""
    return [
        str(VENV_BIN / "uwsgi"), "--master", "--processes", "2",
        "--fastcgi-socket", str(sock), "--wsgi-file", str(BENCH / "apps.py"), *extra,
    ]  # fmt: skip


BACKENDS: dict[str, Backend] = {
    "fcgispawn": Backend(
        "fcgispawn",
        "fcgispawn -n -F 2 --wsgi bench.apps:app",
        lambda sock, tools: [
            str(VENV_BIN / "fcgispawn"), "-n", "-s", str(sock), "-F", "2",
            "--wsgi", "bench.apps:app",
        ],
        3,
    ),
    "fcgispawn-2t": Backend(
        "fcgispawn-2t",
        "fcgispawn -n -F 2 --threads 2 --wsgi bench.apps:app",
        lambda sock, tools: [
            str(VENV_BIN / "fcgispawn"), "-n", "-s", str(sock), "-F", "2", "--threads", "2",
            "--wsgi", "bench.apps:app",
        ],
        3,
    ),
    "uwsgi": Backend(
        "uwsgi",
        "uWSGI --master --processes 2 --fastcgi-socket",
        lambda sock, tools: _uwsgi_argv(sock, "--disable-logging"),
        3,
    ),
    # Opt-in: uWSGI as shipped, logging a line per request (to the run's log file here). Not
    # the goals' reference: that is --disable-logging above, which does what fcgispawn does
    # (no access log). It shows what an operator's default uWSGI costs (s7-start: +1.7 us a
    # request, so logging does not explain why issue 6's first table had uWSGI at 1.47x the C
    # app, where here they cost about the same).
    "uwsgi-logging": Backend(
        "uwsgi-logging",
        "uWSGI --master --processes 2 --fastcgi-socket, request logging on (its default)",
        lambda sock, tools: _uwsgi_argv(sock),
        3,
    ),
    "flup-fork": Backend(
        "flup-fork",
        "flup 1.0.3 fcgi_fork WSGIServer, 2 children",
        lambda sock, tools: [str(VENV_PYTHON), str(BENCH / "apps.py"), "flup-fork", str(sock)],
        3,
    ),
    "flup-threaded": Backend(
        "flup-threaded",
        "flup 1.0.3 fcgi WSGIServer (threads), 1 process",
        lambda sock, tools: [
            str(VENV_PYTHON), str(BENCH / "apps.py"), "flup-threaded", str(sock),
        ],
        1,
    ),
    "floor": Backend(
        "floor",
        "bench/floor.py W: a bare loop around fcgispawn's protocol + WSGI layers, 2 processes",
        lambda sock, tools: [
            "spawn-fcgi", "-F", "1", "-s", str(sock), "-M", "0600", "--",
            str(VENV_PYTHON), str(BENCH / "floor.py"), "W", "2",
        ],
        2,
    ),
    "c-app": Backend(
        "c-app",
        "C libfcgi FCGI_Accept loop under spawn-fcgi -F 2",
        lambda sock, tools: [
            "spawn-fcgi", "-F", "2", "-s", str(sock), "-M", "0600", "--", str(tools.hello_c),
        ],
        2,
    ),
}


@dataclass
class Run:
    """One load window against one backend."""

    backend: str
    repetition: int
    mode: str  # "nginx", "nginx-ka" or "direct" (see MODES)
    requests: int
    errors: int
    seconds: float
    backend_cpu: common.Cpu
    nginx_cpu: float | None = None
    idle_warning: str = ""
    note: str = ""

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    @property
    def us_per_req(self) -> float:
        return self._per_req(self.backend_cpu.total)

    @property
    def user_us_per_req(self) -> float:
        """The backend's user-space share: its own code (for a Python peer, the interpreter)."""
        return self._per_req(self.backend_cpu.user)

    @property
    def kernel_us_per_req(self) -> float:
        return self._per_req(self.backend_cpu.system)

    def _per_req(self, seconds: float) -> float:
        return seconds / self.requests * 1e6 if self.requests else math.nan

    @property
    def nginx_us_per_req(self) -> float:
        if self.nginx_cpu is None or not self.requests:
            return math.nan
        return self.nginx_cpu / self.requests * 1e6

    @property
    def system_us_per_req(self) -> float:
        """nginx + backend: what the machine spends on a request (nginx's share moves with
        how the backend writes: a response in several writes costs nginx more reads)."""
        return self.us_per_req + self.nginx_us_per_req


@dataclass
class Settings:
    duration: float
    repetitions: int
    connections: int
    warmup: float
    peers: list[str]
    modes: list[str]
    label: str
    results_dir: Path | None
    idle_wait: float = 20.0
    body: int = 0  # POST a body of this many bytes (0: GET)
    runs: list[Run] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


# ---- load generators --------------------------------------------------------------------------


def run_wrk(port: int, settings: Settings) -> tuple[int, int, float, str]:
    """wrk -t1 -cC -dD through nginx: (good requests, errors, seconds, note)."""
    argv = [
        "wrk", "-t1", f"-c{settings.connections}", f"-d{settings.duration:g}s",
        f"http://127.0.0.1:{port}/",
    ]
    if settings.body:
        script = Path(tempfile.gettempdir()) / f"fcgispawn-bench-post-{settings.body}.lua"
        script.write_text(
            'wrk.method = "POST"\n'
            'wrk.headers["Content-Type"] = "application/octet-stream"\n'
            f'wrk.body = string.rep("x", {settings.body})\n'
        )
        argv[1:1] = ["-s", str(script)]
    status, out, err = common.run_tool(argv, settings.duration + 60)
    total = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)\b", out)
    if status != 0 or total is None:
        return 0, 0, 0.0, f"wrk failed (exit {status}): {(err or out).strip()[:200]}"
    scale = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[total.group(3)]
    requests, seconds = int(total.group(1)), float(total.group(2)) * scale
    errors = 0
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        errors += int(non2xx.group(1))
    sock_err = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    )
    if sock_err:
        errors += sum(int(x) for x in sock_err.groups())
    return max(0, requests - errors), errors, seconds, ""


def run_fcgiload(
    tools: Tools, sock: Path, duration: float, connections: int, extra: list[str] | None = None
) -> tuple[int, int, float, str]:
    """fcgiload straight at the socket: (good requests, errors, seconds, note)."""
    argv = [
        str(tools.fcgiload), "-s", str(sock), f"-c{connections}", f"-d{duration:g}", "-q",
        *(extra or []),
    ]
    status, out, err = common.run_tool(argv, duration + 60)
    found = dict(re.findall(r"(\w+)=([\d.]+)", out))
    if "requests" not in found:
        return 0, 0, 0.0, f"fcgiload failed (exit {status}): {(err or out).strip()[:200]}"
    note = err.strip().splitlines()[0] if err.strip() else ""
    return int(found["requests"]), int(found["errors"]), float(found["elapsed"]), note


# ---- one backend, one repetition ---------------------------------------------------------------


def measure_backend(
    backend: Backend,
    repetition: int,
    settings: Settings,
    tools: Tools,
    procs: common.Processes,
    nginx: tuple[common.Launched, dict[str, int]] | None,
    sock: Path,
) -> None:
    """Starts backend, warms it up, runs each mode once, stops it."""
    sock.unlink(missing_ok=True)
    out_log = tools.workdir / f"{backend.name}-{repetition}.log"
    launched = procs.launch(
        backend.name, backend.argv(sock, tools), out_log, env=common.backend_env(), cwd=REPO
    )
    try:
        if not common.wait_serving(sock, launched, HELLO, 30.0):
            reason = f"did not serve on {sock} within 30 s:\n{launched.log_tail()}"
            log(f"  {backend.name}: {reason}")
            settings.skipped[backend.name] = reason
            return
        if not common.wait_procs(launched, backend.processes, 10.0):
            log(f"  {backend.name}: warning: fewer than {backend.processes} processes")
        requests, errors, _, note = run_fcgiload(
            tools, sock, settings.warmup, settings.connections
        )
        if requests == 0:
            settings.skipped[backend.name] = f"warm-up failed: {note} {launched.log_tail()}"
            log(f"  {backend.name}: {settings.skipped[backend.name]}")
            return
        for mode in settings.modes:
            through_nginx = mode in NGINX_MODES
            if through_nginx and nginx is None:
                continue
            warning = common.check_idle(
                f"{backend.name} {mode} #{repetition}", wait=settings.idle_wait
            )
            pids = {p for p in launched.pids() if common.is_alive(p)}
            nginx_pids = nginx[0].pids() if nginx else set()
            before = common.cpu_ticks(pids)
            nginx_before = common.cpu_ticks(nginx_pids)
            if through_nginx:
                assert nginx is not None
                requests, errors, seconds, note = run_wrk(nginx[1][mode], settings)
            else:
                requests, errors, seconds, note = run_fcgiload(
                    tools, sock, settings.duration, settings.connections,
                    ["-b", str(settings.body)] if settings.body else None,
                )
            after = common.cpu_ticks(launched.pids() | pids)
            gone = set(before) - set(after)
            if gone:
                note = (note + f" {len(gone)} backend process(es) exited during the run").strip()
            run = Run(
                backend.name,
                repetition,
                mode,
                requests,
                errors,
                seconds,
                common.cpu_between(before, after),
                common.cpu_between(nginx_before, common.cpu_ticks(nginx_pids)).total
                if through_nginx
                else None,
                warning,
                note,
            )
            settings.runs.append(run)
            log(
                f"  {backend.name:14} {mode:6} #{repetition}: {run.rps:9.0f} req/s "
                f"{run.us_per_req:7.1f} µs/req  errors {errors}  ({len(pids)} processes)"
                + (f"  [{note}]" if note else "")
            )
    finally:
        procs.stop(launched)
        sock.unlink(missing_ok=True)


# ---- report --------------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    """Everything that changes numbers: interpreter, peers, tools, kernel, CPU."""
    python = Path(os.path.realpath(VENV_PYTHON))
    py_version = common.command_output([str(VENV_PYTHON), "-c", "import sys; print(sys.version)"])
    flup = common.command_output(
        [str(VENV_PYTHON), "-c", "import importlib.metadata as m; print(m.version('flup'))"]
    )
    libpython = "?"
    ldd = subprocess.run(
        ["ldd", str(VENV_BIN / "uwsgi")], capture_output=True, text=True, check=False
    ).stdout
    for line in ldd.splitlines():
        if "libpython" in line:
            libpython = line.strip().split(" (")[0]
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    git = subprocess.run(
        ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
        capture_output=True, text=True, check=False,
    ).stdout.strip()
    return {
        "python (every Python peer)": f"{VENV_PYTHON} -> {python}: {py_version}",
        "uwsgi": f"{common.command_output([str(VENV_BIN / 'uwsgi'), '--version'])}"
        f" (embeds {libpython})",
        "flup": flup,
        "fcgispawn": common.command_output([str(VENV_BIN / "fcgispawn"), "--version"])
        + f" (git {git or '?'})",
        "nginx": common.command_output(["nginx", "-v"]),
        "wrk": common.command_output(["wrk", "--version"]).split(" Copyright")[0],
        "spawn-fcgi": common.command_output(["spawn-fcgi", "-v"]),
        "libfcgi": common.command_output(
            ["dpkg-query", "-W", "-f=${Version}", "libfcgi-dev"]
        ),
        "gcc": common.command_output(["gcc", "--version"]),
        "kernel": platform.release(),
        "cpu": f"{cpu} x {os.cpu_count()}",
    }


def _fmt(value: float, digits: int = 0) -> str:
    return "-" if math.isnan(value) else f"{value:,.{digits}f}"


def _ratio(value: float, reference: float) -> str:
    if math.isnan(value) or math.isnan(reference) or reference == 0:
        return "-"
    return f"{value / reference:.2f}x"


def summarize(settings: Settings) -> str:
    """Markdown: medians with min-max per backend and mode, ratios vs fcgispawn, raw runs."""
    lines: list[str] = []
    reference = "fcgispawn"
    have_fcgispawn = any(r.backend == "fcgispawn" for r in settings.runs)
    if not have_fcgispawn:
        reference = "uwsgi" if any(r.backend == "uwsgi" for r in settings.runs) else ""
        lines.append(
            "> **fcgispawn was not measured** ("
            + settings.skipped.get("fcgispawn", "not selected").splitlines()[0]
            + (f"); ratios below are against {reference}." if reference else ").")
        )
        lines.append("")
    order = [p for p in settings.peers if any(r.backend == p for r in settings.runs)]
    for mode in settings.modes:
        runs = [r for r in settings.runs if r.mode == mode]
        if not runs:
            continue
        title = MODES[mode].format(c=settings.connections)
        lines.append(f"### {title}")
        lines.append("")
        ref_us = ref_rps = math.nan
        if reference:
            ref_runs = [r for r in runs if r.backend == reference]
            ref_us = common.median_range([r.us_per_req for r in ref_runs])[0]
            ref_rps = common.median_range([r.rps for r in ref_runs])[0]
        header = (
            "| backend | µs/req median (min-max) | req/s median (min-max) "
            f"| µs/req ÷ {reference or '-'} | req/s ÷ {reference or '-'} | errors "
            "| user / kernel µs/req |"
        )
        if mode in NGINX_MODES:
            header += " nginx µs/req | nginx + backend µs/req |"
        lines.append(header)
        lines.append("|---" * (header.count("|") - 1) + "|")
        for name in order:
            mine = [r for r in runs if r.backend == name]
            if not mine:
                continue
            us = common.median_range([r.us_per_req for r in mine])
            rps = common.median_range([r.rps for r in mine])
            row = (
                f"| {name} | {_fmt(us[0], 1)} ({_fmt(us[1], 1)}-{_fmt(us[2], 1)}) "
                f"| {_fmt(rps[0])} ({_fmt(rps[1])}-{_fmt(rps[2])}) "
                f"| {_ratio(us[0], ref_us)} | {_ratio(rps[0], ref_rps)} "
                f"| {sum(r.errors for r in mine)} "
                f"| {_fmt(common.median_range([r.user_us_per_req for r in mine])[0], 1)} / "
                f"{_fmt(common.median_range([r.kernel_us_per_req for r in mine])[0], 1)} |"
            )
            if mode in NGINX_MODES:
                ngx = common.median_range([r.nginx_us_per_req for r in mine])
                both = common.median_range([r.system_us_per_req for r in mine])
                row += f" {_fmt(ngx[0], 1)} | {_fmt(both[0], 1)} |"
            lines.append(row)
        lines.append("")
    if have_fcgispawn:
        lines.append("Goals (issue 6), µs/req medians, fcgispawn ÷ peer:")
        lines.append("")
        for mode in settings.modes:
            def med(name: str, mode: str = mode) -> float:
                return common.median_range(
                    [r.us_per_req for r in settings.runs if r.backend == name and r.mode == mode]
                )[0]

            ours = med("fcgispawn")
            uwsgi, c_app = _ratio(ours, med("uwsgi")), _ratio(ours, med("c-app"))
            if mode in GOAL_MODES:
                uwsgi, c_app = f"{uwsgi} (goal ≤ 1.00)", f"{c_app} (goal ≤ 1.10)"
            lines.append(f"- {mode}: vs uWSGI {uwsgi}, vs C app {c_app}")
            if mode in GOAL_MODES:
                lines.append(f"  - split: {_split(settings, mode)}")
        for mode in (m for m in settings.modes if m in NGINX_MODES):

            def system(name: str, mode: str = mode) -> float:
                return common.median_range(
                    [
                        r.system_us_per_req
                        for r in settings.runs
                        if r.backend == name and r.mode == mode
                    ]
                )[0]

            lines.append(
                f"- {mode}, nginx + backend (not a goal; the whole machine's CPU per request): "
                f"vs uWSGI {_ratio(system('fcgispawn'), system('uwsgi'))}, "
                f"vs C app {_ratio(system('fcgispawn'), system('c-app'))}"
            )
        lines.append("")
    for name, reason in settings.skipped.items():
        lines.append(f"- **{name} skipped**: {reason.splitlines()[0]}")
    warnings = [r for r in settings.runs if r.idle_warning]
    if warnings:
        lines.append(
            f"- **{len(warnings)} of {len(settings.runs)} runs started on a machine that was "
            "not idle** (< 90 % idle over 1 s after waiting up to --idle-wait s; each is noted "
            "in the list of every run). CPU µs/req holds up better than req/s under such noise."
        )
    return "\n".join(lines)


def _split(settings: Settings, mode: str) -> str:
    """Which side of the kernel a gap is on: user / kernel µs/req medians of fcgispawn and of
    the two goal peers (a Python responder's user-space part is the interpreter running it)."""
    parts = []
    for name in ("fcgispawn", "uwsgi", "c-app"):
        mine = [r for r in settings.runs if r.backend == name and r.mode == mode]
        if mine:
            user = common.median_range([r.user_us_per_req for r in mine])[0]
            kernel = common.median_range([r.kernel_us_per_req for r in mine])[0]
            parts.append(f"{name} {_fmt(user, 1)} user + {_fmt(kernel, 1)} kernel")
    return "; ".join(parts) + " µs/req"


def raw_table(settings: Settings) -> str:
    lines = [
        "| rep | backend | mode | requests | errors | s | req/s | backend CPU s | µs/req "
        "| user / kernel µs/req | nginx µs/req | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in settings.runs:
        notes = "; ".join(x for x in (r.idle_warning, r.note) if x)
        lines.append(
            f"| {r.repetition} | {r.backend} | {r.mode} | {r.requests} | {r.errors} "
            f"| {r.seconds:.2f} | {r.rps:,.0f} | {r.backend_cpu.total:.2f} "
            f"| {_fmt(r.us_per_req, 1)} "
            f"| {_fmt(r.user_us_per_req, 1)} / {_fmt(r.kernel_us_per_req, 1)} "
            f"| {_fmt(r.nginx_us_per_req, 1)} | {notes} |"
        )
    return "\n".join(lines)


def write_results(settings: Settings, info: dict[str, str], summary: str, argv: str) -> Path:
    directory = settings.results_dir or BENCH / "results"
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    path = directory / f"{now:%Y-%m-%d}-{settings.label}.md"
    body = [
        f"# Benchmark {settings.label}: hello app"
        + (f", POST of a {settings.body}-byte body" if settings.body else "")
        + f", {now:%Y-%m-%d %H:%M} UTC",
        "",
        f"Command: `{argv}`",
        "",
        f"{settings.repetitions} interleaved repetitions of {settings.duration:g} s per backend "
        f"and mode, {settings.connections} connections, 2 workers per backend (flup-threaded: "
        "1 process). µs/req = utime+stime of all the backend's processes (launcher tree) over "
        "the load window ÷ completed requests.",
        "",
        "## Versions",
        "",
        *[f"- {k}: {v}" for k, v in info.items()],
        "",
        "## Results (medians)",
        "",
        summary,
        "",
        "## Every run",
        "",
        raw_table(settings),
        "",
    ]
    path.write_text("\n".join(body))
    return path


# ---- main ----------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> Settings:
    parser = argparse.ArgumentParser(
        prog="bench.bench", description="hello-app benchmark of FastCGI backends"
    )
    parser.add_argument("-d", "--duration", type=float, default=10.0, help="seconds per run")
    parser.add_argument("-r", "--repetitions", type=int, default=3)
    parser.add_argument("-c", "--connections", type=int, default=32)
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up load")
    parser.add_argument(
        "--peers",
        default=",".join(DEFAULT_PEERS),
        help=f"comma list out of {','.join(PEERS)}",
    )
    parser.add_argument(
        "--modes", default="nginx,direct", help=f"comma list out of {','.join(MODES)}"
    )
    parser.add_argument("--label", default="hello", help="results file name suffix")
    parser.add_argument(
        "--body", type=int, default=0, metavar="BYTES",
        help="POST a body of this many bytes (the app reads it) instead of a GET",
    )
    parser.add_argument(
        "--idle-wait", type=float, default=20.0,
        help="seconds to wait for an idle machine before each run (then warn and go on)",
    )
    parser.add_argument(
        "--results-dir", type=Path, default=None,
        help="where the markdown results go (default bench/results); 'none' to skip",
    )
    args = parser.parse_args(argv)
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = [p for p in peers if p not in BACKENDS]
    if unknown:
        parser.error(f"unknown peer(s) {', '.join(unknown)}; choose from {', '.join(PEERS)}")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        parser.error(f"--modes takes one or more of {', '.join(MODES)}")
    if args.repetitions < 1 or args.duration <= 0 or args.connections < 1:
        parser.error("--repetitions, --duration and --connections must be positive")
    if not 0 <= args.body <= 60000:
        parser.error("--body takes 0 to 60000 bytes (one nginx request buffer)")
    results_dir = None if str(args.results_dir) == "none" else args.results_dir
    settings = Settings(
        args.duration, args.repetitions, args.connections, args.warmup, peers, modes,
        args.label, results_dir, args.idle_wait, body=args.body,
    )
    if str(args.results_dir) == "none":
        settings.label = ""
    return settings


def main(argv: list[str] | None = None) -> int:
    raw_argv = sys.argv[1:] if argv is None else argv
    settings = parse_args(raw_argv)
    common.become_subreaper()
    workdir = common.make_workdir()
    tools = Tools(
        workdir,
        common.compile_c(BENCH / "fcgiload.c", workdir / "fcgiload"),
        common.compile_c(BENCH / "hello_c.c", workdir / "hello_c", ["-lfcgi"]),
    )
    if "fcgispawn" in settings.peers:
        why = common.fcgispawn_status()
        if why:
            settings.skipped["fcgispawn"] = f"fcgispawn not ready: {why}"
            log(f"NOTE: fcgispawn is not measured: {why}")
    info = versions()
    print("Versions:")
    for key, value in info.items():
        print(f"  {key}: {value}")
    sys.stdout.flush()

    procs = common.Processes()
    sock = workdir / "backend.sock"
    try:
        nginx = None
        if any(m in NGINX_MODES for m in settings.modes):
            kept_port = common.free_port()
            launched, port = common.start_nginx(
                procs, workdir / "nginx", sock, keepalive_port=kept_port
            )
            nginx = (launched, {"nginx": port, "nginx-ka": kept_port})
        for repetition in range(1, settings.repetitions + 1):
            order = settings.peers[repetition - 1 :] + settings.peers[: repetition - 1]
            log(f"repetition {repetition}/{settings.repetitions}: {', '.join(order)}")
            for name in order:
                if name in settings.skipped:
                    continue
                measure_backend(
                    BACKENDS[name], repetition, settings, tools, procs, nginx, sock
                )
    except KeyboardInterrupt:
        log("interrupted: reporting what was measured")
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)

    summary = summarize(settings)
    print()
    print(summary)
    if settings.label and settings.runs:
        command = "python -m bench.bench " + " ".join(raw_argv)
        path = write_results(settings, info, summary, command)
        shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path
        print(f"\nresults written to {shown}")
    return 0 if settings.runs else 1


if __name__ == "__main__":
    sys.exit(main())

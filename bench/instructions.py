"""Instructions per request of real serving processes, each peer in its own serving loop.

profile_hotpath.py counts one request cycle driven in-process; this counts what a worker
really executes per request while it serves fcgiload's load on its listening socket (fd 0, as
spawn-fcgi hands it over): accept, read, parse, the app, the write, the close, and the loop
around them. valgrind's callgrind counts user-space instructions only, and counts the same for
the same binary and inputs whatever else the machine does, so peers compare exactly on a noisy
machine; the kernel's share (syscalls, wake-ups) is in bench.py's user / kernel split instead.

Each peer is started twice under callgrind, serves 1 + WARMUP + N and 1 + WARMUP + 2N requests
(fcgiload -c32), and is stopped; (Ir(2N) - Ir(N)) / N is its cost per request with start-up,
imports and warm-up subtracted. One process per peer (no supervisor, no master):

- fcgispawn: the worker command line, ``python -m fcgispawn --wsgi bench.apps:app``
  (``--threads 1``, the default);
- uwsgi: ``uwsgi --fastcgi-socket fd://0 --processes 1 --disable-logging`` with bench/apps.py;
- floor-layers / floor-bare: bench/floor.py ``W`` / ``-`` (the cheapest pure-Python loop, with
  and without fcgispawn's protocol + WSGI layers; see floor.py);
- c-app: bench/hello_c.c (libfcgi).

    python -m bench.instructions [--requests N] [--peers a,b] [--label L]
"""

from __future__ import annotations

import argparse
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from bench import common
from bench.common import BENCH, REPO, VENV_BIN, VENV_PYTHON, log

WARMUP = 200

#: peer -> (argv after valgrind's own, the signal that stops it cleanly)
Peer = Callable[[Path], tuple[list[str], int]]
PEERS: dict[str, Peer] = {
    "fcgispawn": lambda tools: (
        [str(VENV_PYTHON), "-m", "fcgispawn", "--wsgi", "bench.apps:app"],
        signal.SIGTERM,
    ),
    "uwsgi": lambda tools: (
        [
            str(VENV_BIN / "uwsgi"),
            "--fastcgi-socket",
            "fd://0",
            "--processes",
            "1",
            "--wsgi-file",
            str(BENCH / "apps.py"),
            "--disable-logging",
        ],
        signal.SIGINT,  # uWSGI reloads on SIGTERM
    ),
    "floor-layers": lambda tools: (
        [str(VENV_PYTHON), str(BENCH / "floor.py"), "W", "1"],
        signal.SIGTERM,
    ),
    "floor-bare": lambda tools: (
        [str(VENV_PYTHON), str(BENCH / "floor.py"), "-", "1"],
        signal.SIGTERM,
    ),
    "c-app": lambda tools: ([str(tools / "hello_c")], signal.SIGTERM),
}


def _load(fcgiload: Path, sock: Path, connections: int, requests: int) -> None:
    argv = [str(fcgiload), "-s", str(sock), f"-c{connections}", f"-n{requests}", "-d3600", "-q"]
    out = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=3600)
    m = re.search(r"requests=(\d+) errors=(\d+)", out.stdout)
    if out.returncode != 0 or m is None or int(m.group(1)) != requests or m.group(2) != "0":
        raise SystemExit(f"bench: fcgiload failed: {(out.stdout + out.stderr).strip()[:300]}")


def collected(argv: Sequence[str], stop: int, tools: Path, requests: int) -> int:
    """Ir of one run under callgrind that served 1 + WARMUP + ``requests`` requests."""
    workdir = common.make_workdir()
    sock = workdir / "s"
    out = workdir / "cg.out"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(sock))
    listener.listen(1024)
    cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *argv]
    proc = subprocess.Popen(
        cmd, stdin=listener.fileno(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        cwd=REPO, env=common.backend_env(),
    )  # fmt: skip
    listener.close()
    try:
        _load(tools / "fcgiload", sock, 1, 1)  # waits in the backlog until the peer serves
        _load(tools / "fcgiload", sock, 32, WARMUP)
        _load(tools / "fcgiload", sock, 32, requests)
    finally:
        proc.send_signal(stop)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        sock.unlink(missing_ok=True)
        out.unlink(missing_ok=True)
        workdir.rmdir()
    m = re.search(rb"Collected\s*:\s*(\d+)", err)
    if m is None:
        raise SystemExit(f"bench: no 'Collected' line from callgrind: {err[-500:]!r}")
    return int(m.group(1))


def per_request(name: str, tools: Path, requests: int) -> float:
    argv, stop = PEERS[name](tools)
    one = collected(argv, stop, tools, requests)
    two = collected(argv, stop, tools, 2 * requests)
    per = (two - one) / requests
    log(f"  {name:13} {per:10,.0f} instructions/request (Ir {one:,} / {two:,})")
    return per


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=3000, metavar="N")
    parser.add_argument("--peers", default=",".join(PEERS))
    parser.add_argument("--label", default="instructions")
    args = parser.parse_args(argv)
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = [p for p in peers if p not in PEERS]
    if unknown or not peers:
        parser.error(f"--peers takes one or more of {', '.join(PEERS)}")
    if args.requests < 1:
        parser.error("--requests must be positive")
    common.become_subreaper()
    tools = common.make_workdir()
    common.compile_c(BENCH / "fcgiload.c", tools / "fcgiload")
    if "c-app" in peers:
        common.compile_c(BENCH / "hello_c.c", tools / "hello_c", ["-lfcgi"])
    started = time.monotonic()
    counts = {name: per_request(name, tools, args.requests) for name in peers}
    base = counts.get("fcgispawn")
    rows = [
        "| peer | instructions/request | ÷ fcgispawn |",
        "|---|---|---|",
        *(
            f"| {name} | {count:,.0f} | {count / base:.2f}x |"
            if base
            else f"| {name} | {count:,.0f} | - |"
            for name, count in counts.items()
        ),
    ]
    body = (
        f"callgrind, user-space instructions per request of one serving process, {args.requests}"
        f" requests (fcgiload -c32) after {WARMUP} of warm-up, start-up subtracted; "
        f"{time.monotonic() - started:.0f} s.\n\n" + "\n".join(rows)
    )
    print(body)
    path = common.write_results_file(
        args.label, "Instructions per request", body, "python -m bench.instructions "
        + " ".join(argv if argv is not None else sys.argv[1:]),
    )  # fmt: skip
    log(f"bench: results in {path}")


if __name__ == "__main__":
    main()

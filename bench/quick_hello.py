"""Quick responder micro-benchmark: backend CPU us/req and req/s, straight at a UNIX socket.

Starts ``fcgispawn.runtime.run`` on a hello app in a subprocess (socket on fd 0, as a
supervisor would), drives it from ``--clients`` load-generator processes that each send
nginx-like requests (one connection per request, flags=0, as nginx without keepalive) and
reports requests/s plus the server process's own CPU time per request, from /proc/PID/stat
utime+stime over the measured window. The CPU figure is the steady one on a noisy 2-core
machine: the load generator competes for the CPU, so req/s is only indicative here.

    .venv/bin/python bench/quick_hello.py [--threads 1] [--clients 2] [--seconds 5] [--keep-conn]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fcgispawn.protocol import encode_request  # noqa: E402

# What nginx 1.22's stock fastcgi_params sends for "GET /hello?x=1", plus a few HTTP_* headers.
PARAMS = {
    b"QUERY_STRING": b"x=1",
    b"REQUEST_METHOD": b"GET",
    b"CONTENT_TYPE": b"",
    b"CONTENT_LENGTH": b"",
    b"SCRIPT_NAME": b"/hello",
    b"REQUEST_URI": b"/hello?x=1",
    b"DOCUMENT_URI": b"/hello",
    b"DOCUMENT_ROOT": b"/usr/share/nginx/html",
    b"SERVER_PROTOCOL": b"HTTP/1.1",
    b"REQUEST_SCHEME": b"http",
    b"GATEWAY_INTERFACE": b"CGI/1.1",
    b"SERVER_SOFTWARE": b"nginx/1.22.1",
    b"REMOTE_ADDR": b"127.0.0.1",
    b"REMOTE_PORT": b"54321",
    b"SERVER_ADDR": b"127.0.0.1",
    b"SERVER_PORT": b"8080",
    b"SERVER_NAME": b"localhost",
    b"REDIRECT_STATUS": b"200",
    b"HTTP_HOST": b"localhost:8080",
    b"HTTP_USER_AGENT": b"wrk",
    b"HTTP_ACCEPT": b"*/*",
    b"HTTP_CONNECTION": b"keep-alive",
}


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime (fields 14 and 15)


def _client(path: str, stop_at: float, keep_conn: bool, counter: multiprocessing.Value) -> None:  # type: ignore[valid-type]
    wire = encode_request(1, PARAMS, b"", keep_conn=keep_conn)
    n = 0
    sock: socket.socket | None = None
    while time.monotonic() < stop_at:
        if sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(path)
        sock.sendall(wire)
        got = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
            # END_REQUEST header: version 1, type 3, id 1, length 8
            if keep_conn and b"\x01\x03\x00\x01\x00\x08" in got[-16:]:
                break
        if not keep_conn:
            sock.close()
            sock = None
        n += 1
    if sock is not None:
        sock.close()
    with counter.get_lock():  # type: ignore[attr-defined]
        counter.value += n  # type: ignore[attr-defined]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--keep-conn", action="store_true")
    ap.add_argument("--app", default="tests.apps.wsgi_apps:hello")
    ap.add_argument("--python", default=str(REPO / ".venv/bin/python"))
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="fsb-", dir="/tmp")
    path = os.path.join(tmp, "b.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1024)
    code = (
        "import sys; from fcgispawn.runtime import run; "
        f"sys.exit(run({args.app!r}, threads={args.threads}))"
    )
    proc = subprocess.Popen(
        [args.python, "-c", code], stdin=listener.fileno(), cwd=REPO, start_new_session=True
    )
    listener.close()
    try:
        time.sleep(1.0)  # import + warm-up
        counter = multiprocessing.Value("q", 0)
        stop_at = time.monotonic() + 0.5
        warm = [
            multiprocessing.Process(target=_client, args=(path, stop_at, args.keep_conn, counter))
            for _ in range(args.clients)
        ]
        for p in warm:
            p.start()
        for p in warm:
            p.join()
        counter.value = 0
        stop_at = time.monotonic() + args.seconds
        cpu0 = _cpu_ticks(proc.pid)
        t0 = time.monotonic()
        procs = [
            multiprocessing.Process(target=_client, args=(path, stop_at, args.keep_conn, counter))
            for _ in range(args.clients)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        elapsed = time.monotonic() - t0
        cpu = (_cpu_ticks(proc.pid) - cpu0) / os.sysconf("SC_CLK_TCK")
        n = counter.value
        print(
            f"threads={args.threads} clients={args.clients} keep_conn={args.keep_conn} "
            f"requests={n} req/s={n / elapsed:.0f} server_cpu_us/req={cpu / n * 1e6:.1f} "
            f"python={args.python}"
        )
    finally:
        proc.terminate()
        proc.wait(10)
        os.unlink(path)
        os.rmdir(tmp)


if __name__ == "__main__":
    main()

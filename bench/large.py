"""Large bodies: a 100 MB response and a 100 MB upload, fcgispawn against uWSGI.

Issue 6 asks for large bodies "at least as fast as uWSGI, with worker memory flat (no growth
with body size)". For each backend, size and direction we start a fresh backend (VmHWM is a
high-water mark, so a fresh process is the only clean baseline), note its workers' VmHWM after
one small request, move one body of SIZE bytes over one connection, and note VmHWM again. Two
sizes (SIZE/10 and SIZE) show whether peak memory grows with the body. Transfers run straight at
the socket with fcgiload (-c1 -n1) and, with --nginx, through nginx with curl
(``fastcgi_buffering off`` and ``fastcgi_request_buffering off``, so nginx streams instead of
spooling to disk and the backend is what is measured).

Usage: python -m bench.large [--size-mb 100] [--repetitions 3] [--peers fcgispawn,uwsgi] [--nginx]
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shutil
import sys
from pathlib import Path

from bench import common
from bench.common import BENCH, REPO, VENV_BIN, log

PEERS = ("fcgispawn", "uwsgi")


def backend_argv(name: str, sock: Path) -> list[str]:
    """The large-body app on 2 workers, as in the hello benchmark."""
    if name == "fcgispawn":
        return [
            str(VENV_BIN / "fcgispawn"),
            "-n",
            "-s",
            str(sock),
            "-F",
            "2",
            "--wsgi",
            "bench.apps:large_app",
        ]
    return [
        str(VENV_BIN / "uwsgi"),
        "--master",
        "--processes",
        "2",
        "--fastcgi-socket",
        str(sock),
        "--wsgi-file",
        str(BENCH / "apps.py"),
        "--callable",
        "large_app",
        "--disable-logging",
    ]


@dataclasses.dataclass
class Transfer:
    backend: str
    path: str  # "direct" or "nginx"
    direction: str  # "download" or "upload"
    size: int
    seconds: float
    ok: bool
    hwm_before_kib: int
    hwm_after_kib: int
    cpu_seconds: float
    note: str = ""

    @property
    def mb_per_s(self) -> float:
        return self.size / 1e6 / self.seconds if self.ok and self.seconds > 0 else 0.0


def worker_hwm(launched: common.Launched) -> int:
    """Largest VmHWM (KiB) among the backend's processes other than the launcher."""
    pids = launched.pids() - {launched.proc.pid} or launched.pids()
    return max((common.kib(common.status_fields(p).get("VmHWM", "")) for p in pids), default=0)


def transfer_direct(
    fcgiload: Path, sock: Path, direction: str, size: int
) -> tuple[float, bool, str]:
    """One body over one connection with fcgiload: (seconds, ok, note)."""
    if direction == "download":
        extra = ["-u", f"/download?bytes={size}", "-e", ""]
    else:
        extra = ["-u", "/upload", "-b", str(size), "-e", str(size)]
    argv = [str(fcgiload), "-s", str(sock), "-c1", "-n1", "-d300", "-q", *extra]
    status, out, err = common.run_tool(argv, 360)
    found = dict(re.findall(r"(\w+)=([\d.]+)", out))
    if "requests" not in found or found["requests"] != "1":
        return 0.0, False, f"fcgiload exit {status}: {(err or out).strip()[:200]}"
    if direction == "download" and int(found["stdout_bytes"]) < size:
        return 0.0, False, f"short body: {found['stdout_bytes']} of {size} bytes"
    return float(found["elapsed"]), True, ""


def transfer_nginx(
    port: int, direction: str, size: int, upload_file: Path
) -> tuple[float, bool, str]:
    """One body through nginx with curl: (seconds, ok, note)."""
    url = f"http://127.0.0.1:{port}"
    if direction == "download":
        argv = [
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{size_download} %{time_total}",
            f"{url}/download?bytes={size}",
        ]
    else:
        argv = [
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{size_upload} %{time_total}",
            "-H",
            "Content-Type: application/octet-stream",
            "--data-binary",
            f"@{upload_file}",
            f"{url}/upload",
        ]
    status, out, err = common.run_tool(argv, 360)
    parts = out.split()
    if status != 0 or len(parts) != 3 or parts[0] != "200" or int(float(parts[1])) != size:
        return 0.0, False, f"curl exit {status}: {out.strip()} {err.strip()[:200]}"
    return float(parts[2]), True, ""


def measure(
    name: str,
    direction: str,
    size: int,
    via: str,
    workdir: Path,
    fcgiload: Path,
    procs: common.Processes,
    nginx_port: int | None,
    upload_file: Path,
) -> Transfer:
    """Fresh backend, baseline VmHWM, one transfer, VmHWM again."""
    sock = workdir / "backend.sock"
    sock.unlink(missing_ok=True)
    launched = procs.launch(
        name, backend_argv(name, sock), workdir / f"{name}.log", env=common.backend_env(), cwd=REPO
    )
    try:
        if not common.wait_serving(sock, launched, b"200 OK", 30.0, uri="/download?bytes=10"):
            return Transfer(
                name,
                via,
                direction,
                size,
                0.0,
                False,
                0,
                0,
                0.0,
                "did not serve: " + launched.log_tail(3).replace("\n", " "),
            )
        common.wait_procs(launched, 3, 10.0)
        # Touch both workers with a small request so their baseline includes the app import.
        for _ in range(4):
            common.fastcgi_get(str(sock), "/download?bytes=10")
        before = worker_hwm(launched)
        pids = launched.pids()
        cpu0 = common.cpu_ns(pids)
        if via == "nginx":
            assert nginx_port is not None
            seconds, ok, note = transfer_nginx(nginx_port, direction, size, upload_file)
        else:
            seconds, ok, note = transfer_direct(fcgiload, sock, direction, size)
        cpu = (common.cpu_ns(pids) - cpu0) / 1e9
        after = worker_hwm(launched)
        return Transfer(name, via, direction, size, seconds, ok, before, after, cpu, note)
    finally:
        procs.stop(launched)
        sock.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.large", description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=100)
    parser.add_argument("-r", "--repetitions", type=int, default=3)
    parser.add_argument("--peers", default=",".join(PEERS))
    parser.add_argument("--nginx", action="store_true", help="also through nginx with curl")
    parser.add_argument(
        "--label", default="large", help="results file bench/results/DATE-LABEL.md; 'none' skips"
    )
    args = parser.parse_args(argv)
    peers = [p for p in args.peers.split(",") if p]
    if any(p not in PEERS for p in peers):
        parser.error(f"peers are {', '.join(PEERS)}")
    size = args.size_mb * 1_000_000
    sizes = [size // 10, size]

    if "fcgispawn" in peers:
        why = common.fcgispawn_status()
        if why:
            log(f"NOTE: fcgispawn is not measured: {why}")
            peers.remove("fcgispawn")
    if not peers:
        return 1

    common.become_subreaper()
    workdir = common.make_workdir()
    fcgiload = common.compile_c(BENCH / "fcgiload.c", workdir / "fcgiload")
    upload_file = workdir / "upload.bin"
    procs = common.Processes()
    results: list[Transfer] = []
    try:
        nginx_port = None
        vias = ["direct"]
        if args.nginx:
            with open(upload_file, "wb") as out:
                block = b"u" * 1_000_000
                for _ in range(size // len(block)):
                    out.write(block)
            _, nginx_port = common.start_nginx(
                procs,
                workdir / "nginx",
                workdir / "backend.sock",
                extra="            fastcgi_buffering off;\n"
                "            fastcgi_request_buffering off;",
            )
            vias.append("nginx")
        for rep in range(1, args.repetitions + 1):
            for via in vias:
                for direction in ("download", "upload"):
                    for body in sizes:
                        if via == "nginx" and direction == "upload" and body != size:
                            continue  # one upload file, of the full size
                        for name in peers:
                            common.check_idle(f"{name} {via} {direction}", wait=10.0)
                            t = measure(
                                name,
                                direction,
                                body,
                                via,
                                workdir,
                                fcgiload,
                                procs,
                                nginx_port,
                                upload_file,
                            )
                            results.append(t)
                            log(
                                f"  #{rep} {name:9} {via:6} {direction:8} {body / 1e6:5.0f} MB: "
                                f"{t.mb_per_s:7.1f} MB/s  VmHWM {t.hwm_before_kib / 1024:.1f} -> "
                                f"{t.hwm_after_kib / 1024:.1f} MiB CPU {t.cpu_seconds * 1e3:.0f} ms"
                                + (f"  [{t.note}]" if t.note else "")
                            )
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)

    table = [
        "| backend | path | direction | MB | MB/s median (min-max) | worker VmHWM MiB before -> "
        "after (max) | backend CPU ms (median) | failures |",
        "|---|---|---|---|---|---|---|---|",
    ]
    keys = sorted({(t.path, t.direction, t.size, t.backend) for t in results})
    for via, direction, body, name in keys:
        mine = [
            t
            for t in results
            if (t.path, t.direction, t.size, t.backend) == (via, direction, body, name)
        ]
        good = [t for t in mine if t.ok]
        med, lo, hi = common.median_range([t.mb_per_s for t in good])
        cpu = common.median_range([t.cpu_seconds * 1000 for t in good])[0]
        before = max((t.hwm_before_kib for t in good), default=0) / 1024
        after = max((t.hwm_after_kib for t in good), default=0) / 1024
        table.append(
            f"| {name} | {via} | {direction} | {body / 1e6:.0f} | {med:.1f} ({lo:.1f}-{hi:.1f}) "
            f"| {before:.1f} -> {after:.1f} | {cpu:.0f} | {len(mine) - len(good)} |"
        )
    notes = [f"- {t.backend} {t.path} {t.direction} {t.size}: {t.note}" for t in results if t.note]
    print()
    print("\n".join(table + (["", *notes] if notes else [])))
    if args.label != "none" and results:
        path = common.write_results_file(
            args.label,
            "Large bodies (fcgiload -c1 straight; curl through nginx), 2 workers",
            "\n".join(table + (["", *notes] if notes else [])),
            "python -m bench.large " + " ".join(sys.argv[1:] if argv is None else argv),
        )
        print(f"\nresults written to {path}")
    return 0 if results and all(t.ok for t in results) else 1


if __name__ == "__main__":
    sys.exit(main())

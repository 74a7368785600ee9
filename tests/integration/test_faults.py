"""Issue 5 (hardening): faults across the supervisor and its --wsgi workers, real processes.

- A hung app call under ``--request-timeout`` ends that worker only; the supervisor replaces
  it while the other worker (and the hung one's free thread, until it stops) keep answering.
- The supervisor SIGKILLed: workers get PR_SET_PDEATHSIG's SIGTERM, finish the request in
  flight, and exit; nothing is left running.

The chaos run (random kill -9 of workers and HUP reloads under wrk through nginx) is a script,
``bench/chaos.py``, not a test: it takes a minute and reports numbers.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from fcgispawn.client import FastCGIClient
from fcgispawn.server import EXIT_REQUEST_TIMEOUT
from tests.integration.servers import APP, Servers, children_of, pid_alive, wait_until
from tests.integration.test_spawner_servers import wait_workers

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _get(path: str, query: str = "") -> dict[str, str]:
    return {"REQUEST_METHOD": "GET", "SCRIPT_NAME": "", "PATH_INFO": path, "QUERY_STRING": query}


def _pid_of(client: FastCGIClient) -> int:
    resp = client.request(_get("/pid"))
    assert resp.status == 200, resp.body
    return int(resp.body.split()[1])


def test_request_timeout_replaces_only_the_hung_worker_while_the_others_serve(
    servers: Servers,
) -> None:
    sock = servers.workdir / "rt.sock"
    proc = servers.fcgispawn(
        ["-n", "-F", "2", "-s", str(sock), "--request-timeout", "1", "--wsgi", APP],
        wait_unix=sock,
    )
    first = set(wait_workers(proc.pid, 2))
    client = FastCGIClient(str(sock), timeout=10)
    hung_result: list[object] = []

    def hang() -> None:
        try:
            hung_result.append(
                FastCGIClient(str(sock), timeout=30).request(_get("/slow_pid", "s=60"))
            )
        except Exception as exc:  # the worker ends under it: the connection closes
            hung_result.append(exc)

    hanger = threading.Thread(target=hang, daemon=True)
    hanger.start()
    # Fast requests all along: before, during and after the hung worker's replacement.
    deadline = time.monotonic() + 4.0
    answered: list[int] = []
    with ThreadPoolExecutor(max_workers=4) as pool:
        while time.monotonic() < deadline:
            answered += pool.map(lambda _: _pid_of(client), range(4))
            time.sleep(0.05)
    hanger.join(10)
    assert len(answered) >= 40
    assert hung_result and not hasattr(hung_result[0], "status"), hung_result
    # Exactly one first-generation worker is gone, replaced by a new one.
    assert wait_until(
        lambda: len(children_of(proc.pid)) == 2 and len(first & set(children_of(proc.pid))) == 1, 5
    ), children_of(proc.pid)
    new = set(children_of(proc.pid)) - first
    assert len(new) == 1
    assert wait_until(lambda: _pid_of(client) in new, 5)  # the replacement serves
    err = servers.output(proc)[1]
    line = next(x for x in err.splitlines() if "request timeout:" in x)
    assert "GET /slow_pid?s=60" in line and "limit 1 s" in line
    assert f"exit status {EXIT_REQUEST_TIMEOUT}" in err
    assert proc.poll() is None


def test_sigkilled_supervisor_leaves_workers_to_finish_in_flight_work_then_exit(
    servers: Servers,
) -> None:
    sock = servers.workdir / "pd.sock"
    proc = servers.fcgispawn(["-n", "-F", "2", "-s", str(sock), "--wsgi", APP], wait_unix=sock)
    workers = wait_workers(proc.pid, 2)
    result: list[bytes] = []

    def slow() -> None:
        resp = FastCGIClient(str(sock), timeout=30).request(_get("/slow_pid", "s=2"))
        result.append(resp.body)

    t = threading.Thread(target=slow)
    t.start()
    time.sleep(0.5)  # the request is in a worker now
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(5)
    t.join(10)
    assert len(result) == 1 and result[0].startswith(b"slow done pid "), result
    assert int(result[0].split()[-1]) in workers
    assert wait_until(lambda: not any(pid_alive(p) for p in workers), 10), [
        p for p in workers if pid_alive(p)
    ]

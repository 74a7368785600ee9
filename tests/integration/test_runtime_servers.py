"""Issue 2 (the built-in responder runtime) behind real web servers and FastCGI tools.

``fcgispawn --wsgi MOD:APP`` with no socket option serves the socket it inherits. Each front end
hands it one differently, the way it happens in production:

- ``nginx-fd0``: the test binds a UNIX socket and starts the runtime with it as fd 0; a real
  nginx ``fastcgi_pass``es to it (a new connection per request, flags=0).
- ``lighttpd-bin-path``: lighttpd binds the socket and spawns ``fcgispawn --wsgi`` itself.
- ``cgi-fcgi``: the runtime on a test-bound socket, each request one ``cgi-fcgi -bind -connect``.
- ``socket-activate``: ``systemd-socket-activate -l SOCK`` execs the runtime with LISTEN_FDS
  (socket on fd 3); nginx in front.

Every front end gets the same behaviour checks (GET, 1 MiB POST echoed byte-exact, query
string, two Set-Cookie headers, a 404, a 20 MB streamed response, 50 concurrent requests
without cross-talk). Then nginx with ``fastcgi_keep_conn on``, multiplexed requests through
``fcgispawn.client.FastCGIClient.requests``, and Apache (mod_proxy_fcgi, mod_fcgid).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.apps_integration import STREAM_MIB, stream_sha256
from tests.integration.servers import (
    APP,
    HttpResponse,
    LogBook,
    Servers,
    cgi_fcgi,
    open_servers,
    proc_ids,
    unix_connections,
    wait_until,
)
from tests.procs import fcgispawn_argv

pytestmark = pytest.mark.integration

RequestFn = Callable[[str, str, bytes | None, Mapping[str, str] | None, float], HttpResponse]
PID = re.compile(r"^pid (\d+)\n$")


@dataclass
class Frontend:
    """A real server (or tool) in front of the runtime; ``request`` speaks HTTP-ish to it."""

    name: str
    servers: Servers
    send: RequestFn

    @property
    def logbook(self) -> LogBook:
        return self.servers.logbook

    def request(
        self,
        method: str,
        target: str,
        *,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 30.0,
    ) -> HttpResponse:
        return self.send(method, target, body, headers, timeout)

    def get(self, target: str, *, timeout: float = 30.0) -> HttpResponse:
        return self.request("GET", target, timeout=timeout)


def _http_send(server_request: Callable[..., HttpResponse]) -> RequestFn:
    def send(
        method: str,
        target: str,
        body: bytes | None,
        headers: Mapping[str, str] | None,
        timeout: float,
    ) -> HttpResponse:
        return server_request(method, target, body=body, headers=headers, timeout=timeout)

    return send


def _cgi_fcgi_send(address: str) -> RequestFn:
    def send(
        method: str,
        target: str,
        body: bytes | None,
        headers: Mapping[str, str] | None,
        timeout: float,
    ) -> HttpResponse:
        path, _, query = target.partition("?")
        return cgi_fcgi(
            address,
            method,
            path,
            query=query,
            body=body or b"",
            headers=headers,
            timeout=timeout,
        )

    return send


def _runtime_argv() -> list[str]:
    return [*fcgispawn_argv(), "--wsgi", APP]


FRONTENDS = ["nginx-fd0", "lighttpd-bin-path", "cgi-fcgi", "socket-activate"]


@pytest.fixture(scope="module", params=FRONTENDS)
def frontend(request: pytest.FixtureRequest) -> Iterator[Frontend]:
    """One runtime behind one front end, shared by every behaviour test of that front end;
    its processes stop when the tests move on to the next front end."""
    kind: str = request.param
    with open_servers() as servers:
        if kind == "nginx-fd0":
            _proc, address = servers.runtime_on_fd0()
            nginx = servers.nginx(address)
            yield Frontend(kind, servers, _http_send(nginx.request))
        elif kind == "lighttpd-bin-path":
            lighttpd = servers.lighttpd(
                servers.workdir / "lighttpd.sock", bin_path=_runtime_argv(), max_procs=1
            )
            yield Frontend(kind, servers, _http_send(lighttpd.request))
        elif kind == "cgi-fcgi":
            _proc, address = servers.runtime_on_fd0()
            yield Frontend(kind, servers, _cgi_fcgi_send(address))
        elif kind == "socket-activate":
            sock = servers.workdir / "activate.sock"
            servers.socket_activate(sock, _runtime_argv())
            nginx = servers.nginx(str(sock))
            yield Frontend(kind, servers, _http_send(nginx.request))
        else:  # pragma: no cover - the params above are the whole list
            raise AssertionError(kind)


# ---- the same behaviour through every front end ----------------------------------------------


def test_get_returns_the_apps_response(frontend: Frontend) -> None:
    resp = frontend.get("/hello")
    assert resp.status == 200, resp.text
    assert resp.body == b"Hello, World!"
    assert resp.header("Content-Type") == "text/plain"


def test_post_of_1mib_is_echoed_byte_exact(frontend: Frontend) -> None:
    body = os.urandom(1 << 20)
    resp = frontend.request(
        "POST", "/echo", body=body, headers={"Content-Type": "application/octet-stream"}
    )
    assert resp.status == 200, resp.body[:300]
    assert len(resp.body) == len(body)
    assert resp.body == body


def test_query_string_reaches_the_app_unchanged(frontend: Frontend) -> None:
    query = "a=1&b=two%20words&a=3&empty=&caf%C3%A9=%E2%82%AC"
    resp = frontend.get(f"/query?{query}")
    assert resp.status == 200
    assert resp.text == query


def test_two_set_cookie_headers_both_arrive(frontend: Frontend) -> None:
    resp = frontend.get("/cookies")
    assert resp.status == 200
    assert resp.header_all("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]


def test_unknown_path_is_a_404(frontend: Frontend) -> None:
    resp = frontend.get("/no/such/page")
    assert resp.status == 404
    assert resp.body == b"not found"


def test_environ_carries_what_the_server_sent(frontend: Frontend) -> None:
    resp = frontend.get("/environ?x=1&y=%20")
    assert resp.status == 200, resp.text
    environ = json.loads(resp.body)
    assert environ["REQUEST_METHOD"] == "GET"
    assert environ["SCRIPT_NAME"] + environ["PATH_INFO"] == "/environ"
    assert environ["QUERY_STRING"] == "x=1&y=%20"
    assert environ["SERVER_PROTOCOL"].startswith("HTTP/")
    assert environ["wsgi.url_scheme"] == "http"
    assert environ["wsgi.multithread"] is False  # one thread per worker by default


def test_20mb_streamed_response_arrives_complete(frontend: Frontend) -> None:
    resp = frontend.get(f"/stream?mib={STREAM_MIB}", timeout=60)
    assert resp.status == 200
    assert len(resp.body) == STREAM_MIB << 20
    assert hashlib.sha256(resp.body).hexdigest() == stream_sha256(STREAM_MIB)


def test_50_concurrent_requests_each_get_their_own_answer(frontend: Frontend) -> None:
    tokens = [uuid.uuid4().hex for _ in range(50)]
    with ThreadPoolExecutor(max_workers=50) as pool:
        answers = list(pool.map(lambda t: frontend.get(f"/token?t={t}", timeout=60), tokens))
    for token, resp in zip(tokens, answers, strict=True):
        assert resp.status == 200, resp.text
        assert re.fullmatch(rf"token {token} pid \d+\n", resp.text), (token, resp.text)


def test_max_requests_under_lighttpd_bin_path_recycles_without_failing_a_request(
    servers: Servers,
) -> None:
    # lighttpd hands its one spawned process the only copy of the socket; a worker recycling
    # on its own took it along: lighttpd saw the queued connections reset and marked the
    # backend down (57 of 60 requests failed). A supervisor now keeps the socket meanwhile.
    lighttpd = servers.lighttpd(
        servers.workdir / "lighttpd.sock",
        bin_path=[*_runtime_argv(), "--max-requests", "3"],
        max_procs=1,
    )
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: lighttpd.get("/pid"), range(60)))
    assert [r.status for r in responses] == [200] * 60, [r.text for r in responses]
    pids = {r.text for r in responses}
    assert len(pids) >= 15, pids  # 3 requests each (a worker may see fewer at its stop)


@pytest.mark.parametrize("kind", ["nginx", "lighttpd"])
def test_an_app_exception_lands_in_the_web_servers_error_log(servers: Servers, kind: str) -> None:
    # FCGI_STDERR: where an operator looks for a 500, and the only log left where the worker's
    # stderr is /dev/null (a daemonized lighttpd's children, spawn-fcgi-style detached runs).
    if kind == "nginx":
        _proc, address = servers.runtime_on_fd0()
        server = servers.nginx(address)
    else:
        server = servers.lighttpd(
            servers.workdir / "lighttpd.sock", bin_path=_runtime_argv(), max_procs=1
        )
    resp = server.get("/raises")
    assert resp.status == 500
    assert b"boom" not in resp.body
    # The exception's own line first: nginx cuts a stderr line at ~2 KB.
    wanted = "error in the WSGI application, answering 500: RuntimeError: boom"
    assert wait_until(lambda: wanted in server.error_log.read_text(errors="replace"), timeout=5)
    assert server.get("/hello").status == 200


@pytest.mark.parametrize("kind", ["nginx-tcp", "nginx-keep-conn", "nginx-unix", "apache"])
def test_a_response_the_app_broke_off_reaches_the_client_broken(
    servers: Servers, kind: str
) -> None:
    """An app that fails after its response started: the web server must pass the break on,
    not end the response as if whole (a chunked one looked complete to the client). nginx
    without fastcgi_keep_conn takes an EOF for the end: over TCP a reset tells it; over a
    UNIX socket nothing can (documented). lighttpd ends such a response with a close anyway."""
    if kind == "nginx-tcp":
        listener = socket.create_server(("127.0.0.1", 0))
        _proc, address = servers.runtime_on_fd0(sock=listener)
    else:
        _proc, address = servers.runtime_on_fd0()
    if kind == "apache":
        server = servers.apache_proxy(f"unix:{address}")
    else:
        server = servers.nginx(address, keep_conn=kind == "nginx-keep-conn")
    if kind == "nginx-unix":  # nothing tells it a chunked response broke off: /short only
        server.get("/cut")
    else:
        with pytest.raises(http.client.IncompleteRead) as broken:  # the 200's head came, then
            server.get("/cut")
        assert b"first chunk".startswith(broken.value.partial[:11])  # what nginx passed on
    # A body short of its Content-Length ends with END_REQUEST: from it web servers see the
    # shortfall themselves (a plain close left nginx's client waiting for the rest).
    with pytest.raises(http.client.IncompleteRead):
        server.get("/short", timeout=10)
    assert server.get("/hello").body == b"Hello, World!"


# ---- KEEP_CONN and multiplexing ---------------------------------------------------------------


def test_nginx_keep_conn_reuses_connections_and_serves_everything(servers: Servers) -> None:
    _proc, address = servers.runtime_on_fd0()
    nginx = servers.nginx(address, keep_conn=True)
    for _ in range(30):
        resp = nginx.get("/hello")
        assert resp.body == b"Hello, World!", resp.text
    body = os.urandom(1 << 20)
    assert nginx.request("POST", "/echo", body=body).body == body
    stream = nginx.get("/stream?mib=4")
    assert hashlib.sha256(stream.body).hexdigest() == stream_sha256(4)
    tokens = [uuid.uuid4().hex for _ in range(20)]
    with ThreadPoolExecutor(max_workers=20) as pool:
        answers = list(pool.map(lambda t: nginx.get(f"/token?t={t}"), tokens))
    for token, resp in zip(tokens, answers, strict=True):
        assert re.fullmatch(rf"token {token} pid \d+\n", resp.text), resp.text
    # With FCGI_KEEP_CONN the application must not hang up: nginx's idle upstream connections
    # stay open on the runtime's side (without keep-conn there would be none).
    # Connections nginx closed beyond its pool of 8 must be closed by the runtime too.
    assert wait_until(lambda: 1 <= unix_connections(Path(address)) <= 8, 3), (
        f"{unix_connections(Path(address))} connections held open (nginx keepalive 8)"
    )
    assert nginx.get("/hello").status == 200  # an idle, parked connection is served again
    log = nginx.error_log.read_text()
    assert "prematurely closed" not in log, log


def test_multiplexed_requests_on_one_connection_run_concurrently(servers: Servers) -> None:
    from fcgispawn.client import FastCGIClient, RequestSpec

    _proc, address = servers.runtime_on_fd0(extra=["--threads", "4"])
    base = {
        "REQUEST_METHOD": "GET",
        "SCRIPT_NAME": "",
        "SERVER_NAME": "localhost",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
    }

    def token_spec(token: str, sleep: float) -> RequestSpec:
        return RequestSpec(
            {**base, "PATH_INFO": "/token", "QUERY_STRING": f"t={token}&sleep={sleep}"}
        )

    def check_token(token: str, body: bytes) -> None:
        assert re.fullmatch(rf"token {token} pid \d+\n", body.decode()), (token, body)

    with FastCGIClient(address, timeout=5) as client:
        # A multiplexing client sends at most FCGI_MAX_REQS at once; the runtime says how many.
        values = client.get_values(["FCGI_MPXS_CONNS", "FCGI_MAX_REQS"])
        assert values[b"FCGI_MPXS_CONNS"] == b"1"
        capacity = int(values[b"FCGI_MAX_REQS"])
        assert capacity >= 4, values
        tokens = [uuid.uuid4().hex for _ in range(4)]
        started = time.monotonic()
        answers = client.requests([token_spec(t, 0.4) for t in tokens])
        elapsed = time.monotonic() - started
        assert [r.status for r in answers] == [200] * 4, answers
        for token, resp in zip(tokens, answers, strict=True):
            check_token(token, resp.body)
        # 4 x 0.4 s one after the other would take 1.6 s.
        assert elapsed < 1.2, f"multiplexed requests took {elapsed:.2f}s: not run concurrently"

        # The same connection again (KEEP_CONN): a body and small requests interleaved.
        payload = os.urandom(300_000)
        post = RequestSpec(
            {
                **base,
                "REQUEST_METHOD": "POST",
                "PATH_INFO": "/echo",
                "CONTENT_LENGTH": str(len(payload)),
            },
            stdin=payload,
        )
        for _ in range(5):  # a few rounds: a body interleaved with other ids is the hard case
            more = [uuid.uuid4().hex for _ in range(2)]
            echo, *rest = client.requests([post, *(token_spec(t, 0.01) for t in more)])
            assert echo.status == 200
            assert echo.body == payload
            for token, resp in zip(more, rest, strict=True):
                check_token(token, resp.body)


# ---- Apache ------------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_apache_mod_proxy_fcgi_reaches_the_runtime(servers: Servers, transport: str) -> None:
    if transport == "unix":
        _proc, address = servers.runtime_on_fd0()  # mode 0666: Apache's children are www-data
        apache = servers.apache_proxy(f"unix:{address}")
    else:
        _proc, address = servers.runtime_on_fd0(sock=servers.tcp_listening_socket())
        apache = servers.apache_proxy(address)
    resp = apache.get("/hello")
    assert resp.status == 200, resp.text
    assert resp.body == b"Hello, World!"
    body = os.urandom(1 << 20)
    assert apache.request("POST", "/echo", body=body).body == body
    assert apache.get("/cookies").header_all("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]
    assert apache.get("/missing").status == 404


def test_apache_mod_fcgid_spawns_the_runtime_as_www_data(servers: Servers) -> None:
    apache = servers.apache_fcgid(_runtime_argv())
    resp = apache.get("/pid", timeout=60)
    assert resp.status == 200, resp.text
    m = PID.match(resp.text)
    assert m is not None, resp.text
    assert proc_ids(int(m.group(1))) == (33, 33)
    body = os.urandom(1 << 20)
    assert apache.request("POST", "/echo", body=body).body == body
    # The runtime mod_fcgid started stays up between requests (it is FastCGI, not CGI).
    assert apache.get("/pid").text == resp.text

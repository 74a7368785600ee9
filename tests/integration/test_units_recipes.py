"""The shipped integration, run for real: systemd units and every web server recipe in examples/.

The files operators copy are the source of truth here. Each test reads the shipped unit or
example config and changes only what a test machine must change (paths under /run and /srv,
ports, /usr/local/bin to the venv), failing loudly when a placeholder it rewrites is missing
so that the docs and the tests cannot drift apart:

- the ExecStart line of ``fcgispawn@.service`` runs under ``systemd-socket-activate`` on the
  socket unit's ListenStream (moved to a temp path, given its SocketMode/SocketGroup), behind
  nginx configured by ``examples/nginx.conf``; the sd_notify datagrams it sends to a
  NOTIFY_SOCKET the test owns are checked around a reload (ExecReload) and a stop (KillSignal);
- ``fcgispawn-bind@.service``'s ExecStart binds its own socket as www-data (User=/Group=);
- lighttpd (``bin-path`` and ``socket`` forms), Apache mod_proxy_fcgi (TCP and UNIX forms),
  Apache mod_fcgid and HAProxy (as is, and multiplexing) serve the app through the example
  configs.
"""

from __future__ import annotations

import array
import grp
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import stat
import struct
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from fcgispawn.client import FastCGIClient
from tests.integration.servers import (
    HttpServer,
    Servers,
    children_of,
    http_request,
    require_binary,
    require_file,
    wait_until,
)
from tests.procs import REPO, VENV_BIN, free_port
from tests.test_docs import parse_environment_file, parse_unit, unit_value

pytestmark = pytest.mark.integration

UNITS = REPO / "units"
EXAMPLES = REPO / "examples"
INSTANCE = "demo"
INSTALLED_FCGISPAWN = "/usr/local/bin/fcgispawn"
GREETING = "Hello from fcgispawn"
WEB_USER = "www-data"

# The app every recipe serves, written as myapp.py so the recipes' "myapp:app" is used as is.
# It reports the CGI variables a WSGI app depends on, so a recipe that mounts it wrongly fails.
MYAPP_SOURCE = """\
import json
import os


def app(environ, start_response):
    keys = ("SCRIPT_NAME", "PATH_INFO", "QUERY_STRING", "REQUEST_METHOD", "SERVER_NAME")
    info = {k: environ.get(k) for k in keys}
    info["pid"] = os.getpid()
    body = ("Hello from fcgispawn\\n" + json.dumps(info) + "\\n").encode()
    start_response(
        "200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))]
    )
    return [body]
"""


# --------------------------------------------------------------------------------------------
# Reading the shipped files


def render(name: str, replacements: Mapping[str, str]) -> str:
    """examples/NAME with each placeholder replaced; a placeholder that is gone fails the test."""
    text = (EXAMPLES / name).read_text()
    for old, new in replacements.items():
        assert old in text, f"examples/{name} no longer contains {old!r}: update this test"
        text = text.replace(old, new)
    return text


def expand_exec(line: str, env: Mapping[str, str], *, instance: str) -> list[str]:
    """An Exec*= line as systemd runs it: %i, $VAR split at whitespace, ${VAR} as one word."""
    words: list[str] = []
    for word in shlex.split(line.replace("%i", instance)):
        whole = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if whole:
            words.extend(env.get(whole.group(1), "").split())
        else:
            words.append(re.sub(r"\$\{(\w+)\}", lambda m: env.get(m.group(1), ""), word))
    return words


def venv_fcgispawn() -> str:
    path = VENV_BIN / "fcgispawn"
    assert path.exists(), f"{path} missing: run `bash scripts/setup.sh`"
    return str(path)


def example_conf_env(appdir: Path) -> dict[str, str]:
    """units/example.conf as the EnvironmentFile of the instance, its app dir moved to appdir."""
    text = (UNITS / "example.conf").read_text()
    assert "/srv/myapp" in text
    return parse_environment_file(text.replace("/srv/myapp", str(appdir)))


# --------------------------------------------------------------------------------------------
# sd_notify: a NOTIFY_SOCKET owned by the test


@dataclass(frozen=True)
class Notification:
    pid: int
    fields: dict[str, str]


class NotifySocket:
    """An AF_UNIX datagram socket like systemd's, recording the sender pid of each message."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        path.chmod(0o666)  # a service running as www-data must be able to send
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.received: list[Notification] = []

    def close(self) -> None:
        self.sock.close()

    def _receive(self, timeout: float) -> Notification | None:
        self.sock.settimeout(timeout)
        try:
            data, ancdata, _flags, _addr = self.sock.recvmsg(
                65536, socket.CMSG_SPACE(struct.calcsize("3i"))
            )
        except TimeoutError:
            return None
        pid = -1
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = array.array("i", payload[: struct.calcsize("3i")])[0]
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        note = Notification(pid, fields)
        self.received.append(note)
        return note

    def wait_for(self, key: str, value: str, timeout: float = 20.0) -> Notification:
        """The next message carrying KEY=VALUE (others are kept in ``received``)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            note = self._receive(left)
            if note is not None and note.fields.get(key) == value:
                return note
        seen = [n.fields for n in self.received]
        raise AssertionError(f"no {key}={value} within {timeout}s; received: {seen}")

    def drain(self) -> None:
        while self._receive(0.05) is not None:
            pass


@pytest.fixture
def notify_socket(sockdir: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(sockdir / "notify")
    try:
        yield sock
    finally:
        sock.close()


@pytest.fixture
def appdir(sockdir: Path) -> Path:
    """Where "myapp" lives (the recipes' /srv/myapp); readable by www-data like a real one."""
    path = sockdir / "srv-myapp"
    path.mkdir(mode=0o755)
    (path / "myapp.py").write_text(MYAPP_SOURCE)
    (path / "myapp.py").chmod(0o644)
    return path


# --------------------------------------------------------------------------------------------
# Checking responses


def app_info(body: bytes) -> dict[str, object]:
    text = body.decode()
    assert text.startswith(GREETING), f"not the app's answer: {text[:300]!r}"
    info: dict[str, object] = json.loads(text.splitlines()[1])
    return info


def get(server: HttpServer, target: str) -> dict[str, object]:
    resp = http_request("127.0.0.1", server.port, "GET", target)
    assert resp.status == 200, f"{server.name} GET {target}: {resp.status} {resp.text[:500]}"
    return app_info(resp.body)


def fcgi_get(sock: Path, path: str) -> dict[str, object]:
    params = {
        "REQUEST_METHOD": "GET",
        "SCRIPT_NAME": "",
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "SERVER_NAME": "localhost",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
    }
    with FastCGIClient(sock, timeout=20) as client:
        resp = client.request(params)
    assert resp.status == 200, resp.stdout[:500]
    return app_info(resp.body)


# --------------------------------------------------------------------------------------------
# Web servers configured by the example files (local launchers: servers.py builds its own
# configs, while these must include the shipped snippets verbatim)


def start_nginx(servers: Servers, site: str) -> HttpServer:
    """nginx as on Debian (workers run as www-data) with the site snippet in http {}."""
    binary = require_binary("nginx", "nginx-light")
    prefix = servers.workdir / servers.unique("nginx")
    prefix.mkdir(mode=0o755)
    port = free_port()
    error_log = servers.logbook.add("nginx error.log", prefix / "error.log")
    # "include fastcgi_params;" is relative to the directory of the main config.
    shutil.copy(require_file("/etc/nginx/fastcgi_params", "nginx-common"), prefix)
    (prefix / "site.conf").write_text(site.replace("listen 80;", f"listen 127.0.0.1:{port};"))
    temp = "\n".join(
        f"    {kind}_temp_path {prefix}/{kind}_temp;"
        for kind in ("client_body", "fastcgi", "proxy", "uwsgi", "scgi")
    )
    (prefix / "nginx.conf").write_text(
        f"user {WEB_USER};\nworker_processes 1;\npid {prefix}/nginx.pid;\n"
        f"error_log {error_log} info;\nevents {{ worker_connections 64; }}\n"
        f"http {{\n    access_log off;\n{temp}\n    include {prefix}/site.conf;\n}}\n"
    )
    proc = servers.start(
        "nginx",
        [
            binary,
            "-p",
            f"{prefix}/",
            "-e",
            str(error_log),
            "-c",
            str(prefix / "nginx.conf"),
            "-g",
            "daemon off;",
        ],
    )
    servers.wait_tcp("127.0.0.1", port, what="nginx", proc=proc)
    return HttpServer("nginx", port, proc, prefix, error_log)


def start_lighttpd(servers: Servers, snippet: str) -> HttpServer:
    binary = require_binary("lighttpd", "lighttpd")
    prefix = servers.workdir / servers.unique("lighttpd")
    (prefix / "htdocs").mkdir(parents=True)
    port = free_port()
    error_log = servers.logbook.add("lighttpd error.log", prefix / "error.log")
    (prefix / "myapp.conf").write_text(snippet)
    (prefix / "lighttpd.conf").write_text(
        f'server.document-root = "{prefix}/htdocs"\nserver.bind = "127.0.0.1"\n'
        f'server.port = {port}\nserver.errorlog = "{error_log}"\n'
        f'server.pid-file = "{prefix}/lighttpd.pid"\ninclude "{prefix}/myapp.conf"\n'
    )
    proc = servers.start("lighttpd", [binary, "-D", "-f", str(prefix / "lighttpd.conf")])
    servers.wait_tcp("127.0.0.1", port, what="lighttpd", proc=proc)
    return HttpServer("lighttpd", port, proc, prefix, error_log)


def start_apache(
    servers: Servers, site: str, *, modules: tuple[str, ...], extra: str = ""
) -> HttpServer:
    """A private Apache 2.4 (children as www-data) with the site's <VirtualHost> on our port."""
    binary = require_binary("apache2", "apache2")
    prefix = servers.workdir / servers.unique("apache")
    for sub in ("run", "mutex"):
        (prefix / sub).mkdir(parents=True, mode=0o755)
    port = free_port()
    error_log = servers.logbook.add("apache error_log", prefix / "error.log")
    mods = "/usr/lib/apache2/modules"
    loads = "\n".join(
        f"LoadModule {m}_module {require_file(f'{mods}/mod_{m}.so', 'apache2')}"
        for m in ("mpm_event", "authz_core", *modules)
    )
    site = site.replace("<VirtualHost *:80>", f"<VirtualHost 127.0.0.1:{port}>")
    (prefix / "httpd.conf").write_text(
        f'ServerRoot "{prefix}"\n{loads}\nServerName localhost\nListen 127.0.0.1:{port}\n'
        f'PidFile "{prefix}/run/httpd.pid"\nDefaultRuntimeDir "{prefix}/run"\n'
        f'Mutex file:{prefix}/mutex default\nErrorLog "{error_log}"\nLogLevel info\n'
        f"User {WEB_USER}\nGroup {WEB_USER}\n<Directory />\n    Require all granted\n"
        f"</Directory>\n{extra}\n{site}\n"
    )
    proc = servers.start(
        "apache",
        [binary, "-f", str(prefix / "httpd.conf"), "-DFOREGROUND"],
        env=servers.env(APACHE_RUN_DIR=str(prefix / "run")),
    )
    servers.wait_tcp("127.0.0.1", port, what="apache", proc=proc)
    return HttpServer("apache", port, proc, prefix, error_log)


def start_haproxy(servers: Servers, sections: str) -> HttpServer:
    """HAProxy with the example's sections, after the global and defaults sections Debian's
    /etc/haproxy/haproxy.cfg has (log to stderr here, into the test's log book)."""
    binary = require_binary("haproxy", "haproxy")
    prefix = servers.workdir / servers.unique("haproxy")
    prefix.mkdir()
    port = free_port()
    assert "    bind :80\n" in sections, "examples/haproxy.cfg has no 'bind :80': update this test"
    sections = sections.replace("    bind :80\n", f"    bind 127.0.0.1:{port}\n")
    (prefix / "haproxy.cfg").write_text(
        "global\n    log stderr format raw local0\n"
        "defaults\n    mode http\n    log global\n    option httplog\n"
        "    timeout connect 5s\n    timeout client 30s\n    timeout server 30s\n"
        f"{sections}"
    )
    proc = servers.start("haproxy", [binary, "-db", "-f", str(prefix / "haproxy.cfg")])
    servers.wait_tcp("127.0.0.1", port, what="haproxy", proc=proc)
    return HttpServer("haproxy", port, proc, prefix, prefix / "haproxy.cfg")


def start_fcgispawn(
    servers: Servers,
    args: list[str],
    appdir: Path,
    *,
    sock: Path | None = None,
    port: int | None = None,
) -> subprocess.Popen[bytes]:
    """The quick-start command in the foreground, the app found on PYTHONPATH as the docs say."""
    env = servers.env(PYTHONPATH=str(appdir))
    return servers.fcgispawn(
        ["-n", *args],
        env=env,
        wait_unix=sock,
        wait_tcp=("127.0.0.1", port) if port is not None else None,
    )


def give_socket_to_web_server(path: Path, mode: int = 0o660) -> None:
    """What SocketMode=0660 + SocketGroup=www-data (or -G www-data) do for a real unit."""
    os.chown(path, -1, grp.getgrnam(WEB_USER).gr_gid)
    path.chmod(mode)


# --------------------------------------------------------------------------------------------
# systemd units


def test_socket_unit_and_service_execstart_serve_nginx_recipe_and_notify_systemd(
    servers: Servers, appdir: Path, notify_socket: NotifySocket
) -> None:
    socket_unit = parse_unit(UNITS / "fcgispawn@.socket")
    service = parse_unit(UNITS / "fcgispawn@.service")
    listen = unit_value(socket_unit, "Socket", "ListenStream").replace("%i", INSTANCE)
    assert listen == f"/run/fcgispawn/{INSTANCE}.sock"
    sock = servers.workdir / Path(listen).name  # the ListenStream address, moved to a temp dir

    env = example_conf_env(appdir)
    argv = expand_exec(unit_value(service, "Service", "ExecStart"), env, instance=INSTANCE)
    assert argv[0] == INSTALLED_FCGISPAWN
    argv[0] = venv_fcgispawn()
    run_env = servers.env(**env, NOTIFY_SOCKET=str(notify_socket.path))
    proc = servers.socket_activate(
        sock,
        argv,
        env=run_env,
        fdname=unit_value(socket_unit, "Socket", "FileDescriptorName"),
    )
    mode = int(unit_value(socket_unit, "Socket", "SocketMode"), 8)
    assert unit_value(socket_unit, "Socket", "SocketGroup") == WEB_USER
    give_socket_to_web_server(sock, mode)

    ready = notify_socket.wait_for("READY", "1")
    assert ready.pid == proc.pid, "NotifyAccess=main: READY=1 must come from the main process"

    site = render("nginx.conf", {"/run/fcgispawn/myapp.sock": str(sock)})
    nginx = start_nginx(servers, site)
    root = get(nginx, "/a/b?x=1")
    assert (root["SCRIPT_NAME"], root["PATH_INFO"], root["QUERY_STRING"]) == ("", "/a/b", "x=1")
    mounted = get(nginx, "/myapp/x/y")
    assert (mounted["SCRIPT_NAME"], mounted["PATH_INFO"]) == ("/myapp", "/x/y")

    # ExecReload, exactly as systemd would run it.
    old_workers = set(children_of(proc.pid))
    assert old_workers, "no workers under the supervisor"
    notify_socket.drain()
    reload_argv = expand_exec(
        unit_value(service, "Service", "ExecReload"),
        {"MAINPID": str(proc.pid)},
        instance=INSTANCE,
    )
    subprocess.run(reload_argv, check=True, timeout=10)
    reloading = notify_socket.wait_for("RELOADING", "1")
    assert reloading.pid == proc.pid
    notify_socket.wait_for("READY", "1")
    assert wait_until(lambda: not old_workers & set(children_of(proc.pid)), timeout=35), (
        "old workers still running after the reload"
    )
    after = get(nginx, "/after-reload")
    assert after["pid"] not in old_workers

    # KillSignal=, within TimeoutStopSec=.
    kill_signal = unit_value(service, "Service", "KillSignal")
    os.kill(proc.pid, signal.Signals[kill_signal])
    stopping = notify_socket.wait_for("STOPPING", "1")
    assert stopping.pid == proc.pid
    stop_timeout = float(unit_value(service, "Service", "TimeoutStopSec").removesuffix("s"))
    assert proc.wait(stop_timeout) == 0

    notify_socket.drain()
    assert all(n.pid == proc.pid for n in notify_socket.received), [
        (n.pid, n.fields) for n in notify_socket.received
    ]
    assert any("STATUS" in n.fields for n in notify_socket.received)


def test_bind_service_execstart_as_www_data_binds_a_socket_the_web_server_can_use(
    servers: Servers, appdir: Path, notify_socket: NotifySocket
) -> None:
    setpriv = require_binary("setpriv", "util-linux")
    service = parse_unit(UNITS / "fcgispawn-bind@.service")
    user = unit_value(service, "Service", "User")
    group = unit_value(service, "Service", "Group")
    runtime_dir = unit_value(service, "Service", "RuntimeDirectory")
    # RuntimeDirectory=fcgispawn: /run/fcgispawn, created by systemd and owned by User=.
    rundir = servers.workdir / runtime_dir
    rundir.mkdir(mode=0o755)
    shutil.chown(rundir, user, group)

    env = example_conf_env(appdir)
    argv = expand_exec(unit_value(service, "Service", "ExecStart"), env, instance=INSTANCE)
    assert argv[0] == INSTALLED_FCGISPAWN
    argv = [venv_fcgispawn(), *(a.replace("/run/fcgispawn", str(rundir)) for a in argv[1:])]
    sock = rundir / f"{INSTANCE}.sock"
    assert str(sock) in argv
    # User=/Group=/NoNewPrivileges=yes, as systemd applies them before ExecStart.
    as_user = [setpriv, f"--reuid={user}", f"--regid={group}", "--init-groups", "--no-new-privs"]
    proc = servers.start(
        "fcgispawn-bind",
        [*as_user, *argv],
        env=servers.env(**env, NOTIFY_SOCKET=str(notify_socket.path)),
    )
    ready = notify_socket.wait_for("READY", "1")
    assert ready.pid == proc.pid
    info = os.stat(sock)
    assert stat.S_ISSOCK(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o660
    assert pwd.getpwuid(info.st_uid).pw_name == user
    assert grp.getgrgid(info.st_gid).gr_name == WEB_USER
    assert fcgi_get(sock, "/bound")["PATH_INFO"] == "/bound"

    os.kill(proc.pid, signal.Signals[unit_value(service, "Service", "KillSignal")])
    assert notify_socket.wait_for("STOPPING", "1").pid == proc.pid
    assert proc.wait(30) == 0
    assert not sock.exists(), "fcgispawn must remove the socket it bound"


# --------------------------------------------------------------------------------------------
# README quick start and nginx


def test_readme_quick_start_serves_the_demo_app_to_cgi_fcgi(servers: Servers) -> None:
    """The README's try-it lines, run as written (the socket path moved to a temp dir)."""
    readme = (REPO / "README.md").read_text()
    spawn_line = re.search(r"^cd examples && (fcgispawn .*?) &$", readme, re.M)
    client_line = re.search(r"^(REQUEST_METHOD=.* cgi-fcgi .*)$", readme, re.M)
    assert spawn_line and client_line, "README quick start changed: update this test"
    sock = servers.workdir / "hello.sock"
    argv = shlex.split(spawn_line.group(1).replace("/tmp/hello.sock", str(sock)))
    assert argv[0] == "fcgispawn"
    # No PYTHONPATH: "hello" must be found in the working directory, as the README implies.
    env = servers.env()
    env.pop("PYTHONPATH")
    proc = servers.start("quick-start", [venv_fcgispawn(), *argv[1:]], env=env, cwd=EXAMPLES)
    servers.wait_unix(sock, what="README quick start", proc=proc)
    words = shlex.split(client_line.group(1).replace("/tmp/hello.sock", str(sock)))
    assignments = dict(w.split("=", 1) for w in words if re.match(r"^[A-Z_]+=", w))
    client = [w for w in words if not re.match(r"^[A-Z_]+=", w)]
    require_binary(client[0], "libfcgi-bin")
    done = subprocess.run(
        client,
        env={"PATH": os.environ["PATH"], **assignments},
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert b"Hello, you!" in done.stdout, done.stdout


def test_nginx_recipe_mounts_the_app_at_the_root_and_under_a_prefix(
    servers: Servers, appdir: Path
) -> None:
    sock = servers.workdir / "myapp.sock"
    # The command from the recipe's comment, with -G so nginx's www-data workers can connect.
    start_fcgispawn(
        servers,
        ["-s", str(sock), "-G", WEB_USER, "-F", "2", "--wsgi", "myapp:app"],
        appdir,
        sock=sock,
    )
    nginx = start_nginx(servers, render("nginx.conf", {"/run/fcgispawn/myapp.sock": str(sock)}))
    root = get(nginx, "/a/b?x=1")
    assert (root["SCRIPT_NAME"], root["PATH_INFO"], root["QUERY_STRING"]) == ("", "/a/b", "x=1")
    assert get(nginx, "/")["PATH_INFO"] == "/"
    mounted = get(nginx, "/myapp/x/y?z=2")
    assert (mounted["SCRIPT_NAME"], mounted["PATH_INFO"]) == ("/myapp", "/x/y")
    assert mounted["QUERY_STRING"] == "z=2"


# --------------------------------------------------------------------------------------------
# lighttpd


def test_lighttpd_bin_path_recipe_spawns_fcgispawn_on_fd0(servers: Servers, appdir: Path) -> None:
    snippet = render(
        "lighttpd.conf",
        {
            INSTALLED_FCGISPAWN: venv_fcgispawn(),
            "/run/lighttpd/myapp.sock": str(servers.workdir / "lighttpd-myapp.sock"),
            "/srv/myapp": str(appdir),
        },
    )
    lighttpd = start_lighttpd(servers, snippet)
    info = get(lighttpd, "/a/b?x=1")
    assert (info["SCRIPT_NAME"], info["PATH_INFO"], info["QUERY_STRING"]) == ("", "/a/b", "x=1")


def test_lighttpd_socket_recipe_connects_to_fcgispawn(servers: Servers, appdir: Path) -> None:
    sock = servers.workdir / "myapp.sock"
    start_fcgispawn(servers, ["-s", str(sock), "-F", "2", "--wsgi", "myapp:app"], appdir, sock=sock)
    snippet = render("lighttpd-socket.conf", {"/run/fcgispawn/myapp.sock": str(sock)})
    lighttpd = start_lighttpd(servers, snippet)
    info = get(lighttpd, "/a/b?x=1")
    assert (info["SCRIPT_NAME"], info["PATH_INFO"], info["QUERY_STRING"]) == ("", "/a/b", "x=1")


# --------------------------------------------------------------------------------------------
# Apache


PROXY_TCP_LINE = 'ProxyPass "/" "fcgi://127.0.0.1:9000/"'
PROXY_UNIX_LINE = 'ProxyPass "/" "unix:/run/fcgispawn/myapp.sock|fcgi://localhost/"'


def test_apache_proxy_fcgi_tcp_recipe_reaches_fcgispawn_on_its_default_address(
    servers: Servers, appdir: Path
) -> None:
    port = free_port()
    # No -a: the recipe relies on fcgispawn binding 127.0.0.1 by default.
    start_fcgispawn(servers, ["-p", str(port), "--wsgi", "myapp:app"], appdir, port=port)
    site = render("apache-proxy-fcgi.conf", {"127.0.0.1:9000": f"127.0.0.1:{port}"})
    assert f"\n    {PROXY_TCP_LINE.replace('9000', str(port))}\n" in site, "(A) must be active"
    apache = start_apache(servers, site, modules=("proxy", "proxy_fcgi"))
    info = get(apache, "/a/b?x=1")
    assert (info["SCRIPT_NAME"], info["PATH_INFO"], info["QUERY_STRING"]) == ("", "/a/b", "x=1")


def test_apache_proxy_fcgi_unix_recipe_reaches_fcgispawn_socket_via_group(
    servers: Servers, appdir: Path
) -> None:
    sock = servers.workdir / "myapp.sock"
    start_fcgispawn(
        servers, ["-s", str(sock), "-G", WEB_USER, "--wsgi", "myapp:app"], appdir, sock=sock
    )
    site = render(
        "apache-proxy-fcgi.conf",
        {
            # Switch from (A) to (B) as the comment in the recipe says.
            f"    {PROXY_TCP_LINE}\n": f"    #{PROXY_TCP_LINE}\n",
            f"    #{PROXY_UNIX_LINE}\n": f"    {PROXY_UNIX_LINE}\n",
        },
    )
    site = site.replace("/run/fcgispawn/myapp.sock", str(sock))
    apache = start_apache(servers, site, modules=("proxy", "proxy_fcgi"))
    info = get(apache, "/a/b?x=1")
    assert (info["SCRIPT_NAME"], info["PATH_INFO"], info["QUERY_STRING"]) == ("", "/a/b", "x=1")


def test_apache_fcgid_recipe_spawns_fcgispawn_wsgi_as_www_data(
    servers: Servers, appdir: Path
) -> None:
    ipc = servers.workdir / "fcgid-ipc"
    ipc.mkdir(mode=0o755)
    shutil.chown(ipc, WEB_USER, WEB_USER)
    site = render(
        "apache-fcgid.conf", {INSTALLED_FCGISPAWN: venv_fcgispawn(), "/srv/myapp": str(appdir)}
    )
    # Test-only: where mod_fcgid keeps its sockets, and our marker so teardown finds the
    # processes it spawned.
    extra = (
        f'FcgidIPCDir "{ipc}"\nFcgidProcessTableFile "{servers.workdir}/fcgid-shm"\n'
        f"FcgidInitialEnv FCGISPAWN_TEST_MARK {servers.mark}\n"
    )
    apache = start_apache(servers, site, modules=("alias", "fcgid"), extra=extra)
    info = get(apache, "/a/b?x=1")
    assert (info["SCRIPT_NAME"], info["PATH_INFO"], info["QUERY_STRING"]) == ("", "/a/b", "x=1")
    served_by = int(str(info["pid"]))
    assert pwd.getpwuid(os.stat(f"/proc/{served_by}").st_uid).pw_name == WEB_USER


# --------------------------------------------------------------------------------------------
# HAProxy


def haproxy_recipe(port: int, appdir: Path, **more: str) -> str:
    """examples/haproxy.cfg on our ports and app dir; ``more``: an example line -> that line
    followed by more lines (the options the example's comments describe)."""
    text = render("haproxy.cfg", {"127.0.0.1:9000": f"127.0.0.1:{port}", "/srv/myapp": str(appdir)})
    for line, added in more.items():
        assert line in text, f"examples/haproxy.cfg no longer has {line!r}: update this test"
        text = text.replace(line, line + added)
    return text


def test_haproxy_recipe_mounts_the_app_at_the_root_over_kept_tcp_connections(
    servers: Servers, appdir: Path
) -> None:
    port = free_port()
    start_fcgispawn(servers, ["-p", str(port), "-F", "2", "--wsgi", "myapp:app"], appdir, port=port)
    haproxy = start_haproxy(servers, haproxy_recipe(port, appdir))
    info = get(haproxy, "/a/b?x=1")
    assert (info["SCRIPT_NAME"], info["PATH_INFO"], info["QUERY_STRING"]) == ("", "/a/b", "x=1")
    assert info["SERVER_NAME"] == "127.0.0.1"  # the Host header without its port
    assert get(haproxy, "/")["PATH_INFO"] == "/"


SLOWAPP_SOURCE = """\
import time


def app(environ, start_response):
    seconds = float(environ["QUERY_STRING"] or 0)
    time.sleep(seconds)
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]
"""


def test_haproxy_multiplexing_runs_a_request_next_to_slow_ones_on_the_same_connection(
    servers: Servers, appdir: Path
) -> None:
    """HAProxy with get-values and mpxs-conns, as the example's comment says, to a worker with
    four threads: it puts requests on a connection whose request still runs. Those waited for
    the slow one (up to 1.8 s for a fast request next to three 2 s ones); they must run on a
    free thread at once."""
    (appdir / "slowapp.py").write_text(SLOWAPP_SOURCE)
    port = free_port()
    start_fcgispawn(
        servers, ["-p", str(port), "-F", "1", "--threads", "4", "--wsgi", "slowapp:app"],
        appdir, port=port,
    )  # fmt: skip
    haproxy = start_haproxy(
        servers,
        haproxy_recipe(
            port,
            appdir,
            **{
                "    option keep-conn\n": "    option get-values\n    option mpxs-conns\n",
                "    use-fcgi-app myapp\n": "    http-reuse always\n",
            },
        ),
    )
    assert haproxy.get("/?0").status == 200  # a connection open, its GET_VALUES answered
    results: dict[str, list[tuple[int, float]]] = {"slow": [], "fast": []}

    def fetch(kind: str, target: str) -> None:
        t0 = time.monotonic()
        status = haproxy.get(target, timeout=20).status
        results[kind].append((status, time.monotonic() - t0))

    slow = [threading.Thread(target=fetch, args=("slow", "/?2")) for _ in range(3)]
    for t in slow:
        t.start()
    time.sleep(0.3)
    fast = [threading.Thread(target=fetch, args=("fast", "/?0")) for _ in range(8)]
    for t in fast:
        t.start()
    for t in slow + fast:
        t.join(30)
    assert [s for s, _ in results["slow"]] == [200] * 3
    assert [s for s, _ in results["fast"]] == [200] * 8
    worst = max(d for _, d in results["fast"])
    assert worst < 1.0, f"a fast request waited {worst:.2f} s behind a slow one"

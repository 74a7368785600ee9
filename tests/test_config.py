"""Cross-field rules of config.build: each bad combination names the value at fault."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from fcgispawn.config import Options, build, parse_mode
from fcgispawn.errors import ConfigError
from fcgispawn.sockets import FdAddress, TcpAddress, UnixAddress

CMD = ("/bin/cat",)


def opts(**kw: object) -> Options:
    base = Options(command=CMD)
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kw", "fragment"),
    [
        ({"socket": "/tmp/a.sock", "port": 9000}, "give one socket"),
        ({"socket": "/tmp/a.sock", "fd": 3}, "give one socket"),
        ({"address": "127.0.0.1"}, "needs -p"),
        ({"socket": "/tmp/" + "x" * 120}, "longer than the 107"),
        ({"port": 70000}, "out of range"),
        ({"port": 0}, "out of range"),
        ({"socket": "/tmp/a.sock", "socket_mode": "0999"}, "invalid socket mode"),
        ({"socket": "/tmp/a.sock", "socket_mode": "01777"}, "out of range"),
        ({"workers": 0}, "-F/--workers must be at least 1"),
        ({"php_children": -1}, "-C must be at least 0"),
        ({"workers": 99_999_999}, "-F/--workers must be at most 4096"),
        ({"threads": 99_999}, "--threads must be at most 1024"),
        ({"backlog": 3_000_000_000}, "-b/--backlog must be at most 2147483647"),
        ({"fd": 3_000_000_000}, "--fd 3000000000 is not a file descriptor"),
        ({"graceful_timeout": float("inf")}, "--graceful-timeout must be a finite number"),
        ({"graceful_timeout": float("nan")}, "--graceful-timeout must be a finite number"),
        ({"graceful_timeout": 1e7}, "--graceful-timeout must be at most 2000000"),
        ({"request_timeout": 1e300}, "--request-timeout must be at most 2000000"),
        ({"backlog": 0}, "-b/--backlog"),
        ({"threads": 0}, "--threads"),
        ({"backoff_max": 0.0}, "--backoff-max must be at least 0.1"),
        ({"chroot": "/nonexistent-xyz"}, "-c /nonexistent-xyz: no such directory"),
        ({"chdir": "/nonexistent-xyz"}, "-d /nonexistent-xyz: no such directory"),
        ({"web_server_addrs": "127.0.0.1,bogus"}, "'bogus' is not an IP address"),
        ({"crash_limit": 0}, "--crash-limit must be at least 1"),
        ({"command": ()}, "no FastCGI application given"),
        ({"command": ("no-such-program-xyz",)}, "cannot execute 'no-such-program-xyz'"),
        ({"command": ("/etc/passwd",)}, "cannot execute '/etc/passwd'"),
        ({"wsgi": "app", "command": ()}, "not MODULE:CALLABLE"),
        ({"wsgi": "mod:app"}, "either --wsgi"),
    ],
)
def test_bad_combination_is_refused_naming_the_value(kw: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        build(opts(**kw))
    assert fragment in str(info.value)
    assert info.value.exit_code == 2


def test_flags_spawn_fcgi_ignores_in_a_combination_are_ignored_with_a_warning() -> None:
    # An init script passing -M with -p, or -a with -s, runs under spawn-fcgi: so here too.
    cfg = build(opts(port=9000, socket_mode="0600"))
    assert cfg.warnings == ("-M is ignored: it is the mode of a UNIX socket file (-s)",)
    cfg = build(opts(socket="/tmp/a.sock", address="127.0.0.1"))
    assert cfg.address == UnixAddress("/tmp/a.sock")
    assert cfg.warnings == ("-a 127.0.0.1 is ignored: it is the TCP address for -p, not -s",)
    assert build(opts(php_children=0)).extra_env["PHP_FCGI_CHILDREN"] == "0"


def test_without_root_c_is_not_used_to_check_the_command_or_d(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # spawn-fcgi ignores -c without root (and the spawner warns): the command and -d are
    # looked up outside the chroot, not refused inside one that will never be entered.
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    cfg = build(opts(chroot="/nonexistent-xyz", chdir="/tmp", command=("/bin/sleep", "1")))
    assert cfg.command == ("/bin/sleep", "1")


def test_tcp_defaults_to_loopback_not_any_address() -> None:
    cfg = build(opts(port=9000))
    assert cfg.address == TcpAddress("127.0.0.1", 9000)


def test_ipv6_address_with_port() -> None:
    cfg = build(opts(address="::1", port=9000))
    assert cfg.address == TcpAddress("::1", 9000)


def test_socket_mode_defaults_to_0660_and_honours_m_exactly() -> None:
    assert build(opts(socket="/tmp/a.sock")).bind.mode == 0o660
    assert build(opts(socket="/tmp/a.sock", socket_mode="0777")).bind.mode == 0o777
    assert parse_mode("600") == 0o600


def test_no_socket_option_means_inherited() -> None:
    cfg = build(Options(wsgi="hello:app"))
    assert cfg.inherited and cfg.serves_in_process
    assert not build(Options(wsgi="hello:app", workers=2)).serves_in_process
    assert build(opts(fd=5)).address == FdAddress(5)


def test_an_inherited_socket_keeps_a_supervisor_when_the_one_worker_will_exit() -> None:
    # The worker alone would close the only copy of the socket on a recycle or a request
    # timeout: the web server would see its queued connections reset.
    assert not build(Options(wsgi="hello:app", max_requests=100)).serves_in_process
    assert not build(Options(wsgi="hello:app", request_timeout=30.0)).serves_in_process
    assert build(Options(wsgi="hello:app", max_requests_jitter=5)).serves_in_process


def test_php_children_only_with_c() -> None:
    assert "PHP_FCGI_CHILDREN" not in build(opts()).extra_env
    assert build(opts(php_children=4)).extra_env["PHP_FCGI_CHILDREN"] == "4"


def test_deprecated_f_runs_through_the_shell_and_is_ignored_with_command() -> None:
    assert build(Options(app_path="/usr/bin/php-cgi")).command == (
        "/bin/sh",
        "-c",
        "exec /usr/bin/php-cgi",
    )
    assert build(opts(app_path="/usr/bin/php-cgi")).command == CMD


def test_socket_is_created_inside_the_chroot_unless_s(tmp_path: Path) -> None:
    jail = str(tmp_path)
    cfg = build(opts(socket="/run/app.sock", chroot=jail, command=("app",)))
    assert cfg.bind_address() == UnixAddress(f"{jail}/run/app.sock")
    cfg = build(opts(socket="/run/app.sock", chroot=jail, bind_before_chroot=True, command=("a",)))
    assert cfg.bind_address() == UnixAddress("/run/app.sock")


def test_wsgi_worker_args_carry_the_runtime_options() -> None:
    cfg = build(
        Options(
            wsgi="hello:app",
            socket="/tmp/a.sock",
            threads=8,
            max_requests=100,
            max_requests_jitter=10,
            web_server_addrs="127.0.0.1, ::1",
        )
    )
    assert cfg.runtime is not None
    assert cfg.runtime.worker_args() == (
        "--wsgi",
        "hello:app",
        "--threads",
        "8",
        "--max-requests",
        "100",
        "--max-requests-jitter",
        "10",
        "--graceful-timeout",
        "30",
        "--web-server-addrs",
        "127.0.0.1,::1",
    )

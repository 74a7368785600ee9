"""fcgispawn.sockets: addresses, safe UNIX socket creation, TCP binds, adopting inherited fds."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fcgispawn import sockets
from fcgispawn.errors import ConfigError, SocketError
from fcgispawn.sockets import (
    BindOptions,
    FdAddress,
    Listener,
    TcpAddress,
    UnixAddress,
    adopt_fd,
    bind,
    format_address,
    is_listening_socket,
    is_loopback,
    parse_address,
)

NOBODY = 65534
NOGROUP = 65534


def mode_of(path: Path | str) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def connectable(path: Path | str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(os.fspath(path))
        except OSError:
            return False
        return True


@pytest.fixture
def umask() -> Iterator[Callable[[int], None]]:
    """Set the umask for one test and restore it afterwards."""
    saved = os.umask(0o022)
    os.umask(saved)

    def set_umask(mask: int) -> None:
        os.umask(mask)

    try:
        yield set_umask
    finally:
        os.umask(saved)


@pytest.fixture
def listeners() -> Iterator[list[Listener]]:
    """Listeners a test bound; closed (and unlinked) at teardown."""
    bound: list[Listener] = []
    yield bound
    for listener in bound:
        listener.close()


def ss_send_q(args: list[str]) -> int:
    """Send-Q of the single listening socket ``ss`` reports: the backlog passed to listen()."""
    out = subprocess.run(["ss", "-lnH", *args], capture_output=True, text=True, check=True)
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, out.stdout
    fields = lines[0].split()
    # "u_str LISTEN 0 7 /path ino * 0" with -x, "LISTEN 0 5 127.0.0.1:port 0.0.0.0:*" with -t
    state = fields.index("LISTEN")
    return int(fields[state + 2])


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("unix:/run/app.sock", UnixAddress("/run/app.sock")),
        ("unix:relative.sock", UnixAddress("relative.sock")),
        ("/run/app.sock", UnixAddress("/run/app.sock")),
        ("./app.sock", UnixAddress("./app.sock")),
        ("../app.sock", UnixAddress("../app.sock")),
        ("127.0.0.1:9000", TcpAddress("127.0.0.1", 9000)),
        ("localhost:9000", TcpAddress("localhost", 9000)),
        ("0.0.0.0:0", TcpAddress("0.0.0.0", 0)),
        ("[::1]:9000", TcpAddress("::1", 9000)),
        ("[::]:65535", TcpAddress("::", 65535)),
        ("fd:0", FdAddress(0)),
        ("fd:3", FdAddress(3)),
    ],
)
def test_parse_address_accepts_every_documented_form(text: str, expected: object) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("", "empty"),
        ("app.sock", "'app.sock'"),
        ("unix:", "'unix:'"),
        ("127.0.0.1:", "''"),
        ("127.0.0.1:17x", "'17x'"),
        ("127.0.0.1:65536", "'65536'"),
        ("127.0.0.1:-1", "'-1'"),
        (":9000", "':9000'"),
        ("::1:9000", "'::1:9000'"),
        ("[::1]9000", "'[::1]9000'"),
        ("[::1", "'[::1'"),
        ("[nope]:9000", "'nope'"),
        ("fd:", "''"),
        ("fd:x", "'x'"),
        ("fd:-1", "'-1'"),
        ("/a\0b", "NUL"),
    ],
)
def test_parse_address_refuses_bad_values_naming_them(text: str, named: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_address(text)
    assert named in str(info.value)
    assert info.value.exit_code == 2


def test_parse_address_refuses_a_path_longer_than_sun_path_with_its_length() -> None:
    path = "/" + "x" * 107
    with pytest.raises(ConfigError, match="108 bytes long, the limit is 107"):
        parse_address(path)
    assert parse_address(path[:-1]) == UnixAddress(path[:-1])


@pytest.mark.parametrize(
    "addr",
    [
        UnixAddress("/run/a.sock"),
        UnixAddress("./a.sock"),
        UnixAddress("rel.sock"),
        TcpAddress("127.0.0.1", 9000),
        TcpAddress("::1", 9000),
        TcpAddress("localhost", 1),
        FdAddress(3),
    ],
)
def test_format_address_round_trips(addr: sockets.Address) -> None:
    assert parse_address(format_address(addr)) == addr


def test_format_address_brackets_ipv6() -> None:
    assert format_address(TcpAddress("::1", 9000)) == "[::1]:9000"


# --------------------------------------------------------------------------- UNIX: mode/owner


@pytest.mark.parametrize("mask", [0o000, 0o022, 0o077, 0o777])
def test_default_mode_is_0660_whatever_the_umask(
    sockdir: Path, umask: Callable[[int], None], listeners: list[Listener], mask: int
) -> None:
    umask(mask)
    path = sockdir / "app.sock"
    listeners.append(bind(UnixAddress(str(path))))
    assert mode_of(path) == 0o660
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    assert connectable(path)


@pytest.mark.parametrize(("mask", "mode"), [(0o077, 0o777), (0o022, 0o600), (0o000, 0o640)])
def test_explicit_mode_is_applied_exactly_not_masked(
    sockdir: Path, umask: Callable[[int], None], listeners: list[Listener], mask: int, mode: int
) -> None:
    umask(mask)
    path = sockdir / "app.sock"
    listeners.append(bind(UnixAddress(str(path)), BindOptions(mode=mode)))
    assert mode_of(path) == mode


def test_mode_none_means_what_a_plain_bind_gives(
    sockdir: Path, umask: Callable[[int], None], listeners: list[Listener]
) -> None:
    umask(0o027)
    path = sockdir / "app.sock"
    listeners.append(bind(UnixAddress(str(path)), BindOptions(mode=None)))
    assert mode_of(path) == 0o750


@pytest.mark.parametrize("mode", [-1, 0o1000, 0o4755])
def test_out_of_range_mode_is_refused(sockdir: Path, mode: int) -> None:
    with pytest.raises(ConfigError, match="invalid socket mode"):
        bind(UnixAddress(str(sockdir / "a.sock")), BindOptions(mode=mode))
    assert os.listdir(sockdir) == []


@pytest.mark.parametrize("mask", [0o000, 0o022])
def test_socket_file_is_mode_0000_right_after_bind_and_final_before_it_listens(
    sockdir: Path,
    umask: Callable[[int], None],
    listeners: list[Listener],
    monkeypatch: pytest.MonkeyPatch,
    mask: int,
) -> None:
    """Checked at the two moments that matter: right after bind (before chmod) and after
    chmod; listen() comes only after both, so nobody can connect while it is wider."""
    umask(mask)
    target = sockdir / "app.sock"
    seen: list[int] = []
    real_chmod = os.chmod

    def spy_chmod(*args: Any, **kwargs: Any) -> None:
        seen.append(mode_of(target))
        real_chmod(*args, **kwargs)

    monkeypatch.setattr(os, "chmod", spy_chmod)
    listeners.append(bind(UnixAddress(str(target)), BindOptions(mode=0o600)))
    assert seen == [0o000]
    assert mode_of(target) == 0o600
    assert os.listdir(sockdir) == ["app.sock"]


def test_a_watcher_never_sees_the_socket_wider_than_requested(
    sockdir: Path, umask: Callable[[int], None]
) -> None:
    """A concurrent observer, as an attacker would be: many binds/closes under umask 0."""
    umask(0o000)
    target = sockdir / "app.sock"
    stop = threading.Event()
    widest = [0]
    observations = [0]

    def watch() -> None:
        while not stop.is_set():
            for name in os.listdir(sockdir):
                with contextlib.suppress(FileNotFoundError):
                    st = os.lstat(sockdir / name)
                    observations[0] += 1
                    widest[0] |= stat.S_IMODE(st.st_mode) & ~0o600
                    if name == target.name:
                        widest[0] |= stat.S_IMODE(st.st_mode) & ~0o600

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        # bounded: until the watcher has looked often enough (it competes for the GIL)
        for _ in range(20_000):
            bind(UnixAddress(str(target)), BindOptions(mode=0o600)).close()
            if observations[0] >= 300:
                break
    finally:
        stop.set()
        watcher.join(10)
    assert observations[0] > 0
    assert widest[0] == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_owner_and_group_are_set_by_uid_and_gid(sockdir: Path, listeners: list[Listener]) -> None:
    path = sockdir / "app.sock"
    listeners.append(bind(UnixAddress(str(path)), BindOptions(uid=NOBODY, gid=NOGROUP)))
    st = os.lstat(path)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (NOBODY, NOGROUP, 0o660)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_group_only_keeps_the_owner(sockdir: Path, listeners: list[Listener]) -> None:
    path = sockdir / "app.sock"
    listeners.append(bind(UnixAddress(str(path)), BindOptions(gid=NOGROUP)))
    st = os.lstat(path)
    assert (st.st_uid, st.st_gid) == (os.geteuid(), NOGROUP)


def _connect_as_nobody(path: Path) -> bool:
    """Whether uid/gid nobody may connect (checked in a forked child that drops to it)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.setgroups([])
            os.setgid(NOGROUP)
            os.setuid(NOBODY)
            os._exit(0 if connectable(path) else 1)
        finally:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    assert code in (0, 1)
    return code == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become nobody")
def test_mode_and_owner_decide_who_may_connect(sockdir: Path, listeners: list[Listener]) -> None:
    sockdir.chmod(0o755)
    mine = sockdir / "root.sock"
    theirs = sockdir / "nobody.sock"
    listeners.append(bind(UnixAddress(str(mine)), BindOptions(mode=0o660)))
    listeners.append(bind(UnixAddress(str(theirs)), BindOptions(mode=0o600, uid=NOBODY)))
    assert not _connect_as_nobody(mine)
    assert _connect_as_nobody(theirs)


def test_chown_failure_leaves_nothing_behind(sockdir: Path) -> None:
    if os.geteuid() == 0:
        sockdir.chmod(0o777 | stat.S_ISVTX)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child: an unprivileged process cannot give files away
            try:
                os.setgroups([])
                os.setgid(NOGROUP)
                os.setuid(NOBODY)
                try:
                    bind(UnixAddress(str(sockdir / "a.sock")), BindOptions(uid=0))
                except SocketError as exc:
                    ok = "cannot give socket" in str(exc) and exc.errno == errno.EPERM
                    os._exit(0 if ok else 3)
                os._exit(4)
            finally:
                os._exit(5)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    else:
        with pytest.raises(SocketError, match="cannot give socket"):
            bind(UnixAddress(str(sockdir / "a.sock")), BindOptions(uid=0))
    assert os.listdir(sockdir) == []


# --------------------------------------------------------------------------- UNIX: existing paths


def test_live_socket_is_refused_and_left_alone(sockdir: Path) -> None:
    path = sockdir / "app.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(str(path))
        live.listen(8)
        before = os.lstat(path).st_ino
        with pytest.raises(SocketError) as info:
            bind(UnixAddress(str(path)))
        assert str(info.value).startswith(f"socket {path} is already in use")
        assert info.value.errno == errno.EADDRINUSE
        assert info.value.address == str(path)
        assert os.lstat(path).st_ino == before
        assert connectable(path)
    assert sorted(os.listdir(sockdir)) == ["app.sock"]


def test_live_socket_with_a_full_backlog_is_refused_without_hanging(sockdir: Path) -> None:
    path = sockdir / "app.sock"
    clients: list[socket.socket] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(str(path))
        live.listen(0)
        try:
            for _ in range(64):
                client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                client.setblocking(False)
                clients.append(client)
                try:
                    client.connect(str(path))
                except BlockingIOError:
                    break
            else:
                pytest.fail("backlog never filled")
            with pytest.raises(SocketError, match="already in use"):
                bind(UnixAddress(str(path)))
        finally:
            for client in clients:
                client.close()


def test_stale_socket_is_replaced(sockdir: Path, listeners: list[Listener]) -> None:
    path = sockdir / "app.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.listen(1)
    dead.close()  # the file stays, nobody listens: connect() is refused
    assert not connectable(path)
    listener = bind(UnixAddress(str(path)), BindOptions(mode=0o600))
    listeners.append(listener)
    assert listener.identity == (os.lstat(path).st_dev, os.lstat(path).st_ino)
    assert mode_of(path) == 0o600
    assert connectable(path)
    assert os.listdir(sockdir) == ["app.sock"]


def test_datagram_socket_in_the_way_is_refused(sockdir: Path) -> None:
    path = sockdir / "app.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as dgram:
        dgram.bind(str(path))
        with pytest.raises(SocketError, match="datagram or seqpacket socket"):
            bind(UnixAddress(str(path)))
        assert os.path.exists(path)


def test_regular_file_is_refused_and_untouched(sockdir: Path) -> None:
    path = sockdir / "app.sock"
    path.write_text("precious data")
    with pytest.raises(SocketError) as info:
        bind(UnixAddress(str(path)))
    assert f"refusing to replace {path}: it is a regular file" in str(info.value)
    assert info.value.hint is not None
    assert path.read_text() == "precious data"
    assert os.listdir(sockdir) == ["app.sock"]


def test_directory_is_refused_and_untouched(sockdir: Path) -> None:
    path = sockdir / "app.sock"
    path.mkdir()
    with pytest.raises(SocketError, match="it is a directory"):
        bind(UnixAddress(str(path)))
    assert path.is_dir()


def test_fifo_is_refused(sockdir: Path) -> None:
    path = sockdir / "app.sock"
    os.mkfifo(path)
    with pytest.raises(SocketError, match="named pipe"):
        bind(UnixAddress(str(path)))
    assert stat.S_ISFIFO(os.lstat(path).st_mode)


@pytest.mark.parametrize("pointee", ["stale-socket", "file", "nowhere"])
def test_symlink_is_refused_never_followed(sockdir: Path, pointee: str) -> None:
    path = sockdir / "app.sock"
    target = sockdir / "target"
    if pointee == "stale-socket":
        dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dead.bind(str(target))
        dead.close()
    elif pointee == "file":
        target.write_text("keep")
    path.symlink_to(target)
    with pytest.raises(SocketError, match="it is a symbolic link"):
        bind(UnixAddress(str(path)))
    assert path.is_symlink()
    assert os.readlink(path) == str(target)
    if pointee == "file":
        assert target.read_text() == "keep"
    if pointee == "stale-socket":
        assert stat.S_ISSOCK(os.lstat(target).st_mode)


def test_world_writable_directory_without_sticky_bit_is_refused(sockdir: Path) -> None:
    sockdir.chmod(0o777)
    with pytest.raises(SocketError, match="world-writable without the sticky bit") as info:
        bind(UnixAddress(str(sockdir / "app.sock")))
    assert info.value.hint is not None and "chmod +t" in info.value.hint
    assert os.listdir(sockdir) == []


def test_world_writable_directory_with_sticky_bit_is_fine(
    sockdir: Path, listeners: list[Listener]
) -> None:
    sockdir.chmod(0o777 | stat.S_ISVTX)
    listeners.append(bind(UnixAddress(str(sockdir / "app.sock"))))
    assert connectable(sockdir / "app.sock")


def test_missing_directory_is_a_socket_error_naming_it(sockdir: Path) -> None:
    with pytest.raises(SocketError, match="cannot use directory") as info:
        bind(UnixAddress(str(sockdir / "missing" / "app.sock")))
    assert info.value.errno == errno.ENOENT
    assert str(sockdir / "missing") in str(info.value)


def test_too_long_path_is_a_config_error_with_the_length() -> None:
    path = "/tmp/" + "y" * 110
    with pytest.raises(ConfigError, match=r"is 115 bytes long, the limit is 107"):
        bind(UnixAddress(path))


def test_a_path_of_the_full_107_bytes_binds(
    sockdir: Path, listeners: list[Listener]
) -> None:
    deep = sockdir / ("d" * (100 - len(str(sockdir))))
    deep.mkdir()
    path = deep / "s"
    assert len(str(path)) <= 107
    listeners.append(bind(UnixAddress(str(path)), BindOptions(mode=0o600)))
    assert mode_of(path) == 0o600
    assert connectable(path)
    assert os.listdir(deep) == ["s"]


def test_relative_path_is_relative_to_cwd_and_close_still_finds_it(
    sockdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(sockdir)
    listener = bind(parse_address("./app.sock"))
    assert connectable(sockdir / "app.sock")
    monkeypatch.chdir("/")
    listener.close()
    assert os.listdir(sockdir) == []


def test_path_ending_in_slash_is_refused(sockdir: Path) -> None:
    with pytest.raises(ConfigError, match="names a directory"):
        bind(UnixAddress(str(sockdir) + "/"))


# --------------------------------------------------------------------------- UNIX: close


def test_close_unlinks_our_socket(sockdir: Path) -> None:
    path = sockdir / "app.sock"
    listener = bind(UnixAddress(str(path)))
    listener.close()
    assert not path.exists()
    listener.close()  # twice is fine


def test_close_without_unlink_keeps_the_file(sockdir: Path) -> None:
    path = sockdir / "app.sock"
    listener = bind(UnixAddress(str(path)))
    listener.close(unlink=False)
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    assert not connectable(path)


def test_close_leaves_a_file_that_replaced_ours(sockdir: Path) -> None:
    path = sockdir / "app.sock"
    listener = bind(UnixAddress(str(path)))
    os.unlink(path)
    path.write_text("someone else's")
    listener.close()
    assert path.read_text() == "someone else's"


def test_close_leaves_a_newer_instances_socket(sockdir: Path) -> None:
    path = sockdir / "app.sock"
    old = bind(UnixAddress(str(path)))
    old.sock.close()  # old instance died without cleaning up: its file is now stale
    # Keep the old inode allocated so the new file cannot reuse its number (tmpfs does).
    os.link(path, sockdir / "old-inode")
    new = bind(UnixAddress(str(path)))  # takes over the stale path
    try:
        old.close()
        assert connectable(path)
    finally:
        new.close()
    assert not path.exists()


def test_bound_socket_is_not_inheritable_and_has_the_backlog(
    sockdir: Path, listeners: list[Listener]
) -> None:
    path = sockdir / "app.sock"
    listener = bind(UnixAddress(str(path)), BindOptions(backlog=7))
    listeners.append(listener)
    assert not os.get_inheritable(listener.fileno())
    bound_name = listener.sock.getsockname()
    assert ss_send_q(["-x", "src", bound_name]) == 7


def test_default_backlog_is_1024(sockdir: Path, listeners: list[Listener]) -> None:
    listener = bind(UnixAddress(str(sockdir / "app.sock")))
    listeners.append(listener)
    assert ss_send_q(["-x", "src", listener.sock.getsockname()]) == 1024


def test_negative_backlog_is_refused(sockdir: Path) -> None:
    with pytest.raises(ConfigError, match="backlog"):
        bind(UnixAddress(str(sockdir / "a.sock")), BindOptions(backlog=-1))


# --------------------------------------------------------------------------- TCP


def test_tcp_ipv4_bind_with_backlog_and_reuseaddr(listeners: list[Listener]) -> None:
    listener = bind(TcpAddress("127.0.0.1", 0), BindOptions(backlog=5))
    listeners.append(listener)
    host, port = listener.sock.getsockname()
    assert host == "127.0.0.1"
    assert listener.sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
    assert listener.identity is None
    assert not os.get_inheritable(listener.fileno())
    assert ss_send_q(["-t", "sport", f"= :{port}"]) == 5
    with socket.create_connection((host, port), timeout=2):
        pass


@pytest.mark.parametrize("address", ["127.0.0.1:0", "[::1]:0"])
def test_tcp_listener_hands_over_connections_only_once_their_request_came(
    listeners: list[Listener], address: str
) -> None:
    """TCP_DEFER_ACCEPT: a connection whose first bytes have not come is not accepted yet (a
    web server that writes its request a moment after connecting is then accepted with it),
    while one that sent its request is accepted with the bytes already there."""
    listener = bind(parse_address(address))
    listeners.append(listener)
    sock = listener.sock
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT) > 0
    sock.setblocking(False)
    host, port = sock.getsockname()[:2]
    with socket.create_connection((host, port), timeout=2) as silent:
        time.sleep(0.1)
        with pytest.raises(BlockingIOError):
            sock.accept()  # connected, nothing sent: not handed over yet
        with socket.create_connection((host, port), timeout=2) as talker:
            talker.sendall(b"\x01\x01")
            deadline = time.monotonic() + 2
            while True:
                try:
                    conn, peer = sock.accept()
                except BlockingIOError:
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
                    continue
                if peer[:2] == talker.getsockname()[:2]:
                    break
                conn.close()  # the silent one, after its deferral ran out (a stalled machine)
            with conn:
                conn.settimeout(2)
                assert conn.recv(2, socket.MSG_DONTWAIT) == b"\x01\x01"  # already there
        silent.sendall(b"\x01")


@pytest.mark.parametrize("address", ["127.0.0.1:0", "[::1]:0"])
def test_tcp_connections_are_accepted_without_nagle(
    listeners: list[Listener], address: str
) -> None:
    """TCP_NODELAY on the listener, inherited by what it accepts: a response that ends in a
    second small write (END_REQUEST after a streamed body) waited 40 ms for the web server's
    delayed ACK on a kept connection."""
    listener = bind(parse_address(address))
    listeners.append(listener)
    host, port = listener.sock.getsockname()[:2]
    with socket.create_connection((host, port), timeout=2) as client:
        client.sendall(b"\x01")
        conn, _ = listener.sock.accept()
        with conn:
            assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


def test_adopted_tcp_socket_keeps_its_owners_defer_accept() -> None:
    """An inherited socket is its owner's (spawn-fcgi, systemd: DeferAcceptSec=)."""
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.bind(("127.0.0.1", 0))
    raw.listen(8)
    fd = os.dup(raw.fileno())
    raw.close()
    with adopt_fd(fd) as sock:
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT) == 0


def test_tcp_ipv6_loopback_is_v6only(listeners: list[Listener]) -> None:
    listener = bind(parse_address("[::1]:0"))
    listeners.append(listener)
    assert listener.sock.family == socket.AF_INET6
    assert listener.sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    port = listener.sock.getsockname()[1]
    with socket.create_connection(("::1", port), timeout=2):
        pass


def test_tcp_any_ipv6_does_not_take_ipv4(listeners: list[Listener]) -> None:
    # The kernel picks the port; an IPv4 client socket elsewhere on this machine may happen to
    # hold the same number as its local port, so a few picks are allowed before failing.
    for _attempt in range(5):
        listener = bind(TcpAddress("::", 0))
        listeners.append(listener)
        port = listener.sock.getsockname()[1]
        # IPv4 on the same port is still free: the v6 socket did not claim it
        try:
            other = bind(TcpAddress("127.0.0.1", port))
        except SocketError as exc:
            assert exc.errno == errno.EADDRINUSE
            continue
        listeners.append(other)
        return
    pytest.fail("IPv4 bind failed on five ports the IPv6 wildcard socket held")


def test_localhost_resolves(listeners: list[Listener]) -> None:
    listener = bind(TcpAddress("localhost", 0))
    listeners.append(listener)
    assert listener.sock.getsockname()[0] in ("127.0.0.1", "::1")


def test_port_in_use_is_a_socket_error_naming_host_and_port(listeners: list[Listener]) -> None:
    first = bind(TcpAddress("127.0.0.1", 0))
    listeners.append(first)
    port = first.sock.getsockname()[1]
    with pytest.raises(SocketError) as info:
        bind(TcpAddress("127.0.0.1", port))
    assert f"cannot bind 127.0.0.1:{port}" in str(info.value)
    assert info.value.errno == errno.EADDRINUSE
    assert info.value.address == f"127.0.0.1:{port}"
    assert info.value.hint is not None


def test_unavailable_address_is_a_socket_error() -> None:
    with pytest.raises(SocketError) as info:
        bind(TcpAddress("192.0.2.1", 9000))  # TEST-NET-1, not on this machine
    assert "192.0.2.1:9000" in str(info.value)
    assert info.value.errno == errno.EADDRNOTAVAIL


def test_unresolvable_host_is_a_bad_value_exit_2() -> None:
    with pytest.raises(ConfigError, match=r"cannot resolve host 'no-such-host\.invalid'") as info:
        bind(TcpAddress("no-such-host.invalid", 9000))
    assert info.value.exit_code == 2


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become nobody")
def test_privileged_port_as_non_root_is_eacces() -> None:
    start = int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    if start <= 80:
        pytest.skip("unprivileged ports start at or below 80 here")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.setgroups([])
            os.setgid(NOGROUP)
            os.setuid(NOBODY)
            try:
                bind(TcpAddress("127.0.0.1", 80))
            except SocketError as exc:
                ok = exc.errno == errno.EACCES and "127.0.0.1:80" in str(exc)
                os._exit(0 if ok else 3)
            os._exit(4)
        finally:
            os._exit(5)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


# --------------------------------------------------------------------------- adopting fds


def test_adopt_fd_accepts_a_listener_with_its_family_and_type() -> None:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as original:
        original.bind(("::1", 0))
        original.listen(4)
        fd = os.dup(original.fileno())
        adopted = adopt_fd(fd)
        try:
            assert adopted.fileno() == fd
            assert adopted.family == socket.AF_INET6
            assert adopted.type == socket.SOCK_STREAM
            assert adopted.getsockname() == original.getsockname()
            assert is_listening_socket(fd)
        finally:
            adopted.close()


def test_bind_of_an_fd_address_adopts_it(sockdir: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as original:
        original.bind(str(sockdir / "a.sock"))
        original.listen(1)
        fd = os.dup(original.fileno())
        listener = bind(FdAddress(fd))
        assert listener.identity is None
        assert listener.sock.family == socket.AF_UNIX
        listener.close()
        assert (sockdir / "a.sock").exists()  # adopted sockets' files are not ours to remove


def test_adopt_fd_refuses_a_connected_socket_and_leaves_it_open() -> None:
    a, b = socket.socketpair()
    with a, b:
        with pytest.raises(SocketError, match=f"fd {a.fileno()} is not a listening socket"):
            adopt_fd(a.fileno())
        os.fstat(a.fileno())  # still open
        assert not is_listening_socket(a.fileno())


def test_adopt_fd_refuses_a_pipe() -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(
            SocketError, match=rf"fd {r} is not a listening socket \(it is a pipe\)"
        ):
            adopt_fd(r)
        os.fstat(r)
        assert not is_listening_socket(r)
    finally:
        os.close(r)
        os.close(w)


def test_adopt_fd_refuses_a_closed_fd() -> None:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(SocketError, match=f"fd {r} is not open") as info:
        adopt_fd(r)
    assert info.value.errno == errno.EBADF
    assert not is_listening_socket(r)


def test_adopt_fd_refuses_a_udp_socket() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        with pytest.raises(SocketError, match="not a listening socket"):
            adopt_fd(udp.fileno())


def test_adopt_fd_refuses_a_regular_file(tmp_path: Path) -> None:
    with open(tmp_path / "f", "w") as f:
        with pytest.raises(SocketError, match="regular file"):
            adopt_fd(f.fileno())
        assert not is_listening_socket(f.fileno())


def test_is_listening_socket_never_raises() -> None:
    assert not is_listening_socket(-1)
    assert not is_listening_socket(1 << 20)


# --------------------------------------------------------------------------- loopback


@pytest.mark.parametrize(
    ("addr", "expected"),
    [
        (UnixAddress("/run/a.sock"), True),
        (TcpAddress("127.0.0.1", 9000), True),
        (TcpAddress("127.1.2.3", 9000), True),
        (TcpAddress("::1", 9000), True),
        (TcpAddress("::ffff:127.0.0.1", 9000), True),
        (TcpAddress("localhost", 9000), True),
        (TcpAddress("0.0.0.0", 9000), False),
        (TcpAddress("::", 9000), False),
        (TcpAddress("192.0.2.1", 9000), False),
        (TcpAddress("no-such-host.invalid", 9000), False),
        (FdAddress(1 << 20), False),
    ],
)
def test_is_loopback(addr: sockets.Address, expected: bool) -> None:
    assert is_loopback(addr) is expected


def test_is_loopback_of_an_fd_checks_its_bound_address() -> None:
    with socket.socket() as lo, socket.socket() as anyaddr:
        lo.bind(("127.0.0.1", 0))
        anyaddr.bind(("0.0.0.0", 0))
        assert is_loopback(FdAddress(lo.fileno()))
        assert not is_loopback(FdAddress(anyaddr.fileno()))
        os.fstat(lo.fileno())  # not closed by the check


def test_tcp_address_without_host_is_refused() -> None:
    with pytest.raises(ConfigError, match="has no host"):
        bind(TcpAddress("", 9000))


def test_unwritable_directory_is_a_socket_error_with_a_hint(sockdir: Path) -> None:
    sockdir.chmod(0o555)

    def check() -> bool:
        try:
            bind(UnixAddress(str(sockdir / "a.sock")))
        except SocketError as exc:
            return "Permission denied" in str(exc) and "writable" in (exc.hint or "")
        return False

    if os.geteuid() != 0:
        assert check()
        return
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child: root may write anywhere, nobody may not
        try:
            os.setgroups([])
            os.setgid(NOGROUP)
            os.setuid(NOBODY)
            os._exit(0 if check() else 3)
        finally:
            os._exit(5)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_file_that_appears_while_binding_is_not_clobbered(
    sockdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Race: the path was free when checked, then someone created a file there."""
    import fcgispawn.sockets as sockets_mod

    target = sockdir / "app.sock"
    real_remove = sockets_mod._remove_stale

    def racing_remove(*args: Any, **kwargs: Any) -> None:
        real_remove(*args, **kwargs)
        target.write_text("arrived meanwhile")

    monkeypatch.setattr(sockets_mod, "_remove_stale", racing_remove)
    with pytest.raises(SocketError, match="Address already in use"):
        bind(UnixAddress(str(target)))
    assert target.read_text() == "arrived meanwhile"
    assert os.listdir(sockdir) == ["app.sock"]


def test_a_live_listener_that_appears_while_binding_is_not_taken_over(
    sockdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fcgispawn.sockets as sockets_mod

    target = sockdir / "app.sock"
    rival = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    real_remove = sockets_mod._remove_stale

    def racing_remove(*args: Any, **kwargs: Any) -> None:
        real_remove(*args, **kwargs)
        rival.bind(str(target))
        rival.listen(1)

    monkeypatch.setattr(sockets_mod, "_remove_stale", racing_remove)
    with rival, pytest.raises(SocketError, match="Address already in use"):
        bind(UnixAddress(str(target)))
    assert os.listdir(sockdir) == ["app.sock"]


def test_a_stale_socket_removed_while_binding_is_fine(
    sockdir: Path, monkeypatch: pytest.MonkeyPatch, listeners: list[Listener]
) -> None:
    target = sockdir / "app.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(target))
    dead.close()
    real_connect = socket.socket.connect
    calls = [0]

    def vanishing_connect(self: socket.socket, address: Any) -> None:
        calls[0] += 1
        if calls[0] == 1 and address == str(target):  # the liveness probe
            os.unlink(target)
        real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", vanishing_connect)
    listeners.append(bind(UnixAddress(str(target))))
    monkeypatch.undo()
    assert calls[0] == 1
    assert connectable(target)
    assert os.listdir(sockdir) == ["app.sock"]

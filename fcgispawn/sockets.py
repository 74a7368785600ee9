"""Listen addresses, binding with backlog/mode/owner, and adopting inherited listening sockets.

Why this module is careful about UNIX socket files:

* A socket file must never be reachable with a wider mode, or with another owner, than the one
  asked for -- not even for the microseconds between ``bind()`` and ``chmod()``. A web server's
  group is usually allowed in, everybody else must never be. So the socket is bound while the
  umask is fully restrictive (the file appears with mode 0000), then chowned and chmodded, and
  only then ``listen()``-ed: until listen() nobody can connect at all. It is bound at its final
  name (not a temporary one renamed into place) because the kernel keeps the bind name as the
  socket's address: ``ss -lx`` and ``getsockname()`` must show the path the user gave.
* A path is only ever replaced when it is a socket nobody listens on (``connect()`` is refused).
  A live listener is never taken over, and a regular file, directory or symlink is never
  removed: a typo in ``-s`` must not destroy data.
* ``Listener.close()`` removes the file only if it is still the inode we bound, so a newer
  instance that took over the path is left alone.

Nothing here prints or exits; failures are :class:`SocketError` or :class:`ConfigError` naming
the value at fault. Imports nothing of fcgispawn but :mod:`fcgispawn.errors`.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
import stat
from dataclasses import dataclass, field

from fcgispawn.errors import ConfigError, SocketError

__all__ = [
    "SUN_PATH_MAX",
    "Address",
    "BindOptions",
    "FdAddress",
    "Listener",
    "TcpAddress",
    "UnixAddress",
    "adopt_fd",
    "bind",
    "format_address",
    "is_listening_socket",
    "is_loopback",
    "parse_address",
]

#: Longest path a client can connect to: ``sizeof(sun_path)`` (108 on Linux) minus the NUL.
SUN_PATH_MAX = 107

_ADDRESS_FORMS = "use unix:PATH, /abs/path, ./rel/path, HOST:PORT, [IPV6]:PORT or fd:N"
#: TCP_DEFER_ACCEPT on the TCP listeners fcgispawn binds (seconds): the kernel hands a
#: connection to accept() only once its first bytes came. FastCGI's client always speaks first,
#: and a web server over TCP connects, waits to be writable, then writes: without it ~28 % of
#: connections from nginx over loopback TCP were accepted before their request and cost the
#: worker a wait and a second read each. A peer that stays silent reaches accept() after about
#: this long anyway (and is parked, as ever). Inherited sockets keep their owner's setting
#: (systemd: DeferAcceptSec= in the .socket unit).
DEFER_ACCEPT_SECONDS = 1


@dataclass(frozen=True, slots=True)
class UnixAddress:
    """A UNIX stream socket path (absolute, or relative to the working directory at bind)."""

    path: str


@dataclass(frozen=True, slots=True)
class TcpAddress:
    """A TCP host (IPv4/IPv6 literal or a name such as ``localhost``) and port."""

    host: str
    port: int


@dataclass(frozen=True, slots=True)
class FdAddress:
    """An already-open listening socket, e.g. inherited from lighttpd or systemd."""

    fd: int


Address = UnixAddress | TcpAddress | FdAddress


@dataclass(frozen=True, slots=True)
class BindOptions:
    """How to bind.

    ``mode`` is applied exactly, whatever the umask (``None``: what a plain ``bind()`` gives,
    ``0o777 & ~umask``). ``uid``/``gid`` give the socket file to an owner (``None``: unchanged).
    ``mode``/``uid``/``gid`` only apply to UNIX sockets.
    """

    backlog: int = 1024
    mode: int | None = 0o660
    uid: int | None = None
    gid: int | None = None


@dataclass(slots=True)
class Listener:
    """A listening socket and, for UNIX sockets, the identity of the file we created.

    ``identity`` is ``(st_dev, st_ino)`` of our socket file (``None`` for TCP and adopted
    fds); ``path`` is its absolute path at bind time, so ``close()`` still finds it after a
    ``chdir()``.
    """

    sock: socket.socket
    address: Address
    identity: tuple[int, int] | None
    path: str | None = field(default=None)

    def fileno(self) -> int:
        """The listening fd (what the supervisor dup2's to fd 0 in a worker)."""
        return self.sock.fileno()

    def close(self, *, unlink: bool = True) -> None:
        """Close the socket; with ``unlink`` remove the socket file if it is still ours.

        The file is removed only when ``(st_dev, st_ino)`` still match what we bound: if
        another instance replaced the path since, its socket stays. Forked children that
        inherited this object must pass ``unlink=False``. Safe to call twice.
        """
        if unlink and self.identity is not None and self.path is not None:
            with contextlib.suppress(OSError):
                st = os.lstat(self.path)
                if stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == self.identity:
                    os.unlink(self.path)
            self.identity = None
        self.sock.close()


# --------------------------------------------------------------------------- addresses


def parse_address(text: str) -> Address:
    """Parse ``unix:PATH``, ``/abs``, ``./rel``, ``HOST:PORT``, ``[IPV6]:PORT`` or ``fd:N``.

    Raises :class:`ConfigError` naming the value. Relative socket paths must start with ``./``
    or ``../`` (or use ``unix:``) so that ``localhost:9000`` is never mistaken for a file.
    """
    if not text:
        raise ConfigError("empty socket address", hint=_ADDRESS_FORMS)
    if "\0" in text:
        raise ConfigError(f"socket address {text!r} contains a NUL byte")
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path:
            raise ConfigError(f"socket address {text!r} has an empty path", hint=_ADDRESS_FORMS)
        return _unix_address(path)
    if text.startswith(("/", "./", "../")):
        return _unix_address(text)
    if text.startswith("fd:"):
        digits = text[len("fd:") :]
        if not digits.isascii() or not digits.isdigit():
            raise ConfigError(
                f"invalid file descriptor {digits!r} in {text!r}", hint="use fd:N, e.g. fd:3"
            )
        return FdAddress(int(digits))
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise ConfigError(
                f"invalid IPv6 address {text!r}", hint="write it as [ADDR]:PORT, e.g. [::1]:9000"
            )
        host = text[1:end]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(
                f"{host!r} in {text!r} is not a valid IPv6 address",
                hint="write it as [ADDR]:PORT, e.g. [::1]:9000",
            ) from None
        return TcpAddress(host, _parse_port(text[end + 2 :], text))
    if ":" in text:
        host, _, port = text.rpartition(":")
        if ":" in host:
            raise ConfigError(
                f"ambiguous address {text!r}",
                hint="write IPv6 addresses in brackets, e.g. [::1]:9000",
            )
        if not host:
            raise ConfigError(f"socket address {text!r} has no host", hint=_ADDRESS_FORMS)
        return TcpAddress(host, _parse_port(port, text))
    raise ConfigError(f"cannot parse socket address {text!r}", hint=_ADDRESS_FORMS)


def _unix_address(path: str) -> UnixAddress:
    """Check the path fits in ``sun_path``: clients connect by this exact name."""
    size = len(os.fsencode(path))
    if size > SUN_PATH_MAX:
        raise ConfigError(
            f"socket path {path!r} is {size} bytes long, the limit is {SUN_PATH_MAX}",
            hint="choose a shorter path",
        )
    return UnixAddress(path)


def _parse_port(port: str, text: str) -> int:
    """A decimal port 0..65535; refused, never truncated (spawn-fcgi reads ``17x`` as 17)."""
    if not port.isascii() or not port.isdigit() or int(port) > 65535:
        raise ConfigError(
            f"invalid port {port!r} in {text!r}", hint="a port is a number from 0 to 65535"
        )
    return int(port)


def format_address(addr: Address) -> str:
    """The inverse of :func:`parse_address` (``parse_address(format_address(a)) == a``)."""
    match addr:
        case UnixAddress(path):
            return f"unix:{path}"
        case TcpAddress(host, port):
            if ":" in host:
                return f"[{host}]:{port}"
            return f"{host}:{port}"
        case FdAddress(fd):
            return f"fd:{fd}"
    raise TypeError(f"not an address: {addr!r}")  # pragma: no cover


def _describe(addr: Address) -> str:
    """How error messages name an address: UNIX sockets by their path."""
    if isinstance(addr, UnixAddress):
        return addr.path
    return format_address(addr)


def is_loopback(addr: Address) -> bool:
    """True when only this machine can reach the address.

    UNIX sockets are local by nature; TCP hosts are resolved (``localhost`` counts when every
    address it resolves to is loopback); an fd is checked by its bound address. Never raises.
    """
    match addr:
        case UnixAddress():
            return True
        case TcpAddress(host, _):
            return _host_is_loopback(host)
        case FdAddress(fd):
            try:
                sock = socket.socket(fileno=fd)
            except OSError:
                return False
            try:
                if sock.family == socket.AF_UNIX:
                    return True
                if sock.family in (socket.AF_INET, socket.AF_INET6):
                    return _ip_is_loopback(str(sock.getsockname()[0]))
                return False
            except OSError:
                return False
            finally:
                sock.detach()
    return False  # pragma: no cover


def _ip_is_loopback(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def _host_is_loopback(host: str) -> bool:
    if _ip_is_loopback(host):
        return True
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return False
    return bool(infos) and all(_ip_is_loopback(str(info[4][0])) for info in infos)


# --------------------------------------------------------------------------- bind


def bind(address: Address, options: BindOptions = BindOptions()) -> Listener:
    """Create a listening socket for ``address``; :class:`SocketError` says why it could not.

    The socket is non-inheritable (Python's default): the supervisor dup2's it to fd 0 in
    each worker. An :class:`FdAddress` is adopted as it is (backlog, mode, owner untouched).
    """
    if options.backlog < 0:
        raise ConfigError(f"invalid backlog {options.backlog}", hint="use a number >= 0")
    match address:
        case UnixAddress():
            return _bind_unix(address, options)
        case TcpAddress():
            return _bind_tcp(address, options)
        case FdAddress(fd):
            return Listener(adopt_fd(fd), address, None)
    raise TypeError(f"not an address: {address!r}")  # pragma: no cover


def _bind_tcp(address: TcpAddress, options: BindOptions) -> Listener:
    name = format_address(address)
    if not address.host:
        raise ConfigError(f"socket address {name!r} has no host", hint=_ADDRESS_FORMS)
    if not 0 <= address.port <= 65535:
        raise ConfigError(f"invalid port {address.port} in {name}", hint="use 0..65535")
    try:
        infos = socket.getaddrinfo(
            address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICSERV
        )
    except (socket.gaierror, UnicodeError) as exc:
        # Not an address and no name that resolves: a bad value (exit 2), as spawn-fcgi's
        # "'foo' is not a valid IP address".
        raise ConfigError(
            f"cannot resolve host {address.host!r} of {name}: {_strerror(exc)}",
            hint="give an IP address, e.g. -a 127.0.0.1 or -a ::1",
        ) from None
    except OSError as exc:
        raise SocketError(
            f"cannot resolve host {address.host!r} of {name}: {_strerror(exc)}",
            address=name,
            errno=getattr(exc, "errno", None),
        ) from None
    # Prefer IPv4: "localhost" usually means 127.0.0.1 to the web server in front. The next
    # candidate is tried only when an address is not available here (e.g. IPv6 disabled).
    infos.sort(key=lambda info: 0 if info[0] == socket.AF_INET else 1)
    last: OSError | None = None
    for family, socktype, proto, _canon, sockaddr in infos:
        sock = socket.socket(family, socktype, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                # One socket, one family: "::" must not silently also take IPv4 connections.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(sockaddr)
            with contextlib.suppress(OSError, AttributeError):  # an optimisation, not a need
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, DEFER_ACCEPT_SECONDS)
            # Accepted connections inherit it: a COMMAND's response that ends in a small
            # second write (END_REQUEST) must not wait for a delayed ACK (Nagle), 40 ms.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.listen(options.backlog)
        except OSError as exc:
            sock.close()
            last = exc
            if exc.errno == errno.EADDRNOTAVAIL:
                continue
            break
        return Listener(sock, address, None)
    assert last is not None
    raise SocketError(
        f"cannot bind {name}: {_strerror(last)}",
        address=name,
        errno=last.errno,
        hint=_TCP_HINTS.get(last.errno or 0),
    )


_TCP_HINTS = {
    errno.EADDRINUSE: "another process listens on this port; stop it or choose another port",
    errno.EACCES: "ports below 1024 need root or CAP_NET_BIND_SERVICE",
    errno.EADDRNOTAVAIL: "no local interface has this address",
}


def _strerror(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


def _bind_unix(address: UnixAddress, options: BindOptions) -> Listener:
    path = address.path
    if options.mode is not None and not 0 <= options.mode <= 0o777:
        raise ConfigError(
            f"invalid socket mode {options.mode:#o} for {path}",
            hint="a socket mode is an octal number from 0 to 0777",
        )
    _unix_address(path)  # the length check, for addresses not made by parse_address
    directory, base = os.path.split(path)
    if not base:
        raise ConfigError(f"socket path {path!r} names a directory, not a file")
    directory = directory or "."
    try:
        dirfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise SocketError(
            f"cannot use directory {directory} for socket {path}: {_strerror(exc)}",
            address=path,
            errno=exc.errno,
            hint="create the directory first" if exc.errno == errno.ENOENT else None,
        ) from None
    try:
        _check_directory(dirfd, directory, path)
        return _bind_unix_in(dirfd, directory, base, address, options)
    finally:
        os.close(dirfd)


def _check_directory(dirfd: int, directory: str, path: str) -> None:
    """Refuse a world-writable directory without the sticky bit: anyone could swap our socket."""
    st = os.fstat(dirfd)
    if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
        raise SocketError(
            f"refusing to create socket {path}: directory {directory} is world-writable "
            "without the sticky bit",
            address=path,
            hint=f"use a directory only trusted users can write to, or chmod +t {directory}",
        )


def _bind_unix_in(
    dirfd: int, directory: str, base: str, address: UnixAddress, options: BindOptions
) -> Listener:
    """Bind at the final path, never wider than asked, never over a live or foreign file.

    The socket is bound at its real name, not at a temporary one renamed into place: the
    kernel records the bind name as the socket's address, and ``ss -lx``, ``getsockname()``
    and every operator's grep must show the path the user gave. The mode is still never wider
    than asked: the file is created with mode 0000 (umask 0777 for the one bind call), given
    its owner, then its mode, and only then does listen() let anyone connect.
    """
    path = address.path
    mode = options.mode if options.mode is not None else 0o777 & ~_current_umask()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    identity: tuple[int, int] | None = None
    try:
        _remove_stale(dirfd, base, path)
        # os.umask is process-wide: any thread creating a file right now would get mode 0000
        # too. It is held for the single bind() call only, at startup, before threads exist.
        old_umask = os.umask(0o777)
        try:
            sock.bind(path)
        finally:
            os.umask(old_umask)
        st = os.lstat(base, dir_fd=dirfd)
        identity = (st.st_dev, st.st_ino)
        if options.uid is not None or options.gid is not None:
            uid = -1 if options.uid is None else options.uid
            gid = -1 if options.gid is None else options.gid
            try:
                os.chown(base, uid, gid, dir_fd=dirfd, follow_symlinks=False)
            except OSError as exc:
                raise SocketError(
                    f"cannot give socket {path} to uid {uid} gid {gid}: {_strerror(exc)}",
                    address=path,
                    errno=exc.errno,
                    hint="changing a socket's owner needs root"
                    if exc.errno == errno.EPERM
                    else None,
                ) from None
        # Owner first, then mode: the permissions are never granted to the wrong owner.
        # (Linux has no lchmod; the identity check just below catches a swapped file.)
        os.chmod(base, mode, dir_fd=dirfd)
        st = os.lstat(base, dir_fd=dirfd)
        if (st.st_dev, st.st_ino) != identity or not stat.S_ISSOCK(st.st_mode):
            raise SocketError(f"socket file {path} was replaced while binding it", address=path)
        sock.listen(options.backlog)
    except BaseException as exc:
        sock.close()
        if identity is not None:
            _unlink_if(dirfd, base, identity)
        if isinstance(exc, OSError):
            hint = None
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                hint = f"the directory {directory} must be writable by this user"
            elif exc.errno == errno.EADDRINUSE:
                hint = "another process created it meanwhile; is a second instance starting?"
            raise SocketError(
                f"cannot bind socket {path}: {_strerror(exc)}",
                address=path,
                errno=exc.errno,
                hint=hint,
            ) from None
        raise
    return Listener(sock, address, identity, os.path.abspath(path))


def _remove_stale(dirfd: int, base: str, path: str) -> None:
    """Unlink ``base`` only if it is a socket nobody listens on, and still the one probed."""
    try:
        st = os.lstat(base, dir_fd=dirfd)
    except FileNotFoundError:
        return
    _refuse_unless_dead_socket(st, path)
    _unlink_if(dirfd, base, (st.st_dev, st.st_ino))


def _refuse_unless_dead_socket(st: os.stat_result, path: str) -> None:
    """Raise unless ``path`` (already lstat'ed) is a socket nobody listens on."""
    if not stat.S_ISSOCK(st.st_mode):
        kind = _file_kind(st.st_mode)
        raise SocketError(
            f"refusing to replace {path}: it is a {kind}, not a socket",
            address=path,
            errno=errno.EEXIST,
            hint="remove it yourself or choose another socket path",
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)  # a listener with a full backlog must not hang us
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        return  # stale: left by a dead process
    except FileNotFoundError:
        return  # removed meanwhile; rename() will simply create it
    except BlockingIOError:
        pass  # EAGAIN: alive, its backlog is full
    except OSError as exc:
        if exc.errno == errno.EPROTOTYPE:
            raise SocketError(
                f"refusing to replace {path}: it is a datagram or seqpacket socket",
                address=path,
                errno=exc.errno,
                hint="remove it yourself or choose another socket path",
            ) from None
        raise SocketError(
            f"cannot check whether socket {path} is in use: {_strerror(exc)}",
            address=path,
            errno=exc.errno,
            hint="remove it yourself if it is stale",
        ) from None
    finally:
        probe.close()
    raise SocketError(
        f"socket {path} is already in use",
        address=path,
        errno=errno.EADDRINUSE,
        hint="another process listens on it; stop it or choose another socket path",
    )


def _file_kind(mode: int) -> str:
    kinds = (
        (stat.S_ISLNK, "symbolic link"),
        (stat.S_ISDIR, "directory"),
        (stat.S_ISREG, "regular file"),
        (stat.S_ISFIFO, "named pipe"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
    )
    for test, kind in kinds:
        if test(mode):
            return kind
    return "file of unknown type"


def _unlink_if(dirfd: int, name: str, identity: tuple[int, int]) -> None:
    with contextlib.suppress(OSError):
        st = os.lstat(name, dir_fd=dirfd)
        if (st.st_dev, st.st_ino) == identity:
            os.unlink(name, dir_fd=dirfd)


def _current_umask() -> int:
    """Read the umask (the only API sets it too; restored at once)."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


# --------------------------------------------------------------------------- adopt


def adopt_fd(fd: int) -> socket.socket:
    """Wrap an inherited listening socket (fd 0, LISTEN_FDS, ``--fd N``).

    Checks that the fd is a socket and ``SO_ACCEPTCONN`` is set: serving ``accept()`` on a
    connected socket or a pipe would fail in confusing ways later. On failure the fd is left
    open and untouched. On success the returned object owns the fd (closing it closes the fd);
    its family and type are read from the kernel. The inheritable flag is not changed.
    """
    if fd < 0:
        raise SocketError(f"fd {fd} is not a valid file descriptor", address=f"fd:{fd}")
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise SocketError(
            f"fd {fd} is not open",
            address=f"fd:{fd}",
            errno=exc.errno,
            hint="the parent process must pass the listening socket on this fd",
        ) from None
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketError(
            f"fd {fd} is not a listening socket (it is a {_fd_kind(st.st_mode)})",
            address=f"fd:{fd}",
            errno=errno.ENOTSOCK,
        )
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise SocketError(
            f"fd {fd} is not a usable socket: {_strerror(exc)}",
            address=f"fd:{fd}",
            errno=exc.errno,
        ) from None
    try:
        accepting = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError as exc:
        sock.detach()
        raise SocketError(
            f"fd {fd} is not a listening socket: {_strerror(exc)}",
            address=f"fd:{fd}",
            errno=exc.errno,
        ) from None
    if accepting != 1:
        sock.detach()
        raise SocketError(
            f"fd {fd} is not a listening socket (it is a socket that does not accept connections)",
            address=f"fd:{fd}",
            errno=errno.EINVAL,
        )
    if sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise SocketError(
            f"fd {fd} is a listening socket but not a stream socket (FastCGI needs one)",
            address=f"fd:{fd}",
        )
    return sock


def _fd_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "pipe"
    return _file_kind(mode)


def is_listening_socket(fd: int) -> bool:
    """Whether ``fd`` is a listening socket; never raises (for probing fd 0 at startup)."""
    try:
        if fd < 0 or not stat.S_ISSOCK(os.fstat(fd).st_mode):
            return False
        sock = socket.socket(fileno=fd)
    except (OSError, ValueError):
        return False
    try:
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
    except OSError:
        return False
    finally:
        sock.detach()

"""Process-wide changes: credentials and privilege drop, child hygiene, pid files, detaching.

Only the supervisor and the cli call these; each one changes state that the whole process
shares (uid, signal dispositions, fds, umask, session), which is why they live together and
why most are meant to run in a freshly forked child right before ``exec``.

Why each piece exists:

* :func:`resolve_credentials` follows spawn-fcgi's rules (``-u`` name or uid, ``-g`` defaults to
  the user's primary group, uid 0 / gid 0 refused) but refuses, instead of warning about, a
  numeric uid without a passwd entry and no ``-g``: spawn-fcgi then keeps gid 0 (root's group),
  which is a privilege drop that silently is not one.
* :func:`drop_privileges` keeps spawn-fcgi's order (setgid, setgroups/initgroups, chroot,
  setuid, chdir): groups need root, chroot needs root, so uid goes last.
* :func:`reset_child_state`: CPython ignores SIGPIPE and SIGXFSZ and ignored dispositions
  survive ``exec``; a blocked signal mask survives too; and fds the supervisor holds (pipes,
  the signal socketpair, a pid file) must not leak into workers.
* :func:`write_pid_file` never follows symlinks and replaces the file atomically, so a
  concurrently reading ``kill $(cat pidfile)`` never sees an empty or partial pid.
* :func:`detach` and :class:`ReadinessPipe`: without ``-n`` the command must return only once
  the workers are up, with an exit status that says whether startup worked. python-daemon's
  double fork makes the original process exit at once, so we fork first, let the child
  detach, and make the original process wait for one line on a pipe.

Imports nothing of fcgispawn but :mod:`fcgispawn.errors`.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import pwd
import resource
import select
import signal
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO

from fcgispawn.errors import ProcessError

__all__ = [
    "Credentials",
    "ReadinessPipe",
    "ReadinessResult",
    "daemonize",
    "detach",
    "drop_privileges",
    "read_pid_file",
    "remove_pid_file",
    "reset_child_state",
    "resolve_credentials",
    "resolve_gid",
    "resolve_uid",
    "write_pid_file",
]


# --------------------------------------------------------------------------- credentials


@dataclass(frozen=True, slots=True)
class Credentials:
    """Resolved worker identity. ``None`` fields mean "leave as it is"."""

    uid: int | None
    gid: int | None
    username: str | None


def resolve_uid(user: str) -> int:
    """A user name or numeric uid to a uid (0 allowed: also used for the socket owner ``-U``).

    Names win over numbers, so a user literally named ``1000`` means that user.
    """
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        pass
    if user.isascii() and user.isdigit():
        return int(user)
    raise ProcessError(f"unknown user {user!r}", hint="check the name with `getent passwd`")


def resolve_gid(group: str) -> int:
    """A group name or numeric gid to a gid (0 allowed: also used for the socket group ``-G``)."""
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        pass
    if group.isascii() and group.isdigit():
        return int(group)
    raise ProcessError(f"unknown group {group!r}", hint="check the name with `getent group`")


def resolve_credentials(user: str | None, group: str | None) -> Credentials:
    """Resolve ``-u``/``-g`` for the workers with spawn-fcgi's rules; refuses root.

    * ``user`` is a name or uid; uid 0 is refused ("will not run workers as root").
    * ``group`` is a name or gid, default the user's primary group; gid 0 is refused.
    * A numeric uid with no passwd entry needs an explicit ``group`` (spawn-fcgi would keep
      gid 0 and only warn).
    """
    uid: int | None = None
    gid: int | None = None
    username: str | None = None
    primary_gid: int | None = None
    if user is not None:
        if not user:
            raise ProcessError("empty user name")
        uid = resolve_uid(user)
        if uid == 0:
            raise ProcessError(
                f"will not set uid to 0: user {user!r} is root",
                hint="workers must run as an unprivileged user; omit -u to keep the current user",
            )
        try:
            entry = pwd.getpwuid(uid)
        except KeyError:
            entry = None
        if entry is not None:
            username = entry.pw_name
            primary_gid = entry.pw_gid
    if group is not None:
        if not group:
            raise ProcessError("empty group name")
        gid = resolve_gid(group)
        if gid == 0:
            raise ProcessError(
                f"will not set gid to 0: group {group!r} is root's group",
                hint="choose an unprivileged group",
            )
    elif uid is not None:
        if primary_gid is None:
            raise ProcessError(
                f"uid {uid} (from {user!r}) has no passwd entry, so it has no primary group",
                hint="give the group explicitly with -g",
            )
        if primary_gid == 0:
            raise ProcessError(
                f"will not set gid to 0: the primary group of user {user!r} is root's group",
                hint="give an unprivileged group with -g",
            )
        gid = primary_gid
    return Credentials(uid=uid, gid=gid, username=username)


def drop_privileges(creds: Credentials, *, chroot: str | None, chdir: str | None) -> None:
    """Become ``creds`` in spawn-fcgi's order: setgid, setgroups/initgroups, chroot, setuid, chdir.

    Meant for a forked child right before ``exec`` (it changes the whole process for good).
    Supplementary groups are first cleared -- root's must never leak -- then set to the
    user's own. ``chdir`` is relative to the new root. Failures raise :class:`ProcessError`
    naming the step and value.
    """
    if creds.gid is not None:
        _step(f"setgid({creds.gid})", os.setgid, creds.gid)
        _step("setgroups([])", os.setgroups, [])
        if creds.username is not None:
            _step(
                f"initgroups({creds.username!r}, {creds.gid})",
                os.initgroups,
                creds.username,
                creds.gid,
            )
    if chroot is not None:
        _step(f"chroot({chroot!r})", os.chroot, chroot)
        _step("chdir('/') in the chroot", os.chdir, "/")
    if creds.uid is not None:
        _step(f"setuid({creds.uid})", os.setuid, creds.uid)
        if creds.uid != 0 and _can_regain_root():
            raise ProcessError(f"setuid({creds.uid}) did not drop root privileges")
    if chdir is not None:
        _step(f"chdir({chdir!r})", os.chdir, chdir)


def _step(what: str, func: Callable[..., object], *args: object) -> None:
    """Run one privilege step; an OSError becomes a ProcessError naming the step."""
    try:
        func(*args)
    except OSError as exc:
        hint = "this needs root" if exc.errno == errno.EPERM else None
        raise ProcessError(f"{what} failed: {exc.strerror or exc}", hint=hint) from None


def _can_regain_root() -> bool:
    """Paranoia the way OpenSSH does it: after setuid, setuid(0) must fail."""
    try:
        os.setuid(0)
    except OSError:
        return False
    return True


# --------------------------------------------------------------------------- child hygiene


def reset_child_state(keep_fds: Sequence[int]) -> None:
    """Give a forked child a clean slate before ``exec``: what a C parent would have given.

    * Every signal disposition back to ``SIG_DFL`` (CPython ignores SIGPIPE/SIGXFSZ, handles
      SIGINT, and the supervisor handles more; ignored dispositions survive exec).
    * An empty signal mask (masks survive exec too).
    * Every fd above 2 closed except ``keep_fds``, which are made inheritable so they survive
      exec. Uses ``os.closerange`` (the close_range(2) syscall on Linux) around kept fds.
    """
    with contextlib.suppress(ValueError, OSError):
        signal.set_wakeup_fd(-1)
    for signum in signal.valid_signals():
        if signum in (signal.SIGKILL, signal.SIGSTOP):
            continue
        # OSError only (EINVAL for numbers the libc reserves); a ValueError ("main thread
        # only") must not pass silently: after fork the forking thread *is* the main thread.
        with contextlib.suppress(OSError):
            signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    keep = sorted({fd for fd in keep_fds if fd > 2})
    low = 3
    for fd in keep:
        if fd > low:
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, _max_fd())
    for fd in (0, 1, 2, *keep):
        with contextlib.suppress(OSError):
            os.set_inheritable(fd, True)


def _max_fd() -> int:
    """One past the highest fd that can be open: the hard limit, never below the soft one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = max(soft, hard)
    if limit == resource.RLIM_INFINITY or limit > 1 << 30:
        return 1 << 30
    return int(limit)


# --------------------------------------------------------------------------- pid file


def write_pid_file(path: str, pid: int) -> None:
    """Write ``"PID\\n"`` to ``path`` atomically (temp file + ``rename()``).

    Refuses an existing non-regular file (symlink, fifo, directory: following a symlink as
    root would let anyone who can write the directory overwrite any file) and a world-writable
    directory without the sticky bit. Mode 0644.
    """
    directory, base = os.path.split(path)
    if not base:
        raise ProcessError(f"pid file {path!r} names a directory, not a file")
    directory = directory or "."
    try:
        dirfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise ProcessError(
            f"cannot write pid file {path}: directory {directory}: {exc.strerror or exc}",
            hint="create the directory first" if exc.errno == errno.ENOENT else None,
        ) from None
    try:
        st = os.fstat(dirfd)
        if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
            raise ProcessError(
                f"refusing to write pid file {path}: directory {directory} is world-writable "
                "without the sticky bit",
                hint="use a directory only trusted users can write to",
            )
        _refuse_non_regular(dirfd, base, path)
        temp = f".{base[:40]}.{os.urandom(6).hex()}.tmp"  # (not secrets: see supervisor.py)
        try:
            fd = os.open(
                temp,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o644,
                dir_fd=dirfd,
            )
        except OSError as exc:
            raise ProcessError(f"cannot write pid file {path}: {exc.strerror or exc}") from None
        try:
            try:
                os.fchmod(fd, 0o644)  # not masked by the umask: readers need it
                os.write(fd, f"{pid}\n".encode())
            finally:
                os.close(fd)
            _refuse_non_regular(dirfd, base, path)
            os.rename(temp, base, src_dir_fd=dirfd, dst_dir_fd=dirfd)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.unlink(temp, dir_fd=dirfd)
            if isinstance(exc, OSError):
                raise ProcessError(f"cannot write pid file {path}: {exc.strerror or exc}") from None
            raise
    finally:
        os.close(dirfd)


def _refuse_non_regular(dirfd: int, base: str, path: str) -> None:
    try:
        st = os.lstat(base, dir_fd=dirfd)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode):
        what = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a regular file"
        raise ProcessError(
            f"refusing to write pid file {path}: it exists and is {what}",
            hint="remove it yourself or choose another pid file path",
        )


def read_pid_file(path: str) -> int | None:
    """The pid in ``path``, or ``None`` if missing, not a regular file, or not a pid."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        data = os.read(fd, 64)
    except OSError:
        return None
    finally:
        os.close(fd)
    text = data.decode("ascii", "replace").strip()
    if not text.isascii() or not text.isdigit():
        return None
    return int(text)


def remove_pid_file(path: str, pid: int) -> None:
    """Remove ``path`` only if it still holds ``pid``: a newer instance's file stays."""
    if read_pid_file(path) == pid:
        with contextlib.suppress(OSError):
            os.unlink(path)


# --------------------------------------------------------------------------- detaching


@dataclass(frozen=True, slots=True)
class ReadinessResult:
    """What the original foreground process learned: exit status, message, supervisor pid."""

    exit_code: int
    message: str
    pid: int | None


class ReadinessPipe:
    """One line from the detached supervisor to the process the user started.

    Protocol (text, one line each): ``PID <pid>`` once detached (optional), then exactly one
    of ``OK <pid>`` (workers are up) or ``ERR <exit_code> <message>`` (startup failed;
    newlines in the message are escaped). EOF without a final line means the supervisor died.

    Usage in cli.py::

        pipe = ReadinessPipe()
        if pipe.fork():                      # original process
            result = pipe.wait(timeout=30)
            print(...); return result.exit_code
        # child: detach, start, then report
        detach([listener.fileno()], readiness=pipe)
        try:
            supervisor.run(on_ready=pipe.ready)
        except FcgiSpawnError as exc:
            pipe.fail(str(exc), exc.exit_code)
    """

    def __init__(self) -> None:
        self._read_fd: int | None
        self._write_fd: int | None
        self._read_fd, self._write_fd = os.pipe()  # both close-on-exec: workers never get them
        self._child: int | None = None

    @property
    def write_fd(self) -> int | None:
        """The fd the child writes to (put it in ``files_preserve``); ``None`` once closed."""
        return self._write_fd

    def fork(self) -> bool:
        """Fork; ``True`` in the original (waiting) process, ``False`` in the child."""
        try:
            pid = os.fork()
        except OSError as exc:
            self.close()
            raise ProcessError(f"cannot fork: {exc.strerror or exc}") from None
        if pid:
            self._child = pid
            self._close_write()
            return True
        self._close_read()
        return False

    def _close_read(self) -> None:
        if self._read_fd is not None:
            os.close(self._read_fd)
            self._read_fd = None

    def _close_write(self) -> None:
        if self._write_fd is not None:
            os.close(self._write_fd)
            self._write_fd = None

    def _send(self, line: str, *, final: bool) -> None:
        if self._write_fd is None:
            return
        data = line.encode("utf-8", "replace")
        with contextlib.suppress(OSError):  # the waiter may be gone (timeout, ^C): carry on
            while data:
                written = os.write(self._write_fd, data)
                data = data[written:]
        if final:
            self._close_write()

    def announce(self, pid: int | None = None) -> None:
        """Tell the waiter which pid the detached supervisor has (before it is ready)."""
        self._send(f"PID {os.getpid() if pid is None else pid}\n", final=False)

    def ready(self, pid: int | None = None) -> None:
        """Report success (workers are up) and close; later calls do nothing."""
        self._send(f"OK {os.getpid() if pid is None else pid}\n", final=True)

    def fail(self, message: str, exit_code: int = 1) -> None:
        """Report a startup failure with the exit status the original process should return."""
        code = exit_code if exit_code != 0 else 1
        self._send(f"ERR {code} {_escape(message)}\n", final=True)

    def close(self) -> None:
        """Drop both ends (e.g. in a worker forked after readiness)."""
        self._close_read()
        self._close_write()

    def wait(self, timeout: float | None = None) -> ReadinessResult:
        """In the original process: wait for the final line, EOF or ``timeout`` seconds.

        On timeout the supervisor keeps running (its pid is in the result if announced) and
        the result says startup did not complete (exit 1). The forked child is reaped.
        """
        if self._read_fd is None:
            raise ProcessError("ReadinessPipe.wait() called without a read end")
        buf = bytearray()
        deadline = None if timeout is None else time.monotonic() + timeout
        timed_out = False
        try:
            while True:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    timed_out = True
                    break
                # poll(), not select(): the fd may be above FD_SETSIZE in a busy process
                poller = select.poll()
                poller.register(self._read_fd, select.POLLIN)
                wait_ms = None if remaining is None else max(1, int(remaining * 1000))
                if not poller.poll(wait_ms):
                    continue
                chunk = os.read(self._read_fd, 4096)
                if not chunk:
                    break
                buf += chunk
                if _final_line_seen(buf):
                    break
        finally:
            self._close_read()
        status = self._reap()
        return _parse_readiness(
            bytes(buf), timed_out=timed_out, timeout=timeout, child_status=status
        )

    def _reap(self) -> int | None:
        """Collect the intermediate child (it exits at once in python-daemon's first fork)."""
        if self._child is None:
            return None
        child, self._child = self._child, None
        for _ in range(100):  # bounded: it exits right after forking, but do not hang
            try:
                pid, status = os.waitpid(child, os.WNOHANG)
            except ChildProcessError:
                return None
            if pid:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.01)
        return None


def _final_line_seen(buf: bytes | bytearray) -> bool:
    """A complete ``OK``/``ERR`` line has arrived (only complete lines count)."""
    complete = bytes(buf).rpartition(b"\n")[0]
    return any(line.startswith((b"OK ", b"ERR ")) for line in complete.split(b"\n"))


def _escape(message: str) -> str:
    return message.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "")


def _unescape(message: str) -> str:
    out: list[str] = []
    chars = iter(message)
    for char in chars:
        if char == "\\":
            nxt = next(chars, "")
            out.append("\n" if nxt == "n" else nxt)
        else:
            out.append(char)
    return "".join(out)


def _parse_readiness(
    data: bytes, *, timed_out: bool, timeout: float | None, child_status: int | None
) -> ReadinessResult:
    text = data.decode("utf-8", "replace")
    pid: int | None = None
    lines = text.split("\n")
    for line in lines:
        word, _, rest = line.partition(" ")
        if word == "PID" and rest.strip().isdigit():
            pid = int(rest.strip())
        elif word == "OK":
            if rest.strip().isdigit():
                pid = int(rest.strip())
            return ReadinessResult(0, f"supervisor running as pid {pid}", pid)
        elif word == "ERR":
            code_text, _, message = rest.partition(" ")
            if code_text.isdigit() and int(code_text) != 0:
                code = int(code_text)
            else:
                code, message = 1, rest
            return ReadinessResult(code, _unescape(message).strip() or "startup failed", pid)
    if timed_out:
        where = f" (pid {pid}, still running)" if pid is not None else ""
        return ReadinessResult(
            1, f"timed out after {timeout:g}s waiting for the workers to start{where}", pid
        )
    if child_status not in (None, 0):
        return ReadinessResult(
            1, f"the supervisor exited with status {child_status} before it was ready", pid
        )
    return ReadinessResult(1, "the supervisor exited before it was ready", pid)


def detach(
    keep_fds: Sequence[int],
    *,
    readiness: ReadinessPipe | None = None,
    stdout: IO[str] | IO[bytes] | None = None,
    stderr: IO[str] | IO[bytes] | None = None,
) -> None:
    """Become a daemon (python-daemon: double fork, setsid, stdio to /dev/null).

    python-daemon's defaults are overridden on purpose: it would close every fd not in
    ``files_preserve`` (so ``keep_fds`` and the readiness pipe are preserved), set umask 0
    (we keep the user's), chdir to ``/`` (we keep the cwd so relative paths still mean what
    the user meant), install handlers for SIGTERM/SIGTSTP/SIGTTIN/SIGTTOU (the supervisor
    uses TTIN/TTOU itself, so ``signal_map={}``) and disable core dumps (not ours to decide).
    When ``readiness`` is given, the new pid is announced on it.
    """
    import daemon  # python-daemon; imported here: only the detaching path needs it

    preserve: list[int] = [fd for fd in keep_fds if fd >= 0]
    if readiness is not None and readiness.write_fd is not None:
        preserve.append(readiness.write_fd)
    mask = os.umask(0o022)
    os.umask(mask)
    context = daemon.DaemonContext(
        detach_process=True,
        files_preserve=preserve,
        umask=mask,
        working_directory=os.getcwd(),
        signal_map={},
        prevent_core=False,
        stdin=None,
        stdout=stdout,
        stderr=stderr,
    )
    try:
        context.open()
    except Exception as exc:
        raise ProcessError(f"cannot detach: {exc}") from exc
    if readiness is not None:
        readiness.announce()


def daemonize(*, keep_fds: Sequence[int], readiness: ReadinessPipe | None = None) -> None:
    """Alias of :func:`detach` under the name the first contract draft used."""
    detach(keep_fds, readiness=readiness)

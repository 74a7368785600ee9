"""Errors that carry data, so that cli.py can print one line naming the value at fault.

Only cli.py prints or exits; every other layer raises one of these. ``exit_code`` follows
DESIGN.md: 2 for usage errors, 1 for runtime failures.
"""

from __future__ import annotations


class FcgiSpawnError(Exception):
    """Base of every error fcgispawn reports to a user."""

    exit_code: int = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} ({self.hint})"
        return self.message


class ConfigError(FcgiSpawnError):
    """A value given by the user is invalid on its own or together with another one."""

    exit_code = 2


class SocketError(FcgiSpawnError):
    """The listen socket could not be bound, adopted or found."""

    def __init__(
        self,
        message: str,
        *,
        address: str | None = None,
        errno: int | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.address = address
        self.errno = errno


class ProcessError(FcgiSpawnError):
    """A process-wide change failed: user/group lookup, chroot, pid file, daemonizing, exec."""


class AppImportError(FcgiSpawnError):
    """The WSGI application named by MODULE:CALLABLE could not be imported.

    ``detail`` holds the app's own traceback: the user needs it to fix their code, and it is
    printed after the one-line message rather than folded into it.
    """

    def __init__(self, message: str, *, detail: str = "", hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.detail = detail


class CrashLoopError(FcgiSpawnError):
    """Workers kept dying at startup; the supervisor gave up."""

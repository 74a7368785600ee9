"""The command line: click parsing, a validated config, the core called, errors mapped to exits.

This is the only module that prints or exits (DESIGN.md). Every flag of spawn-fcgi keeps its
meaning so an init script changes only the binary name; the deliberate differences are listed
in the help epilog and the man page.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import click

from fcgispawn import __version__, systemd
from fcgispawn.config import DEFAULT_THREADS, Options, SpawnConfig, build
from fcgispawn.errors import AppImportError, FcgiSpawnError

Log = Callable[[str], None]

EPILOG = """\b
Differences from spawn-fcgi (deliberate):
  -a defaults to 127.0.0.1, not 0.0.0.0 (never expose FastCGI by accident).
  -M defaults to 0660 whatever the umask, so the web server's group can connect.
  -P holds the supervisor's pid (signal it to stop or reload all workers).
  COMMAND is looked up on PATH. Workers are supervised and restarted.
  A path that holds anything but a dead socket is never unlinked; a live socket is refused.
  Out-of-range -p or -M values are refused, not truncated.
  Workers get no inherited fds beyond 0-2, default signal dispositions, an empty mask.
  Running workers as root without -u prints a warning.

\b
Signals to the supervisor: TERM/INT graceful stop, QUIT fast stop, HUP zero-downtime reload,
TTIN/TTOU one worker more/less, USR1 forwarded to workers (reopen logs).

\b
Exit status: 0 success, 1 runtime failure, 2 usage error.
"""


def fail(error: FcgiSpawnError) -> NoReturn:
    """One line (and an app's traceback) on stderr, then exit with the error's status: how
    every error reaches the user, also from __main__'s worker shortcut."""
    click.echo(f"fcgispawn: {error}", err=True)
    if isinstance(error, AppImportError) and error.detail:
        click.echo(error.detail.rstrip("\n"), err=True)
    sys.exit(error.exit_code)


def run(cfg: SpawnConfig, log: Log = systemd.stderr_log) -> int:
    """Run a validated configuration; raises FcgiSpawnError for anything the user must fix."""
    for warning in cfg.warnings:
        log(f"warning: {warning}")
    if cfg.serves_in_process:
        assert cfg.runtime is not None
        from fcgispawn import runtime

        return runtime.run(listener=None, log=log, **cfg.runtime.run_kwargs())
    from fcgispawn import spawner

    return spawner.spawn(cfg, log=log, say=click.echo, daemon_log=systemd.daemon_log)


def _options(params: dict[str, Any]) -> Options:
    return Options(**params)


@click.command(
    context_settings={
        "help_option_names": ["-h", "--help"],
        "allow_interspersed_args": False,
        "max_content_width": 100,
    },
    epilog=EPILOG,
)
@click.option(
    "-f",
    "app_path",
    metavar="PATH",
    help="App run through /bin/sh (spawn-fcgi's deprecated form; ignored with -- COMMAND).",
)
@click.option(
    "-d", "--chdir", metavar="DIR", help="Change to DIR before starting workers (after chroot)."
)
@click.option(
    "-a", "--address", metavar="ADDR", help="TCP bind address for -p.  [default: 127.0.0.1]"
)
@click.option("-p", "--port", type=int, metavar="PORT", help="TCP port to bind (1-65535).")
@click.option("-s", "--socket", metavar="PATH", help="UNIX socket path to bind.")
@click.option("--fd", type=int, metavar="N", help="Adopt the already-open listening socket N.")
@click.option(
    "-M", "--socket-mode", metavar="MODE", help="UNIX socket mode, octal.  [default: 0660]"
)
@click.option(
    "-U", "--socket-user", metavar="USER", help="UNIX socket owner (root only).  [default: -u]"
)
@click.option(
    "-G",
    "--socket-group",
    metavar="GROUP",
    help="UNIX socket group (root only).  [default: group of -U, else -g]",
)
@click.option(
    "-C", "php_children", type=int, metavar="N", help="Set PHP_FCGI_CHILDREN=N for the workers."
)
@click.option(
    "-F",
    "--workers",
    type=int,
    default=1,
    show_default=True,
    metavar="N",
    help="Number of worker processes.",
)
@click.option(
    "-b",
    "--backlog",
    type=int,
    default=1024,
    show_default=True,
    metavar="N",
    help="Listen backlog.",
)
@click.option("-P", "--pid-file", metavar="PATH", help="Write the supervisor's pid to PATH.")
@click.option(
    "-n",
    "--no-fork",
    is_flag=True,
    help="Stay in the foreground (systemd, daemontools, containers).",
)
@click.option(
    "-c",
    "--chroot",
    metavar="DIR",
    help="chroot workers into DIR (root only); the socket is created inside it unless -S.",
)
@click.option(
    "-S",
    "bind_before_chroot",
    is_flag=True,
    help="Create the socket before the chroot, outside DIR.",
)
@click.option(
    "-u", "--user", metavar="USER", help="Run workers as USER (root only; uid 0 refused)."
)
@click.option(
    "-g",
    "--group",
    metavar="GROUP",
    help="Run workers with GROUP (root only).  [default: primary group of -u]",
)
@click.option(
    "--pass",
    "pass_mode",
    type=click.Choice(["fd0", "systemd"]),
    default="fd0",
    show_default=True,
    help="How workers get the socket: on fd 0, or on fd 3 with LISTEN_FDS.",
)
@click.option(
    "--fdname",
    default="fcgi",
    show_default=True,
    metavar="NAME",
    help="LISTEN_FDNAMES for --pass systemd; the name picked from an inherited set.",
)
@click.option(
    "--graceful-timeout",
    type=float,
    default=30.0,
    show_default=True,
    metavar="SECONDS",
    help="How long workers may finish in-flight requests on stop/reload before KILL.",
)
@click.option(
    "--crash-limit",
    type=int,
    default=5,
    show_default=True,
    metavar="N",
    help="Give up (exit 1) after N startup failures within --crash-window.",
)
@click.option(
    "--crash-window",
    type=float,
    default=10.0,
    show_default=True,
    metavar="SECONDS",
    help="Window for --crash-limit; a worker that dies after it was up is restarted, not counted.",
)
@click.option(
    "--backoff-max",
    type=float,
    default=10.0,
    show_default=True,
    metavar="SECONDS",
    help="Upper bound of the exponential restart delay.",
)
@click.option(
    "--wsgi",
    metavar="MODULE:CALLABLE",
    help="Workers are the built-in FastCGI responder serving this WSGI app.",
)
@click.option(
    "--threads",
    type=int,
    default=DEFAULT_THREADS,
    show_default=True,
    metavar="N",
    help="Request threads per --wsgi worker.",
)
@click.option(
    "--max-requests",
    type=int,
    default=0,
    show_default=True,
    metavar="N",
    help="Recycle a --wsgi worker after N requests (0: never).",
)
@click.option(
    "--max-requests-jitter",
    type=int,
    default=0,
    show_default=True,
    metavar="N",
    help="Add 0..N to --max-requests per worker so they do not recycle together.",
)
@click.option(
    "--request-timeout",
    type=float,
    default=0.0,
    show_default=True,
    metavar="SECONDS",
    help="End a --wsgi worker (exit 124, replaced) whose app call runs longer (0: no limit).",
)
@click.option(
    "--preload/--no-preload",
    default=True,
    show_default=True,
    help="Fork --wsgi workers from one process that imported the app (a reload still "
    "loads new code); --no-preload starts each worker afresh, for apps not safe to fork.",
)
@click.option(
    "--web-server-addrs",
    metavar="LIST",
    help="Comma-separated peer addresses allowed on TCP.  [default: $FCGI_WEB_SERVER_ADDRS]",
)
@click.version_option(
    __version__,
    "-v",
    "--version",
    prog_name="fcgispawn",
    message="%(prog)s %(version)s (spawn-fcgi compatible)",
)
@click.argument("command", nargs=-1, type=click.UNPROCESSED, metavar="[-- COMMAND [ARG...]]")
def command(**params: Any) -> None:
    """Spawn FastCGI workers on a socket and keep them alive.

    \b
    fcgispawn [OPTIONS] -- COMMAND [ARG...]     COMMAND as workers, socket on fd 0
    fcgispawn [OPTIONS] --wsgi MODULE:CALLABLE  workers are the built-in responder
    fcgispawn --wsgi MODULE:CALLABLE            serve on the inherited socket
                                               (fd 0 or systemd's LISTEN_FDS)
    """
    params["command"] = tuple(params["command"])
    try:
        cfg = build(_options(params))
        rc = run(cfg)
    except FcgiSpawnError as error:
        fail(error)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(rc)


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point; never lets a traceback reach the user for known errors."""
    try:
        command.main(args=list(argv) if argv is not None else None, prog_name="fcgispawn")
    except FcgiSpawnError as error:  # raised outside the command body (e.g. by click callbacks)
        fail(error)
    except Exception:  # pragma: no cover - a bug: say so, keep the traceback for the report
        click.echo("fcgispawn: internal error, please report:", err=True)
        click.echo(traceback.format_exc().rstrip("\n"), err=True)
        sys.exit(1)

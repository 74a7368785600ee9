#!/usr/bin/env python3
"""Runs :class:`fcgispawn.supervisor.Supervisor` in its own process, so tests send real signals.

Usage: ``supervise.py CONFIG_JSON``. Binds the UNIX socket ``socket`` itself (independent of
sockets.py), builds WorkerSpec/Policy from the config, prints ``READY <pid>`` on stdout when
``on_ready`` runs and logs one line per event on stderr (``<monotonic> <message>``).

Config keys: ``socket`` (path), ``argv`` (list), ``env`` (dict, default: os.environ),
``pass_mode`` ("fd0"/"systemd"), ``fdname``, ``policy`` (Policy fields), ``user``/``group``
(through process.resolve_credentials), ``chroot``, ``chdir``, ``readiness`` ("settle"/"notify"),
``template`` (bool: preload mode, argv is a template program), ``cannot_start`` ([status,
message]: WorkerSpec.cannot_start),
and hygiene probes:
``leak_fd`` (open an inheritable fd at 40 before starting), ``block_signal`` (block SIGUSR2 in
the supervisor's mask). Exit status: run()'s, or 1 with ``error: <message>`` on stderr.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time

from fcgispawn.errors import FcgiSpawnError
from fcgispawn.process import resolve_credentials
from fcgispawn.supervisor import PassMode, Policy, Readiness, Supervisor, WorkerSpec


def _log(message: str) -> None:
    sys.stderr.write(f"{time.monotonic():.3f} {message}\n")
    sys.stderr.flush()


def main() -> int:
    config = json.loads(sys.argv[1])
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(config["socket"])
    listener.listen(128)
    if config.get("leak_fd"):
        fd = os.open(os.devnull, os.O_RDONLY)
        os.dup2(fd, 40, inheritable=True)
        os.close(fd)
    if config.get("block_signal"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})
    spec = WorkerSpec(
        argv=tuple(config["argv"]),
        env=config.get("env", dict(os.environ)),
        pass_mode=PassMode(config.get("pass_mode", "fd0")),
        fdname=config.get("fdname", "fcgi"),
        credentials=(
            resolve_credentials(config.get("user"), config.get("group"))
            if config.get("user") or config.get("group")
            else None
        ),
        chroot=config.get("chroot"),
        chdir=config.get("chdir"),
        readiness=Readiness(config.get("readiness", "settle")),
        template=bool(config.get("template", False)),
        cannot_start=tuple(config["cannot_start"]) if config.get("cannot_start") else None,
    )
    policy = Policy(**config.get("policy", {}))

    def ready() -> None:
        sys.stdout.write(f"READY {os.getpid()}\n")
        sys.stdout.flush()

    try:
        return Supervisor(listener, spec, policy, log=_log).run(on_ready=ready)
    except FcgiSpawnError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return exc.exit_code
    finally:
        listener.close()


if __name__ == "__main__":
    sys.exit(main())

"""``python -m fcgispawn`` is the same program as the ``fcgispawn`` script.

With one shortcut: a ``--wsgi`` worker started by fcgispawn's own supervisor finds its
configuration in ``FCGISPAWN_WORKER`` (config.WORKER_ENV: the values its command line also
shows, for ps) and serves without click and the option machinery. A preload template then
holds ~2 MiB less, which every worker forked from it would share and partly copy, and a
worker or template starts ~11 ms sooner. Any other use goes through cli.py.
"""

import json
import os
import sys

from fcgispawn.config import APP_LOAD_EXIT, WORKER_ENV


def _worker(spec: str) -> int:
    from fcgispawn import runtime, systemd
    from fcgispawn.errors import AppImportError, ConfigError, FcgiSpawnError

    log = systemd.worker_log()
    try:
        try:
            kwargs = json.loads(spec)
            if not isinstance(kwargs, dict):
                raise TypeError("not an object")
            return runtime.run(**kwargs, log=log)
        except (ValueError, TypeError) as exc:  # not what the spawner writes
            raise ConfigError(f"{WORKER_ENV} is not a worker configuration ({exc})") from None
    except AppImportError as error:
        # One entry in the supervisor's log, stamped like its other lines, and the status
        # that makes it give up at once (config.APP_LOAD_EXIT) rather than retry.
        log(str(error) + (f"\n{error.detail.rstrip()}" if error.detail else ""))
        return APP_LOAD_EXIT
    except FcgiSpawnError as error:
        from fcgispawn.cli import fail  # the message format; click is loaded only now

        fail(error)


def _main() -> None:
    # Taken out of the environment first: the app's own child processes must not see it.
    spec = os.environ.pop(WORKER_ENV, None)
    if spec is not None:
        sys.exit(_worker(spec))
    from fcgispawn.cli import main

    main()


if __name__ == "__main__":
    _main()

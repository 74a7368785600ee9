"""The command line as a user meets it: exit codes, one clear line, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.procs import ProcessGroup, fcgispawn_argv


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*fcgispawn_argv(), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def assert_one_clear_line(proc: subprocess.CompletedProcess[str], code: int, fragment: str) -> None:
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    assert fragment in proc.stderr


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        (("-s", "/tmp/x.sock", "-p", "9000", "--", "/bin/cat"), 2, "give one socket"),
        (("-p", "70000", "--", "/bin/cat"), 2, "out of range"),
        (("-p", "abc", "--", "/bin/cat"), 2, "'abc' is not a valid integer"),
        (("-s", "/tmp/x.sock", "-M", "999", "--", "/bin/cat"), 2, "invalid socket mode"),
        (("-s", "/tmp/" + "y" * 110, "--", "/bin/cat"), 2, "longer than the 107"),
        (("-s", "/tmp/x.sock", "-F", "0", "--", "/bin/cat"), 2, "at least 1"),
        (("-s", "/tmp/x.sock", "-C", "-1", "--", "/bin/cat"), 2, "-C must be at least 0"),
        (("-s", "/tmp/x.sock", "--graceful-timeout", "inf", "--", "/bin/cat"), 2, "finite"),
        (("-s", "/tmp/x.sock"), 2, "no FastCGI application given"),
        (("-s", "/tmp/x.sock", "--", "no-such-cmd-xyz"), 2, "cannot execute 'no-such-cmd-xyz'"),
        (("-s", "/tmp/x.sock", "--wsgi", "nocolon"), 2, "not MODULE:CALLABLE"),
        (("--bogus",), 2, "No such option"),
    ],
)
def test_bad_input_gives_one_clear_line_and_usage_exit(
    args: tuple[str, ...], code: int, fragment: str
) -> None:
    assert_one_clear_line(run(*args), code, fragment)


def test_unknown_user_is_a_runtime_error_naming_it(sockdir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("user switching needs root")
    proc = run("-n", "-s", str(sockdir / "a.sock"), "-u", "no-such-user-xyz", "--", "/bin/cat")
    assert_one_clear_line(proc, 1, "unknown user 'no-such-user-xyz'")
    assert not (sockdir / "a.sock").exists()


def test_root_user_is_refused(sockdir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("user switching needs root")
    proc = run("-n", "-s", str(sockdir / "a.sock"), "-u", "root", "--", "/bin/cat")
    assert_one_clear_line(proc, 1, "will not set uid to 0")


def test_version_and_help() -> None:
    version = run("-v")
    assert version.returncode == 0
    assert "fcgispawn" in version.stdout
    helptext = run("-h")
    assert helptext.returncode == 0
    assert "127.0.0.1" in helptext.stdout and "0660" in helptext.stdout
    for flag in ("-f", "-d", "-a", "-p", "-s", "-M", "-C", "-F", "-b", "-P", "-n", "-c", "-S"):
        assert f"{flag} " in helptext.stdout or f"{flag}," in helptext.stdout, flag
    for flag in ("-u", "-g", "-U", "-G", "--wsgi", "--fd", "--pass", "--graceful-timeout"):
        assert flag in helptext.stdout, flag


def test_wsgi_without_an_inherited_socket_says_so() -> None:
    proc = run("--wsgi", "examples.hello:app")
    assert_one_clear_line(proc, 1, "no listening socket")


def test_socket_in_use_is_refused_and_left_alone(sockdir: Path) -> None:
    import socket

    path = sockdir / "live.sock"
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(str(path))
        live.listen()
        proc = run("-n", "-s", str(path), "--", "/bin/cat")
        assert_one_clear_line(proc, 1, "already in use")
        assert path.exists()


@pytest.mark.parametrize("preload", ["--preload", "--no-preload"])
def test_a_wsgi_app_that_does_not_import_ends_the_pool_at_once(
    sockdir: Path, preload: str
) -> None:
    """As gunicorn halts when a worker fails to boot: one error line from the worker and one
    from the supervisor, exit 1, no retries. Five tries with backoff took 2-3 s, long enough
    for supervisord (startsecs=1) to count fcgispawn as started and restart it forever."""
    t0 = time.monotonic()
    proc = run("-n", "-s", str(sockdir / "a.sock"), "-F", "2", preload, "--wsgi", "nosuchmod:app")
    assert time.monotonic() - t0 < 3  # (~0.4 s here; the retries took 2-3 s more)
    assert_one_clear_line(proc, 1, "fcgispawn: the WSGI application cannot be loaded")
    assert proc.stderr.count("cannot load WSGI application 'nosuchmod:app'") <= 2  # a worker each
    assert "starting a new template" not in proc.stderr and "restarting slot" not in proc.stderr
    assert not (sockdir / "a.sock").exists()


def test_detaching_mode_reports_a_crash_loop_before_returning(sockdir: Path) -> None:
    proc = run(
        "-s",
        str(sockdir / "a.sock"),
        "--crash-limit",
        "2",
        "--crash-window",
        "5",
        "--",
        "/bin/false",
    )
    assert_one_clear_line(proc, 1, "workers keep dying")
    assert not (sockdir / "a.sock").exists()


def test_wsgi_worker_with_stdout_and_stderr_closed_serves_and_stops_cleanly(
    sockdir: Path, procs: ProcessGroup
) -> None:
    """FastCGI's initial state (spec section 2): the listener on fd 0, stdout and stderr closed.

    Python then has no sys.stderr; logging (e.g. the stop message) must not turn a clean stop
    into a failure.
    """
    import signal
    import socket

    from fcgispawn.client import FastCGIClient
    from tests.procs import REPO

    path = sockdir / "closed.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        listener.listen(16)

        # The shell closes fds 1 and 2 and execs: no preexec_fn (unsafe with threads).
        proc = subprocess.Popen(
            [
                "/bin/sh",
                "-c",
                'exec "$@" >&- 2>&-',
                "sh",
                *fcgispawn_argv(),
                "--wsgi",
                "tests.apps.wsgi_apps:app",
            ],
            stdin=listener.fileno(),
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            start_new_session=True,
        )
    procs.procs.append(proc)
    response = FastCGIClient(path, timeout=20).request(
        {"REQUEST_METHOD": "GET", "SCRIPT_NAME": "", "PATH_INFO": "/hello"}
    )
    assert response.body == b"Hello, World!"
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(20) == 0


# ---- the worker shortcut (__main__.py, config.WORKER_ENV) ------------------------------------


def test_run_kwargs_are_runtime_runs_arguments_and_survive_json() -> None:
    import inspect
    import json

    from fcgispawn import runtime
    from fcgispawn.config import RuntimeOptions

    for opts in (
        RuntimeOptions(app="m:a"),
        RuntimeOptions(
            app="pkg.mod:make_app()",
            threads=7,
            max_requests=100,
            max_requests_jitter=9,
            graceful_timeout=2.5,
            request_timeout=30,
            web_server_addrs=("127.0.0.1", "::1"),
        ),
    ):
        kwargs = json.loads(json.dumps(opts.run_kwargs()))
        bound = inspect.signature(runtime.run).bind(**kwargs)
        assert bound.arguments["app_spec"] == opts.app
        assert kwargs["threads"] == opts.threads
        assert kwargs["graceful_timeout"] == opts.graceful_timeout
        addrs = kwargs["web_server_addrs"]
        assert (None if addrs is None else tuple(addrs)) == opts.web_server_addrs


@pytest.mark.parametrize("value", ["not json", "[1, 2]", '{"no_such_argument": 1}'])
def test_a_broken_worker_configuration_is_one_clear_line(value: str) -> None:
    # The shortcut is python -m fcgispawn's (what the supervisor runs), not the console script's.
    proc = subprocess.run(
        [sys.executable, "-m", "fcgispawn", "--wsgi", "m:a"],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
        check=False,
        env={**os.environ, "FCGISPAWN_WORKER": value},
    )
    assert_one_clear_line(proc, 2, "FCGISPAWN_WORKER is not a worker configuration")

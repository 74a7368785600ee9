"""Fixtures for the integration tests: real servers, a compiled C libfcgi app, php-cgi.

- ``servers``: a ``Servers`` for one test (its processes stop when the test ends).
- ``module_servers``: the same for a whole module (for servers reused by many tests).
- ``c_hello_app``: the libfcgi hello app, compiled once per session.
- ``php_docroot``: a directory holding ``index.php``; ``php_cgi``: the php-cgi binary.

When a test fails, the tails of every log its servers wrote are added to the report.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from tests.integration.servers import (
    PHP_SOURCE,
    LogBook,
    Servers,
    compile_c_hello,
    require_binary,
)
from tests.procs import ProcessGroup, process_group


def _short_tmpdir(prefix: str) -> Path:
    # /tmp, not pytest's tmp_path: UNIX socket paths must fit sun_path's 107 bytes, and
    # www-data (Apache) and nobody (-u) must be able to traverse it.
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path


@pytest.fixture
def servers(procs: ProcessGroup, sockdir: Path) -> Iterator[Servers]:
    """Launchers bound to this test: everything they start is stopped, by pid, at teardown."""
    launcher = Servers(procs, sockdir)
    try:
        yield launcher
    finally:
        launcher.close()


@pytest.fixture(scope="module")
def module_servers() -> Iterator[Servers]:
    """Launchers whose processes live for the whole module (start once, test many times)."""
    workdir = _short_tmpdir("fsm-")
    with process_group() as group:
        launcher = Servers(group, workdir)
        try:
            yield launcher
        finally:
            launcher.close()
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def c_hello_app() -> Iterator[Path]:
    """The C libfcgi hello app (FCGI_Accept loop), compiled once per session with gcc."""
    directory = _short_tmpdir("fsc-")
    try:
        yield compile_c_hello(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def php_cgi() -> str:
    return require_binary("php-cgi", "php-cgi")


@pytest.fixture(scope="session")
def php_docroot() -> Iterator[Path]:
    """A document root with ``index.php`` (prints its pid and PHP_FCGI_CHILDREN)."""
    directory = _short_tmpdir("fsp-")
    (directory / "index.php").write_text(PHP_SOURCE)
    (directory / "index.php").chmod(0o644)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _logbooks(item: pytest.Item) -> list[LogBook]:
    books: list[LogBook] = []
    funcargs: dict[str, object] = getattr(item, "funcargs", {})
    for value in funcargs.values():
        book = value if isinstance(value, LogBook) else getattr(value, "logbook", None)
        if isinstance(book, LogBook) and all(book is not b for b in books):
            books.append(book)
    return books


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """On failure, show what the servers of this test logged (nginx error.log, stderr...)."""
    report = yield
    if report.failed:
        for book in _logbooks(item):
            for label, text in book.tails():
                report.sections.append((f"log: {label}", text))
    return report

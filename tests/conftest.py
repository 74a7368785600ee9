"""Fixtures every test module may use."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs import ProcessGroup, process_group


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short directory for UNIX sockets: pytest's tmp_path can exceed sun_path's 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="fs-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def procs() -> Iterator[ProcessGroup]:
    """Processes started through this are stopped by pid when the test ends."""
    with process_group() as group:
        yield group

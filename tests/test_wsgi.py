"""Unit tests for fcgispawn.wsgi: environ, wsgi.input/errors, run_app's PEP 3333 rules, loading.

Apps run through ``wsgiref.validate.validator`` wherever the behaviour under test is legal WSGI,
so the checks cover both sides: our environ/streams as the validator sees them, and our
start_response/close handling as a validated app drives them. Apps that break the rules on
purpose (bad headers, no start_response) run unwrapped, because there the validator would
raise before run_app gets to show what it does.
"""

from __future__ import annotations

import io
import itertools
import sys
import time
import tracemalloc
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment
from wsgiref.validate import validator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fcgispawn.wsgi import (
    FILE_READ_SIZE,
    ClientDisconnected,
    ErrorStream,
    FileWrapper,
    InputStream,
    InvalidResponseError,
    WSGIAppLoadError,
    build_environ,
    build_environ_latin1,
    load_app,
    parse_app_spec,
    run_app,
)

pytestmark = [
    pytest.mark.filterwarnings("error::wsgiref.validate.WSGIWarning"),
    # the validator's iterator wrapper asserts in __del__ that close() was called
    pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning"),
]

HELLO_HEAD = b"Status: 200 OK\r\nContent-Type: text/plain\r\n\r\n"
TEXT = [("Content-Type", "text/plain")]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def chunk_source(chunks: Iterable[bytes]) -> Callable[[], bytes]:
    """A server-like chunk source: the chunks, then b"" for ever."""
    it = iter(chunks)
    return lambda: next(it, b"")


def counting_source(chunks: Sequence[bytes]) -> tuple[Callable[[], bytes], list[int]]:
    """A source that records how often it was called (to check nothing reads past EOF)."""
    calls = [0]
    it = iter(chunks)

    def source() -> bytes:
        calls[0] += 1
        return next(it, b"")

    return source, calls


def environ_for(
    params: dict[bytes, bytes] | None = None,
    *,
    body: Sequence[bytes] = (),
    stderr: list[bytes] | None = None,
    url_scheme: str | None = None,
) -> dict[str, Any]:
    sink = stderr.append if stderr is not None else (lambda data: None)
    if params is None:
        params = {b"REQUEST_METHOD": b"GET", b"REQUEST_URI": b"/"}
    stream, errors = InputStream(chunk_source(body)), ErrorStream(sink)
    environ = build_environ(
        params,
        input=stream,
        errors=errors,
        multithread=True,
        multiprocess=False,
        url_scheme=url_scheme,
    )
    # The server's fast path (PARAMS decoded straight to str, environ built in place) must
    # give the very same environ, for every params table of this file.
    latin1 = {k.decode("latin-1"): v.decode("latin-1") for k, v in params.items()}
    fast = build_environ_latin1(
        latin1,
        input=stream,
        errors=errors,
        multithread=True,
        multiprocess=False,
        url_scheme=url_scheme,
    )
    assert fast is latin1
    assert fast == environ
    return environ


@dataclass
class Outcome:
    """What one run_app call did: its return value, each send() call, each log line."""

    status: int
    sends: list[list[bytes]]
    logs: list[str]
    stderr: list[bytes] = field(default_factory=list)

    @property
    def raw(self) -> bytes:
        return b"".join(buf for call in self.sends for buf in call)

    @property
    def head(self) -> bytes:
        return self.raw.partition(b"\r\n\r\n")[0] + b"\r\n\r\n"

    @property
    def body(self) -> bytes:
        return self.raw.partition(b"\r\n\r\n")[2]

    @property
    def status_line(self) -> bytes:
        return self.raw.split(b"\r\n", 1)[0]


def serve(
    app: WSGIApplication,
    params: dict[bytes, bytes] | None = None,
    *,
    body: Sequence[bytes] = (),
    validate: bool = True,
    send: Callable[[list[bytes]], None] | None = None,
) -> Outcome:
    sends: list[list[bytes]] = []
    logs: list[str] = []
    stderr: list[bytes] = []
    environ = environ_for(params, body=body, stderr=stderr)

    def record(bufs: list[bytes]) -> None:
        assert all(type(b) is bytes for b in bufs)
        sends.append(list(bufs))
        if send is not None:
            send(bufs)

    status = run_app(validator(app) if validate else app, environ, record, log=logs.append)
    return Outcome(status, sends, logs, stderr)


class Closing:
    """A response iterable that counts close() calls and how far it was iterated."""

    def __init__(
        self, chunks: Sequence[bytes], *, fail_at: int | None = None, fail_in_close: bool = False
    ) -> None:
        self.chunks = chunks
        self.fail_at = fail_at
        self.fail_in_close = fail_in_close
        self.closed = 0
        self.yielded = 0

    def __iter__(self) -> Iterator[bytes]:
        for i, chunk in enumerate(self.chunks):
            if i == self.fail_at:
                raise RuntimeError("boom in iteration")
            self.yielded += 1
            yield chunk

    def close(self) -> None:
        self.closed += 1
        if self.fail_in_close:
            raise RuntimeError("boom in close")


def hello(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"Hello, world!"]


def broken_pipe(bufs: list[bytes]) -> None:
    raise BrokenPipeError(32, "Broken pipe")


# --------------------------------------------------------------------------------------------
# build_environ
# --------------------------------------------------------------------------------------------


def test_environ_decodes_names_and_values_as_latin1_native_strings() -> None:
    env = environ_for({b"HTTP_X_NAME": b"caf\xc3\xa9 \xff", b"REQUEST_METHOD": b"POST"})
    assert env["HTTP_X_NAME"] == "caf\xc3\xa9 \xff"
    assert env["HTTP_X_NAME"].encode("latin-1") == b"caf\xc3\xa9 \xff"
    assert all(type(v) is str for k, v in env.items() if "." not in k)


@pytest.mark.parametrize(
    ("params", "key", "expected"),
    [
        ({}, "REQUEST_METHOD", "GET"),
        ({b"REQUEST_METHOD": b""}, "REQUEST_METHOD", "GET"),
        ({b"REQUEST_METHOD": b"DELETE"}, "REQUEST_METHOD", "DELETE"),
        ({}, "SERVER_NAME", "localhost"),
        ({}, "SERVER_PORT", "80"),
        ({b"HTTPS": b"on"}, "SERVER_PORT", "443"),
        ({b"HTTP_HOST": b"example.org"}, "SERVER_NAME", "example.org"),
        ({b"HTTP_HOST": b"example.org:8080"}, "SERVER_NAME", "example.org"),
        ({b"HTTP_HOST": b"example.org:8080"}, "SERVER_PORT", "8080"),
        ({b"HTTP_HOST": b"[::1]:8443"}, "SERVER_NAME", "[::1]"),
        ({b"HTTP_HOST": b"[::1]:8443"}, "SERVER_PORT", "8443"),
        ({b"HTTP_HOST": b"[::1]"}, "SERVER_NAME", "[::1]"),
        ({b"SERVER_NAME": b"srv", b"HTTP_HOST": b"other:1"}, "SERVER_NAME", "srv"),
        ({b"SERVER_PORT": b"9000", b"HTTP_HOST": b"h:1"}, "SERVER_PORT", "9000"),
        ({}, "SERVER_PROTOCOL", "HTTP/1.0"),
        ({b"SERVER_PROTOCOL": b"HTTP/2.0"}, "SERVER_PROTOCOL", "HTTP/2.0"),
        ({}, "QUERY_STRING", ""),
        ({b"REQUEST_URI": b"/p?a=1&b=%20"}, "QUERY_STRING", "a=1&b=%20"),
        ({b"QUERY_STRING": b"given", b"REQUEST_URI": b"/p?other"}, "QUERY_STRING", "given"),
        ({b"CONTENT_LENGTH": b"12"}, "CONTENT_LENGTH", "12"),
        ({b"CONTENT_TYPE": b"text/plain"}, "CONTENT_TYPE", "text/plain"),
        ({b"HTTP_CONTENT_TYPE": b"a/b"}, "CONTENT_TYPE", "a/b"),
        ({b"HTTP_CONTENT_TYPE": b"a/b", b"CONTENT_TYPE": b"c/d"}, "CONTENT_TYPE", "c/d"),
    ],
)
def test_environ_fills_cgi_defaults(params: dict[bytes, bytes], key: str, expected: str) -> None:
    assert environ_for(params)[key] == expected


@pytest.mark.parametrize(
    ("params", "absent"),
    [
        ({b"CONTENT_LENGTH": b""}, "CONTENT_LENGTH"),
        ({b"CONTENT_TYPE": b""}, "CONTENT_TYPE"),
        ({b"HTTP_CONTENT_TYPE": b"a/b", b"CONTENT_TYPE": b""}, "HTTP_CONTENT_TYPE"),
        ({b"HTTP_CONTENT_LENGTH": b"3"}, "HTTP_CONTENT_LENGTH"),
        ({b"HTTP_CONTENT_LENGTH": b"3"}, "CONTENT_LENGTH"),
    ],
)
def test_environ_drops_empty_content_vars_and_http_content_duplicates(
    params: dict[bytes, bytes], absent: str
) -> None:
    assert absent not in environ_for(params)


@pytest.mark.parametrize(
    ("params", "script_name", "path_info"),
    [
        ({}, "", ""),
        ({b"REQUEST_URI": b"/a%20b/c?x=1"}, "", "/a b/c"),
        ({b"REQUEST_URI": b"/caf%C3%A9"}, "", "/caf\xc3\xa9"),
        ({b"REQUEST_URI": b"/raw\xc3\xa9"}, "", "/raw\xc3\xa9"),
        ({b"REQUEST_URI": b"/a%2Fb"}, "", "/a/b"),
        ({b"REQUEST_URI": b"/x#frag"}, "", "/x"),
        ({b"REQUEST_URI": b"http://host:81/abs?q"}, "", "/abs"),
        ({b"REQUEST_URI": b"http://host"}, "", "/"),
        ({b"REQUEST_URI": b"/uri", b"PATH_INFO": b""}, "", "/uri"),
        ({b"REQUEST_URI": b"/uri", b"PATH_INFO": b"/given"}, "", "/given"),
        ({b"REQUEST_URI": b"/app/x", b"SCRIPT_NAME": b"/app"}, "/app", ""),
        ({b"SCRIPT_NAME": b"/app", b"PATH_INFO": b"/x"}, "/app", "/x"),
        ({b"PATH_INFO": b"/x"}, "", "/x"),
        ({b"SCRIPT_NAME": b"/"}, "", "/"),
        ({b"SCRIPT_NAME": b"/", b"PATH_INFO": b"/x"}, "", "/x"),
        ({b"SCRIPT_NAME": b"/app/", b"PATH_INFO": b"x"}, "/app", "/x"),
        ({b"SCRIPT_NAME": b"/app/", b"PATH_INFO": b""}, "/app", "/"),
    ],
)
def test_environ_script_name_and_path_info(
    params: dict[bytes, bytes], script_name: str, path_info: str
) -> None:
    env = environ_for(params)
    assert (env["SCRIPT_NAME"], env["PATH_INFO"]) == (script_name, path_info)


@pytest.mark.parametrize(
    ("params", "override", "scheme"),
    [
        ({}, None, "http"),
        ({b"HTTPS": b"on"}, None, "https"),
        ({b"HTTPS": b"ON"}, None, "https"),
        ({b"HTTPS": b"On"}, None, "https"),
        ({b"HTTPS": b"1"}, None, "https"),
        ({b"HTTPS": b"off"}, None, "http"),
        ({b"HTTPS": b""}, None, "http"),
        ({b"HTTPS": b"0"}, None, "http"),
        ({b"REQUEST_SCHEME": b"https"}, None, "https"),
        ({b"REQUEST_SCHEME": b"HTTPS"}, None, "https"),
        ({b"REQUEST_SCHEME": b"http"}, None, "http"),
        ({b"HTTPS": b"on"}, "http", "http"),
        ({}, "https", "https"),
    ],
)
def test_environ_url_scheme(params: dict[bytes, bytes], override: str | None, scheme: str) -> None:
    assert environ_for(params, url_scheme=override)["wsgi.url_scheme"] == scheme


def test_environ_wsgi_keys_are_complete_and_truthful() -> None:
    stream = InputStream(chunk_source([]))
    errors = ErrorStream(lambda data: None)
    env = build_environ({}, input=stream, errors=errors, multithread=False, multiprocess=True)
    assert env["wsgi.version"] == (1, 0)
    assert env["wsgi.input"] is stream
    assert env["wsgi.errors"] is errors
    assert env["wsgi.multithread"] is False
    assert env["wsgi.multiprocess"] is True
    assert env["wsgi.run_once"] is False
    assert env["wsgi.file_wrapper"] is FileWrapper
    assert env["wsgi.input_terminated"] is True


def test_environ_passes_wsgiref_validator() -> None:
    seen: list[WSGIEnvironment] = []

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        seen.append(environ)
        start_response("204 No Content", [])
        return []

    params = {
        b"REQUEST_METHOD": b"POST",
        b"REQUEST_URI": b"/p?q=1",
        b"CONTENT_LENGTH": b"",
        b"CONTENT_TYPE": b"",
        b"HTTP_CONTENT_TYPE": b"x/y",
        b"HTTP_CONTENT_LENGTH": b"0",
        b"SCRIPT_NAME": b"/",
        b"HTTPS": b"on",
    }
    out = serve(app, params)
    assert out.status == 0, out.logs
    assert seen


# --------------------------------------------------------------------------------------------
# InputStream
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("chunks", "sizes", "expected"),
    [
        ([b"abc", b"def", b"g"], [2, 2, 10, 1], [b"ab", b"cd", b"efg", b""]),
        ([b"abc", b"def"], [3, 3, 3], [b"abc", b"def", b""]),
        ([b"abcdef"], [1, 0, 2, -1], [b"a", b"", b"bc", b"def"]),
        ([b"a", b"b", b"c", b"d"], [3, 3], [b"abc", b"d"]),
        ([b"abc"], [None], [b"abc"]),
        ([b"ab", b"cd"], [1, None, None], [b"a", b"bcd", b""]),
        ([], [5, -1], [b"", b""]),
    ],
)
def test_input_read_sizes_follow_buffered_io_semantics(
    chunks: list[bytes], sizes: list[int | None], expected: list[bytes]
) -> None:
    stream = InputStream(chunk_source(chunks))
    got = [stream.read(size) for size in sizes]
    assert got == expected
    assert all(type(part) is bytes for part in got)  # parts of chunks are joined, not leaked


def test_input_read_all_of_a_one_chunk_body_returns_that_chunk_without_copying() -> None:
    chunk = b"x" * 100_000
    assert InputStream(chunk_source([chunk])).read() is chunk


def test_input_read_of_exactly_one_chunk_returns_it_without_copying() -> None:
    first, second = b"a" * 1000, b"b" * 1000
    stream = InputStream(chunk_source([first, second]))
    assert stream.read(1000) is first
    assert stream.read(1000) is second


def test_input_read_zero_does_not_touch_the_source() -> None:
    source, calls = counting_source([b"abc"])
    assert InputStream(source).read(0) == b""
    assert calls[0] == 0


def test_input_never_calls_the_source_again_after_eof() -> None:
    source, calls = counting_source([b"abc"])
    stream = InputStream(source)
    assert stream.read() == b"abc"
    for _ in range(3):
        assert stream.read() == b""
        assert stream.readline() == b""
        assert stream.read(10) == b""
    assert calls[0] == 2


def test_input_converts_non_bytes_chunks_to_bytes() -> None:
    stream = InputStream(chunk_source([bytearray(b"ab"), memoryview(b"c\n")]))  # type: ignore[list-item]
    line = stream.readline()
    assert line == b"abc\n"
    assert type(line) is bytes


@pytest.mark.parametrize(
    ("chunks", "lines"),
    [
        ([b"a\nb", b"c\n", b"\nd"], [b"a\n", b"bc\n", b"\n", b"d"]),
        ([b"one\ntwo\n"], [b"one\n", b"two\n"]),
        ([b"no newline at all"], [b"no newline at all"]),
        ([b"sp", b"lit", b" line\n", b"x"], [b"split line\n", b"x"]),
        ([b"\n\n", b"\n"], [b"\n", b"\n", b"\n"]),
        ([b"\r\n", b"a\r", b"\nb"], [b"\r\n", b"a\r\n", b"b"]),
        ([], []),
    ],
)
def test_input_readline_and_iteration_split_on_newline(
    chunks: list[bytes], lines: list[bytes]
) -> None:
    stream = InputStream(chunk_source(chunks))
    got = []
    while line := stream.readline():
        got.append(line)
    assert got == lines
    assert all(type(line) is bytes for line in got)
    assert list(InputStream(chunk_source(chunks))) == lines
    assert InputStream(chunk_source(chunks)).readlines() == lines


@pytest.mark.parametrize(
    ("chunks", "sizes", "expected"),
    [
        ([b"abcdef\n"], [3, 3, 3], [b"abc", b"def", b"\n"]),
        ([b"ab", b"cdef\n"], [3, -1], [b"abc", b"def\n"]),
        ([b"ab\ncd"], [10, 10], [b"ab\n", b"cd"]),
        ([b"ab", b"\n"], [2, 2], [b"ab", b"\n"]),
        ([b"a", b"b", b"c", b"d\n"], [3, 3], [b"abc", b"d\n"]),
        ([b"abc\n"], [0, None], [b"", b"abc\n"]),
        ([b"ab", b"c"], [5], [b"abc"]),
    ],
)
def test_input_readline_size_limits_the_line(
    chunks: list[bytes], sizes: list[int | None], expected: list[bytes]
) -> None:
    stream = InputStream(chunk_source(chunks))
    assert [stream.readline(size) for size in sizes] == expected


def test_input_readline_then_read_continue_where_the_other_stopped() -> None:
    stream = InputStream(chunk_source([b"head\nbo", b"dy\nrest"]))
    assert stream.readline() == b"head\n"
    assert stream.read(4) == b"body"
    assert stream.readline() == b"\n"
    assert stream.read() == b"rest"


@pytest.mark.parametrize(
    ("hint", "expected"),
    [
        (-1, [b"aa\n", b"b\n", b"cccc\n", b"d"]),
        (0, [b"aa\n", b"b\n", b"cccc\n", b"d"]),
        (None, [b"aa\n", b"b\n", b"cccc\n", b"d"]),
        (1, [b"aa\n"]),
        (3, [b"aa\n"]),
        (4, [b"aa\n", b"b\n"]),
        (6, [b"aa\n", b"b\n", b"cccc\n"]),
        (100, [b"aa\n", b"b\n", b"cccc\n", b"d"]),
    ],
)
def test_input_readlines_hint_stops_once_total_reaches_hint(
    hint: int | None, expected: list[bytes]
) -> None:
    chunks = [b"aa\nb", b"\ncc", b"cc\nd"]
    assert InputStream(chunk_source(chunks)).readlines(hint) == expected
    # the same as io's reference implementation
    assert io.BytesIO(b"".join(chunks)).readlines(hint) == expected


_OPS = st.lists(
    st.tuples(st.sampled_from(["read", "readline", "readlines"]), st.integers(-1, 12)),
    max_size=20,
)


@given(
    body=st.binary(max_size=200).map(lambda b: b.replace(b"\x00", b"\n")),
    cuts=st.lists(st.integers(0, 200), max_size=12),
    ops=_OPS,
)
def test_input_behaves_like_bytesio_for_any_chunking_and_any_calls(
    body: bytes, cuts: list[int], ops: list[tuple[str, int]]
) -> None:
    points = sorted({min(c, len(body)) for c in cuts} | {0, len(body)})
    chunks = [body[a:b] for a, b in itertools.pairwise(points)]
    stream, reference = InputStream(chunk_source(chunks)), io.BytesIO(body)
    for op, size in ops:
        assert getattr(stream, op)(size) == getattr(reference, op)(size), (op, size)
    assert stream.read() == reference.read()
    assert stream.buffered_bytes == 0


def test_input_streams_a_1_gib_upload_with_bounded_memory() -> None:
    chunk_size, count = 64 * 1024, 16 * 1024  # 1 GiB in 64 KiB chunks
    chunk = b"x" * chunk_size  # one object, yielded again and again: no allocation per chunk
    stream = InputStream(chunk_source(chunk for _ in range(count)))
    total = max_held = 0
    tracemalloc.start()
    try:
        while data := stream.read(100_000):  # reads that straddle chunk boundaries
            total += len(data)
            max_held = max(max_held, stream.buffered_bytes)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == chunk_size * count
    assert max_held <= chunk_size
    assert peak < 1024 * 1024


def test_input_iterates_a_1_gib_upload_line_by_line_with_bounded_buffer() -> None:
    chunk_size, count = 64 * 1024, 16 * 1024
    chunk = b"y" * (chunk_size - 1) + b"\n"
    stream = InputStream(chunk_source(chunk for _ in range(count)))
    lines = max_held = 0
    for line in stream:
        assert line is chunk  # a chunk that is exactly one line is handed on as it is
        lines += 1
        max_held = max(max_held, stream.buffered_bytes)
    assert lines == count
    assert max_held <= chunk_size


def test_input_readline_of_a_long_line_over_many_chunks_is_linear() -> None:
    # 64 MiB line in 4 KiB pieces: rescanning from the start each time would take minutes.
    piece = b"z" * 4096
    count = 16 * 1024
    stream = InputStream(chunk_source([*(piece for _ in range(count)), b"\nnext"]))
    started = time.perf_counter()
    line = stream.readline()
    elapsed = time.perf_counter() - started
    assert len(line) == 4096 * count + 1
    assert stream.read() == b"next"
    assert elapsed < 5.0


def test_input_drain_skips_the_rest_without_keeping_it() -> None:
    stream = InputStream(chunk_source([b"abc", b"def"]))
    assert stream.read(1) == b"a"
    assert stream.drain() == 5
    assert stream.buffered_bytes == 0
    assert stream.read() == b""


# --------------------------------------------------------------------------------------------
# ErrorStream
# --------------------------------------------------------------------------------------------


def test_errors_hands_on_complete_lines_and_holds_a_partial_one_until_flush() -> None:
    out: list[bytes] = []
    errors = ErrorStream(out.append)
    print("first", file=errors)  # print() writes the text, then "\n" separately
    assert out == [b"first\n"]
    errors.write("partial")
    assert out == [b"first\n"]
    errors.flush()
    assert out == [b"first\n", b"partial"]
    errors.flush()
    assert out == [b"first\n", b"partial"]


def test_errors_encodes_utf8_with_backslashreplace() -> None:
    out: list[bytes] = []
    errors = ErrorStream(out.append)
    assert errors.write("caf\u00e9 \udcff\n") == 7
    assert out == [b"caf\xc3\xa9 \\udcff\n"]


def test_errors_writelines_is_one_sink_call_per_flush() -> None:
    out: list[bytes] = []
    errors = ErrorStream(out.append)
    errors.writelines(["a", "b", "c\n"])
    assert out == [b"abc\n"]


def test_errors_bounds_the_pending_text_without_a_newline() -> None:
    out: list[bytes] = []
    errors = ErrorStream(out.append)
    for _ in range(100):
        errors.write("x" * 1000)
    assert len(out) >= 10
    errors.flush()
    assert b"".join(out) == b"x" * 100_000


def test_errors_rejects_bytes() -> None:
    with pytest.raises(TypeError):
        ErrorStream(lambda data: None).write(b"bytes")  # type: ignore[arg-type]


def test_errors_go_quiet_instead_of_failing_when_the_sink_is_gone() -> None:
    calls: list[bytes] = []

    def sink(data: bytes) -> None:
        calls.append(data)
        raise BrokenPipeError(32, "Broken pipe")

    errors = ErrorStream(sink)
    errors.write("one\n")
    errors.write("two\n")
    assert calls == [b"one\n"]


def test_errors_echo_each_flushed_text_to_the_log_even_when_the_sink_is_gone() -> None:
    """The server's log gets what the web server gets (one entry per line or flush, without
    the newline), and keeps getting it after the connection went away."""
    sent: list[bytes] = []
    logged: list[str] = []

    def sink(data: bytes) -> None:
        sent.append(data)
        if len(sent) == 2:
            raise BrokenPipeError(32, "Broken pipe")

    errors = ErrorStream(sink, logged.append)
    assert errors.echoes and not ErrorStream(sink).echoes
    errors.write("partial ")
    errors.write("line\n")
    errors.write("two\n")
    errors.write("three\n")
    errors.write("no newline")
    errors.flush()
    assert sent == [b"partial line\n", b"two\n"]
    assert logged == ["partial line", "two", "three", "no newline"]


def test_run_app_flushes_wsgi_errors_when_the_request_ends() -> None:
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        environ["wsgi.errors"].write("no newline")
        start_response("200 OK", TEXT)
        return [b"ok"]

    out = serve(app)
    assert out.stderr == [b"no newline"]


# --------------------------------------------------------------------------------------------
# run_app: the happy paths and the send() shape
# --------------------------------------------------------------------------------------------


def test_hello_app_is_exactly_one_send_of_head_and_body() -> None:
    out = serve(hello, validate=False)
    assert out.status == 0
    assert out.sends == [[HELLO_HEAD, b"Hello, world!"]]
    assert out.logs == []


def test_hello_app_through_validator_is_one_send() -> None:
    out = serve(hello)
    assert out.status == 0
    assert out.sends == [[HELLO_HEAD, b"Hello, world!"]]


def test_single_element_tuple_result_is_one_send() -> None:
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", TEXT)
        return (b"tuple",)

    assert serve(app).sends == [[HELLO_HEAD, b"tuple"]]


def test_head_is_cgi_format_with_status_first_and_headers_in_order() -> None:
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        start_response(
            "404 Not Found",
            [
                ("Content-Type", "text/html"),
                ("X-A", "1"),
                ("Set-Cookie", "a=b"),
                ("X-Latin", "\xe9"),
            ],
        )
        return [b"nope"]

    out = serve(app)
    assert out.sends[0][0] == (
        b"Status: 404 Not Found\r\nContent-Type: text/html\r\nX-A: 1\r\n"
        b"Set-Cookie: a=b\r\nX-Latin: \xe9\r\n\r\n"
    )


def test_empty_body_sends_the_head_alone_at_the_end() -> None:
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        start_response("204 No Content", [])
        return []

    out = serve(app)
    assert out.sends == [[b"Status: 204 No Content\r\n\r\n"]]
    assert out.status == 0


def test_streaming_generator_sends_each_chunk_as_it_comes_and_skips_empty_ones() -> None:
    produced: list[int] = []

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterator[bytes]:
        start_response("200 OK", TEXT)
        for i, chunk in enumerate([b"", b"", b"one", b"", b"two", b"three"]):
            produced.append(i)
            yield chunk

    sends_seen_at: list[int] = []

    def send(bufs: list[bytes]) -> None:
        sends_seen_at.append(len(produced))

    out = serve(app, send=send)
    assert out.sends == [[HELLO_HEAD, b"one"], [b"two"], [b"three"]]
    # each chunk went out before the next one was produced (PEP 3333: no buffering)
    assert sends_seen_at == [3, 5, 6]


def test_generator_yielding_only_empty_chunks_sends_head_at_the_end() -> None:
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterator[bytes]:
        start_response("200 OK", TEXT)
        yield b""
        yield b""

    assert serve(app).sends == [[HELLO_HEAD]]


def test_large_body_is_streamed_chunk_by_chunk_not_concatenated() -> None:
    chunks = [bytes([65 + i]) * 65536 for i in range(8)]

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", TEXT)
        return iter(chunks)

    out = serve(app)
    assert len(out.sends) == 8
    assert out.sends[0][1] is chunks[0]
    assert all(call[-1] is chunk for call, chunk in zip(out.sends, chunks, strict=True))


def test_write_callable_sends_immediately_then_the_iterable_follows() -> None:
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        write = start_response("200 OK", TEXT)
        write(b"")
        write(b"w1")
        write(b"w2")
        return [b"it"]

    out = serve(app)
    assert out.sends == [[HELLO_HEAD, b"w1"], [b"w2"], [b"it"]]
    assert out.status == 0


def test_write_rejects_str() -> None:
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        write = start_response("200 OK", TEXT)
        write("text")  # type: ignore[arg-type]
        return []

    out = serve(app, validate=False)
    assert out.status_line == b"Status: 500 Internal Server Error"
    assert "TypeError" in out.logs[0]


def test_request_body_is_readable_from_the_app() -> None:
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        data = environ["wsgi.input"].read(int(environ["CONTENT_LENGTH"]))
        start_response("200 OK", TEXT)
        return [data.upper()]

    out = serve(app, {b"REQUEST_METHOD": b"POST", b"CONTENT_LENGTH": b"6"}, body=[b"abc", b"def"])
    assert out.body == b"ABCDEF"


# --------------------------------------------------------------------------------------------
# run_app: file_wrapper
# --------------------------------------------------------------------------------------------


class TrackedFile(io.BytesIO):
    """BytesIO that records its read sizes and close() calls."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.reads: list[int] = []
        self.close_calls = 0

    def read(self, size: int | None = -1, /) -> bytes:
        self.reads.append(-1 if size is None else size)
        return super().read(size)

    def close(self) -> None:
        self.close_calls += 1
        super().close()


def file_app(data: bytes, blksize: int = 1000) -> tuple[WSGIApplication, list[TrackedFile]]:
    files: list[TrackedFile] = []

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        f = TrackedFile(data)
        files.append(f)
        wrapper: Iterable[bytes] = environ["wsgi.file_wrapper"](f, blksize)
        return wrapper

    return app, files


def test_file_wrapper_is_read_in_big_blocks_and_closed() -> None:
    data = bytes(range(256)) * 4096  # 1 MiB
    app, files = file_app(data, blksize=1000)
    out = serve(app, validate=False)
    assert out.body == data
    assert out.status == 0
    assert files[0].reads[0] == FILE_READ_SIZE  # not the app's small blksize
    assert len(out.sends) == -(-len(data) // FILE_READ_SIZE)
    assert files[0].close_calls == 1


def test_file_wrapper_through_validator_iterates_in_blksize_blocks_and_closes() -> None:
    data = b"0123456789" * 250
    app, files = file_app(data, blksize=1000)
    out = serve(app)
    assert out.body == data
    assert [len(call[-1]) for call in out.sends] == [1000, 1000, 500]
    assert files[0].close_calls == 1


def test_file_wrapper_iterates_and_closes_on_its_own() -> None:
    f = TrackedFile(b"abcdefg")
    wrapper = FileWrapper(f, 3)
    assert list(wrapper) == [b"abc", b"def", b"g"]
    wrapper.close()
    assert f.close_calls == 1


def test_file_wrapper_close_tolerates_files_without_close() -> None:
    class Reader:
        def read(self, size: int = -1, /) -> bytes:
            return b""

    FileWrapper(Reader()).close()


# --------------------------------------------------------------------------------------------
# run_app: start_response rules and exc_info
# --------------------------------------------------------------------------------------------


def test_exc_info_before_headers_are_sent_replaces_the_response() -> None:
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", TEXT)
        try:
            raise ValueError("handled by the app")
        except ValueError:
            start_response("503 Service Unavailable", TEXT, sys.exc_info())
        return [b"sorry"]

    out = serve(app)
    assert out.sends == [
        [b"Status: 503 Service Unavailable\r\nContent-Type: text/plain\r\n\r\n", b"sorry"]
    ]
    assert out.status == 0


def test_exc_info_after_headers_are_sent_reraises_and_stops_the_response() -> None:
    reraised: list[BaseException] = []

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterator[bytes]:
        start_response("200 OK", TEXT)
        yield b"partial"
        try:
            raise KeyError("late failure")
        except KeyError:
            try:
                start_response("500 Oops", TEXT, sys.exc_info())
            except KeyError as exc:
                reraised.append(exc)
                raise
        yield b"never"

    out = serve(app)
    assert len(reraised) == 1
    assert out.sends == [[HELLO_HEAD, b"partial"]]
    assert out.status == 1
    assert "late failure" in out.logs[0]
    assert "Traceback" in out.logs[0]


def test_second_start_response_without_exc_info_is_an_error() -> None:
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", TEXT)
        start_response("201 Created", TEXT)
        return [b"x"]

    out = serve(app, validate=False)
    assert out.status_line == b"Status: 500 Internal Server Error"
    assert "second time" in out.logs[0]
    assert out.status == 1


def test_body_without_start_response_is_a_500() -> None:
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        return [b"forgot"]

    out = serve(app, validate=False)
    assert out.sends == [[out.raw]]
    assert out.status_line == b"Status: 500 Internal Server Error"
    assert b"forgot" not in out.raw
    assert "start_response" in out.logs[0]


def test_empty_result_without_start_response_is_a_500() -> None:
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        return []

    out = serve(app, validate=False)
    assert out.status_line == b"Status: 500 Internal Server Error"
    assert out.status == 1


@pytest.mark.parametrize(
    "chunk", ["text", bytearray(b"ba"), 42, None], ids=["str", "bytearray", "int", "None"]
)
def test_non_bytes_body_chunk_is_a_500(chunk: object) -> None:
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", TEXT)
        return [b"", chunk]  # type: ignore[list-item]

    out = serve(app, validate=False)
    assert out.status_line == b"Status: 500 Internal Server Error"
    assert "not bytes" in out.logs[0]


@pytest.mark.parametrize("result", [b"raw bytes", "text"], ids=["bytes", "str"])
def test_app_returning_bytes_instead_of_a_list_is_a_500_naming_the_mistake(
    result: object,
) -> None:
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", TEXT)
        return result  # type: ignore[return-value]

    out = serve(app, validate=False)
    assert out.status_line == b"Status: 500 Internal Server Error"
    assert "e.g. [body]" in out.logs[0]


def test_app_returning_none_is_a_500() -> None:
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", TEXT)
        return None  # type: ignore[return-value]

    out = serve(app, validate=False)
    assert out.status_line == b"Status: 500 Internal Server Error"


# --------------------------------------------------------------------------------------------
# run_app: status and header validation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        [("X-Evil", "a\r\nSet-Cookie: session=stolen")],
        [("X-Evil", "a\nb")],
        [("X-Evil", "a\rb")],
        [("X-Evil", "a\x00b")],
        [("X-Evil", "a\x7fb")],
        [("X-Euro", "\u20ac")],
        [("X-Emoji", "\U0001f600")],
        [("X Space", "v")],
        [("X:Colon", "v")],
        [("", "v")],
        [("X-\u00e9", "v")],
        [("X-Bytes", b"v")],
        [(b"X-Bytes", "v")],
        [("X-Int", 1)],
        [("X-Three", "a", "b")],
        ["X-Not-A-Tuple"],
        [("Status", "404 Not Found")],
        [("Content-Length", "12abc")],
        [("Content-Length", "-1")],
    ],
    ids=lambda h: repr(h)[:40],
)
def test_bad_header_becomes_500_is_logged_and_never_reaches_the_wire(
    headers: list[Any],
) -> None:
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain"), *headers])
        return [b"body"]

    out = serve(app, validate=False)
    assert out.sends == [[out.raw]]
    assert out.status_line == b"Status: 500 Internal Server Error"
    assert out.body == b"Internal Server Error"
    assert b"stolen" not in out.raw and b"X-" not in out.raw and b"body" not in out.raw
    assert out.status == 1
    assert len(out.logs) == 1
    assert "InvalidResponseError" in out.logs[0]


@pytest.mark.parametrize(
    "status",
    [
        "20 OK",
        "OK",
        "2000 OK",
        "099 Low",
        "200 OK\r\nX-Evil: 1",
        "200 OK\n",
        "200\tOK",
        "200 \u20ac",
        b"200 OK",
        200,
        "",
    ],
    ids=repr,
)
def test_bad_status_becomes_500(status: Any) -> None:
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        start_response(status, TEXT)
        return [b"body"]

    out = serve(app, validate=False)
    assert out.status_line == b"Status: 500 Internal Server Error"
    assert b"X-Evil" not in out.raw
    assert "InvalidResponseError" in out.logs[0]


@pytest.mark.parametrize(
    "status", ["200 OK", "404 Not Found", "299 Whatever We Like", "200", "500 ", "418 I\u00e9m"]
)
def test_valid_status_goes_out_verbatim(status: str) -> None:
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        start_response(status, TEXT)
        return [b"x"]

    out = serve(app, validate=False)
    assert out.status_line == b"Status: " + status.encode("latin-1")
    assert out.status == 0


@pytest.mark.parametrize("name", ["X-Token!#$%&'*+-.^_`|~09az", "content-type", "ETag", "A"])
def test_token_header_names_are_accepted(name: str) -> None:
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", [(name, "v\t w \xff")])
        return [b"x"]

    out = serve(app, validate=False)
    assert out.head == b"Status: 200 OK\r\n" + name.encode() + b": v\t w \xff\r\n\r\n"


def test_start_response_raises_at_call_time_so_the_app_can_answer_itself() -> None:
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        try:
            start_response("200 OK", [("X-Bad", "a\nb")])
        except InvalidResponseError:
            start_response("502 Bad Gateway", TEXT, sys.exc_info())
        return [b"upstream header was bad"]

    out = serve(app, validate=False)
    assert out.status_line == b"Status: 502 Bad Gateway"
    assert out.status == 0


def test_body_beyond_content_length_is_truncated_and_logged() -> None:
    gen = Closing([b"abc", b"def", b"ghi"])

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", [*TEXT, ("Content-Length", "5")])
        return gen

    out = serve(app)
    assert out.body == b"abcde"
    assert gen.yielded == 2  # stopped iterating once Content-Length was reached
    assert gen.closed == 1
    assert "Content-Length" in out.logs[0]
    assert out.status == 1


def test_write_beyond_content_length_raises_in_the_app() -> None:
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        write = start_response("200 OK", [*TEXT, ("Content-Length", "2")])
        write(b"abc")
        return []

    out = serve(app)
    assert out.body == b"ab"
    assert out.status == 1


# --------------------------------------------------------------------------------------------
# run_app: application errors
# --------------------------------------------------------------------------------------------


def test_app_exception_before_response_is_a_plain_500_with_the_traceback_in_the_logs() -> None:
    # In the worker's log and in wsgi.errors (FCGI_STDERR: the web server's error log, the
    # only log left where the worker's stderr is /dev/null), never in the response.
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        raise ZeroDivisionError("secret detail /srv/app/settings.py")

    out = serve(app)
    assert out.sends == [
        [
            b"Status: 500 Internal Server Error\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: 21\r\n\r\nInternal Server Error"
        ]
    ]
    assert b"secret" not in out.raw and b"Traceback" not in out.raw
    assert out.status == 1
    assert len(out.logs) == 1
    assert "Traceback (most recent call last)" in out.logs[0]
    assert "ZeroDivisionError: secret detail" in out.logs[0]
    # The exception's own line comes first: web servers cut long stderr lines (nginx ~2 KB).
    first = "error in the WSGI application, answering 500: ZeroDivisionError: secret detail"
    assert out.logs[0].startswith(first)
    assert b"".join(out.stderr).decode() == out.logs[0] + "\n"


def test_app_exception_after_start_response_but_before_body_is_still_a_500() -> None:
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterator[bytes]:
        start_response("200 OK", TEXT)
        yield b""
        raise RuntimeError("before any byte")

    out = serve(app)
    assert out.status_line == b"Status: 500 Internal Server Error"
    assert b"200 OK" not in out.raw


def test_app_exception_after_body_started_stops_the_stream_and_returns_1() -> None:
    result = Closing([b"first", b"second", b"third"], fail_at=1)

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", TEXT)
        return result

    out = serve(app)
    assert out.sends == [[HELLO_HEAD, b"first"]]
    assert out.status == 1
    assert "boom in iteration" in out.logs[0]
    assert result.closed == 1


def test_keyboard_interrupt_propagates_after_close() -> None:
    result = Closing([b"a", b"b"])

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", TEXT)
        return result

    def send(bufs: list[bytes]) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        serve(app, send=send, validate=False)
    assert result.closed == 1


def test_app_faults_after_the_response_started_reach_wsgi_errors_too() -> None:
    def overflowing(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Length", "3")])
        return [b"first"]

    out = serve(overflowing, validate=False)
    assert "more body than its Content-Length header (3 bytes)" in b"".join(out.stderr).decode()

    def failing(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", TEXT)
        return Closing([b"first", b"second"], fail_at=1)

    out = serve(failing, validate=False)
    stderr = b"".join(out.stderr).decode()
    assert "after the response started; it is truncated: RuntimeError: boom" in stderr
    assert stderr == out.logs[0] + "\n"


@pytest.mark.parametrize(
    ("method", "status", "reported"),
    [("GET", "200 OK", True), ("HEAD", "200 OK", False), ("GET", "304 Not Modified", False)],
)
def test_a_body_shorter_than_its_content_length_is_reported(
    method: str, status: str, reported: bool
) -> None:
    """The web server cannot tell a body cut short from a slow one (it waits, then its
    client sees a truncated response): the app's mistake is logged and ends the request with
    app status 1, as a body longer than its Content-Length does. Not for HEAD, nor a 304,
    where the Content-Length describes what is not sent."""

    def short(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        start_response(status, [("Content-Length", "100")])
        return [b"x" * 10] if method == "GET" and status.startswith("200") else []

    out = serve(short, {b"REQUEST_METHOD": method.encode()}, validate=False)
    message = "it sent 10 of the 100 body bytes its Content-Length header announced"
    assert (message in "\n".join(out.logs)) is reported
    assert out.status == (1 if reported else 0)


def _cut_cases() -> dict[str, tuple[WSGIApplication, bool]]:
    def raises_mid_stream(environ: WSGIEnvironment, start_response: StartResponse) -> Any:
        start_response("200 OK", TEXT)
        return Closing([b"first", b"second"], fail_at=1)

    def short_body(environ: WSGIEnvironment, start_response: StartResponse) -> Any:
        start_response("200 OK", [("Content-Length", "100")])
        return [b"x" * 10]

    def raises_first(environ: WSGIEnvironment, start_response: StartResponse) -> Any:
        raise RuntimeError("before anything")

    def close_fails(environ: WSGIEnvironment, start_response: StartResponse) -> Any:
        start_response("200 OK", [("Content-Length", "5")])
        return Closing([b"whole"], fail_in_close=True)

    def overflows(environ: WSGIEnvironment, start_response: StartResponse) -> Any:
        start_response("200 OK", [("Content-Length", "3")])
        return [b"first"]

    return {
        "raises mid-stream": (raises_mid_stream, True),
        "short of its Content-Length": (short_body, True),
        "raises first (a whole 500)": (raises_first, False),
        "close() fails after it all": (close_fails, False),
        "more than its Content-Length (cut to it)": (overflows, False),
    }


@pytest.mark.parametrize("case", list(_cut_cases()))
def test_run_app_tells_the_server_when_a_response_was_cut_short(case: str) -> None:
    """Only a response that started and did not end (see wsgi.Batching) is ``cut``: the
    server closes the connection instead of ending it as if whole. A failure before anything
    was sent is a whole 500; a failing close() or a body cut to its Content-Length leave the
    client a whole response; all of them have app status 1."""
    app, cut = _cut_cases()[case]
    sink = _Deferred()
    status = run_app(app, environ_for(None), sink.send, log=lambda _: None, batching=sink)
    assert status == 1
    assert sink.cut is cut
    head = _Deferred()
    run_app(app, environ_for({b"REQUEST_METHOD": b"HEAD"}), head.send, lambda _: None, head)
    assert head.cut is False  # a HEAD's head is all of it


@pytest.mark.parametrize("kind", ["list", "write", "file", "endless"])
def test_a_head_request_gets_the_head_and_no_body(kind: str) -> None:
    """A HEAD's body goes nowhere (every web server drops it, nginx closes once it has the
    head): not sent, a file not read, an endless generator not run past its first chunk
    (closed as usual); the Content-Length stays what the app said."""
    reads: list[int] = []
    closed: list[bool] = []

    class Counting(io.BytesIO):
        def read(self, size: int | None = -1, /) -> bytes:
            reads.append(1)
            return super().read(size)

    def endless() -> Iterator[bytes]:
        try:
            while True:
                yield b"x" * 100
        finally:
            closed.append(True)

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        write = start_response("200 OK", [("Content-Length", "300")])
        if kind == "list":
            return [b"x" * 300]
        if kind == "write":
            write(b"x" * 300)
            return []
        if kind == "file":
            return environ["wsgi.file_wrapper"](Counting(b"x" * 300))  # type: ignore[no-any-return]
        return endless()

    out = serve(app, {b"REQUEST_METHOD": b"HEAD"}, validate=False)
    assert out.status == 0 and out.body == b"" and b"Content-Length: 300" in out.head
    assert not reads and (closed == [True] if kind == "endless" else not closed)
    assert not out.logs


def test_a_head_request_that_fails_gets_the_500_head_without_its_body() -> None:
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        raise RuntimeError("boom")

    out = serve(app, {b"REQUEST_METHOD": b"HEAD"}, validate=False)
    assert out.status_line == b"Status: 500 Internal Server Error"
    assert out.body == b"" and b"Content-Length: 21" in out.head


def test_a_fault_after_the_client_went_away_is_only_logged() -> None:
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        write = start_response("200 OK", TEXT)
        try:
            write(b"first")
        except Exception:
            raise RuntimeError("late") from None
        return []

    def send(bufs: list[bytes]) -> None:
        raise BrokenPipeError(32, "gone")

    out = serve(app, send=send, validate=False)
    assert any("after the client went away: RuntimeError: late" in line for line in out.logs)
    assert out.stderr == []


# --------------------------------------------------------------------------------------------
# run_app: close() is called exactly once, whatever happens
# --------------------------------------------------------------------------------------------


def closing_app(result: Closing) -> WSGIApplication:
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", TEXT)
        return result

    return app


def test_close_is_called_once_on_success() -> None:
    result = Closing([b"a", b"b"])
    out = serve(closing_app(result))
    assert out.body == b"ab"
    assert result.closed == 1


def test_close_is_called_once_when_iteration_raises_before_the_first_chunk() -> None:
    result = Closing([b"a"], fail_at=0)
    out = serve(closing_app(result))
    assert out.status_line == b"Status: 500 Internal Server Error"
    assert result.closed == 1


def test_close_is_called_once_when_the_client_disconnects_and_iteration_stops() -> None:
    result = Closing([b"a", b"b", b"c"])
    out = serve(closing_app(result), send=broken_pipe)
    assert result.closed == 1
    assert result.yielded == 1  # nothing more was produced for a dead peer
    assert len(out.sends) == 1
    assert out.status == 1
    assert "client went away" in out.logs[0]
    assert "Traceback" not in out.logs[0]


def test_client_disconnect_during_write_stops_the_app_and_closes() -> None:
    result = Closing([b"never"])
    caught: list[BaseException] = []

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        write = start_response("200 OK", TEXT)
        try:
            write(b"first")
        except ConnectionError as exc:
            caught.append(exc)
            try:
                write(b"second")
            except ClientDisconnected as again:
                caught.append(again)
        return result

    out = serve(app, send=broken_pipe)
    assert [type(exc) for exc in caught] == [ClientDisconnected, ClientDisconnected]
    assert len(out.sends) == 1  # the second write never reached send()
    assert result.closed == 1
    assert result.yielded == 0
    assert out.status == 1


def test_client_disconnect_while_sending_the_500_is_swallowed() -> None:
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        raise RuntimeError("app bug")

    out = serve(app, send=broken_pipe)
    assert out.status == 1
    assert any("app bug" in line for line in out.logs)


def test_close_is_called_once_for_a_generator_that_is_cut_short() -> None:
    finalized: list[str] = []

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterator[bytes]:
        start_response("200 OK", TEXT)
        try:
            yield b"one"
            yield b"two"
        finally:
            finalized.append("closed")

    serve(app, send=broken_pipe)
    assert finalized == ["closed"]


def test_close_raising_is_logged_and_returns_1() -> None:
    class BadClose(Closing):
        def close(self) -> None:
            super().close()
            raise OSError("close failed")

    result = BadClose([b"ok"])
    out = serve(closing_app(result), validate=False)
    assert out.body == b"ok"
    assert result.closed == 1
    assert out.status == 1
    assert "close()" in out.logs[0]


# --------------------------------------------------------------------------------------------
# parse_app_spec / load_app
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("app:application", ("app", "application")),
        ("pkg.mod:factory.app", ("pkg.mod", "factory.app")),
        ("  mod:app  ", ("mod", "app")),
        ("mod", ("mod", "application")),
    ],
)
def test_parse_app_spec_splits_module_and_attribute(spec: str, expected: tuple[str, str]) -> None:
    assert parse_app_spec(spec) == expected


@pytest.mark.parametrize(
    "spec",
    [
        "",
        ":app",
        "mod:",
        "mod:app:x",
        "mod:create_app()",
        "my-mod:app",
        "mod:.app",
        "/path/to/mod.py:app",
        ".rel:app",
        "mod:app.",
        "1mod:app",
    ],
)
def test_parse_app_spec_rejects_malformed_specs_naming_the_spec(spec: str) -> None:
    with pytest.raises(WSGIAppLoadError) as info:
        parse_app_spec(spec)
    assert info.value.spec == spec
    assert repr(spec) in str(info.value)


@pytest.fixture
def app_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, str]]:
    """A directory on sys.path and a unique package name, removed from sys.modules afterwards."""
    name = f"wsgi_test_{uuid.uuid4().hex}"
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path, name
    for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[mod]


def write_module(root: Path, dotted: str, source: str) -> None:
    parts = dotted.split(".")
    directory = root
    for part in parts[:-1]:
        directory = directory / part
        directory.mkdir(exist_ok=True)
        (directory / "__init__.py").touch()
    (directory / f"{parts[-1]}.py").write_text(source)


def test_load_app_imports_module_attribute(app_dir: tuple[Path, str]) -> None:
    root, name = app_dir
    write_module(root, name, "def application(environ, start_response):\n    return []\n")
    app = load_app(f"{name}:application")
    assert app.__name__ == "application"
    assert load_app(name) is app


def test_load_app_follows_a_dotted_attribute_in_a_package(app_dir: tuple[Path, str]) -> None:
    root, name = app_dir
    write_module(
        root,
        f"{name}.sub.mod",
        "class Factory:\n"
        "    @staticmethod\n"
        "    def app(environ, start_response):\n"
        "        start_response('200 OK', [('Content-Type', 'text/plain')])\n"
        "        return [b'from package']\n",
    )
    app = load_app(f"{name}.sub.mod:Factory.app")
    assert serve(app).body == b"from package"


def test_load_app_never_calls_a_factory(app_dir: tuple[Path, str]) -> None:
    root, name = app_dir
    write_module(
        root,
        name,
        "CALLS = []\n"
        "def create_app():\n"
        "    CALLS.append(1)\n"
        "    raise AssertionError('factory must not be called')\n",
    )
    app = load_app(f"{name}:create_app")
    assert app is sys.modules[name].create_app
    assert sys.modules[name].CALLS == []


def test_load_app_missing_module_names_spec_and_hints_at_sys_path(
    app_dir: tuple[Path, str],
) -> None:
    _, name = app_dir
    with pytest.raises(WSGIAppLoadError) as info:
        load_app(f"{name}.nothere:app")
    err = info.value
    assert err.spec == f"{name}.nothere:app"
    assert f"{name}.nothere:app" in str(err)
    assert "sys.path" in str(err)
    assert "\n" not in str(err)
    assert err.traceback_text is None  # importlib's frames only: nothing of the app's


def test_load_app_missing_module_imported_by_a_package_of_the_app_keeps_its_traceback(
    app_dir: tuple[Path, str],
) -> None:
    """The package exists and its __init__ imports the missing submodule: the line that does
    is the app's, and the traceback shows it."""
    root, name = app_dir
    (root / name).mkdir()
    (root / name / "__init__.py").write_text(f"from {name} import nothere\n")
    with pytest.raises(WSGIAppLoadError) as info:
        load_app(f"{name}.nothere:app")
    assert info.value.traceback_text is not None
    assert "__init__.py" in info.value.traceback_text


def test_load_app_import_error_carries_the_apps_traceback(app_dir: tuple[Path, str]) -> None:
    root, name = app_dir
    source = "import os\n\nraise RuntimeError('database url missing\\nset DATABASE_URL')\n"
    write_module(root, name, source)
    with pytest.raises(WSGIAppLoadError) as info:
        load_app(f"{name}:app")
    err = info.value
    assert f"{name}:app" in str(err)
    assert "RuntimeError: database url missing set DATABASE_URL" in str(err)
    assert "\n" not in str(err)
    assert err.traceback_text is not None
    assert f"{name}.py" in err.traceback_text
    assert "line 3" in err.traceback_text
    assert isinstance(err.__cause__, RuntimeError)


def test_load_app_missing_dependency_inside_the_app_is_an_import_failure(
    app_dir: tuple[Path, str],
) -> None:
    root, name = app_dir
    write_module(root, name, f"import {name}_dependency_that_does_not_exist\n")
    with pytest.raises(WSGIAppLoadError) as info:
        load_app(f"{name}:app")
    assert "importing" in info.value.message
    assert "ModuleNotFoundError" in info.value.message


def test_load_app_syntax_error_points_at_the_line(app_dir: tuple[Path, str]) -> None:
    root, name = app_dir
    write_module(root, name, "x = 1\ndef broken(:\n")
    with pytest.raises(WSGIAppLoadError) as info:
        load_app(f"{name}:app")
    assert info.value.traceback_text is not None
    assert "SyntaxError" in info.value.traceback_text
    assert "line 2" in info.value.traceback_text


def test_load_app_sys_exit_at_import_is_a_load_error(app_dir: tuple[Path, str]) -> None:
    root, name = app_dir
    write_module(root, name, "import sys\nsys.exit(3)\n")
    with pytest.raises(WSGIAppLoadError, match="SystemExit"):
        load_app(f"{name}:app")


@pytest.mark.parametrize(
    ("attr", "fragment"),
    [("missing", "has no attribute 'missing'"), ("holder.nope", "has no attribute 'nope'")],
)
def test_load_app_missing_attribute_is_a_clear_error(
    app_dir: tuple[Path, str], attr: str, fragment: str
) -> None:
    root, name = app_dir
    write_module(root, name, "class holder:\n    pass\n")
    with pytest.raises(WSGIAppLoadError, match=fragment) as info:
        load_app(f"{name}:{attr}")
    assert f"{name}:{attr}" in str(info.value)


def test_load_app_missing_submodule_attribute_hints_at_the_module_part(
    app_dir: tuple[Path, str],
) -> None:
    root, name = app_dir
    write_module(root, f"{name}.web", "def app(environ, start_response):\n    return []\n")
    with pytest.raises(WSGIAppLoadError, match="submodule") as info:
        load_app(f"{name}:web.app")
    assert f"'{name}.web:...'" in str(info.value)
    assert callable(load_app(f"{name}.web:app"))


def test_load_app_not_callable_is_a_clear_error(app_dir: tuple[Path, str]) -> None:
    root, name = app_dir
    write_module(root, name, "application = {'not': 'callable'}\n")
    with pytest.raises(WSGIAppLoadError, match="not a callable") as info:
        load_app(f"{name}:application")
    assert "dict" in str(info.value)


# --------------------------------------------------------------------------------------------
# the cache of validated heads
# --------------------------------------------------------------------------------------------


def test_head_cache_revalidates_headers_changed_in_place() -> None:
    """An app reusing one (mutable) headers list: a cached good head never covers a bad one."""
    headers = [("Content-Type", "text/plain"), ("X-Note", "fine")]

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", headers)
        return [b"ok"]

    for _ in range(2):  # the second run is a cache hit
        out = serve(app)
        assert out.status == 0
        assert out.head == b"Status: 200 OK\r\nContent-Type: text/plain\r\nX-Note: fine\r\n\r\n"
    headers[1] = ("X-Note", "evil\r\nSet-Cookie: x=1")
    out = serve(app, validate=False)
    assert out.status == 1
    assert out.status_line == b"Status: 500 Internal Server Error"
    assert b"Set-Cookie" not in out.raw
    assert any("X-Note" in line for line in out.logs)


def test_head_cache_handles_unhashable_and_tuple_headers() -> None:
    for headers in ([["Content-Type", "text/plain"]], (("Content-Type", "text/plain"),)):

        def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
            start_response("200 OK", headers)  # type: ignore[arg-type]  # noqa: B023
            return [b"ok"]

        for _ in range(2):
            out = serve(app, validate=False)
            assert out.status == 0
            assert out.head == b"Status: 200 OK\r\nContent-Type: text/plain\r\n\r\n"


def test_head_cache_keeps_the_content_length_per_head() -> None:
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Length", "2")])
        return [b"toolong"]

    for _ in range(2):
        out = serve(app, validate=False)
        assert out.body == b"to"
        assert out.status == 1


class _Deferred:
    """A server's side of run_app's ``batching``: records whether it was told to coalesce,
    and whether that was before the first send."""

    def __init__(self) -> None:
        self.defer = False
        self.cut = False
        self.defer_at_first_send: bool | None = None

    def send(self, bufs: list[bytes]) -> None:
        if self.defer_at_first_send is None:
            self.defer_at_first_send = self.defer


@pytest.mark.parametrize(
    ("kind", "coalesce"),
    [("list", True), ("tuple", True), ("file_wrapper", True), ("generator", False)],
)
def test_run_app_lets_the_server_coalesce_only_responses_without_app_code_between_chunks(
    kind: str, coalesce: bool
) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        if kind == "list":
            return [b"a", b"b"]
        if kind == "tuple":
            return (b"a", b"b")
        if kind == "file_wrapper":
            return cast(Iterable[bytes], environ["wsgi.file_wrapper"](io.BytesIO(b"ab")))
        return (chunk for chunk in (b"a", b"b"))

    sink = _Deferred()
    status = run_app(app, environ_for(None), sink.send, log=print, batching=sink)
    assert status == 0
    assert sink.defer is coalesce
    assert sink.defer_at_first_send is coalesce  # decided before anything was sent

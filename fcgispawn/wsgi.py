"""PEP 3333 glue between a FastCGI request and a WSGI application.

This module is deliberately ignorant of FastCGI records and sockets (it imports nothing from
fcgispawn): the server hands it decoded PARAMS, a chunk source for the request body and a
``send`` callback, and gets back CGI-format response bytes. That keeps the PEP 3333 rules here,
testable without any I/O, and the framing in ``protocol.py``.

Public API (the server builds on it):

- ``build_environ(params, *, input, errors, multithread, multiprocess, url_scheme=None)``
- ``InputStream(source)`` — ``wsgi.input`` streaming from ``source()`` chunks, ``b""`` at EOF
- ``ErrorStream(sink)`` — ``wsgi.errors``: text in, UTF-8 bytes out through ``sink``
- ``FileWrapper(filelike, blksize=65536)`` — ``wsgi.file_wrapper``
- ``run_app(app, environ, send, log, batching=None) -> int`` — call the app, send the
  response, app status
- ``parse_app_spec(spec)`` / ``load_app(spec)`` / ``WSGIAppLoadError`` — ``--wsgi MODULE:CALLABLE``
"""

from __future__ import annotations

import importlib
import operator
import re
import traceback
import types
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Final, Protocol, TypeAlias, cast
from urllib.parse import unquote_to_bytes
from wsgiref import types as wsgi_types

__all__ = [
    "Batching",
    "ClientDisconnected",
    "ErrorStream",
    "FileWrapper",
    "InputStream",
    "InvalidResponseError",
    "RequestBodyIncomplete",
    "StartResponseError",
    "WSGIAppLoadError",
    "WSGIApplication",
    "WSGIEnvironment",
    "build_environ",
    "build_environ_latin1",
    "load_app",
    "parse_app_spec",
    "run_app",
]

WSGIApplication: TypeAlias = wsgi_types.WSGIApplication
WSGIEnvironment: TypeAlias = wsgi_types.WSGIEnvironment
_ExcInfo: TypeAlias = (
    tuple[type[BaseException], BaseException, types.TracebackType] | tuple[None, None, None]
)

#: Block size ``run_app`` reads a ``FileWrapper``'s file with (unless the app asked for more).
#: A multiple of 65528 (the FastCGI record payload the server frames stdout in) so that only the
#: last record of a file needs padding; big blocks mean fewer send calls per file.
FILE_READ_SIZE: Final = 4 * 65528

#: ``ErrorStream`` hands text on at each newline; a chatty app that never writes one still gets
#: its output out once this much is pending, so memory stays bounded.
ERROR_BUFFER_LIMIT: Final = 8192

_INTERNAL_ERROR_BODY: Final = b"Internal Server Error"
_INTERNAL_ERROR_RESPONSE: Final = (
    b"Status: 500 Internal Server Error\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: " + str(len(_INTERNAL_ERROR_BODY)).encode("ascii") + b"\r\n"
    b"\r\n" + _INTERNAL_ERROR_BODY
)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class InvalidResponseError(ValueError):
    """``start_response`` got a status or header that must never reach the wire.

    Raised inside the application (PEP 3333 asks servers to check headers when
    ``start_response`` is called, so the error surfaces while the app still runs); if the app
    does not handle it, ``run_app`` logs it and answers 500.
    """


class StartResponseError(RuntimeError):
    """``start_response`` was misused: called twice without ``exc_info``, or never called."""


class ClientDisconnected(ConnectionError):
    """The ``send`` callback failed: the peer is gone, so the response cannot be delivered.

    Raised from the ``write()`` callable so that an app which streams through ``write()`` stops;
    a subclass of ``ConnectionError`` so that apps treating I/O errors generically still do.
    """


class RequestBodyIncomplete(ClientDisconnected):
    """Raised by ``wsgi.input`` reads when the request body cannot be completed: the web server
    aborted the request (its client went away), closed the connection, or stopped sending.

    Never a silent early end: with ``wsgi.input_terminated`` (and chunked uploads, which carry
    no CONTENT_LENGTH) a short read would look like the whole body, and a cut upload would be
    stored as if complete. A ``ConnectionError``, as mod_wsgi's and gunicorn's read errors are
    I/O errors: apps and frameworks that guard their reads for those still do.
    """


class WSGIAppLoadError(Exception):
    """The ``MODULE:CALLABLE`` spec could not be turned into a WSGI application.

    ``str(err)`` is one line that names the spec and what went wrong; ``traceback_text`` is the
    application's own traceback (import errors), so the caller can print the line and then the
    traceback without catching anything itself.
    """

    def __init__(self, spec: str, message: str, *, traceback_text: str | None = None) -> None:
        message = " ".join(message.split())  # one line, whatever the app's exception said
        super().__init__(f"cannot load WSGI application {spec!r}: {message}")
        self.spec = spec
        self.message = message
        self.traceback_text = traceback_text


# --------------------------------------------------------------------------------------------
# wsgi.input
# --------------------------------------------------------------------------------------------


class InputStream:
    """``wsgi.input``: the request body, streamed from the server's chunk source.

    At most one source chunk is held at any time (plus whatever a single ``read``/``readline``
    call was asked to return), so a 1 GiB upload never sits in memory. The current chunk is kept
    whole with a read offset instead of being re-sliced after each read: slicing the rest off
    after every small read would copy it again and again (quadratic). Reads that line up with a
    chunk return the chunk object itself, without a copy.

    ``read``, ``readline`` and ``readlines`` follow ``io.BufferedReader`` semantics: ``read(n)``
    returns ``n`` bytes unless the body ends first; a negative or ``None`` size means "to EOF".
    """

    __slots__ = ("_buf", "_eof", "_pos", "_source")

    def __init__(self, source: Callable[[], bytes]) -> None:
        self._source = source
        self._buf = b""  # the current chunk; bytes before _pos are consumed
        self._pos = 0
        self._eof = False

    @property
    def buffered_bytes(self) -> int:
        """Bytes of body held in memory right now (the current chunk, consumed part included).

        Exposed so that tests (and curious servers) can check that memory stays bounded.
        """
        return len(self._buf)

    def _next_chunk(self) -> bytes:
        """The next non-empty chunk, or ``b""`` at EOF; the source is never asked again after EOF
        because a server-side source may block or raise once the stream has ended."""
        if self._eof:
            return b""
        chunk = self._source()
        if not chunk:
            self._eof = True
            return b""
        if type(chunk) is not bytes:
            # PEP 3333 promises bytes to the app; a bytearray/memoryview from a server would
            # leak through read() otherwise.
            chunk = bytes(chunk)
        return chunk

    def _take_rest(self) -> list[bytes | memoryview]:
        """Detach the unconsumed part of the current chunk (as a list, possibly empty), for
        ``b"".join``: a part of a chunk is a memoryview, so that the join is its only copy
        (slicing bytes first copied every byte of an upload twice)."""
        buf, pos = self._buf, self._pos
        self._buf = b""
        self._pos = 0
        if pos >= len(buf):
            return []
        return [memoryview(buf)[pos:] if pos else buf]

    def _keep(self, chunk: bytes, pos: int) -> None:
        """Make ``chunk`` the current chunk with ``pos`` bytes already consumed."""
        if pos >= len(chunk):
            self._buf = b""
            self._pos = 0
        else:
            self._buf = chunk
            self._pos = pos

    def read(self, size: int | None = -1, /) -> bytes:
        """Read ``size`` bytes (fewer only at EOF); all the rest when ``size`` is negative."""
        if size is None or size < 0:
            parts = self._take_rest()
            while chunk := self._next_chunk():
                parts.append(chunk)
            # bytes.join of a one-element list returns that element: a body that came in one
            # chunk is returned without any copy.
            return b"".join(parts)
        if size == 0:
            return b""
        buf, pos = self._buf, self._pos
        avail = len(buf) - pos
        if avail >= size:
            if pos == 0 and avail == size:
                self._buf = b""
                return buf
            self._keep(buf, pos + size)
            return buf[pos : pos + size]
        parts = self._take_rest()
        need = size - avail
        while need > 0:
            chunk = self._next_chunk()
            if not chunk:
                break
            n = len(chunk)
            if n <= need:
                parts.append(chunk)
                need -= n
            else:
                parts.append(memoryview(chunk)[:need])
                self._keep(chunk, need)
                need = 0
        return b"".join(parts)

    def readline(self, size: int | None = -1, /) -> bytes:
        """Read one line including its ``\\n``, at most ``size`` bytes when ``size`` >= 0.

        Each chunk is searched once, from where the previous search stopped, so a long line
        spread over many chunks costs linear time.
        """
        if size is None:
            size = -1
        if size == 0:
            return b""
        buf, pos = self._buf, self._pos
        end = len(buf)
        limit = end if size < 0 else min(end, pos + size)
        nl = buf.find(b"\n", pos, limit)
        if nl >= 0 or limit < end:
            cut = nl + 1 if nl >= 0 else limit
            if pos == 0 and cut == end:
                self._buf = b""
                return buf
            self._keep(buf, cut)
            return buf[pos:cut]
        parts = self._take_rest()
        got = end - pos
        while size < 0 or got < size:
            chunk = self._next_chunk()
            if not chunk:
                break
            n = len(chunk)
            lim = n if size < 0 else min(n, size - got)
            nl = chunk.find(b"\n", 0, lim)
            if nl < 0 and lim == n:
                parts.append(chunk)
                got += n
                continue
            cut = nl + 1 if nl >= 0 else lim
            parts.append(chunk if cut == n else memoryview(chunk)[:cut])
            self._keep(chunk, cut)
            break
        return b"".join(parts)

    def readlines(self, hint: int | None = -1, /) -> list[bytes]:
        """Read lines until EOF, or until their total size reaches ``hint`` (``io`` semantics:
        the line that crosses ``hint`` is included)."""
        lines: list[bytes] = []
        total = 0
        while line := self.readline():
            lines.append(line)
            total += len(line)
            if hint is not None and 0 < hint <= total:
                break
        return lines

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        line = self.readline()
        if not line:
            raise StopIteration
        return line

    def readable(self) -> bool:
        """Some frameworks probe file-likes with ``readable()`` before wrapping them."""
        return True

    def drain(self) -> int:
        """Discard the rest of the body, chunk by chunk; returns how many bytes were skipped.

        For a server that must consume the whole stdin stream before reusing a connection
        without ever holding what the app did not read.
        """
        skipped = sum(len(part) for part in self._take_rest())
        while chunk := self._next_chunk():
            skipped += len(chunk)
        return skipped


# --------------------------------------------------------------------------------------------
# wsgi.errors
# --------------------------------------------------------------------------------------------


class ErrorStream:
    """``wsgi.errors``: text in, UTF-8 bytes out through ``sink`` (the server's FCGI_STDERR),
    and the same text to ``echo`` (the server's own log) if given: not every web server logs
    FCGI_STDERR (Caddy 2.6 drops it, even with ``capture_stderr``), and an app's errors must
    not get lost with it; flup writes both too, gunicorn and uWSGI their own log.

    Line-buffered: web servers log each stderr record as one line ("FastCGI sent in stderr"),
    so ``print(..., file=errors)``, which writes the text and the newline separately, would
    otherwise become two log entries. ``flush()`` sends what is pending; ``run_app`` calls it
    when the request ends. Encoding uses ``backslashreplace`` so that an app logging a string
    with lone surrogates (e.g. an undecodable file name) never fails because of its log line.
    A sink that raises ``OSError`` (the connection is gone) silences the stream instead of
    turning a log line into an application error.
    """

    __slots__ = ("_broken", "_echo", "_pending", "_pending_len", "_sink")

    def __init__(
        self, sink: Callable[[bytes], None], echo: Callable[[str], None] | None = None
    ) -> None:
        self._sink = sink
        self._echo = echo
        self._pending: list[str] = []
        self._pending_len = 0
        self._broken = False

    def write(self, s: str, /) -> int:
        """Queue ``s``; hand everything on if it contains a newline or too much is pending."""
        if not isinstance(s, str):
            raise TypeError(f"wsgi.errors.write() takes str, not {type(s).__name__}")
        if s:
            self._pending.append(s)
            self._pending_len += len(s)
            if "\n" in s or self._pending_len >= ERROR_BUFFER_LIMIT:
                self.flush()
        return len(s)

    @property
    def echoes(self) -> bool:
        """Whether what is written also goes to the server's log (see the class docstring)."""
        return self._echo is not None

    def writelines(self, seq: Iterable[str], /) -> None:
        """Write each string of ``seq`` (no newlines added, as with ``io``)."""
        for s in seq:
            self.write(s)

    def flush(self) -> None:
        """Send what is pending, as one sink call."""
        if not self._pending:
            return
        text = "".join(self._pending)
        self._pending.clear()
        self._pending_len = 0
        if self._echo is not None:
            self._echo(text[:-1] if text.endswith("\n") else text)
        if self._broken:
            return
        try:
            self._sink(text.encode("utf-8", "backslashreplace"))
        except OSError:
            self._broken = True


# --------------------------------------------------------------------------------------------
# wsgi.file_wrapper
# --------------------------------------------------------------------------------------------


class _Readable(Protocol):
    def read(self, size: int = ..., /) -> bytes: ...


class FileWrapper:
    """``wsgi.file_wrapper``: iterates a file in ``blksize`` blocks, closes it in ``close()``.

    ``run_app`` recognises it and reads the file in ``FILE_READ_SIZE`` blocks itself (sendfile
    is impossible through FastCGI framing, big reads are the next best thing). Iterating it
    directly, as any middleware may, works too.
    """

    __slots__ = ("blksize", "filelike")

    def __init__(self, filelike: _Readable, blksize: int = 65536) -> None:
        self.filelike = filelike
        self.blksize = blksize

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        data = self.filelike.read(self.blksize)
        if data:
            return data
        raise StopIteration

    def close(self) -> None:
        """Close the file if it can be closed (PEP 3333 requires forwarding ``close``)."""
        close = getattr(self.filelike, "close", None)
        if close is not None:
            close()


# --------------------------------------------------------------------------------------------
# environ
# --------------------------------------------------------------------------------------------

_TRUE_HTTPS: Final = frozenset({"on", "1"})
_DEFAULTED: Final = operator.itemgetter(
    "REQUEST_METHOD", "SERVER_NAME", "SERVER_PORT", "SERVER_PROTOCOL"
)


def _path_from_request_uri(uri: bytes) -> str:
    """PATH_INFO as a CGI server would give it: the path part of REQUEST_URI, URL-decoded.

    Decoding works on the raw bytes (``unquote_to_bytes`` on a ``str`` would UTF-8 encode
    non-ASCII first), and the result is latin-1 decoded, as PEP 3333 wants for native strings.
    """
    path = uri.split(b"?", 1)[0].split(b"#", 1)[0]
    if not path.startswith(b"/") and b"://" in path:
        # absolute-form request target (http://host/path): keep only the path
        rest = path.split(b"://", 1)[1]
        slash = rest.find(b"/")
        path = rest[slash:] if slash >= 0 else b"/"
    return unquote_to_bytes(path).decode("latin-1")


def build_environ(
    params: Mapping[bytes, bytes],
    *,
    input: wsgi_types.InputStream,
    errors: wsgi_types.ErrorStream,
    multithread: bool,
    multiprocess: bool,
    url_scheme: str | None = None,
) -> dict[str, Any]:
    """Turn FastCGI PARAMS into a PEP 3333 environ.

    Names and values are latin-1 decoded: that maps every byte to one code point, which is what
    PEP 3333 calls a native string, and is lossless (``.encode("latin-1")`` gives the bytes back).
    Missing CGI variables get the defaults WSGI apps rely on, so that an app never fails on
    ``environ["SERVER_NAME"]`` because a web server's config left it out.
    ``url_scheme`` overrides the HTTPS detection (for a server that knows better).
    """
    return build_environ_latin1(
        {k.decode("latin-1"): v.decode("latin-1") for k, v in params.items()},
        input=input,
        errors=errors,
        multithread=multithread,
        multiprocess=multiprocess,
        url_scheme=url_scheme,
    )


# The wsgi.* entries that do not change between requests, one dict per (multithread,
# multiprocess, url_scheme): a single dict.update() adds them all.
_WSGI_CONSTANTS: Final = {
    (mt, mp, scheme): {
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": scheme,
        "wsgi.multithread": mt,
        "wsgi.multiprocess": mp,
        "wsgi.run_once": False,
        "wsgi.file_wrapper": FileWrapper,
        # The FastCGI stdin stream has an explicit end, so reading to EOF is safe even without
        # CONTENT_LENGTH (chunked uploads).
        "wsgi.input_terminated": True,
    }
    for mt in (False, True)
    for mp in (False, True)
    for scheme in ("http", "https")
}


def build_environ_latin1(
    environ: dict[str, str],
    input: wsgi_types.InputStream,
    errors: wsgi_types.ErrorStream,
    multithread: bool,
    multiprocess: bool,
    url_scheme: str | None = None,
) -> dict[str, Any]:
    """build_environ() for PARAMS already latin-1 decoded (``protocol.Params.take_latin1()``).

    The dict is turned into the environ IN PLACE and returned: the caller hands it over. This
    is the server's fast path: the PARAMS block was decoded once, straight to ``str``, and no
    second dict is built. (Positional arguments are accepted, unlike build_environ's keyword-only
    ones: a keyword call costs the server ~0.1 us a request on 3.11.)
    """
    env: dict[str, Any] = environ
    get = env.get
    # One C call tells whether any of the four variables that get defaults is missing or empty
    # (never, from nginx, lighttpd or Apache); only then are they looked at one by one.
    try:
        defaults_needed = "" in _DEFAULTED(env)
    except KeyError:
        defaults_needed = True

    if defaults_needed and not get("REQUEST_METHOD"):
        env["REQUEST_METHOD"] = "GET"

    # CGI forbids HTTP_CONTENT_TYPE/LENGTH (and wsgiref.validate rejects them), but nginx passes
    # every request header on as HTTP_*; the CGI variables are the authoritative ones.
    if "HTTP_CONTENT_TYPE" in env:
        http_ctype = env.pop("HTTP_CONTENT_TYPE")
        if "CONTENT_TYPE" not in env and http_ctype:
            env["CONTENT_TYPE"] = http_ctype
    if "HTTP_CONTENT_LENGTH" in env:  # absent is the rule: "in" costs less than a pop() call
        del env["HTTP_CONTENT_LENGTH"]  # noqa: RUF051
    # Web servers send CONTENT_LENGTH="" / CONTENT_TYPE="" for bodiless requests; PEP 3333
    # says they "may be empty or absent", and absent is what apps test for.
    if get("CONTENT_LENGTH") == "":
        del env["CONTENT_LENGTH"]
    if get("CONTENT_TYPE") == "":
        del env["CONTENT_TYPE"]

    script_name = get("SCRIPT_NAME")
    path_info = get("PATH_INFO")
    if script_name is None:
        script_name = ""
        request_uri = get("REQUEST_URI")
        if not path_info and request_uri is not None:
            # latin-1 round-trips, so this is the raw REQUEST_URI bytes again
            path_info = _path_from_request_uri(request_uri.encode("latin-1"))
        env["SCRIPT_NAME"] = ""
    if path_info is None:
        path_info = ""
    if script_name.endswith("/"):
        # PEP 3333: SCRIPT_NAME never ends in "/" ("/" must become "" with PATH_INFO "/"),
        # the slash belongs to PATH_INFO.
        env["SCRIPT_NAME"] = script_name[:-1]
        if not path_info.startswith("/"):
            path_info = "/" + path_info
    env["PATH_INFO"] = path_info

    if "QUERY_STRING" not in env:
        uri = get("REQUEST_URI", "")
        env["QUERY_STRING"] = uri.split("?", 1)[1].split("#", 1)[0] if "?" in uri else ""

    if url_scheme is None:
        https = get("HTTPS")
        scheme = get("REQUEST_SCHEME")
        if https is None and (scheme is None or scheme == "http"):
            url_scheme = "http"  # the common case, without the lower() calls
        elif (https is not None and https.lower() in _TRUE_HTTPS) or (
            scheme or ""
        ).lower() == "https":
            url_scheme = "https"
        else:
            url_scheme = "http"

    if defaults_needed and (not get("SERVER_NAME") or not get("SERVER_PORT")):
        host = get("HTTP_HOST", "")
        name, port = host, ""
        colon = host.rfind(":")
        if colon >= 0 and host.find("]", colon) < 0:  # a ":" that is not inside "[::1]"
            name, port = host[:colon], host[colon + 1 :]
        if not get("SERVER_NAME"):
            env["SERVER_NAME"] = name or "localhost"
        if not get("SERVER_PORT"):
            env["SERVER_PORT"] = port or ("443" if url_scheme == "https" else "80")
    if defaults_needed and not get("SERVER_PROTOCOL"):
        env["SERVER_PROTOCOL"] = "HTTP/1.0"

    constants = _WSGI_CONSTANTS.get((multithread, multiprocess, url_scheme))
    if constants is not None:
        env.update(constants)
    else:  # a url_scheme other than http/https, given by the server
        env.update(_WSGI_CONSTANTS[bool(multithread), bool(multiprocess), "http"])
        env["wsgi.url_scheme"] = url_scheme
    env["wsgi.input"] = input
    env["wsgi.errors"] = errors
    return env


# --------------------------------------------------------------------------------------------
# Response
# --------------------------------------------------------------------------------------------

_STATUS_OK: Final = re.compile(r"[1-9][0-9][0-9](?: [\t\x20-\x7e\x80-\xff]*)?").fullmatch
_TOKEN_OK: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+").fullmatch
# HTAB, SP, VCHAR, obs-text (RFC 9110 field-value): no CR/LF/NUL/other controls, and nothing
# above U+00FF, so the latin-1 encoding of the head cannot fail.
_VALUE_OK: Final = re.compile(r"[\t\x20-\x7e\x80-\xff]*").fullmatch


_DIGITS_OK: Final = re.compile(r"[0-9]+").fullmatch

# Validation results are cached for the few status strings and header names an app uses, so the
# hot path pays a dict lookup instead of a regex match. Bounded, so that an app generating
# header names cannot grow them without limit; values are checked every time (they vary).
_CACHE_LIMIT: Final = 512
_PLAIN: Final = 0
_CONTENT_LENGTH: Final = 1
_known_statuses: set[str] = set()
_known_names: dict[str, int] = {}
# Whole heads, keyed by (status, *headers): an app answers with the same few status/header
# combinations, so the common start_response() is one tuple, one hash and one dict lookup. A
# hit is as safe as a miss: it returns bytes that were validated when the key was first seen,
# and a key only equals one built from equal strings. Bounded like the caches above.
_known_heads: dict[tuple[object, ...], tuple[bytes, int | None]] = {}


def _check_status(status: object) -> str:
    if type(status) is str and status in _known_statuses:
        return status
    if not isinstance(status, str):
        raise InvalidResponseError(f"status must be str, not {type(status).__name__}: {status!r}")
    if _STATUS_OK(status) is None:
        raise InvalidResponseError(
            f"status must be a 3-digit code, then a space and a reason phrase without control "
            f"characters, e.g. '200 OK' (a bare '200' is taken too): {status!r}"
        )
    if len(_known_statuses) < _CACHE_LIMIT:
        _known_statuses.add(status)
    return status


def _name_kind(name: object) -> int:
    """Validate a header name: ``_CONTENT_LENGTH`` for that header, ``_PLAIN`` otherwise."""
    if type(name) is str:
        kind = _known_names.get(name)
        if kind is not None:
            return kind
    if not isinstance(name, str) or _TOKEN_OK(name) is None:
        raise InvalidResponseError(f"invalid response header name {name!r}")
    lname = name.lower()
    if lname == "status":
        raise InvalidResponseError(
            "a 'Status' header would clash with the CGI status line; pass the status as "
            "start_response's first argument"
        )
    kind = _CONTENT_LENGTH if lname == "content-length" else _PLAIN
    if len(_known_names) < _CACHE_LIMIT:
        _known_names[name] = kind
    return kind


def _build_head(status: object, headers: object) -> tuple[bytes, int | None]:
    """Validate status and headers and build the CGI head with one join and one encode.

    Returns the head bytes and the declared Content-Length (None when absent). Raises
    ``InvalidResponseError`` naming the offender, so a bad header never reaches the wire.
    """
    parts = ["Status: ", _check_status(status), "\r\n"]
    if not isinstance(headers, list | tuple):
        raise InvalidResponseError(f"headers must be a list, not {type(headers).__name__}")
    content_length: int | None = None
    for item in headers:
        if not isinstance(item, tuple | list) or len(item) != 2:
            raise InvalidResponseError(f"each header must be a (name, value) tuple: {item!r}")
        name, value = item
        kind = _name_kind(name)
        # printable ASCII is the common case and two C calls; the regex also admits HTAB and
        # latin-1 obs-text, and rejects everything else.
        if not isinstance(value, str) or not (
            (value.isascii() and value.isprintable()) or _VALUE_OK(value) is not None
        ):
            raise InvalidResponseError(
                f"invalid value for response header {name!r}: {value!r} (must be a latin-1 "
                f"str without CR, LF, NUL or other control characters)"
            )
        if kind == _CONTENT_LENGTH:
            if _DIGITS_OK(value.strip()) is None:
                raise InvalidResponseError(f"invalid Content-Length {value!r}")
            content_length = int(value)
        parts += (name, ": ", value, "\r\n")
    parts.append("\r\n")
    return "".join(parts).encode("latin-1"), content_length


class _Response:
    """The state of one response: what start_response set, and what has been sent.

    A class rather than closures so the hot path (hello app) stays a handful of attribute
    lookups and the rules live in one place.
    """

    __slots__ = (
        "cut",
        "declared",
        "errors",
        "head",
        "head_only",
        "head_sent",
        "log",
        "overflow",
        "remaining",
        "send",
        "send_error",
    )

    def __init__(
        self,
        send: Callable[[list[bytes]], None],
        log: Callable[[str], None],
        errors: wsgi_types.ErrorStream | None = None,
    ) -> None:
        self.send = send
        self.log = log
        self.errors = errors
        self.head: bytes | None = None
        self.head_only = False  # a HEAD request: the body is dropped (see run_app)
        self.head_sent = False
        self.declared: int | None = None  # the Content-Length header's value
        self.remaining: int | None = None  # Content-Length bytes still allowed
        self.overflow = False  # the app produced more than its Content-Length
        self.cut = False  # the response started, and the app failed before its end
        self.send_error: OSError | None = None  # why send() failed: the peer is gone

    @property
    def disconnected(self) -> bool:
        return self.send_error is not None

    def report(self, message: str) -> None:
        """A fault of the app's: to the server's log, and to the request's ``wsgi.errors``
        too, as wsgiref does. fcgispawn's wsgi.errors is FCGI_STDERR, which every web server
        writes to its error log: where an operator looks for a 500, and the only place the
        message survives where the worker's stderr is /dev/null (lighttpd's bin-path children,
        a detached spawner's workers, both as spawn-fcgi's). A stream that echoes to the log
        itself gets it once."""
        errors = self.errors
        if not (isinstance(errors, ErrorStream) and errors.echoes):
            self.log(message)
        if errors is not None:
            try:
                errors.write(message + "\n")
                errors.flush()
            except Exception:  # the log above has it; this copy is best effort
                pass

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: _ExcInfo | None = None, /
    ) -> Callable[[bytes], object]:
        """PEP 3333 start_response: check now, send with the first non-empty body chunk."""
        if exc_info is not None and exc_info[1] is not None:
            try:
                if self.head_sent:
                    # Too late to change the status: PEP 3333 says re-raise so the app aborts.
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None  # break the frame <-> traceback cycle
        elif self.head is not None:
            raise StartResponseError("start_response() called a second time without exc_info")
        hit = key = None
        if type(headers) is list:
            try:
                key = (status, *headers)
                hit = _known_heads.get(key)
            except TypeError:  # an unhashable item (a list, say): validate it the long way
                key = None
        if hit is None:
            hit = _build_head(status, headers)
            if key is not None and len(_known_heads) < _CACHE_LIMIT:
                _known_heads[key] = hit
        self.head, self.declared = hit
        self.remaining = hit[1]
        return self.write

    def write(self, data: bytes) -> None:
        """PEP 3333 write(): sent before returning (send() is synchronous)."""
        if type(data) is not bytes:
            raise TypeError(f"write() takes bytes, not {type(data).__name__}")
        if self.send_error is not None:
            raise ClientDisconnected("the client is gone; the response cannot be sent")
        if self.overflow:
            raise InvalidResponseError("write() past the declared Content-Length")
        if data:
            self.emit(data)
            if self.overflow:
                raise InvalidResponseError("write() past the declared Content-Length")

    def emit(self, chunk: bytes) -> None:
        """Send a non-empty body chunk, with the head in the same call if not yet sent."""
        if self.head_only:
            chunk = b""
        remaining = self.remaining
        if remaining is not None:
            if len(chunk) > remaining:
                # PEP 3333: never send more than Content-Length (it would corrupt a kept-alive
                # upstream connection's next response on the web server's side).
                self.overflow = True
                self.report(
                    "WSGI application sent more body than its Content-Length header "
                    f"({self.declared} bytes); the response was truncated"
                )
                chunk = chunk[:remaining]
            self.remaining = remaining - len(chunk)
        if self.head_sent:
            if not chunk:
                return
            bufs = [chunk]
        else:
            head = self.head
            if head is None:
                raise StartResponseError("the application sent body before start_response()")
            self.head_sent = True
            bufs = [head, chunk] if chunk else [head]
        self.transmit(bufs)

    def finish(self) -> None:
        """The iterable ended: send the head if no body chunk did (PEP 3333)."""
        if not self.head_sent:
            if self.head is None:
                raise StartResponseError(
                    "the application returned without calling start_response()"
                )
            self.head_sent = True
            self.transmit([self.head])

    def transmit(self, bufs: list[bytes]) -> None:
        """Hand buffers to the server; a failed send means the peer is gone for good."""
        if self.send_error is not None:
            raise ClientDisconnected("the client is gone; the response cannot be sent")
        try:
            self.send(bufs)
        except OSError as exc:
            self.send_error = exc
            raise ClientDisconnected(f"sending the response failed: {exc!r}") from exc


def _format_exception(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)).rstrip("\n")


def _only_import_machinery(exc: BaseException) -> bool:
    """Whether a traceback has no frame of the app's own code: a mistyped --wsgi module, or a
    missing PYTHONPATH, then gets the one-line message alone, not ten lines of importlib."""
    return all(
        frame.filename.startswith("<frozen importlib")
        or frame.filename in (importlib.__file__, __file__)
        for frame in traceback.extract_tb(exc.__traceback__)
    )


def _describe(exc: BaseException) -> str:
    """The exception's own line first, then the traceback: web servers cut a long stderr
    line (nginx at ~2 KB), and a traceback ends with what matters most."""
    summary = traceback.format_exception_only(exc)[-1].rstrip("\n")
    return f"{summary}\n{_format_exception(exc)}"


class Batching(Protocol):
    """What ``run_app`` tells a server that may coalesce sends (see ``run_app``), and that
    ``cut`` a response short: it started, and the app failed before its end (an exception
    after the head went out, or fewer body bytes than its Content-Length). END_REQUEST's app
    status cannot tell a web server so (nginx, Apache and HAProxy ignore it, end a chunked
    response as if complete, and Apache even one short of its Content-Length): the server
    closes the connection instead, which they pass on to the client as a broken response, as
    gunicorn closes its client's."""

    defer: bool
    cut: bool


def run_app(
    app: WSGIApplication,
    environ: dict[str, Any],
    send: Callable[[list[bytes]], None],
    log: Callable[[str], None],
    batching: Batching | None = None,
) -> int:
    """Run one request through ``app`` and stream the CGI-format response to ``send``.

    ``send`` gets lists of buffers (the server frames them into one writev): the head travels
    with the first non-empty body chunk, so a one-chunk response is exactly one ``send`` call.
    The result's ``close()`` is always called, whatever happens. Returns the app status for
    END_REQUEST: 0 when the whole response went out, 1 otherwise (app error, invalid
    status/header, client gone). Problems go to ``log`` (one call each, tracebacks included) and
    never into the response body: a failure before anything was sent becomes a plain 500.
    Exceptions that are not ``Exception`` (KeyboardInterrupt, SystemExit) propagate after
    ``close()``, for the server to decide.

    ``batching.defer`` is set True when the app returned a list, tuple or file_wrapper: no app
    code runs between its chunks, so the server may hold them and write them together with
    what ends the response (PEP 3333 forbids holding a chunk back only while the app computes
    the next one: a generator's chunks must go out as they come). ``batching.cut`` is set True
    when the response was cut short (see Batching).
    """
    errors = environ.get("wsgi.errors")
    resp = _Response(send, log, errors)
    # A HEAD's body goes nowhere (every web server drops it; nginx closes once it has the
    # head): not sent, and not read or computed further than the head needs.
    resp.head_only = environ.get("REQUEST_METHOD") == "HEAD"
    result: Iterable[bytes] | None = None
    failed = False
    try:
        result = app(environ, resp.start_response)
        if batching is not None:
            rtype = type(result)
            if rtype is list or rtype is tuple or rtype is FileWrapper:
                batching.defer = True
        if resp.send_error is None:  # the app may have hit a dead peer through write() already
            _send_result(resp, result)
    except RequestBodyIncomplete as exc:
        # The web server gave up on this request: no one is left to read a 500 or a traceback.
        failed = True
        log(f"the request ended before its body was complete: {exc}")
    except ClientDisconnected as exc:
        if resp.send_error is None:  # raised by the app itself, not by our send
            failed = True
            _report(resp, exc)
    except Exception as exc:
        failed = True
        _report(resp, exc)
    finally:
        if result is not None and type(result) is not list:  # (lists have no close: skip lookup)
            close = getattr(result, "close", None)
            if close is not None:
                try:
                    close()
                except Exception as exc:
                    failed = True
                    resp.report(f"error in the WSGI application's close(): {_describe(exc)}")
        # (the server's own ErrorStream with nothing pending: skip the call)
        if errors is not None and (type(errors) is not ErrorStream or errors._pending):
            try:
                errors.flush()
            except Exception as exc:
                log(f"error flushing wsgi.errors: {exc!r}")
    if resp.send_error is not None:
        log(f"client went away before the response was complete: {resp.send_error!r}")
    elif resp.remaining and not failed and _has_body(environ, resp.head):
        # The web server cannot tell a cut-short body from a client's slow one: say it here.
        failed = resp.cut = True
        resp.report(
            f"error in the WSGI application: it sent {resp.declared - resp.remaining} of the "  # type: ignore[operator]
            f"{resp.declared} body bytes its Content-Length header announced"
        )
    if resp.cut and batching is not None:
        batching.cut = True
    return 1 if failed or resp.overflow or resp.send_error is not None else 0


def _has_body(environ: dict[str, Any], head: bytes | None) -> bool:
    """Whether the response's Content-Length counts body bytes: not for a HEAD request, nor a
    304 (the Content-Length of what was not re-sent), 204 or 1xx."""
    if head is None or environ.get("REQUEST_METHOD") == "HEAD":
        return False
    code = head[8:11]
    return code not in (b"304", b"204") and code[:1] != b"1"


def _send_result(resp: _Response, result: Iterable[bytes]) -> None:
    """Send the app's iterable: one send per non-empty chunk, the head with the first."""
    rtype = type(result)
    if (rtype is list or rtype is tuple) and len(result) == 1:  # type: ignore[arg-type]
        # The common "return [body]": head and body in one send, no iterator. (No typing.cast
        # for the checker here: it is a real function call, on every request.)
        chunk = result[0]  # type: ignore[index]
        if type(chunk) is not bytes:
            raise TypeError(f"the application's iterable yielded {type(chunk).__name__}, not bytes")
        if chunk:
            remaining = resp.remaining
            head = resp.head
            if (
                resp.head_sent
                or head is None
                or resp.head_only
                or (remaining is not None and len(chunk) > remaining)
            ):
                resp.emit(chunk)  # the general rules
            else:  # the hello case, emit() inlined: head and body in one send
                if remaining is not None:
                    resp.remaining = remaining - len(chunk)
                resp.head_sent = True
                resp.transmit([head, chunk])
                return
    elif rtype is FileWrapper:
        wrapper = cast(FileWrapper, result)
        read = wrapper.filelike.read
        size = max(wrapper.blksize, FILE_READ_SIZE)
        while not (resp.overflow or resp.head_only):
            chunk = read(size)
            if not chunk:
                break
            if type(chunk) is not bytes:
                raise TypeError(
                    f"wsgi.file_wrapper's file returned {type(chunk).__name__}, not bytes"
                )
            resp.emit(chunk)
    else:
        if isinstance(result, bytes | str):
            # Iterating bytes yields ints: name the real mistake instead of "yielded int".
            raise TypeError(
                f"the application returned {type(result).__name__}; return an iterable of "
                f"bytes, e.g. [body]"
            )
        for chunk in result:
            if type(chunk) is not bytes:
                raise TypeError(
                    f"the application's iterable yielded {type(chunk).__name__}, not bytes"
                )
            if chunk:
                resp.emit(chunk)
                if resp.overflow or resp.head_only:
                    break
    resp.finish()


def _report(resp: _Response, exc: Exception) -> None:
    """Log an application failure and, if nothing was sent yet, answer a bare 500."""
    if resp.disconnected:
        resp.log(f"error in the WSGI application after the client went away: {_describe(exc)}")
        return
    if resp.head_sent:
        resp.cut = not resp.head_only
        resp.report(
            "error in the WSGI application after the response started; it is truncated: "
            + _describe(exc)
        )
        return
    resp.report(f"error in the WSGI application, answering 500: {_describe(exc)}")
    resp.head_sent = True
    try:
        error = _INTERNAL_ERROR_RESPONSE
        resp.send([error[: -len(_INTERNAL_ERROR_BODY)] if resp.head_only else error])
    except OSError as send_exc:
        resp.send_error = send_exc


# --------------------------------------------------------------------------------------------
# Loading the application
# --------------------------------------------------------------------------------------------


def _dotted_ok(text: str) -> bool:
    return bool(text) and all(part.isidentifier() for part in text.split("."))


def parse_app_spec(spec: str) -> tuple[str, str]:
    """Split ``"pkg.module:attr.path"`` into ``("pkg.module", "attr.path")``.

    Without a colon the attribute defaults to ``application`` (the mod_wsgi/gunicorn
    convention). Raises ``WSGIAppLoadError`` for anything that is not a dotted module name and
    a dotted attribute path, so the user sees the mistake before any import runs.
    """
    module, sep, attr = spec.strip().partition(":")
    if not sep:
        attr = "application"
    if "(" in attr:
        raise WSGIAppLoadError(
            spec,
            "calling a factory is not supported; create the application in the module "
            "(e.g. 'app = create_app()') and name that object",
        )
    if not _dotted_ok(module) or not _dotted_ok(attr):
        raise WSGIAppLoadError(
            spec,
            "expected MODULE:CALLABLE with dotted Python names, e.g. 'myproject.wsgi:application'",
        )
    return module, attr


def load_app(spec: str) -> WSGIApplication:
    """Import ``MODULE`` and return ``CALLABLE`` (a dotted attribute path) from it.

    Nothing is ever called: a factory function (``create_app``) is returned as it is, so the
    spec must name the application object itself. Every failure becomes ``WSGIAppLoadError``
    with the spec in its message and, when the app's own code failed, its traceback.
    """
    module_name, attr = parse_app_spec(spec)
    try:
        module = importlib.import_module(module_name)
    except (Exception, SystemExit) as exc:
        tb = _format_exception(exc)
        if (
            isinstance(exc, ModuleNotFoundError)
            and exc.name is not None
            and (module_name == exc.name or module_name.startswith(exc.name + "."))
        ):
            raise WSGIAppLoadError(
                spec,
                f"no module named {exc.name!r} (is its directory on sys.path / PYTHONPATH, "
                f"or the working directory set with --chdir?)",
                traceback_text=None if _only_import_machinery(exc) else tb,
            ) from exc
        raise WSGIAppLoadError(
            spec,
            f"importing {module_name!r} failed: {type(exc).__name__}: {exc}",
            traceback_text=tb,
        ) from exc
    obj: object = module
    done = module_name
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            hint = ""
            if isinstance(obj, types.ModuleType):
                hint = f" (a submodule must be part of the module name: '{done}.{part}:...')"
            raise WSGIAppLoadError(spec, f"{done!r} has no attribute {part!r}{hint}") from exc
        except Exception as exc:
            raise WSGIAppLoadError(
                spec,
                f"getting {part!r} from {done!r} failed: {type(exc).__name__}: {exc}",
                traceback_text=_format_exception(exc),
            ) from exc
        done = f"{done}:{part}" if done == module_name else f"{done}.{part}"
    if not callable(obj):
        raise WSGIAppLoadError(
            spec, f"{done!r} is a {type(obj).__name__}, not a callable WSGI application"
        )
    return cast(WSGIApplication, obj)

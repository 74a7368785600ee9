"""Sans-IO FastCGI 1.0: bytes in, events out; calls in, bytes out.

Why sans-IO: the same code serves the threaded responder, the test client and the fuzzer, and
every byte of it can be tested without a socket. This module therefore imports nothing from
fcgispawn and knows no sockets, threads, os or logging. Names and values stay ``bytes``: the
WSGI layer decides how to decode them.

Why it looks the way it does (DESIGN.md "Fast paths"): parsing happens on one ``bytearray``
with a read offset and precompiled ``struct.Struct.unpack_from`` calls, so a record costs one
header unpack and one slice for its payload; when the receive buffer is empty (the common case:
nginx sends BEGIN_REQUEST, PARAMS, the empty PARAMS and the empty STDIN in one segment) the
caller's bytes are parsed in place and nothing is copied into the buffer at all. Output is a
list of buffers for one ``socket.sendmsg`` (writev); body chunks are 65528 bytes (a multiple of
8) so only the last record of a stream needs padding.

Any input either parses or raises :class:`ProtocolError` -- nothing else (IndexError,
struct.error, MemoryError...). A property test and an atheris fuzzer hold this.

Where the spec leaves room, these are the decisions (each pinned by tests/test_protocol.py):
- STDIN (or FCGI_DATA) before the end of PARAMS is a ProtocolError: §6 orders the streams, every
  real server sends PARAMS first, and the app needs its environ before its body.
- FCGI_DATA for a non-FILTER request, BEGIN_REQUEST for an active id, a BEGIN_REQUEST body that
  is not 8 bytes, ABORT_REQUEST with a body, a stream record after its stream ended, or a
  record type the web server never sends (STDOUT, END_REQUEST...) on an active id: ProtocolError.
- Records for inactive ids are ignored whatever their type (§3.3); only the header is checked.
- Any record on id 0 other than GET_VALUES is answered UNKNOWN_TYPE (§4.2), BEGIN_REQUEST too.
- A rejected request (UNKNOWN_ROLE, CANT_MPX_CONN, OVERLOADED) without KEEP_CONN ends like any
  other: should_close becomes True.
- A name given twice in PARAMS: the last one wins, as when a CGI environ is built.
- A 4-byte length for a short name or value is accepted (the spec says "can", not "must").
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Final, TypeVar

__all__ = [
    "CLOSING_MARK",
    "FCGI_HEADER_LEN",
    "FCGI_KEEP_CONN",
    "FCGI_MAX_CONTENT",
    "FCGI_NULL_REQUEST_ID",
    "FCGI_VERSION_1",
    "MERGE_BYTES",
    "STDOUT_CHUNK",
    "AbortRequest",
    "BeginRequest",
    "Buffer",
    "ClientConnection",
    "ClientEvent",
    "Data",
    "EndRequest",
    "Event",
    "GetValuesResult",
    "Limits",
    "Params",
    "ProtocolError",
    "ProtocolStatus",
    "RecordType",
    "Role",
    "ServerConnection",
    "StderrData",
    "Stdin",
    "StdoutData",
    "UnknownType",
    "asks_keep_conn",
    "decode_pairs",
    "decode_pairs_latin1",
    "encode_abort_request",
    "encode_begin_request",
    "encode_get_values",
    "encode_pairs",
    "encode_record",
    "encode_request",
    "encode_response",
    "encode_stream",
    "frame_stream",
    "whole_responder_request",
]

FCGI_VERSION_1: Final = 1
FCGI_HEADER_LEN: Final = 8
FCGI_MAX_CONTENT: Final = 65535
#: Largest multiple of 8 that fits a record: full chunks need no padding, only the last one pads.
STDOUT_CHUNK: Final = 65528
#: Consecutive STDIN/FCGI_DATA records of one request in one read become one event of up to
#: this many bytes (see ServerConnection._parse); a single record may be bigger (65535).
MERGE_BYTES: Final = 65536
FCGI_NULL_REQUEST_ID: Final = 0
FCGI_KEEP_CONN: Final = 1


class RecordType(IntEnum):
    """FCGI record types (spec §8)."""

    BEGIN_REQUEST = 1
    ABORT_REQUEST = 2
    END_REQUEST = 3
    PARAMS = 4
    STDIN = 5
    STDOUT = 6
    STDERR = 7
    DATA = 8
    GET_VALUES = 9
    GET_VALUES_RESULT = 10
    UNKNOWN_TYPE = 11


class Role(IntEnum):
    """Roles of FCGI_BEGIN_REQUEST (spec §5.1)."""

    RESPONDER = 1
    AUTHORIZER = 2
    FILTER = 3


class ProtocolStatus(IntEnum):
    """protocolStatus of FCGI_END_REQUEST (spec §5.5)."""

    REQUEST_COMPLETE = 0
    CANT_MPX_CONN = 1
    OVERLOADED = 2
    UNKNOWN_ROLE = 3


class ProtocolError(Exception):
    """The peer broke FastCGI. The only exception any input can raise; close the connection."""


# Why these defaults (each is a cap on what a peer can make us hold, not a tuning knob):
# - max_params_bytes = 1 MiB: PARAMS carry the HTTP request headers plus ~20 CGI variables.
#   Apache's defaults allow LimitRequestFields 100 x LimitRequestFieldSize 8190 ~= 800 KiB of
#   headers; nginx refuses more than large_client_header_buffers 4 x 8k = 32 KiB; lighttpd's
#   server.max-request-field-size defaults to 8 KiB. 1 MiB fits every real server with room to
#   spare, while a hostile peer cannot make a request hold more.
# - max_requests_per_conn = 64: nginx, lighttpd and Apache never multiplex (they all use
#   request id 1, see shared/reference/fastcgi.md); HAProxy does (mpxs-conns), up to the
#   FCGI_MAX_REQS it is told (the server passes its thread count for both). The default only
#   bounds what a hostile or test peer can pin on one connection: 64 x 1 MiB of PARAMS at worst.
# - max_conns / max_reqs = 1024: what GET_VALUES reports; 1024 matches the default listen
#   backlog, and the server passes its real numbers.
@dataclass(frozen=True, slots=True)
class Limits:
    """What one connection accepts, and what GET_VALUES reports (spec §4.1).

    ``max_reqs`` is enforced only when ServerConnection gets ``active_elsewhere`` (the number
    of requests active on the server's other connections); ``max_requests_per_conn`` always.
    """

    max_conns: int = 1024
    max_reqs: int = 1024
    mpxs_conns: bool = True
    max_requests_per_conn: int = 64
    max_params_bytes: int = 1 << 20


# ---------------------------------------------------------------------------------------------
# Events


@dataclass(frozen=True, slots=True)
class BeginRequest:
    """A request was accepted; only accepted requests produce this (rejections are answered)."""

    request_id: int
    role: Role
    keep_conn: bool


class Params:
    """The whole PARAMS stream, decoded once when its empty record arrives (last name wins).

    Not a dataclass, unlike the other events, for speed. A ``ServerConnection(...,
    latin1_params=True)`` decodes the block in ONE pass straight to latin-1 ``str`` names and
    values (what a WSGI environ holds): ``take_latin1()`` hands that dict over without a copy
    (``wsgi.build_environ_latin1`` turns it into the environ in place) and the ``bytes`` mapping
    ``params`` is only built if someone asks for it. Otherwise the block is decoded to ``bytes``
    as before and ``take_latin1()`` decodes those. Either way both views are right; only the
    cost differs. Treat it as immutable, like the other events; equality compares
    ``request_id`` and ``params``.

    ``Params(rid, params)`` wraps a mapping; ``Params(rid, block=b"...")`` decodes (and checks:
    ProtocolError) a raw name-value block, as the parser does.
    """

    __slots__ = ("_block", "_latin1", "_params", "request_id")
    _latin1: dict[str, str] | None
    __match_args__ = ("request_id", "params")

    def __init__(
        self, request_id: int, params: dict[bytes, bytes] | None = None, *, block: bytes = b""
    ) -> None:
        self.request_id = request_id
        self._params = params
        self._block = block
        self._latin1 = None if params is not None else decode_pairs_latin1(block)

    @property
    def params(self) -> dict[bytes, bytes]:
        """Names and values as bytes, exactly as they came (built on first use, then cached)."""
        p = self._params
        if p is None:
            latin1 = self._latin1
            if latin1 is not None:  # not handed over yet: encode it back (cheaper than a walk)
                p = {k.encode("latin-1"): v.encode("latin-1") for k, v in latin1.items()}
            elif not self._block:  # a Params(rid) made without pairs
                p = {}
            else:
                p = decode_pairs(self._block)
            self._params = p
        return p

    def take_latin1(self) -> dict[str, str]:
        """Names and values latin-1 decoded, as a dict the caller owns and may modify.

        The first call returns the dict built when the PARAMS arrived (no copy); the caller
        may turn it into a WSGI environ in place. Later calls return a fresh dict.
        """
        latin1 = self._latin1
        if latin1 is not None:
            self._latin1 = None
            return latin1
        if self._params is None:
            return decode_pairs_latin1(self._block)
        return {k.decode("latin-1"): v.decode("latin-1") for k, v in self._params.items()}

    def __eq__(self, other: object) -> bool:
        if type(other) is not Params:
            return NotImplemented
        return self.request_id == other.request_id and self.params == other.params

    __hash__ = None  # type: ignore[assignment]  # mutable mapping inside, as with the dataclass

    def __repr__(self) -> str:
        return f"Params(request_id={self.request_id!r}, params={self.params!r})"


@dataclass(frozen=True, slots=True)
class Stdin:
    """Request body bytes, in order; ``b""`` is the end of the stream.

    Where one event ends and the next begins is not the web server's record boundaries: a
    record cut by the end of a read is handed on as far as it came, and consecutive records of
    one request in one read come as one event of up to MERGE_BYTES (see
    ServerConnection.receive). Only the bytes and the empty end are the contract.
    """

    request_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Data:
    """FCGI_DATA stream bytes (FILTER role only), cut and merged as Stdin; ``b""`` is the
    end of the stream."""

    request_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class AbortRequest:
    """The web server gave up on this request; the app stops and the server calls end_request."""

    request_id: int


Event = BeginRequest | Params | Stdin | Data | AbortRequest


@dataclass(frozen=True, slots=True)
class StdoutData:
    """Client side: one STDOUT record's payload; ``b""`` ends the stream."""

    request_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class StderrData:
    """Client side: one STDERR record's payload; ``b""`` ends the stream."""

    request_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class EndRequest:
    """Client side: the application finished (or rejected) a request."""

    request_id: int
    app_status: int
    protocol_status: ProtocolStatus


@dataclass(frozen=True, slots=True)
class GetValuesResult:
    """Client side: the answer to GET_VALUES."""

    values: dict[bytes, bytes]


@dataclass(frozen=True, slots=True)
class UnknownType:
    """Client side: the application did not understand a management record of this type."""

    record_type: int


ClientEvent = StdoutData | StderrData | EndRequest | GetValuesResult | UnknownType

#: What output functions accept and return, ready for socket.sendmsg: headers and padding as
#: bytes, the caller's data as given or as zero-copy memoryview slices of it.
Buffer = bytes | bytearray | memoryview

# ---------------------------------------------------------------------------------------------
# Wire structures (precompiled: a Struct call is several times cheaper than struct.pack(fmt)).

_HEADER: Final = struct.Struct("!BBHHBx")
_BEGIN_BODY: Final = struct.Struct("!HB5x")
_END_BODY: Final = struct.Struct("!IB3x")
_UNKNOWN_BODY: Final = struct.Struct("!B7x")
_U32: Final = struct.Struct("!I")
_PAD: Final = tuple(b"\0" * n for n in range(8))
# Padding of the last STDOUT record + empty STDOUT + END_REQUEST, in one pack call, and the
# same with an empty STDERR terminator: the tail of every response is a single bytes object.
_TAIL: Final = tuple(struct.Struct(f"!{n}xBBHHBxBBHHBxIB3x") for n in range(8))
_TAIL_ERR: Final = tuple(struct.Struct(f"!{n}xBBHHBxBBHHBxBBHHBxIB3x") for n in range(8))

# Plain ints for the hot loop: comparing to an IntEnum member goes through __eq__ lookups.
_BEGIN: Final = 1
_ABORT: Final = 2
_END: Final = 3
_PARAMS: Final = 4
_STDIN: Final = 5
_STDOUT: Final = 6
_STDERR: Final = 7
_DATA: Final = 8
_GET_VALUES: Final = 9
_GET_VALUES_RESULT: Final = 10
_UNKNOWN_TYPE: Final = 11
_RESPONDER: Final = 1

# Dict lookups instead of Role(x): calling an IntEnum by value is slow, and unknown values
# must not raise ValueError.
_ROLES: Final = {int(r): r for r in Role}
_PSTATUS: Final = {int(s): s for s in ProtocolStatus}
_MAX_PAIR_LEN: Final = 0x7FFFFFFF
_T = TypeVar("_T", bytes, str)


# ---------------------------------------------------------------------------------------------
# Name-value pairs (spec §3.4)


def _walk_pairs(data: bytes, text: _T) -> dict[_T, _T]:
    """Decode a complete name-value block into ``text`` slices: ``text`` is ``data`` itself
    (bytes out) or its latin-1 decoding (str out; latin-1 maps byte i to code point i, so the
    offsets are the same). A later duplicate name wins, as in a CGI environ.

    The common pair (both lengths < 128) costs two index reads, one test and two slices; the
    bounds are checked once, after the loop: slicing never reads past the end (it clips), so a
    pair that runs past the end leaves ``i > n`` and raises then, and a claimed 2 GiB length
    costs nothing. A length byte missing at the end is an IndexError, turned into ProtocolError.
    """
    n = len(data)
    i = 0
    out: dict[_T, _T] = {}
    try:
        while i < n:
            nlen = data[i]
            vlen = data[i + 1]
            if nlen < 0x80 and vlen < 0x80:
                mid = i + 2 + nlen
                end = mid + vlen
                out[text[i + 2 : mid]] = text[mid:end]
                i = end
                continue
            # A 4-byte length (the spec's "B3 & 0x7f" form; 4-byte forms of short lengths too).
            if nlen & 0x80:
                if i + 4 > n:
                    raise ProtocolError("name-value pair: truncated 4-byte name length")
                nlen = _U32.unpack_from(data, i)[0] & 0x7FFFFFFF
                i += 4
            else:
                i += 1
            vlen = data[i]
            if vlen & 0x80:
                if i + 4 > n:
                    raise ProtocolError("name-value pair: truncated 4-byte value length")
                vlen = _U32.unpack_from(data, i)[0] & 0x7FFFFFFF
                i += 4
            else:
                i += 1
            mid = i + nlen
            end = mid + vlen
            if end > n:
                raise ProtocolError(
                    f"name-value pair: lengths {nlen}+{vlen} exceed the {n - i} bytes left"
                )
            out[text[i:mid]] = text[mid:end]
            i = end
    except IndexError:
        raise ProtocolError("name-value pair: value length missing") from None
    if i != n:
        raise ProtocolError(f"name-value pair: a name or value runs {i - n} bytes past the end")
    return out


def decode_pairs(block: bytes | bytearray | memoryview) -> dict[bytes, bytes]:
    """Decode a complete name-value block; a later duplicate name wins, as in a CGI environ.

    A claimed 2 GiB length costs nothing: slices stop at the end of the block, and the pair
    that runs past it raises ProtocolError.
    """
    data = block if type(block) is bytes else bytes(block)
    return _walk_pairs(data, data)


def decode_pairs_latin1(block: bytes | bytearray | memoryview) -> dict[str, str]:
    """decode_pairs() with every name and value latin-1 decoded (PEP 3333 native strings), in
    one pass: the block is decoded once and sliced, no bytes dict in between."""
    data = block if type(block) is bytes else bytes(block)
    return _walk_pairs(data, data.decode("latin-1"))


def _pair_len(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    if n > _MAX_PAIR_LEN:
        raise ValueError(f"name-value length {n} exceeds 2**31-1")
    return _U32.pack(n | 0x80000000)


def encode_pairs(pairs: Mapping[bytes, bytes] | Iterable[tuple[bytes, bytes]]) -> bytes:
    """Encode name-value pairs with the shortest length forms (1 byte up to 127, else 4)."""
    items = pairs.items() if isinstance(pairs, Mapping) else pairs
    parts: list[bytes] = []
    for name, value in items:
        parts.append(_pair_len(len(name)))
        parts.append(_pair_len(len(value)))
        parts.append(bytes(name))
        parts.append(bytes(value))
    return b"".join(parts)


# ---------------------------------------------------------------------------------------------
# Encoding records (both directions)


def encode_record(
    rtype: RecordType | int, request_id: int, content: bytes = b"", *, pad: bool = True
) -> bytes:
    """One record; ``pad`` aligns it to 8 bytes as the spec recommends.

    ValueError (a caller bug, not peer input) if the content does not fit one record.
    """
    n = len(content)
    if n > FCGI_MAX_CONTENT:
        raise ValueError(f"record content of {n} bytes exceeds {FCGI_MAX_CONTENT}")
    padding = -n & 7 if pad else 0
    return _HEADER.pack(FCGI_VERSION_1, rtype, request_id, n, padding) + content + _PAD[padding]


def encode_stream(rtype: RecordType | int, request_id: int, data: bytes) -> bytes:
    """A whole stream: records of up to STDOUT_CHUNK bytes, then the empty terminator."""
    parts = [
        encode_record(rtype, request_id, data[i : i + STDOUT_CHUNK])
        for i in range(0, len(data), STDOUT_CHUNK)
    ]
    parts.append(_HEADER.pack(FCGI_VERSION_1, rtype, request_id, 0, 0))
    return b"".join(parts)


def encode_begin_request(
    request_id: int, role: Role = Role.RESPONDER, keep_conn: bool = False
) -> bytes:
    """A BEGIN_REQUEST record (spec §5.1)."""
    body = _BEGIN_BODY.pack(role, FCGI_KEEP_CONN if keep_conn else 0)
    return _HEADER.pack(FCGI_VERSION_1, _BEGIN, request_id, 8, 0) + body


def encode_abort_request(request_id: int) -> bytes:
    """An ABORT_REQUEST record (spec §5.4)."""
    return _HEADER.pack(FCGI_VERSION_1, _ABORT, request_id, 0, 0)


def encode_get_values(names: Iterable[bytes]) -> bytes:
    """A GET_VALUES management record: the names, each with an empty value (spec §4.1)."""
    return encode_record(_GET_VALUES, FCGI_NULL_REQUEST_ID, encode_pairs((n, b"") for n in names))


def encode_request(
    request_id: int,
    params: Mapping[bytes, bytes] | Iterable[tuple[bytes, bytes]],
    stdin: bytes = b"",
    *,
    role: Role = Role.RESPONDER,
    keep_conn: bool = False,
    data: bytes = b"",
) -> bytes:
    """Everything a web server sends for one request: BEGIN, PARAMS, STDIN (and DATA for FILTER)."""
    out = (
        encode_begin_request(request_id, role, keep_conn)
        + encode_stream(_PARAMS, request_id, encode_pairs(params))
        + encode_stream(_STDIN, request_id, stdin)
    )
    if role == Role.FILTER:
        out += encode_stream(_DATA, request_id, data)
    return out


def _frame_into(out: list[Buffer], rtype: int, request_id: int, buffers: Iterable[Buffer]) -> int:
    """Append records holding ``buffers`` (headers + the caller's buffers or slices of them).

    Returns the padding the last record still needs, so the caller can merge it with what
    follows (the response tail) instead of sending a separate 1..7-byte buffer.
    """
    t = type(buffers)
    bufs: Sequence[Buffer] = (
        buffers if t is list or t is tuple else list(buffers)  # type: ignore[assignment]
    )
    total = 0
    empty = False
    for b in bufs:
        n = b.nbytes if type(b) is memoryview else len(b)
        total += n
        if not n:
            empty = True
    if total == 0:
        return 0
    pack = _HEADER.pack
    if total <= STDOUT_CHUNK:
        pad = -total & 7
        out.append(pack(FCGI_VERSION_1, rtype, request_id, total, pad))
        if empty:
            out.extend([b for b in bufs if b])
        else:
            out += bufs
        return pad
    if len(bufs) == 1:
        # One big buffer (a streamed chunk, a file block): whole records of it in turn; half
        # the cost of the general loop below for a 64 KiB chunk.
        mv = memoryview(bufs[0])
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        off = 0
        while off < total:
            end = off + STDOUT_CHUNK
            n = STDOUT_CHUNK if end <= total else total - off
            out.append(pack(FCGI_VERSION_1, rtype, request_id, n, -n & 7))
            out.append(mv[off:end])
            off = end
        return -total & 7
    remaining = total
    room = 0
    for b in bufs:
        mv = memoryview(b)
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        size = len(mv)
        off = 0
        while off < size:
            if room == 0:
                room = min(STDOUT_CHUNK, remaining)
                remaining -= room
                out.append(pack(FCGI_VERSION_1, rtype, request_id, room, -room & 7))
            take = min(room, size - off)
            out.append(mv if take == size else mv[off : off + take])
            off += take
            room -= take
    # Only the last record can be short; every earlier one is exactly STDOUT_CHUNK bytes.
    return -(total % STDOUT_CHUNK) & 7


def frame_stream(
    request_id: int, buffers: Iterable[Buffer], *, stderr: bool = False
) -> list[Buffer]:
    """STDOUT (or STDERR) records for ``buffers``, padding included; stateless. Up to 65528
    bytes in all share one record header, so one sendmsg carries them."""
    out: list[Buffer] = []
    pad = _frame_into(out, _STDERR if stderr else _STDOUT, request_id, buffers)
    if pad:
        out.append(_PAD[pad])
    return out


def _end_tail(pad: int, request_id: int, app_status: int, status: int, stderr_used: bool) -> bytes:
    if stderr_used:
        return _TAIL_ERR[pad].pack(
            FCGI_VERSION_1, _STDOUT, request_id, 0, 0,
            FCGI_VERSION_1, _STDERR, request_id, 0, 0,
            FCGI_VERSION_1, _END, request_id, 8, 0,
            app_status & 0xFFFFFFFF, status,
        )  # fmt: skip
    return _TAIL[pad].pack(
        FCGI_VERSION_1, _STDOUT, request_id, 0, 0,
        FCGI_VERSION_1, _END, request_id, 8, 0,
        app_status & 0xFFFFFFFF, status,
    )  # fmt: skip


#: The tail of a complete request with id 1 and app status 0 (every request from nginx, lighttpd
#: and Apache that went well), for each padding the last STDOUT record needs.
_TAIL_1_OK: Final = tuple(_end_tail(pad, 1, 0, 0, False) for pad in range(8))

#: What the application sends after the last END_REQUEST on a kept-open connection it is about
#: to close (a graceful stop, a reload, a recycle): an empty FCGI_GET_VALUES_RESULT, a valid
#: management record. nginx keeps an upstream connection for reuse only when END_REQUEST ends
#: what it read; bytes after it make nginx close the connection instead (its fastcgi input
#: filters). Without them nginx may write its next request into the connection at the moment
#: we close it: a reset, and a 502 for a POST, which nginx does not retry (measured: 30-80 a
#: reload under load). Sent to nginx only (server._marks_understood): Apache mod_proxy_fcgi
#: would read it as the first record of its next response on a reused connection.
CLOSING_MARK: Final = _HEADER.pack(FCGI_VERSION_1, _GET_VALUES_RESULT, 0, 0, 0)
_COMPLETE: Final = ProtocolStatus.REQUEST_COMPLETE


def encode_response(
    request_id: int,
    body: Iterable[Buffer],
    app_status: int = 0,
    *,
    stderr_used: bool = False,
    status: ProtocolStatus = ProtocolStatus.REQUEST_COMPLETE,
) -> list[Buffer]:
    """STDOUT records for ``body`` + empty STDOUT (+ empty STDERR) + END_REQUEST, as buffers.

    A body up to 65528 bytes becomes ``[header, *body, tail]``: one sendmsg for the whole
    response. Stateless; ServerConnection.respond() is the same with the id bookkeeping.
    """
    out: list[Buffer] = []
    pad = _frame_into(out, _STDOUT, request_id, body)
    if request_id == 1 and not app_status and not stderr_used and status is _COMPLETE:
        out.append(_TAIL_1_OK[pad])  # what every nginx request that went well ends with
    else:
        out.append(_end_tail(pad, request_id, app_status, status, stderr_used))
    return out


# ---------------------------------------------------------------------------------------------
# Application side


def _chunk_event(rtype: int, rid: int, parts: list[memoryview]) -> Stdin | Data:
    """One Stdin (or Data) event for the contents of consecutive records (see _parse)."""
    data = b"".join(parts)
    return Stdin(rid, data) if rtype == _STDIN else Data(rid, data)


# Events are immutable, so the ones every nginx request produces are made once: the empty STDIN
# and the BEGIN_REQUEST of request ids 1-8 (nginx, lighttpd and Apache always use id 1).
_STDIN_END: Final = {rid: Stdin(rid, b"") for rid in range(1, 9)}
_BEGIN_EVENTS: Final = {
    (rid, int(role), keep): BeginRequest(rid, role, keep)
    for rid in range(1, 9)
    for role in Role
    for keep in (False, True)
}


# The whole-request fast path: BEGIN_REQUEST record + the next record's header in one unpack,
# and the empty PARAMS + empty STDIN records that must end the buffer, per request id.
_WHOLE_HEAD: Final = struct.Struct("!BBHHBxHB5xBBHHBx")
_NOT_WHOLE: Final = (0,) * 12
_new_params: Final = object.__new__  # Params without __init__'s keyword call, for the fast path
_EMPTY_PARAMS: Final = {
    rid: _HEADER.pack(FCGI_VERSION_1, _PARAMS, rid, 0, 0) for rid in range(1, 9)
}
_EMPTY_STDIN: Final = {rid: _HEADER.pack(FCGI_VERSION_1, _STDIN, rid, 0, 0) for rid in range(1, 9)}
_WHOLE_TAIL: Final = {rid: _EMPTY_PARAMS[rid] + _EMPTY_STDIN[rid] for rid in range(1, 9)}


def _whole_shape(
    data: bytes | memoryview, body: list[bytes] | None = None
) -> tuple[int, int, int, int] | None:
    """(request id, role, flags, end of the PARAMS content) when ``data`` is exactly BEGIN_REQUEST,
    ONE PARAMS record, the empty PARAMS and the empty STDIN -- (almost) every request a web server
    sends, in one read; None for anything else. One unpack and one compare instead of four trips
    through the record loop. With ``body``, STDIN records with content may come between the
    empty PARAMS and the empty STDIN (a small POST, as nginx sends it): see _whole_body."""
    (
        version, rtype, rid, clen, plen, role_value, flags,
        pversion, ptype, prid, pclen, pplen,
    ) = _WHOLE_HEAD.unpack_from(data) if (end := len(data)) >= 40 else _NOT_WHOLE  # fmt: skip
    stop = 24 + pclen
    tail = _WHOLE_TAIL.get(rid)
    if (
        tail is None
        or version != FCGI_VERSION_1
        or rtype != _BEGIN
        or clen != 8
        or plen
        or pversion != FCGI_VERSION_1
        or ptype != _PARAMS
        or prid != rid
        or not pclen
    ):
        return None
    if (stop + pplen + 16 != end or data[end - 16 :] != tail) and (
        body is None or not _whole_body(data, rid, stop + pplen, end, body)
    ):
        return None
    return rid, role_value, flags, stop


def _whole_body(data: bytes | memoryview, rid: int, pos: int, end: int, body: list[bytes]) -> bool:
    """Whether ``data`` goes on from ``pos`` with the empty PARAMS, STDIN records with content
    and the empty STDIN that ends it; if so their contents are appended to ``body``."""
    last = end - 8
    if (
        pos + 8 >= last
        or data[pos : pos + 8] != _EMPTY_PARAMS[rid]
        or data[last:] != _EMPTY_STDIN[rid]
    ):
        return False
    pos += 8
    unpack = _HEADER.unpack_from
    chunks: list[bytes] = []
    while pos < last:
        if last - pos < 8:
            return False
        version, rtype, srid, clen, plen = unpack(data, pos)
        start = pos + 8
        pos = start + clen + plen
        if version != FCGI_VERSION_1 or rtype != _STDIN or srid != rid or not clen or pos > last:
            return False
        chunks.append(bytes(data[start : start + clen]))
    body += chunks
    return True


def asks_keep_conn(data: bytes | memoryview) -> bool:
    """Whether ``data`` starts with a BEGIN_REQUEST record whose flags ask for FCGI_KEEP_CONN.

    The server's cue, when whole_responder_request(..., keep_conn=False) said no for a new
    connection's first read, to try again with keep_conn=True: nginx with ``fastcgi_keep_conn
    on`` sets the flag on the first request of every connection it opens.
    """
    return len(data) >= 16 and data[1] == _BEGIN and data[10] & FCGI_KEEP_CONN == FCGI_KEEP_CONN


def whole_responder_request(
    data: bytes | memoryview,
    limits: Limits,
    body: list[bytes] | None = None,
    keep_conn: bool = False,
) -> Params | None:
    """The one request of a connection that carries nothing else, when it came whole in one read.

    That is: BEGIN_REQUEST (RESPONDER, no KEEP_CONN), one PARAMS record, the empty PARAMS and
    the empty STDIN, nothing after -- what nginx sends for a bodiless request by default. The
    server answers it without a ServerConnection: no state can outlive it (the web server lets
    us close, and nothing else arrives). Returns its Params, latin-1 decoded, or None for
    anything else, including input ServerConnection would reject or answer (management
    records, other roles, KEEP_CONN, malformed pairs, limits): it handles those as always.

    With ``body`` (an empty list), a request whose whole body came in the same read -- STDIN
    records with content before the empty STDIN, what nginx sends for a small POST -- is one
    too: the contents are appended to ``body`` (left empty when None is returned).

    ``keep_conn``: the FCGI_KEEP_CONN flag the request must carry -- False for a new
    connection's request (nginx's default: the server closes after it), True for a request
    after which the server keeps the connection open: the next one on a kept connection, or a
    new connection's first one that asks for it (see asks_keep_conn).
    """
    shape = _whole_shape(data, body)
    if shape is None:
        return None
    rid, role_value, flags, stop = shape
    if (
        role_value != _RESPONDER
        or flags & FCGI_KEEP_CONN != keep_conn  # (the flag is bit 0: 1 == True, 0 == False)
        or limits.max_requests_per_conn < 1
        or stop - 24 > limits.max_params_bytes
    ):
        if body:
            body.clear()
        return None
    block = bytes(data[24:stop])
    ev = _new_params(Params)
    ev.request_id = rid
    ev._block = block
    ev._params = None
    try:
        ev._latin1 = _walk_pairs(block, block.decode("latin-1"))
    except ProtocolError:
        if body:
            body.clear()
        return None  # the connection's parser reports it, as for every other connection
    return ev


class _Request:
    """Mutable per-request state (slotted, not a dataclass: it changes on every record)."""

    __slots__ = (
        "aborted",
        "data_open",
        "keep_conn",
        "params",
        "params_size",
        "role",
        "stderr_used",
        "stdin_open",
    )

    def __init__(self, role: Role, keep_conn: bool) -> None:
        self.role = role
        self.keep_conn = keep_conn
        self.params: list[bytes] | None = []  # None once the PARAMS stream has ended
        self.params_size = 0
        self.stdin_open = True
        self.data_open = role == Role.FILTER
        self.stderr_used = False
        self.aborted = False


class _Reader:
    """The receive buffer shared by both sides: one bytearray and a read offset.

    When nothing is buffered the caller's bytes are parsed in place; only an incomplete tail
    is copied. The buffer is compacted only once the offset passes half of it, so a stream of
    small reads costs O(n), never the quadratic ``data = data[n:]``.
    """

    __slots__ = ("_buf", "_failed", "_pos")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._failed = False

    def _parse(self, view: bytes | memoryview, pos: int, end: int, events: list[object]) -> int:
        raise NotImplementedError

    @property
    def mid_record(self) -> bool:
        """Whether bytes of an incomplete record are buffered (the next read continues it)."""
        return len(self._buf) > self._pos

    def _feed(self, data: bytes | bytearray | memoryview, events: list[object]) -> None:
        if self._failed:
            raise ProtocolError("connection already failed")
        buf = self._buf
        try:
            if self._pos == len(buf):
                if type(data) is bytes:
                    pos = self._parse(data, 0, len(data), events)
                    if pos < len(data):  # keep the incomplete tail; the buffer was empty
                        buf[:] = memoryview(data)[pos:]
                    return
                with memoryview(data) as mv:
                    flat = mv if mv.format == "B" and mv.ndim == 1 else mv.cast("B")
                    pos = self._parse(flat, 0, len(flat), events)
                    buf[:] = flat[pos:]
                    self._pos = 0
                return
            buf += data
            with memoryview(buf) as mv:
                pos = self._parse(mv, self._pos, len(mv), events)
            if pos == len(buf):
                buf.clear()
                pos = 0
            elif pos > len(buf) >> 1:
                del buf[:pos]
                pos = 0
            self._pos = pos
        except ProtocolError:
            self._failed = True
            raise
        except (ValueError, TypeError, OverflowError, IndexError, KeyError, struct.error) as exc:
            # Defence in depth: a bug must not let malformed input escape as another type. The
            # original stays chained as __cause__, which the property tests and fuzzer reject.
            self._failed = True
            raise ProtocolError(f"malformed input: {exc}") from exc


class ServerConnection(_Reader):
    """The application side of one transport connection.

    Not thread-safe: the server serialises calls on one connection (it writes whole records
    under one lock anyway). After a ProtocolError the connection is dead: close it.
    """

    __slots__ = (
        "_active_elsewhere",
        "_latin1_params",
        "_limits",
        "_pending",
        "_requests",
        "_should_close",
        "_skip",
        "_stream_left",
        "_stream_rid",
        "_stream_type",
    )

    def __init__(
        self,
        limits: Limits = Limits(),  # frozen, so one shared default is safe
        *,
        active_elsewhere: Callable[[], int] | None = None,
        latin1_params: bool = False,
    ) -> None:
        """``active_elsewhere()`` returns how many requests are active on the server's OTHER
        connections; with it, a BEGIN_REQUEST that would take the server past
        ``limits.max_reqs`` is answered OVERLOADED.

        ``latin1_params``: decode PARAMS straight to latin-1 ``str`` (for a WSGI server that
        calls ``Params.take_latin1()``; see :class:`Params`)."""
        self._buf = bytearray()  # _Reader's state, set here: one call less per connection
        self._pos = 0
        self._failed = False
        self._limits = limits
        self._active_elsewhere = active_elsewhere
        self._latin1_params = latin1_params
        self._requests: dict[int, _Request] = {}
        self._pending = bytearray()
        self._should_close = False
        # A STDIN/DATA record cut by the end of a read: its content goes out as it arrives
        # (_parse, _feed), so a large body is never copied into the buffer to be reassembled.
        self._stream_rid = 0
        self._stream_type = 0
        self._stream_left = 0  # content bytes of that record still to come
        self._skip = 0  # then its padding bytes still to come

    # -- input ----------------------------------------------------------------------------

    def receive(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Feed bytes in any chunking; returns the events of every complete record, and a
        Stdin/Data event for as much of a STDIN/FCGI_DATA record as came (a body is handed on as
        it arrives, so how it is split into events depends on the reads; consecutive records of
        one request in one read make one event of up to MERGE_BYTES; an empty one still ends the
        stream).

        ``data`` is not referenced after the call returns (a recv_into buffer may be reused).
        """
        events: list[Event] = []
        t = type(data)
        if (
            (t is bytes or (t is memoryview and data.format == "B" and data.ndim == 1))  # type: ignore[union-attr]
            and not self._requests
            and not self._buf
            and not self._failed
            and not self._stream_left
            and not self._skip
        ):
            try:
                if self._parse_whole_request(data, events):  # type: ignore[arg-type]
                    return events
            except ProtocolError:
                self._failed = True
                raise
            except (
                ValueError,
                TypeError,
                OverflowError,
                IndexError,
                KeyError,
                struct.error,
            ) as exc:
                self._failed = True  # as in _feed: malformed input raises ProtocolError only
                raise ProtocolError(f"malformed input: {exc}") from exc
        self._feed(data, events)  # type: ignore[arg-type]
        return events

    @property
    def mid_record(self) -> bool:
        """Whether part of a record came and the next read continues it."""
        return len(self._buf) > self._pos or bool(self._stream_left or self._skip)

    def _stream(self, rtype: int, rid: int, left: int, remaining: int) -> None:
        """A STDIN/DATA record was cut: ``remaining`` bytes of it are still to come, ``left``
        of them content, the rest padding (the content so far is out as an event already)."""
        self._stream_type = rtype
        self._stream_rid = rid
        self._stream_left = left
        self._skip = remaining - left

    def _feed(self, data: bytes | bytearray | memoryview, events: list[object]) -> None:
        if self._stream_left or self._skip:
            if self._failed:
                raise ProtocolError("connection already failed")
            # The rest of a cut STDIN/DATA record: one copy, into its event, and on to the next
            # record. A request ended meanwhile (the app returned without reading its whole
            # body) takes the rest of its record with it, as whole records for it would be.
            with memoryview(data) as mv:
                flat = mv if mv.format == "B" and mv.ndim == 1 else mv.cast("B")
                n = len(flat)
                take = min(self._stream_left, n)
                if take:
                    self._stream_left -= take
                    rid = self._stream_rid
                    if rid in self._requests:
                        chunk = bytes(flat[:take])
                        if self._stream_type == _STDIN:
                            events.append(Stdin(rid, chunk))
                        else:
                            events.append(Data(rid, chunk))
                skipped = 0
                if not self._stream_left:
                    skipped = min(self._skip, n - take)
                    self._skip -= skipped
                used = take + skipped
                if used < n:
                    super()._feed(flat[used:], events)
            return
        super()._feed(data, events)

    def _parse(self, view: bytes | memoryview, pos: int, end: int, events: list[object]) -> int:
        requests = self._requests
        unpack = _HEADER.unpack_from
        append = events.append
        # STDIN (or FCGI_DATA) contents of consecutive records of one request in this read: one
        # event for up to MERGE_BYTES of them, made with one copy. nginx sends a body in 8 KiB
        # records, a read holds up to 32 of them, and an event each cost ~1 us apiece on the
        # way to the app. (Not more: glibc serves allocations from 128 KiB up with fresh mmaps,
        # so bigger events cost a page fault per 4 KiB, more than the events saved.)
        merge: list[memoryview] = []
        mtype = mrid = msize = 0
        mv: memoryview | None = None
        while end - pos >= 8:
            version, rtype, rid, clen, plen = unpack(view, pos)
            if merge and (
                rtype != mtype or rid != mrid or not clen or msize + clen > MERGE_BYTES
            ):
                append(_chunk_event(mtype, mrid, merge))
                merge = []
                msize = 0
            if version != FCGI_VERSION_1:
                raise ProtocolError(f"unsupported FastCGI version {version}")
            start = pos + 8
            stop = start + clen
            nxt = stop + plen
            if nxt > end:
                # Cut by the end of this read. STDIN and DATA of an active request are handed
                # on as far as they came (see _stream); any other record waits to be whole.
                if (
                    rtype not in (_STDIN, _DATA)
                    or not clen
                    or end == start
                    or not rid
                    or rid not in requests
                ):
                    break
                stop = min(stop, end)
                nxt = end
            pos = nxt
            if rid == 0:
                self._management(rtype, view[start:stop])
                continue
            req = requests.get(rid)
            if req is None:
                if rtype == _BEGIN:
                    if clen != 8:
                        raise ProtocolError(
                            f"request {rid}: BEGIN_REQUEST body of {clen} bytes, not 8"
                        )
                    role_value, flags = _BEGIN_BODY.unpack_from(view, start)
                    self._begin(rid, role_value, flags & FCGI_KEEP_CONN == FCGI_KEEP_CONN, append)
                # Records for inactive ids are ignored (spec §3.3).
                continue
            if rtype == _PARAMS:
                parts = req.params
                if parts is None:
                    raise ProtocolError(f"request {rid}: PARAMS after the end of PARAMS")
                if clen:
                    size = req.params_size + clen
                    if size > self._limits.max_params_bytes:
                        raise ProtocolError(
                            f"request {rid}: PARAMS exceed {self._limits.max_params_bytes} bytes"
                        )
                    req.params_size = size
                    parts.append(bytes(view[start:stop]))
                else:
                    req.params = None
                    block = parts[0] if len(parts) == 1 else b"".join(parts)
                    append(self._params_event(rid, block))
            elif rtype in (_STDIN, _DATA):
                if rtype == _STDIN:
                    if req.params is not None:
                        # Spec §6.2: a responder receives PARAMS, then STDIN. Every real server
                        # ends PARAMS first; accepting STDIN earlier would hand the app a body
                        # before its environ, so it is refused.
                        raise ProtocolError(f"request {rid}: STDIN before the end of PARAMS")
                    if not req.stdin_open:
                        raise ProtocolError(f"request {rid}: STDIN after the end of STDIN")
                    if not clen:
                        req.stdin_open = False
                        append(_STDIN_END.get(rid) or Stdin(rid, b""))
                        continue
                else:
                    if req.role != Role.FILTER:
                        raise ProtocolError(f"request {rid}: FCGI_DATA for a non-FILTER request")
                    if req.params is not None:
                        raise ProtocolError(f"request {rid}: FCGI_DATA before the end of PARAMS")
                    if not req.data_open:
                        raise ProtocolError(
                            f"request {rid}: FCGI_DATA after the end of FCGI_DATA"
                        )
                    if not clen:
                        req.data_open = False
                        append(Data(rid, b""))
                        continue
                if mv is None:
                    mv = memoryview(view)
                merge.append(mv[start:stop])
                mtype, mrid = rtype, rid
                msize += clen
                if pos == end and start + clen + plen > end:
                    self._stream(rtype, rid, start + clen - stop, start + clen + plen - end)
                    continue
                # The records that follow in a body (whole records of this stream and request,
                # with content, within MERGE_BYTES): the few checks they need, in a tight loop.
                # Anything else goes round the full loop above.
                while end - pos >= 8:
                    version, next_type, next_rid, clen, plen = unpack(view, pos)
                    start = pos + 8
                    stop = start + clen
                    nxt = stop + plen
                    if (
                        next_type != rtype
                        or next_rid != rid
                        or version != FCGI_VERSION_1
                        or not clen
                        or nxt > end
                        or msize + clen > MERGE_BYTES
                    ):
                        break
                    merge.append(mv[start:stop])
                    msize += clen
                    pos = nxt
            elif rtype == _ABORT:
                if clen:
                    raise ProtocolError(f"request {rid}: ABORT_REQUEST with a body")
                if not req.aborted:
                    req.aborted = True
                    append(AbortRequest(rid))
            elif rtype == _BEGIN:
                raise ProtocolError(f"request {rid}: BEGIN_REQUEST for an active request")
            else:
                raise ProtocolError(f"request {rid}: unexpected record type {rtype}")
        if merge:
            append(_chunk_event(mtype, mrid, merge))
        return pos

    def _parse_whole_request(self, data: bytes | memoryview, events: list[object]) -> bool:
        """The shape of (almost) every request from a web server, in one read: BEGIN_REQUEST,
        ONE PARAMS record, the empty PARAMS and the empty STDIN, nothing else. Checked with one
        unpack and one endswith() instead of four trips through the record loop; the events,
        state and errors are exactly the loop's (False: not this shape, use the loop).
        """
        shape = _whole_shape(data)
        if shape is None:
            return False
        rid, role_value, flags, stop = shape
        pclen = stop - 24
        append = events.append
        keep_conn = flags & FCGI_KEEP_CONN == FCGI_KEEP_CONN
        limits = self._limits
        role = _ROLES.get(role_value)
        if role is None or limits.max_requests_per_conn < 1 or self._active_elsewhere is not None:
            # _begin() decides (no request is active here, so only these can reject)
            self._begin(rid, role_value, keep_conn, append)
            req = self._requests.get(rid)
            if req is None:  # rejected: its other records are ignored (spec §3.3)
                return True
        else:
            req = self._requests[rid] = _Request(role, keep_conn)
            append(
                _BEGIN_EVENTS.get((rid, role_value, keep_conn))
                or BeginRequest(rid, role, keep_conn)
            )
        if pclen > limits.max_params_bytes:
            raise ProtocolError(f"request {rid}: PARAMS exceed {limits.max_params_bytes} bytes")
        req.params = None
        req.stdin_open = False
        append(self._params_event(rid, bytes(data[24:stop])))
        append(_STDIN_END[rid])
        return True

    def _params_event(self, rid: int, block: bytes) -> Params:
        """Params for a complete block, decoded (and checked) once, to str or to bytes."""
        ev = _new_params(Params)
        ev.request_id = rid
        ev._block = block
        if self._latin1_params:
            ev._params = None
            ev._latin1 = _walk_pairs(block, block.decode("latin-1"))
        else:
            ev._params = _walk_pairs(block, block)
            ev._latin1 = None
        return ev

    def _begin(
        self, rid: int, role_value: int, keep_conn: bool, append: Callable[[BeginRequest], None]
    ) -> None:
        role = _ROLES.get(role_value)
        limits = self._limits
        requests = self._requests
        if role is None:
            self._reject(rid, ProtocolStatus.UNKNOWN_ROLE, keep_conn)
        elif requests and not limits.mpxs_conns:
            self._reject(rid, ProtocolStatus.CANT_MPX_CONN, keep_conn)
        elif len(requests) >= limits.max_requests_per_conn or (
            self._active_elsewhere is not None
            and self._active_elsewhere() + len(requests) >= limits.max_reqs
        ):
            self._reject(rid, ProtocolStatus.OVERLOADED, keep_conn)
        else:
            requests[rid] = _Request(role, keep_conn)
            append(
                _BEGIN_EVENTS.get((rid, role_value, keep_conn))
                or BeginRequest(rid, role, keep_conn)
            )

    def _reject(self, rid: int, status: ProtocolStatus, keep_conn: bool) -> None:
        self._pending += _HEADER.pack(FCGI_VERSION_1, _END, rid, 8, 0)
        self._pending += _END_BODY.pack(0, status)
        if not keep_conn:
            self._should_close = True

    def _management(self, rtype: int, body: bytes | memoryview) -> None:
        if rtype != _GET_VALUES:
            # Spec §4.2: any management type we do not understand, BEGIN_REQUEST on id 0 too.
            self._pending += _HEADER.pack(FCGI_VERSION_1, _UNKNOWN_TYPE, 0, 8, 0)
            self._pending += _UNKNOWN_BODY.pack(rtype)
            return
        limits = self._limits
        known = {
            b"FCGI_MAX_CONNS": str(limits.max_conns).encode(),
            b"FCGI_MAX_REQS": str(limits.max_reqs).encode(),
            b"FCGI_MPXS_CONNS": b"1" if limits.mpxs_conns else b"0",
        }
        asked = decode_pairs(body)
        reply = encode_pairs((name, known[name]) for name in asked if name in known)
        self._pending += encode_record(_GET_VALUES_RESULT, 0, reply)

    # -- output ---------------------------------------------------------------------------

    def pending_output(self) -> bytes:
        """Bytes the library produced by itself (GET_VALUES_RESULT, UNKNOWN_TYPE, rejections).

        Send them after every receive(); the call clears them.
        """
        if not self._pending:
            return b""
        out = bytes(self._pending)
        self._pending.clear()
        return out

    def _active(self, request_id: int) -> _Request:
        req = self._requests.get(request_id)
        if req is None:
            raise ValueError(f"request {request_id} is not active")
        return req

    def stdout(self, request_id: int, data: Buffer) -> list[Buffer]:
        """STDOUT records for ``data``: header, data (or 65528-byte slices of it), padding."""
        self._active(request_id)
        return frame_stream(request_id, (data,))

    def stdout_many(self, request_id: int, buffers: Iterable[Buffer]) -> list[Buffer]:
        """stdout() for several buffers (e.g. what the WSGI layer hands to send()): up to 65528
        bytes in all they share one record header, so one sendmsg carries them."""
        self._active(request_id)
        return frame_stream(request_id, buffers)

    def stderr(self, request_id: int, data: Buffer) -> list[Buffer]:
        """STDERR records for ``data``; end_request() then also ends the STDERR stream."""
        req = self._active(request_id)
        out = frame_stream(request_id, (data,), stderr=True)
        if out:
            req.stderr_used = True
        return out

    def end_request(
        self,
        request_id: int,
        app_status: int = 0,
        status: ProtocolStatus = ProtocolStatus.REQUEST_COMPLETE,
    ) -> list[bytes]:
        """Empty STDOUT (+ empty STDERR if it was used) + END_REQUEST; the id becomes inactive."""
        req = self._requests.pop(request_id, None)
        if req is None:
            raise ValueError(f"request {request_id} is not active")
        if not req.keep_conn:
            self._should_close = True
        return [_end_tail(0, request_id, app_status, status, req.stderr_used)]

    def respond(self, request_id: int, body: Iterable[Buffer], app_status: int = 0) -> list[Buffer]:
        """stdout(body) + end_request() in one list: a small response is ONE sendmsg.

        ``body`` may be several buffers (CGI head, first chunk...): up to 65528 bytes in all
        they share one record header, and the padding rides with the END_REQUEST tail.
        """
        req = self._requests.pop(request_id, None)
        if req is None:
            raise ValueError(f"request {request_id} is not active")
        if not req.keep_conn:
            self._should_close = True
        return encode_response(request_id, body, app_status, stderr_used=req.stderr_used)

    def keep_conn(self, request_id: int) -> bool:
        """Whether the web server asked to keep the connection after this (active) request."""
        return self._active(request_id).keep_conn

    def role(self, request_id: int) -> Role:
        """The role of an active request."""
        return self._active(request_id).role

    @property
    def active_requests(self) -> frozenset[int]:
        """Ids between BEGIN_REQUEST (accepted) and end_request()."""
        return frozenset(self._requests)

    @property
    def should_close(self) -> bool:
        """True once a request without KEEP_CONN has ended (or been rejected).

        Spec §5.1: the application then closes the connection after responding. With
        multiplexed requests still active, close once ``active_requests`` is empty.
        """
        return self._should_close


# ---------------------------------------------------------------------------------------------
# Web server (client) side


class ClientConnection(_Reader):
    """The web-server side of a connection: parses what an application sends back.

    Stateless apart from the receive buffer: it does not track ids (the caller does), but it
    checks every record: only STDOUT, STDERR, END_REQUEST (non-zero id), GET_VALUES_RESULT and
    UNKNOWN_TYPE (id 0) may come from an application.
    """

    __slots__ = ()

    def receive(self, data: bytes | bytearray | memoryview) -> list[ClientEvent]:
        """Feed bytes in any chunking; returns the events of every complete record."""
        events: list[ClientEvent] = []
        self._feed(data, events)  # type: ignore[arg-type]
        return events

    def _parse(self, view: bytes | memoryview, pos: int, end: int, events: list[object]) -> int:
        unpack = _HEADER.unpack_from
        append = events.append
        while end - pos >= 8:
            version, rtype, rid, clen, plen = unpack(view, pos)
            if version != FCGI_VERSION_1:
                raise ProtocolError(f"unsupported FastCGI version {version}")
            start = pos + 8
            stop = start + clen
            nxt = stop + plen
            if nxt > end:
                break
            pos = nxt
            body = view[start:stop]
            if rid == 0:
                if rtype == _GET_VALUES_RESULT:
                    append(GetValuesResult(decode_pairs(body)))
                elif rtype == _UNKNOWN_TYPE:
                    if clen != 8:
                        raise ProtocolError(f"UNKNOWN_TYPE body of {clen} bytes, not 8")
                    append(UnknownType(body[0]))
                else:
                    raise ProtocolError(f"unexpected management record type {rtype}")
            elif rtype == _STDOUT:
                append(StdoutData(rid, bytes(body)))
            elif rtype == _STDERR:
                append(StderrData(rid, bytes(body)))
            elif rtype == _END:
                if clen != 8:
                    raise ProtocolError(f"request {rid}: END_REQUEST body of {clen} bytes, not 8")
                app_status, pstatus = _END_BODY.unpack_from(body)
                status = _PSTATUS.get(pstatus)
                if status is None:
                    raise ProtocolError(f"request {rid}: unknown protocolStatus {pstatus}")
                append(EndRequest(rid, app_status, status))
            else:
                raise ProtocolError(f"request {rid}: unexpected record type {rtype}")
        return pos

"""Properties of fcgispawn.protocol that tables cannot cover: round trips, arbitrary chunking,
and "any input parses or raises ProtocolError, with bounded memory".

max_examples stays modest so the whole file runs in a few seconds; the atheris harness in
fuzz/ is where long random runs belong.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fcgispawn.protocol import (
    FCGI_HEADER_LEN,
    FCGI_MAX_CONTENT,
    AbortRequest,
    BeginRequest,
    ClientConnection,
    ClientEvent,
    Data,
    EndRequest,
    Event,
    Limits,
    Params,
    ProtocolError,
    ProtocolStatus,
    RecordType,
    Role,
    ServerConnection,
    StderrData,
    Stdin,
    StdoutData,
    decode_pairs,
    decode_pairs_latin1,
    encode_abort_request,
    encode_get_values,
    encode_pairs,
    encode_record,
    encode_request,
)
from tests.procs import merge_body_chunks

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Lengths around 127/128 so both the 1-byte and the 4-byte forms occur.
names = st.binary(max_size=140)
values = st.one_of(st.binary(max_size=20), st.binary(min_size=120, max_size=300))
param_dicts = st.dictionaries(names, values, max_size=6)

# The largest thing the receive buffer may hold between calls: one incomplete record.
MAX_RECORD = FCGI_HEADER_LEN + FCGI_MAX_CONTENT + 255


@dataclass(frozen=True)
class Req:
    rid: int
    role: Role
    keep_conn: bool
    params: dict[bytes, bytes]
    stdin: bytes
    data: bytes


requests = st.builds(
    Req,
    rid=st.integers(1, 0xFFFF),
    role=st.sampled_from(list(Role)),
    keep_conn=st.booleans(),
    params=param_dicts,
    stdin=st.binary(max_size=300),
    data=st.binary(max_size=100),
)


def cut(wire: bytes, points: list[int]) -> list[bytes]:
    """Split ``wire`` at the given offsets (taken modulo its length)."""
    offsets = sorted({p % (len(wire) + 1) for p in points} | {0, len(wire)})
    return [wire[a:b] for a, b in itertools.pairwise(offsets)]


def feed(conn: ServerConnection, chunks: list[bytes]) -> tuple[list[object], bytes]:
    """Events (a body's chunks joined: how a body is split depends on the reads) and output."""
    events: list[Event] = []
    out = b""
    for chunk in chunks:
        events += conn.receive(chunk)
        out += conn.pending_output()
    return merge_body_chunks(events), out


@st.composite
def valid_streams(draw: st.DrawFn) -> bytes:
    """Several requests (distinct ids, keep-alive) plus management and stray records."""
    reqs = draw(st.lists(requests, max_size=4, unique_by=lambda r: r.rid))
    parts = []
    for r in reqs:
        parts.append(
            encode_request(r.rid, r.params, r.stdin, role=r.role, keep_conn=True, data=r.data)
        )
        if draw(st.booleans()):
            parts.append(encode_abort_request(r.rid))
    if draw(st.booleans()):
        parts.append(encode_get_values([b"FCGI_MAX_CONNS", b"x", b"FCGI_MPXS_CONNS"]))
    if draw(st.booleans()):
        parts.append(encode_record(draw(st.integers(12, 255)), 0, b"mgmt"))
    parts.append(encode_record(RecordType.STDIN, 0xFFFF if not reqs else 0, b"stray"))
    return b"".join(parts)


# --- name-value pairs ---------------------------------------------------------------------------


@FAST
@given(param_dicts)
def test_pairs_round_trip(params: dict[bytes, bytes]) -> None:
    assert decode_pairs(encode_pairs(params)) == params


@FAST
@given(st.binary(max_size=64))
def test_decode_pairs_of_arbitrary_bytes_returns_or_raises_protocol_error(block: bytes) -> None:
    try:
        result = decode_pairs(block)
    except ProtocolError:
        return
    assert sum(len(k) + len(v) for k, v in result.items()) <= len(block)


# --- chunking -----------------------------------------------------------------------------------


@FAST
@given(valid_streams(), st.lists(st.integers(0, 1 << 16), max_size=12))
def test_any_chunking_gives_the_same_events(wire: bytes, points: list[int]) -> None:
    expected = feed(ServerConnection(), [wire])
    assert feed(ServerConnection(), cut(wire, points)) == expected


@SLOW
@given(valid_streams())
def test_byte_at_a_time_gives_the_same_events(wire: bytes) -> None:
    expected = feed(ServerConnection(), [wire])
    assert feed(ServerConnection(), [wire[i : i + 1] for i in range(len(wire))]) == expected


# --- arbitrary input ----------------------------------------------------------------------------


def check_arbitrary(chunks: list[bytes], limits: Limits, *, latin1: bool = False) -> None:
    conn = ServerConnection(limits, latin1_params=latin1)
    for chunk in chunks:
        try:
            events = conn.receive(chunk)
        except ProtocolError as exc:
            # A ProtocolError with a cause is an internal error the safety net converted:
            # a bug, even though the caller only sees ProtocolError.
            assert exc.__cause__ is None, repr(exc.__cause__)
            return
        conn.pending_output()
        assert all(
            isinstance(e, BeginRequest | Params | Stdin | Data | AbortRequest) for e in events
        )
        # Memory bound: at most one incomplete record stays buffered.
        assert len(conn._buf) - conn._pos < MAX_RECORD
        assert len(conn.active_requests) <= limits.max_requests_per_conn


@FAST
@given(st.lists(st.binary(max_size=200), max_size=8))
def test_arbitrary_bytes_give_events_or_protocol_error_only(chunks: list[bytes]) -> None:
    check_arbitrary(chunks, Limits(max_requests_per_conn=4, max_params_bytes=256))


record_headers = st.tuples(
    st.sampled_from([1, 1, 1, 1, 0, 2]),  # mostly version 1, so parsing goes deep
    st.integers(0, 13),
    st.sampled_from([0, 1, 2, 0xFFFF]),
    st.binary(max_size=40),
    st.integers(0, 9),
)


@FAST
@given(st.lists(record_headers, max_size=12), st.lists(st.integers(0, 1 << 12), max_size=6))
def test_arbitrary_records_give_events_or_protocol_error_only(
    records: list[tuple[int, int, int, bytes, int]], points: list[int]
) -> None:
    wire = b"".join(
        bytes([ver, rtype, rid >> 8, rid & 0xFF, len(body) >> 8, len(body) & 0xFF, pad, 0])
        + body
        + b"\0" * pad
        for ver, rtype, rid, body, pad in records
    )
    check_arbitrary(cut(wire, points), Limits(max_requests_per_conn=2, mpxs_conns=True))
    check_arbitrary(cut(wire, points), Limits(mpxs_conns=False))
    check_arbitrary(cut(wire, points), Limits(max_params_bytes=30), latin1=True)


def outcome(chunks: list[bytes], latin1: bool) -> tuple[object, ...]:
    """Every event (or the error) and the connection's state after it."""
    conn = ServerConnection(
        Limits(max_requests_per_conn=2, max_params_bytes=64), latin1_params=latin1
    )
    events: list[object] = []
    try:
        for chunk in chunks:
            events += conn.receive(chunk)
    except ProtocolError as exc:
        assert exc.__cause__ is None, repr(exc.__cause__)
        events.append(ProtocolError)
    return (
        tuple(merge_body_chunks(events)),
        conn.pending_output(),
        conn.active_requests,
        conn.should_close,
    )


whole_requests = st.tuples(
    st.sampled_from([1, 1, 1, 2]),  # BEGIN version
    st.sampled_from([1, 1, 1, 4]),  # BEGIN type
    st.sampled_from([0, 1, 8, 9]),  # request id
    st.sampled_from([1, 2, 3, 7]),  # role
    st.sampled_from([0, 1]),  # flags
    st.binary(max_size=80),  # PARAMS body: often a malformed pair block
    st.integers(0, 9),  # PARAMS padding
    st.sampled_from([b"", b"\x01\x05\x00\x01\x00\x00\x00\x00", b"\x00"]),  # trailing junk
)


@FAST
@given(whole_requests)
def test_whole_request_fast_path_matches_the_record_loop(
    shape: tuple[int, int, int, int, int, bytes, int, bytes],
) -> None:
    ver, rtype, rid, role, flags, body, pad, junk = shape
    wire = (
        bytes([ver, rtype, 0, rid, 0, 8, 0, 0, 0, role, flags, 0, 0, 0, 0, 0])
        + bytes([1, 4, 0, rid, 0, len(body), pad, 0])
        + body
        + b"\0" * pad
        + bytes([1, 4, 0, rid, 0, 0, 0, 0, 1, 5, 0, rid, 0, 0, 0, 0])
        + junk
    )
    # Split after the first byte, no record is complete: the generic loop parses it all.
    expected = outcome([wire[:1], wire[1:]], latin1=False)
    for latin1 in (False, True):
        assert outcome([wire], latin1) == expected
        assert outcome([wire[:1], wire[1:]], latin1) == expected


@FAST
@given(st.binary(max_size=64))
def test_decode_pairs_latin1_agrees_with_decode_pairs(block: bytes) -> None:
    try:
        expected = {
            k.decode("latin-1"): v.decode("latin-1") for k, v in decode_pairs(block).items()
        }
    except ProtocolError:
        with pytest.raises(ProtocolError):
            decode_pairs_latin1(block)
        return
    assert decode_pairs_latin1(block) == expected


@FAST
@given(st.lists(st.binary(max_size=200), max_size=8))
def test_client_connection_arbitrary_bytes_give_events_or_protocol_error(
    chunks: list[bytes],
) -> None:
    conn = ClientConnection()
    for chunk in chunks:
        try:
            conn.receive(chunk)
        except ProtocolError as exc:
            assert exc.__cause__ is None, repr(exc.__cause__)
            return
        assert len(conn._buf) - conn._pos < MAX_RECORD


# --- round trips between the two sides ----------------------------------------------------------


@FAST
@given(requests)
def test_client_encoding_decodes_to_the_same_request_on_the_server(r: Req) -> None:
    conn = ServerConnection()
    wire = encode_request(r.rid, r.params, r.stdin, role=r.role, keep_conn=r.keep_conn, data=r.data)
    events = conn.receive(wire)
    assert events[:2] == [BeginRequest(r.rid, r.role, r.keep_conn), Params(r.rid, r.params)]
    stdin = [e.data for e in events if isinstance(e, Stdin)]
    assert b"".join(stdin) == r.stdin and stdin[-1] == b""
    data = [e.data for e in events if isinstance(e, Data)]
    if r.role == Role.FILTER:
        assert b"".join(data) == r.data and data[-1] == b""
    else:
        assert data == []
    assert conn.pending_output() == b""


@SLOW
@given(
    st.lists(st.binary(max_size=300), max_size=4),
    st.lists(st.binary(max_size=100), max_size=3),
    st.integers(-(1 << 31), (1 << 32) - 1),
    st.booleans(),
    st.integers(0, 70000),
)
def test_server_output_decodes_on_the_client(
    body: list[bytes], errors: list[bytes], app_status: int, respond: bool, big: int
) -> None:
    conn = ServerConnection()
    conn.receive(encode_request(9, {}, keep_conn=True))
    out: list[bytes | bytearray | memoryview] = []
    for e in errors:
        out += conn.stderr(9, e)
    out += conn.stdout(9, b"B" * big)
    if respond:
        out += conn.respond(9, body, app_status)
    else:
        for b in body:
            out += conn.stdout(9, b)
        out += conn.end_request(9, app_status)
    wire = b"".join(bytes(b) for b in out)
    assert len(wire) % 8 == 0
    events: list[ClientEvent] = ClientConnection().receive(wire)
    stdout = b"".join(e.data for e in events if isinstance(e, StdoutData))
    assert stdout == b"B" * big + b"".join(body)
    stderr = [e.data for e in events if isinstance(e, StderrData)]
    assert b"".join(stderr) == b"".join(errors)
    assert (stderr[-1:] == [b""]) is any(errors)
    assert events[-1] == EndRequest(9, app_status & 0xFFFFFFFF, ProtocolStatus.REQUEST_COMPLETE)
    assert conn.active_requests == frozenset() and conn.should_close is False

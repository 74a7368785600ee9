"""Byte-exact, table-driven tests of fcgispawn.protocol (FastCGI 1.0, both directions).

Expected bytes are written out by hand (``hdr``/``rec`` below use no struct and no code under
test), so an encoder bug cannot hide behind the same bug in the decoder.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Sequence

import pytest

from fcgispawn.protocol import (
    FCGI_HEADER_LEN,
    FCGI_KEEP_CONN,
    FCGI_MAX_CONTENT,
    FCGI_NULL_REQUEST_ID,
    FCGI_VERSION_1,
    MERGE_BYTES,
    STDOUT_CHUNK,
    AbortRequest,
    BeginRequest,
    Buffer,
    ClientConnection,
    Data,
    EndRequest,
    Event,
    GetValuesResult,
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
    UnknownType,
    asks_keep_conn,
    decode_pairs,
    decode_pairs_latin1,
    encode_abort_request,
    encode_begin_request,
    encode_get_values,
    encode_pairs,
    encode_record,
    encode_request,
    encode_response,
    encode_stream,
    whole_responder_request,
)
from tests.procs import merge_body_chunks

# --- hand-written wire helpers ------------------------------------------------------------------


def hdr(rtype: int, rid: int, clen: int, plen: int = 0, version: int = 1) -> bytes:
    """A record header spelled out byte by byte (spec §3.3)."""
    return bytes([version, rtype, rid >> 8, rid & 0xFF, clen >> 8, clen & 0xFF, plen, 0])


def rec(rtype: int, rid: int, content: bytes = b"", plen: int | None = None) -> bytes:
    """A record, padded to 8 unless ``plen`` says otherwise."""
    if plen is None:
        plen = -len(content) % 8
    return hdr(rtype, rid, len(content), plen) + content + b"\0" * plen


def begin(rid: int, role: int = 1, flags: int = 0) -> bytes:
    return rec(1, rid, bytes([role >> 8, role & 0xFF, flags, 0, 0, 0, 0, 0]))


def pair(name: bytes, value: bytes) -> bytes:
    def length(n: int) -> bytes:
        return bytes([n]) if n < 128 else (n | 0x80000000).to_bytes(4, "big")

    return length(len(name)) + length(len(value)) + name + value


def end_body(app_status: int, status: int) -> bytes:
    return app_status.to_bytes(4, "big") + bytes([status, 0, 0, 0])


def flat(buffers: Sequence[Buffer]) -> bytes:
    return b"".join(bytes(b) for b in buffers)


def nginx_request(rid: int = 1, flags: int = 0, stdin: bytes = b"") -> bytes:
    """What nginx sends in one segment: BEGIN, PARAMS, empty PARAMS, STDIN, empty STDIN."""
    params = pair(b"REQUEST_METHOD", b"GET") + pair(b"SCRIPT_NAME", b"/hello")
    out = begin(rid, 1, flags) + rec(4, rid, params) + rec(4, rid)
    if stdin:
        out += rec(5, rid, stdin)
    return out + rec(5, rid)


def accepted(conn: ServerConnection, rid: int = 1, flags: int = 0) -> list[Event]:
    return conn.receive(nginx_request(rid, flags))


# --- constants and enums ------------------------------------------------------------------------


def test_wire_constants_match_the_spec() -> None:
    assert (FCGI_VERSION_1, FCGI_HEADER_LEN, FCGI_MAX_CONTENT) == (1, 8, 65535)
    assert (FCGI_NULL_REQUEST_ID, FCGI_KEEP_CONN) == (0, 1)
    assert STDOUT_CHUNK == 65528 and STDOUT_CHUNK % 8 == 0 and STDOUT_CHUNK + 7 <= 65535


@pytest.mark.parametrize(
    ("enum_value", "wire"),
    [
        (RecordType.BEGIN_REQUEST, 1), (RecordType.ABORT_REQUEST, 2),
        (RecordType.END_REQUEST, 3), (RecordType.PARAMS, 4), (RecordType.STDIN, 5),
        (RecordType.STDOUT, 6), (RecordType.STDERR, 7), (RecordType.DATA, 8),
        (RecordType.GET_VALUES, 9), (RecordType.GET_VALUES_RESULT, 10),
        (RecordType.UNKNOWN_TYPE, 11), (Role.RESPONDER, 1), (Role.AUTHORIZER, 2),
        (Role.FILTER, 3), (ProtocolStatus.REQUEST_COMPLETE, 0),
        (ProtocolStatus.CANT_MPX_CONN, 1), (ProtocolStatus.OVERLOADED, 2),
        (ProtocolStatus.UNKNOWN_ROLE, 3),
    ],
)  # fmt: skip
def test_enum_values_are_the_wire_values(enum_value: int, wire: int) -> None:
    assert enum_value == wire


# --- encoding records ---------------------------------------------------------------------------


@pytest.mark.parametrize("rtype", list(RecordType))
@pytest.mark.parametrize(
    ("content", "padding"),
    [(b"", 0), (b"a", 7), (b"abcdefg", 1), (b"abcdefgh", 0), (b"abcdefghi", 7)],
)
def test_encode_record_every_type_pads_to_eight(
    rtype: RecordType, content: bytes, padding: int
) -> None:
    expected = hdr(rtype, 0x1234, len(content), padding) + content + b"\0" * padding
    assert encode_record(rtype, 0x1234, content) == expected


def test_encode_record_without_padding_and_with_max_content() -> None:
    assert encode_record(RecordType.STDIN, 1, b"abc", pad=False) == hdr(5, 1, 3) + b"abc"
    big = b"x" * FCGI_MAX_CONTENT
    assert encode_record(RecordType.STDIN, 1, big) == hdr(5, 1, 65535, 1) + big + b"\0"


def test_encode_record_refuses_content_that_does_not_fit_one_record() -> None:
    with pytest.raises(ValueError, match="65535"):
        encode_record(RecordType.STDIN, 1, b"x" * (FCGI_MAX_CONTENT + 1))


@pytest.mark.parametrize(
    ("role", "keep_conn", "body"),
    [
        (Role.RESPONDER, False, b"\x00\x01\x00\0\0\0\0\0"),
        (Role.RESPONDER, True, b"\x00\x01\x01\0\0\0\0\0"),
        (Role.AUTHORIZER, False, b"\x00\x02\x00\0\0\0\0\0"),
        (Role.FILTER, True, b"\x00\x03\x01\0\0\0\0\0"),
    ],
)
def test_encode_begin_request(role: Role, keep_conn: bool, body: bytes) -> None:
    assert encode_begin_request(0x0102, role, keep_conn) == hdr(1, 0x0102, 8) + body


def test_encode_abort_request_and_get_values() -> None:
    assert encode_abort_request(7) == hdr(2, 7, 0)
    content = b"\x0e\x00FCGI_MAX_CONNS\x0f\x00FCGI_MPXS_CONNS"
    expected = hdr(9, 0, len(content), 7) + content + b"\0" * 7
    assert encode_get_values([b"FCGI_MAX_CONNS", b"FCGI_MPXS_CONNS"]) == expected


def test_encode_stream_splits_into_chunks_and_terminates() -> None:
    data = bytes(range(256)) * 300  # 76800 bytes: one full chunk + 11272
    wire = encode_stream(RecordType.STDIN, 3, data)
    rest = len(data) - STDOUT_CHUNK
    assert wire == (
        hdr(5, 3, STDOUT_CHUNK) + data[:STDOUT_CHUNK]
        + hdr(5, 3, rest, -rest % 8) + data[STDOUT_CHUNK:] + b"\0" * (-rest % 8)
        + hdr(5, 3, 0)
    )  # fmt: skip
    assert encode_stream(RecordType.PARAMS, 3, b"") == hdr(4, 3, 0)


def test_encode_request_sends_data_stream_only_for_filter() -> None:
    params = {b"A": b"b"}
    responder = encode_request(1, params, b"in")
    assert responder == begin(1) + rec(4, 1, b"\x01\x01Ab") + rec(4, 1) + rec(5, 1, b"in") + rec(
        5, 1
    )
    filt = encode_request(2, params, b"", role=Role.FILTER, keep_conn=True, data=b"file")
    assert filt == (
        begin(2, 3, 1) + rec(4, 2, b"\x01\x01Ab") + rec(4, 2) + rec(5, 2)
        + rec(8, 2, b"file") + rec(8, 2)
    )  # fmt: skip


# --- name-value pairs ---------------------------------------------------------------------------

N127, N128 = b"n" * 127, b"N" * 128
V127, V128 = b"v" * 127, b"V" * 128


@pytest.mark.parametrize(
    ("combo", "name", "value", "wire"),
    [
        ("11", b"NAME", b"value", b"\x04\x05NAMEvalue"),
        ("11-empty", b"", b"", b"\x00\x00"),
        ("11-max", N127, V127, b"\x7f\x7f" + N127 + V127),
        ("14", b"N", V128, b"\x01\x80\x00\x00\x80N" + V128),
        ("41", N128, b"v", b"\x80\x00\x00\x80\x01" + N128 + b"v"),
        ("44", N128, V128, b"\x80\x00\x00\x80\x80\x00\x00\x80" + N128 + V128),
        ("44-big", N128, b"x" * 70000, b"\x80\x00\x00\x80\x80\x01\x11\x70" + N128 + b"x" * 70000),
    ],
)
def test_pairs_encode_and_decode_all_length_combinations(
    combo: str, name: bytes, value: bytes, wire: bytes
) -> None:
    assert encode_pairs({name: value}) == wire, combo
    assert decode_pairs(wire) == {name: value}
    assert decode_pairs(memoryview(wire)) == {name: value}
    assert decode_pairs(bytearray(wire)) == {name: value}


def test_pairs_accept_a_needless_four_byte_length_and_keep_the_last_duplicate() -> None:
    wire = b"\x80\x00\x00\x01\x80\x00\x00\x01ab" + b"\x01\x01ac" + b"\x01\x01ad"
    assert decode_pairs(wire) == {b"a": b"d"}
    assert encode_pairs([(b"a", b"1"), (b"b", b"2")]) == b"\x01\x01a1\x01\x01b2"


def test_encode_pairs_refuses_lengths_beyond_31_bits() -> None:
    class Huge(bytes):
        def __len__(self) -> int:
            return 1 << 31

    with pytest.raises(ValueError, match="2\\*\\*31"):
        encode_pairs([(Huge(b"x"), b"")])


@pytest.mark.parametrize(
    "wire",
    [
        pytest.param(b"\x05", id="value-length-missing"),
        pytest.param(b"\x80\x00\x00", id="truncated-4-byte-name-length"),
        pytest.param(b"\x01\x80\x00", id="truncated-4-byte-value-length"),
        pytest.param(b"\x03\x01ab", id="name-runs-past-end"),
        pytest.param(b"\x01\x03abc", id="value-runs-past-end"),
        pytest.param(b"\x01\x01ab\x01", id="second-pair-truncated"),
        pytest.param(b"\xff\xff\xff\xff\x00", id="2GiB-name"),
        pytest.param(b"\x01\xff\xff\xff\xffa", id="2GiB-value"),
        pytest.param(b"\x80\x00\x00\x00\xff\xff\xff\xff", id="2GiB-value-after-4-byte-name"),
    ],
)
def test_malformed_pairs_raise_protocol_error(wire: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_pairs(wire)


def test_two_gib_lengths_raise_without_allocating_them() -> None:
    conn = ServerConnection()
    conn.receive(begin(1))
    block = b"\xff\xff\xff\xff\xff\xff\xff\xff" + b"x" * 64
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError):
            conn.receive(rec(4, 1, block) + rec(4, 1))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


# --- server: requests ---------------------------------------------------------------------------


def test_nginx_segment_yields_begin_params_and_end_of_stdin_in_one_receive() -> None:
    conn = ServerConnection()
    events = conn.receive(nginx_request())
    assert events == [
        BeginRequest(1, Role.RESPONDER, False),
        Params(1, {b"REQUEST_METHOD": b"GET", b"SCRIPT_NAME": b"/hello"}),
        Stdin(1, b""),
    ]
    assert conn.pending_output() == b""
    assert conn.active_requests == frozenset({1})
    assert conn.keep_conn(1) is False and conn.role(1) is Role.RESPONDER


def test_consecutive_stdin_records_of_one_read_become_one_event() -> None:
    conn = ServerConnection()
    wire = begin(1) + rec(4, 1) + rec(5, 1, b"abc") + rec(5, 1, b"defgh") + rec(5, 1)
    assert conn.receive(wire)[2:] == [Stdin(1, b"abcdefgh"), Stdin(1, b"")]


def test_merged_stdin_events_stay_within_merge_bytes_and_keep_every_byte_in_order() -> None:
    """nginx's 8 KiB body records: eight make one 64 KiB event (bigger allocations would
    come from fresh mmaps), and the end of the stream stays an event of its own."""
    records = [bytes([i]) * 8192 for i in range(20)]
    wire = begin(1) + rec(4, 1) + b"".join(rec(5, 1, r) for r in records) + rec(5, 1)
    events = ServerConnection().receive(wire)[2:]
    chunks = [e.data for e in events if isinstance(e, Stdin)]
    assert len(chunks) == len(events)
    assert [len(c) for c in chunks] == [MERGE_BYTES, MERGE_BYTES, 4 * 8192, 0]
    assert b"".join(chunks) == b"".join(records)
    assert all(type(c) is bytes for c in chunks)


def test_stdin_records_of_multiplexed_requests_are_never_merged_across_requests() -> None:
    conn = ServerConnection()
    wire = begin(1) + begin(2) + rec(4, 1) + rec(4, 2)
    wire += rec(5, 1, b"a") + rec(5, 1, b"b") + rec(5, 2, b"c") + rec(5, 1, b"d") + rec(5, 2, b"e")
    assert conn.receive(wire)[4:] == [
        Stdin(1, b"ab"), Stdin(2, b"c"), Stdin(1, b"d"), Stdin(2, b"e")
    ]


def test_filter_data_records_merge_like_stdin_and_end_on_their_own() -> None:
    conn = ServerConnection()
    wire = begin(1, role=3) + rec(4, 1) + rec(5, 1, b"in") + rec(5, 1)
    wire += rec(8, 1, b"da") + rec(8, 1, b"ta") + rec(8, 1)
    assert conn.receive(wire)[2:] == [
        Stdin(1, b"in"), Stdin(1, b""), Data(1, b"data"), Data(1, b"")
    ]


def test_a_merged_event_then_the_rest_of_a_record_cut_by_the_read() -> None:
    conn = ServerConnection()
    wire = begin(1) + rec(4, 1) + rec(5, 1, b"abc") + rec(5, 1, b"defghij") + rec(5, 1)
    cut = len(wire) - 8 - 8 + 1  # after the "d" of "defghij" (7 bytes + 1 of padding)
    first = conn.receive(wire[:cut])[2:]
    rest = conn.receive(wire[cut:])
    assert first == [Stdin(1, b"abcd")]
    assert rest == [Stdin(1, b"efghij"), Stdin(1, b"")]


@pytest.mark.parametrize("split", [1, 2, 5, 6, 10, 13, 14])
def test_pairs_split_across_params_records_at_any_byte(split: int) -> None:
    block = pair(b"HTTP_HOST", b"example.org") + pair(N128, V128)
    wire = begin(1) + rec(4, 1, block[:split]) + rec(4, 1, block[split:]) + rec(4, 1)
    events = ServerConnection().receive(wire)
    assert events[1] == Params(1, {b"HTTP_HOST": b"example.org", N128: V128})


@pytest.mark.parametrize("padding", [0, 1, 7, 8, 255])
def test_receiver_skips_any_padding(padding: int) -> None:
    wire = (
        begin(1) + rec(4, 1, pair(b"A", b"1"), padding) + rec(4, 1, b"", padding)
        + rec(5, 1, b"body", padding) + rec(5, 1, b"", padding)
    )  # fmt: skip
    assert ServerConnection().receive(wire) == [
        BeginRequest(1, Role.RESPONDER, False),
        Params(1, {b"A": b"1"}),
        Stdin(1, b"body"),
        Stdin(1, b""),
    ]


def test_byte_at_a_time_gives_the_same_events_as_one_segment() -> None:
    wire = nginx_request(stdin=b"x" * 100) + encode_get_values([b"FCGI_MAX_REQS"])
    whole = ServerConnection()
    expected = whole.receive(wire)
    slow = ServerConnection()
    got: list[Event] = []
    for i in range(len(wire)):
        got += slow.receive(wire[i : i + 1])
    # (the body comes out as it arrives: 100 one-byte STDIN events here)
    assert merge_body_chunks(got) == expected
    assert slow.pending_output() == whole.pending_output() != b""


def test_a_body_record_cut_by_a_read_is_handed_on_as_it_arrives_not_buffered() -> None:
    body = bytes(range(256)) * 234  # 59,904 bytes in one STDIN record
    wire = nginx_request(stdin=body) + nginx_request(rid=2, stdin=b"next")
    conn = ServerConnection(Limits(max_requests_per_conn=2))
    first = conn.receive(wire[:30_000])  # the first STDIN record is cut after ~29 KB
    stdin = [e.data for e in first if isinstance(e, Stdin)]
    assert stdin and 0 < len(stdin[-1]) < len(body)
    assert conn.mid_record and len(conn._buf) == 0  # nothing of it copied into the buffer
    rest = [conn.receive(wire[i : i + 7_000]) for i in range(30_000, len(wire), 7_000)]
    events = first + [e for part in rest for e in part]
    assert b"".join(e.data for e in events if isinstance(e, Stdin) and e.request_id == 1) == body
    whole = ServerConnection(Limits(max_requests_per_conn=2)).receive(wire)
    assert merge_body_chunks(events) == merge_body_chunks(whole)
    assert not conn.mid_record


def test_the_rest_of_a_cut_body_record_of_an_ended_request_is_dropped() -> None:
    conn = ServerConnection(Limits(max_requests_per_conn=2))
    wire = nginx_request(flags=1, stdin=b"a" * 1000) + nginx_request(stdin=b"again")
    cut = wire.index(b"a" * 1000) + 100
    events = conn.receive(wire[:cut])
    assert [e.data for e in events if isinstance(e, Stdin)] == [b"a" * 100]
    conn.end_request(1, 0)  # the app answered without reading its body
    later = conn.receive(wire[cut:])
    assert [e.data for e in later if isinstance(e, Stdin)] == [b"again", b""]


def test_receive_does_not_keep_a_reference_to_the_callers_buffer() -> None:
    wire = nginx_request(stdin=b"payload!")
    buf = bytearray(wire[:30])
    conn = ServerConnection()
    events = conn.receive(memoryview(buf))
    buf[:] = b"\xff" * 30  # a recv_into buffer being reused
    events += conn.receive(memoryview(bytearray(wire[30:])))
    assert events == ServerConnection().receive(wire)


def test_many_small_segments_keep_the_buffer_small() -> None:
    conn = ServerConnection()
    conn.receive(begin(1) + rec(4, 1))
    record = rec(5, 1, b"x" * 1000)
    total = 0
    for i in range(0, len(record) * 200, 333):
        chunk = (record * 200)[i : i + 333]
        total += sum(len(e.data) for e in conn.receive(chunk) if isinstance(e, Stdin))
        assert len(conn._buf) <= 2 * len(record)
    assert total == 200 * 1000


def test_filter_role_receives_the_data_stream() -> None:
    conn = ServerConnection()
    wire = (
        begin(5, 3) + rec(4, 5, pair(b"FCGI_DATA_LENGTH", b"4")) + rec(4, 5)
        + rec(5, 5) + rec(8, 5, b"file") + rec(8, 5)
    )  # fmt: skip
    assert conn.receive(wire) == [
        BeginRequest(5, Role.FILTER, False),
        Params(5, {b"FCGI_DATA_LENGTH": b"4"}),
        Stdin(5, b""),
        Data(5, b"file"),
        Data(5, b""),
    ]


def test_authorizer_role_is_accepted() -> None:
    assert ServerConnection().receive(begin(1, 2))[0] == BeginRequest(1, Role.AUTHORIZER, False)


def test_multiplexed_ids_are_kept_apart() -> None:
    conn = ServerConnection()
    wire = (
        begin(1, 1, 1) + begin(2, 1, 1)
        + rec(4, 2, pair(b"ID", b"2")) + rec(4, 1, pair(b"ID", b"1")) + rec(4, 1)
        + rec(4, 2) + rec(5, 2, b"two") + rec(5, 1) + rec(5, 2)
    )  # fmt: skip
    assert conn.receive(wire) == [
        BeginRequest(1, Role.RESPONDER, True),
        BeginRequest(2, Role.RESPONDER, True),
        Params(1, {b"ID": b"1"}),
        Params(2, {b"ID": b"2"}),
        Stdin(2, b"two"),
        Stdin(1, b""),
        Stdin(2, b""),
    ]
    assert conn.active_requests == frozenset({1, 2})
    conn.end_request(2)
    assert conn.active_requests == frozenset({1})
    assert conn.receive(rec(5, 2, b"late")) == []  # id 2 is inactive again
    assert conn.should_close is False


def test_an_ended_id_can_begin_again_on_a_kept_connection() -> None:
    conn = ServerConnection()
    for _ in range(3):
        assert len(accepted(conn, 1, FCGI_KEEP_CONN)) == 3
        conn.end_request(1)
        assert conn.should_close is False


# --- server: management records -----------------------------------------------------------------


def test_get_values_answers_true_values_and_omits_unknown_names() -> None:
    conn = ServerConnection(Limits(max_conns=7, max_reqs=42, mpxs_conns=False))
    asked = pair(b"FCGI_MPXS_CONNS", b"") + pair(b"NOPE", b"") + pair(b"FCGI_MAX_CONNS", b"")
    asked += pair(b"FCGI_MAX_REQS", b"")
    assert conn.receive(rec(9, 0, asked)) == []
    reply = pair(b"FCGI_MPXS_CONNS", b"0") + pair(b"FCGI_MAX_CONNS", b"7")
    reply += pair(b"FCGI_MAX_REQS", b"42")
    assert conn.pending_output() == rec(10, 0, reply)
    assert conn.pending_output() == b""  # cleared


def test_get_values_defaults_and_empty_query() -> None:
    conn = ServerConnection()
    conn.receive(rec(9, 0, pair(b"FCGI_MPXS_CONNS", b"")) + rec(9, 0))
    assert conn.pending_output() == rec(10, 0, pair(b"FCGI_MPXS_CONNS", b"1")) + rec(10, 0)


def test_malformed_get_values_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        ServerConnection().receive(rec(9, 0, b"\x05"))


@pytest.mark.parametrize("rtype", [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 200, 255])
def test_unknown_management_type_is_answered_with_unknown_type(rtype: int) -> None:
    conn = ServerConnection()
    assert conn.receive(rec(rtype, 0, b"whatever")) == []
    assert conn.pending_output() == hdr(11, 0, 8) + bytes([rtype]) + b"\0" * 7
    assert conn.should_close is False


# --- server: rejections -------------------------------------------------------------------------


@pytest.mark.parametrize(("role", "flags"), [(0, 0), (4, 1), (0xFFFF, 0), (0x0101, 0)])
def test_unknown_role_is_answered_unknown_role_without_an_event(role: int, flags: int) -> None:
    conn = ServerConnection()
    wire = begin(3, role, flags) + rec(4, 3, pair(b"A", b"b")) + rec(4, 3) + rec(5, 3)
    assert conn.receive(wire) == []  # the rest is for an inactive id: ignored
    assert conn.pending_output() == hdr(3, 3, 8) + end_body(0, 3)
    assert conn.active_requests == frozenset()
    assert conn.should_close is (flags == 0)


def test_over_capacity_is_answered_overloaded() -> None:
    conn = ServerConnection(Limits(max_requests_per_conn=2))
    accepted(conn, 1, FCGI_KEEP_CONN)
    accepted(conn, 2, FCGI_KEEP_CONN)
    assert conn.receive(begin(3, 1, FCGI_KEEP_CONN)) == []
    assert conn.pending_output() == hdr(3, 3, 8) + end_body(0, 2)
    assert conn.active_requests == frozenset({1, 2})
    conn.end_request(1)
    assert conn.receive(begin(3, 1, FCGI_KEEP_CONN)) == [BeginRequest(3, Role.RESPONDER, True)]


def test_server_wide_capacity_counts_requests_on_other_connections() -> None:
    elsewhere = [9]
    conn = ServerConnection(Limits(max_reqs=10), active_elsewhere=lambda: elsewhere[0])
    assert accepted(conn, 1, FCGI_KEEP_CONN)[0] == BeginRequest(1, Role.RESPONDER, True)
    assert conn.receive(begin(2, 1, FCGI_KEEP_CONN)) == []  # 9 elsewhere + 1 here = 10
    assert conn.pending_output() == hdr(3, 2, 8) + end_body(0, 2)
    elsewhere[0] = 8
    assert conn.receive(begin(2, 1, FCGI_KEEP_CONN)) == [BeginRequest(2, Role.RESPONDER, True)]


def test_no_multiplexing_answers_cant_mpx_conn_to_a_second_id() -> None:
    conn = ServerConnection(Limits(mpxs_conns=False))
    accepted(conn, 1, FCGI_KEEP_CONN)
    assert conn.receive(begin(2, 1, FCGI_KEEP_CONN) + rec(4, 2) + rec(5, 2)) == []
    assert conn.pending_output() == hdr(3, 2, 8) + end_body(0, 1)
    assert conn.active_requests == frozenset({1})
    conn.end_request(1)
    assert conn.receive(begin(2, 1, FCGI_KEEP_CONN)) == [BeginRequest(2, Role.RESPONDER, True)]


# --- server: abort and inactive ids -------------------------------------------------------------


def test_abort_request_is_an_event_once_and_end_request_follows() -> None:
    conn = ServerConnection()
    accepted(conn, 1)
    assert conn.receive(rec(2, 1) + rec(2, 1)) == [AbortRequest(1)]
    assert flat(conn.end_request(1)) == hdr(6, 1, 0) + hdr(3, 1, 8) + end_body(0, 0)
    assert conn.receive(rec(2, 1)) == []  # inactive now


def test_abort_before_params_end_is_delivered() -> None:
    conn = ServerConnection()
    assert conn.receive(begin(1) + rec(4, 1, pair(b"A", b"b")) + rec(2, 1)) == [
        BeginRequest(1, Role.RESPONDER, False),
        AbortRequest(1),
    ]


@pytest.mark.parametrize("rtype", [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 255])
def test_records_for_inactive_ids_are_ignored(rtype: int) -> None:
    conn = ServerConnection()
    assert conn.receive(rec(rtype, 9, b"\xff\xff\xff\xff junk")) == []
    assert conn.pending_output() == b""
    assert accepted(conn, 9)[0] == BeginRequest(9, Role.RESPONDER, False)


# --- server: protocol errors --------------------------------------------------------------------


def test_params_over_the_cap_is_a_protocol_error() -> None:
    conn = ServerConnection(Limits(max_params_bytes=100))
    conn.receive(begin(1) + rec(4, 1, b"\x01\x5fA" + b"x" * 95))  # exactly 98 bytes: fine
    with pytest.raises(ProtocolError, match="exceed 100"):
        conn.receive(rec(4, 1, b"abc"))


def test_params_exactly_at_the_cap_is_accepted() -> None:
    conn = ServerConnection(Limits(max_params_bytes=100))
    events = conn.receive(begin(1) + rec(4, 1, b"\x01\x61A" + b"x" * 97) + rec(4, 1))
    assert events[1] == Params(1, {b"A": b"x" * 97})


@pytest.mark.parametrize("version", [0, 2, 255])
def test_version_other_than_one_is_a_protocol_error_as_soon_as_the_header_arrives(
    version: int,
) -> None:
    conn = ServerConnection()
    with pytest.raises(ProtocolError, match="version"):
        conn.receive(hdr(1, 1, 8, 0, version))


@pytest.mark.parametrize(
    ("wire", "match"),
    [
        pytest.param(begin(1) + begin(1), "active", id="begin-twice"),
        pytest.param(begin(1) + rec(5, 1, b"x"), "STDIN before", id="stdin-before-params-end"),
        pytest.param(begin(1) + rec(5, 1), "STDIN before", id="empty-stdin-before-params"),
        pytest.param(begin(1) + rec(4, 1) + rec(4, 1), "PARAMS after", id="params-after-end"),
        pytest.param(nginx_request() + rec(5, 1, b"x"), "STDIN after", id="stdin-after-end"),
        pytest.param(nginx_request() + rec(8, 1, b"x"), "non-FILTER", id="data-for-responder"),
        pytest.param(begin(1, 3) + rec(8, 1), "DATA before", id="data-before-params-end"),
        pytest.param(
            begin(1, 3) + rec(4, 1) + rec(8, 1) + rec(8, 1), "DATA after", id="data-after-end"
        ),
        pytest.param(begin(1) + rec(2, 1, b"x"), "body", id="abort-with-body"),
        pytest.param(rec(1, 1, b"\x00\x01\x00\0\0\0\0"), "not 8", id="begin-body-7"),
        pytest.param(rec(1, 1, b"\x00\x01\x00\0\0\0\0\0\0"), "not 8", id="begin-body-9"),
        pytest.param(rec(1, 1), "not 8", id="begin-body-empty"),
        pytest.param(begin(1) + rec(6, 1, b"x"), "unexpected", id="stdout-from-web-server"),
        pytest.param(begin(1) + rec(3, 1, end_body(0, 0)), "unexpected", id="end-request-in"),
        pytest.param(begin(1) + rec(9, 1), "unexpected", id="get-values-on-request-id"),
        pytest.param(begin(1) + rec(99, 1), "unexpected", id="unknown-type-on-request-id"),
    ],
)
def test_malformed_streams_are_protocol_errors(wire: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        ServerConnection().receive(wire)


def test_a_failed_connection_refuses_further_input() -> None:
    conn = ServerConnection()
    with pytest.raises(ProtocolError):
        conn.receive(hdr(1, 1, 8, 0, 2))
    with pytest.raises(ProtocolError, match="already failed"):
        conn.receive(nginx_request())


def test_api_misuse_is_a_value_error_not_a_protocol_error() -> None:
    conn = ServerConnection()
    for call in (
        lambda: conn.stdout(1, b"x"),
        lambda: conn.stdout_many(1, [b"x"]),
        lambda: conn.stderr(1, b"x"),
        lambda: conn.end_request(1),
        lambda: conn.respond(1, [b"x"]),
        lambda: conn.keep_conn(1),
    ):
        with pytest.raises(ValueError, match="not active"):
            call()


# --- server: output -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", b""),
        (b"a", hdr(6, 1, 1, 7) + b"a" + b"\0" * 7),
        (b"12345678", hdr(6, 1, 8) + b"12345678"),
        (b"123456789", hdr(6, 1, 9, 7) + b"123456789" + b"\0" * 7),
    ],
)
def test_stdout_small_records(data: bytes, expected: bytes) -> None:
    conn = ServerConnection()
    accepted(conn)
    assert flat(conn.stdout(1, data)) == expected
    assert flat(conn.stdout(1, memoryview(data))) == expected


@pytest.mark.parametrize(
    "size",
    [STDOUT_CHUNK - 1, STDOUT_CHUNK, STDOUT_CHUNK + 1, 65535, 65536, 3 * STDOUT_CHUNK, 200_003],
)
def test_stdout_splits_at_65528_and_only_the_last_record_pads(size: int) -> None:
    data = bytes(i % 251 for i in range(size))
    conn = ServerConnection()
    accepted(conn)
    buffers = conn.stdout(1, data)
    expected = bytearray()
    for start in range(0, size, STDOUT_CHUNK):
        chunk = data[start : start + STDOUT_CHUNK]
        expected += hdr(6, 1, len(chunk), -len(chunk) % 8) + chunk + b"\0" * (-len(chunk) % 8)
    assert flat(buffers) == expected
    # The data goes out as the caller's buffer or zero-copy slices of it, never copied.
    payload = [b for b in buffers if isinstance(b, memoryview) or b is data]
    assert sum(len(b) for b in payload) == size


def test_stdout_many_frames_several_buffers_under_one_header() -> None:
    conn = ServerConnection()
    accepted(conn)
    out = conn.stdout_many(1, [b"head\r\n\r\n", b"", b"body"])
    assert flat(out) == hdr(6, 1, 12, 4) + b"head\r\n\r\nbody" + b"\0" * 4
    assert len(out) == 4
    assert conn.stdout_many(1, [b"", b""]) == []
    big = [b"a" * 40000, b"b" * 40000]
    assert flat(conn.stdout_many(1, big)) == flat(conn.stdout(1, b"".join(big)))


def test_stdout_accepts_non_byte_memoryviews() -> None:
    conn = ServerConnection()
    accepted(conn)
    words = memoryview(bytearray(b"abcdefgh" * 10000)).cast("I")
    assert flat(conn.stdout(1, words)) == flat(conn.stdout(1, b"abcdefgh" * 10000))


def test_end_request_terminates_stdout_and_ends_the_request() -> None:
    conn = ServerConnection()
    accepted(conn)
    out = conn.end_request(1, 0)
    assert flat(out) == hdr(6, 1, 0) + hdr(3, 1, 8) + end_body(0, 0)
    assert conn.active_requests == frozenset()
    assert conn.should_close is True


def test_end_request_terminates_stderr_only_when_it_was_used() -> None:
    conn = ServerConnection()
    accepted(conn)
    assert flat(conn.stderr(1, b"")) == b""  # nothing sent: STDERR not used
    assert flat(conn.stderr(1, b"oops")) == hdr(7, 1, 4, 4) + b"oops" + b"\0" * 4
    out = conn.end_request(1, 3)
    assert flat(out) == hdr(6, 1, 0) + hdr(7, 1, 0) + hdr(3, 1, 8) + end_body(3, 0)


@pytest.mark.parametrize(
    ("app_status", "status", "body"),
    [
        (0, ProtocolStatus.REQUEST_COMPLETE, end_body(0, 0)),
        (1, ProtocolStatus.REQUEST_COMPLETE, end_body(1, 0)),
        (0xFFFFFFFF, ProtocolStatus.REQUEST_COMPLETE, end_body(0xFFFFFFFF, 0)),
        (-1, ProtocolStatus.REQUEST_COMPLETE, end_body(0xFFFFFFFF, 0)),
        (0x01020304, ProtocolStatus.OVERLOADED, end_body(0x01020304, 2)),
    ],
)
def test_end_request_app_status_and_protocol_status(
    app_status: int, status: ProtocolStatus, body: bytes
) -> None:
    conn = ServerConnection()
    accepted(conn, 0xBEEF)
    out = flat(conn.end_request(0xBEEF, app_status, status))
    assert out == hdr(6, 0xBEEF, 0) + hdr(3, 0xBEEF, 8) + body


def test_respond_frames_head_and_body_in_one_record_and_one_tail() -> None:
    conn = ServerConnection()
    accepted(conn, 1, FCGI_KEEP_CONN)
    head, body = b"Status: 200 OK\r\n\r\n", b"hello"
    out = conn.respond(1, [head, body])
    content = head + body  # 23 bytes -> 1 byte of padding
    assert flat(out) == (
        hdr(6, 1, 23, 1) + content + b"\0" + hdr(6, 1, 0) + hdr(3, 1, 8) + end_body(0, 0)
    )
    assert len(out) == 4  # header, head, body, padding+terminator+END_REQUEST
    assert conn.active_requests == frozenset() and conn.should_close is False


def test_respond_after_stderr_ends_both_streams() -> None:
    conn = ServerConnection()
    accepted(conn)
    conn.stderr(1, b"warn")
    out = flat(conn.respond(1, [b"x" * 8], app_status=1))
    assert out == hdr(6, 1, 8) + b"x" * 8 + hdr(6, 1, 0) + hdr(7, 1, 0) + hdr(3, 1, 8) + end_body(
        1, 0
    )


@pytest.mark.parametrize(
    "sizes", [[], [0], [10, 0, 20], [STDOUT_CHUNK], [STDOUT_CHUNK, 1], [40000, 40000, 70000]]
)
def test_encode_response_splits_a_body_of_several_buffers(sizes: list[int]) -> None:
    body = [bytes([65 + i]) * n for i, n in enumerate(sizes)]
    data = b"".join(body)
    expected = bytearray()
    for start in range(0, len(data), STDOUT_CHUNK):
        chunk = data[start : start + STDOUT_CHUNK]
        expected += hdr(6, 2, len(chunk), -len(chunk) % 8) + chunk + b"\0" * (-len(chunk) % 8)
    expected += hdr(6, 2, 0) + hdr(3, 2, 8) + end_body(5, 0)
    assert flat(encode_response(2, body, 5)) == expected
    err = flat(encode_response(2, body, 5, stderr_used=True))
    assert err == bytes(expected[:-24]) + hdr(6, 2, 0) + hdr(7, 2, 0) + hdr(3, 2, 8) + end_body(
        5, 0
    )


# --- keep-alive ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("flags", "closes"), [(0, True), (1, False), (0xFE, True), (0xFF, False)])
def test_should_close_follows_keep_conn_of_the_ended_request(flags: int, closes: bool) -> None:
    conn = ServerConnection()
    assert accepted(conn, 1, flags)[0] == BeginRequest(1, Role.RESPONDER, not closes)
    assert conn.keep_conn(1) is (not closes)
    assert conn.should_close is False  # not before the request has ended
    conn.end_request(1)
    assert conn.should_close is closes


def test_should_close_stays_set_once_a_request_without_keep_conn_ended() -> None:
    conn = ServerConnection()
    accepted(conn, 1, 0)
    conn.respond(1, [b"x"])
    accepted(conn, 2, FCGI_KEEP_CONN)
    conn.end_request(2)
    assert conn.should_close is True


# --- client side --------------------------------------------------------------------------------


def test_client_connection_decodes_every_record_an_application_sends() -> None:
    wire = (
        rec(6, 1, b"Status: 200\r\n\r\nok") + rec(7, 1, b"warn") + rec(6, 1) + rec(7, 1)
        + rec(3, 1, end_body(2, 0)) + rec(10, 0, pair(b"FCGI_MAX_REQS", b"5"))
        + rec(11, 0, bytes([42]) + b"\0" * 7) + rec(3, 2, end_body(0, 1))
    )  # fmt: skip
    expected = [
        StdoutData(1, b"Status: 200\r\n\r\nok"),
        StderrData(1, b"warn"),
        StdoutData(1, b""),
        StderrData(1, b""),
        EndRequest(1, 2, ProtocolStatus.REQUEST_COMPLETE),
        GetValuesResult({b"FCGI_MAX_REQS": b"5"}),
        UnknownType(42),
        EndRequest(2, 0, ProtocolStatus.CANT_MPX_CONN),
    ]
    assert ClientConnection().receive(wire) == expected
    slow = ClientConnection()
    assert [e for i in range(len(wire)) for e in slow.receive(wire[i : i + 1])] == expected


@pytest.mark.parametrize(
    "wire",
    [
        pytest.param(rec(3, 1, b"\0" * 7), id="end-request-short"),
        pytest.param(rec(3, 1, end_body(0, 4)), id="unknown-protocol-status"),
        pytest.param(rec(11, 0, b"\x01"), id="unknown-type-short"),
        pytest.param(rec(6, 0, b"x"), id="stdout-on-id-0"),
        pytest.param(rec(1, 1, b"\0\1\0\0\0\0\0\0"), id="begin-request-from-app"),
        pytest.param(rec(10, 0, b"\x09"), id="malformed-get-values-result"),
        pytest.param(hdr(6, 1, 0, 0, 2), id="version-2"),
    ],
)
def test_client_connection_rejects_malformed_answers(wire: bytes) -> None:
    with pytest.raises(ProtocolError):
        ClientConnection().receive(wire)


def test_client_encoding_round_trips_through_the_server() -> None:
    params = {b"A": b"1", N128: V128, b"EMPTY": b""}
    wire = encode_request(4, params, b"x" * 70000, keep_conn=True)
    events = ServerConnection().receive(wire)
    assert events[:2] == [BeginRequest(4, Role.RESPONDER, True), Params(4, params)]
    assert [len(e.data) for e in events[2:] if isinstance(e, Stdin)] == [STDOUT_CHUNK, 4472, 0]


# --- the whole-request fast path and latin-1 PARAMS -----------------------------------------------


def _outcome(chunks: Sequence[bytes | memoryview], latin1: bool) -> object:
    """Events (or the error), then the connection's state and output."""
    conn = ServerConnection(latin1_params=latin1)
    try:
        events: object = [ev for chunk in chunks for ev in conn.receive(chunk)]
    except ProtocolError:
        events = ProtocolError
    return events, conn.pending_output(), conn.active_requests, conn.should_close


@pytest.mark.parametrize("latin1", [False, True])
@pytest.mark.parametrize(
    "wire",
    [
        pytest.param(nginx_request(), id="nginx"),
        pytest.param(nginx_request(rid=8, flags=1), id="id-8-keep-conn"),
        pytest.param(nginx_request(rid=300), id="id-300"),
        pytest.param(
            begin(1, 3) + rec(4, 1, pair(b"A", b"1")) + rec(4, 1) + rec(5, 1), id="filter"
        ),
        pytest.param(
            begin(1, 2) + rec(4, 1, pair(b"A", b"\xff")) + rec(4, 1) + rec(5, 1), id="auth"
        ),
        pytest.param(
            begin(1, 9) + rec(4, 1, pair(b"A", b"1")) + rec(4, 1) + rec(5, 1), id="bad-role"
        ),
        pytest.param(nginx_request()[:-1] + b"\x01", id="reserved-byte-set"),
        pytest.param(nginx_request() + rec(5, 1), id="more-after-stdin-end"),
        pytest.param(nginx_request(stdin=b"body"), id="with-body"),
        pytest.param(
            begin(1) + rec(4, 1, pair(b"A", b"1"), plen=0) + rec(4, 1) + rec(5, 1), id="unpadded"
        ),
        pytest.param(
            rec(1, 1, bytes([0, 1, 0, 0, 0, 0, 0, 0]), plen=8)
            + rec(4, 1, pair(b"A", b"1"))
            + rec(4, 1)
            + rec(5, 1),
            id="padded-begin",
        ),
    ],
)
def test_whole_request_fast_path_gives_the_record_loops_events_and_state(
    wire: bytes, latin1: bool
) -> None:
    # the record loop: a first byte alone completes no record, so the fast path is not taken
    expected = _outcome([wire[:1], wire[1:]], latin1)
    assert _outcome([wire], latin1) == expected
    assert _outcome([memoryview(bytearray(wire))], latin1) == expected


def test_whole_request_fast_path_rejection_ignores_the_rest() -> None:
    """An OVERLOADED request's PARAMS are ignored (spec §3.3), even one over the size cap."""
    limits = Limits(max_params_bytes=4)
    wire = begin(1) + rec(4, 1, pair(b"LONG", b"value")) + rec(4, 1) + rec(5, 1)
    conn = ServerConnection(limits, active_elsewhere=lambda: limits.max_reqs)
    assert conn.receive(wire) == []
    assert conn.pending_output() == rec(3, 1, b"\0\0\0\0\x02\0\0\0")
    assert conn.should_close
    with pytest.raises(ProtocolError, match="exceed 4"):
        ServerConnection(limits).receive(wire)


@pytest.mark.parametrize("view", [False, True])
def test_whole_request_fast_path_errors_fail_the_connection(view: bool) -> None:
    wire = begin(1) + rec(4, 1, b"\x05\x01ab") + rec(4, 1) + rec(5, 1)
    conn = ServerConnection(latin1_params=True)
    with pytest.raises(ProtocolError) as info:
        conn.receive(memoryview(wire) if view else wire)
    assert info.value.__cause__ is None
    with pytest.raises(ProtocolError, match="already failed"):
        conn.receive(nginx_request(rid=2))


@pytest.mark.parametrize("latin1", [False, True])
def test_params_gives_bytes_and_latin1_views_of_the_same_pairs(latin1: bool) -> None:
    raw = {b"REQUEST_URI": b"/caf\xc3\xa9?q=\xff", N128: V128, b"EMPTY": b""}
    wire = begin(1) + rec(4, 1, encode_pairs(raw)) + rec(4, 1) + rec(5, 1)
    ev = ServerConnection(latin1_params=latin1).receive(wire)[1]
    assert isinstance(ev, Params)
    native = {k.decode("latin-1"): v.decode("latin-1") for k, v in raw.items()}
    taken = ev.take_latin1()
    assert taken == native
    taken["MUTATED"] = "by the caller, who owns it"
    assert ev.params == raw
    assert ev.take_latin1() == native  # a fresh dict after the first hand-over
    assert ev == Params(1, raw)
    assert Params(1, raw).take_latin1() == native
    assert Params(1, block=encode_pairs(raw)).params == raw
    assert decode_pairs_latin1(encode_pairs(raw)) == native
    assert repr(Params(1, {b"A": b"1"})) == "Params(request_id=1, params={b'A': b'1'})"


def test_params_built_lazily_before_hand_over_matches() -> None:
    ev = ServerConnection(latin1_params=True).receive(nginx_request())[1]
    assert isinstance(ev, Params)
    assert ev.params == {b"REQUEST_METHOD": b"GET", b"SCRIPT_NAME": b"/hello"}
    assert ev.take_latin1() == {"REQUEST_METHOD": "GET", "SCRIPT_NAME": "/hello"}


def test_respond_tail_for_request_id_1_is_the_generic_one() -> None:
    bodies: list[list[Buffer]] = [
        [b""],
        [b"x"],
        [b"x" * 7],
        [b"x" * 8],
        [b"ab", memoryview(b"cde")],
    ]
    for body in bodies:
        conn = ServerConnection()
        conn.receive(nginx_request())
        got = b"".join(bytes(b) for b in conn.respond(1, body))
        assert got == b"".join(bytes(b) for b in encode_response(1, body)), body


# --- whole_responder_request: a request and its body in one read --------------------------------

_POST = {b"REQUEST_METHOD": b"POST", b"CONTENT_LENGTH": b"10", b"SCRIPT_NAME": b"/echo"}


@pytest.mark.parametrize("size", [1, 10, 65535, 65536, 70_000])
def test_whole_request_takes_a_body_that_came_in_the_same_read(size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    wire = encode_request(1, _POST, payload)
    body: list[bytes] = []
    params = whole_responder_request(wire, Limits(), body)
    assert params is not None and params.take_latin1()["REQUEST_METHOD"] == "POST"
    assert b"".join(body) == payload and all(body)
    # Without a list to fill, only a bodiless request is whole (floor.py, older callers).
    assert whole_responder_request(wire, Limits()) is None
    assert whole_responder_request(memoryview(bytearray(wire)), Limits(), []) is not None


def _post_wire(body: bytes = b"0123456789", rid: int = 1, flags: int = 0) -> bytes:
    return encode_begin_request(rid, Role.RESPONDER, bool(flags)) + (
        encode_stream(RecordType.PARAMS, rid, encode_pairs(_POST))
        + encode_stream(RecordType.STDIN, rid, body)
    )


@pytest.mark.parametrize(
    "wire",
    [
        pytest.param(_post_wire() + b"\0", id="a_byte_after_the_end"),
        pytest.param(_post_wire()[:-8], id="no_empty_stdin"),
        pytest.param(_post_wire()[:-1], id="the_empty_stdin_cut"),
        pytest.param(
            _post_wire()[:-8] + encode_record(RecordType.STDIN, 2, b"x") + _post_wire()[-8:],
            id="stdin_of_another_request",
        ),
        pytest.param(
            _post_wire()[:-8] + encode_record(RecordType.DATA, 1, b"x") + _post_wire()[-8:],
            id="a_data_record",
        ),
        pytest.param(
            _post_wire()[:-8] + encode_abort_request(1) + _post_wire()[-8:], id="an_abort"
        ),
        pytest.param(
            _post_wire()[:-8] + hdr(5, 1, 0, 3) + b"\0\0\0" + _post_wire()[-8:],
            id="an_empty_stdin_with_padding_before_the_end",
        ),
        pytest.param(
            _post_wire()[:-8] + hdr(5, 1, 100) + b"x" * 10 + _post_wire()[-8:],
            id="a_stdin_record_longer_than_what_came",
        ),
        pytest.param(_post_wire(flags=FCGI_KEEP_CONN), id="keep_conn"),
        pytest.param(
            encode_request(1, _POST, b"0123456789", role=Role.FILTER, data=b"d"), id="filter"
        ),
    ],
)
def test_whole_request_with_a_body_is_exactly_that_shape(wire: bytes) -> None:
    """Anything else goes to the connection's parser, which answers or rejects it as always;
    the body list stays empty."""
    body: list[bytes] = []
    assert whole_responder_request(wire, Limits(), body) is None
    assert body == []


def test_asks_keep_conn_reads_the_begin_request_flag_and_nothing_else() -> None:
    """The server's cue to retry a new connection's first read as a kept one."""
    assert asks_keep_conn(encode_begin_request(1, keep_conn=True) + b"rest")
    assert asks_keep_conn(memoryview(encode_begin_request(7, Role.FILTER, keep_conn=True)))
    assert not asks_keep_conn(encode_begin_request(1))
    assert not asks_keep_conn(encode_begin_request(1, keep_conn=True)[:15])  # cut short
    # The flags byte of anything but a BEGIN_REQUEST means nothing.
    flags_at_10 = b"\x00\x00\x01" + b"\x00" * 5
    assert not asks_keep_conn(encode_record(RecordType.PARAMS, 1, flags_at_10))

"""atheris harness for fcgispawn.protocol: any bytes -> events or ProtocolError, memory bounded.

Run it with ``bash fuzz/run.sh [SECONDS]`` (not part of CI). The fuzzer's bytes choose the
limits and how the input is chunked, then feed the application side, the client side and the
name-value decoder. Any exception other than ProtocolError, or a receive buffer that grows
past one incomplete record, is a crash; libFuzzer's -rss_limit_mb catches unbounded memory.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from fcgispawn.protocol import (
        FCGI_HEADER_LEN,
        FCGI_MAX_CONTENT,
        ClientConnection,
        Limits,
        ProtocolError,
        Role,
        ServerConnection,
        decode_pairs,
        encode_abort_request,
        encode_get_values,
        encode_request,
    )

# One incomplete record is all a connection may hold between calls.
MAX_BUFFERED = FCGI_HEADER_LEN + FCGI_MAX_CONTENT + 255


def _chunks(fdp: atheris.FuzzedDataProvider) -> list[bytes]:
    out: list[bytes] = []
    while fdp.remaining_bytes() > 0 and len(out) < 64:
        size = fdp.ConsumeIntInRange(0, 512)
        out.append(fdp.ConsumeBytes(size))
    return out


def _check(exc: ProtocolError) -> None:
    # The library turns an internal IndexError/ValueError/... into ProtocolError as a safety
    # net, chaining the original: a chained ProtocolError is a bug the fuzzer must report.
    if exc.__cause__ is not None:
        raise AssertionError("internal error converted to ProtocolError") from exc


def _buffered(conn: ServerConnection | ClientConnection) -> int:
    return len(conn._buf) - conn._pos


def test_one_input(data: bytes) -> None:
    """The invariant: events or ProtocolError, never another exception, never a big buffer."""
    fdp = atheris.FuzzedDataProvider(data)
    limits = Limits(
        mpxs_conns=fdp.ConsumeBool(),
        max_requests_per_conn=fdp.ConsumeIntInRange(1, 8),
        max_params_bytes=fdp.ConsumeIntInRange(0, 4096),
    )
    latin1 = fdp.ConsumeBool()  # the server's mode (PARAMS straight to str) and the default
    chunks = _chunks(fdp)

    server = ServerConnection(limits, latin1_params=latin1)
    try:
        for chunk in chunks:
            server.receive(chunk)
            server.pending_output()
            if _buffered(server) >= MAX_BUFFERED:
                raise AssertionError("server receive buffer grew past one record")
            if len(server.active_requests) > limits.max_requests_per_conn:
                raise AssertionError("more active requests than the limit")
    except ProtocolError as exc:
        _check(exc)

    client = ClientConnection()
    try:
        for chunk in chunks:
            client.receive(memoryview(bytearray(chunk)))
            if _buffered(client) >= MAX_BUFFERED:
                raise AssertionError("client receive buffer grew past one record")
    except ProtocolError as exc:
        _check(exc)

    with contextlib.suppress(ProtocolError):
        decode_pairs(b"".join(chunks))


def write_seeds(directory: Path) -> None:
    """Valid streams to start from, so the fuzzer does not have to discover the header first."""
    directory.mkdir(parents=True, exist_ok=True)
    seeds = {
        "responder": encode_request(1, {b"SCRIPT_NAME": b"/", b"X" * 130: b"y" * 200}, b"body"),
        "filter": encode_request(2, {}, b"", role=Role.FILTER, keep_conn=True, data=b"d"),
        "abort": encode_request(3, {b"A": b"b"}, keep_conn=True) + encode_abort_request(3),
        "get_values": encode_get_values([b"FCGI_MAX_CONNS", b"FCGI_MPXS_CONNS", b"NOPE"]),
    }
    for name, wire in seeds.items():
        # Prefix bytes the provider consumes for limits and a first chunk size.
        (directory / name).write_bytes(b"\x01\x04\x00\x10" + b"\xff\x01" + wire)


def main() -> None:
    """Entry point: ``python fuzz/fuzz_protocol.py [--seed DIR] [libFuzzer args] [CORPUS]``."""
    if len(sys.argv) == 3 and sys.argv[1] == "--seed":
        write_seeds(Path(sys.argv[2]))
        return
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

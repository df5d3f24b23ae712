"""Peer-link framing, sans-IO: bytes in, (header, payload) messages out.

A frame is `u32 header length, u32 payload length, header, payload`. Headers
are msgpack maps (msgspec) with a `t` (type) key; payloads are raw block data
and never decoded. Both lengths are bounded, so a bad or hostile peer cannot
make the receiver buffer more than one maximal frame.
"""

from __future__ import annotations

import struct
from typing import Any

import msgspec

from twinvol.nbd.constants import MAX_PAYLOAD

PROTOCOL_VERSION = 1
MAX_HEADER = 64 * 1024
MAX_FRAME_PAYLOAD = MAX_PAYLOAD
_LEN = struct.Struct(">II")

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(dict[str, Any])


class WireError(Exception):
    """The peer broke the framing; the link must be dropped."""


def encode(header: dict[str, Any], payload: bytes | bytearray | memoryview = b""
           ) -> list[bytes | bytearray | memoryview]:
    """Frame parts, ready for writelines; the payload is not copied (its owner must not
    change it afterwards)."""
    h = _encoder.encode(header)
    if len(h) > MAX_HEADER or len(payload) > MAX_FRAME_PAYLOAD:
        raise WireError("frame too large")
    if payload:
        return [_LEN.pack(len(h), len(payload)) + h, payload]
    return [_LEN.pack(len(h), 0) + h]


class FrameDecoder:
    """Accumulates received bytes and yields complete frames.

    A payload is received straight into a buffer of its exact size, so a large write
    is copied once, not once per received piece.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._header: dict[str, Any] | None = None
        self._payload: bytearray | None = None
        self._got = 0

    def feed(self, data: bytes | bytearray | memoryview
             ) -> list[tuple[dict[str, Any], bytes | bytearray]]:
        out: list[tuple[dict[str, Any], bytes | bytearray]] = []
        view = memoryview(data)
        pos = 0
        while True:
            payload = self._payload
            if payload is not None:
                n = min(len(payload) - self._got, len(view) - pos)
                payload[self._got:self._got + n] = view[pos:pos + n]
                self._got += n
                pos += n
                if self._got < len(payload):
                    return out
                assert self._header is not None
                out.append((self._header, payload))
                self._header = self._payload = None
                continue
            buf = self._buf
            if len(buf) < _LEN.size:
                take = min(_LEN.size - len(buf), len(view) - pos)
                buf += view[pos:pos + take]
                pos += take
                if len(buf) < _LEN.size:
                    return out
            hlen, plen = _LEN.unpack_from(buf, 0)
            if hlen > MAX_HEADER or plen > MAX_FRAME_PAYLOAD:
                raise WireError(f"frame lengths {hlen}/{plen} exceed the limits")
            want = _LEN.size + hlen
            if len(buf) < want:
                take = min(want - len(buf), len(view) - pos)
                buf += view[pos:pos + take]
                pos += take
                if len(buf) < want:
                    return out
            try:
                header = _decoder.decode(buf[_LEN.size:want])
            except msgspec.DecodeError as e:
                raise WireError(f"undecodable frame header: {e}") from None
            if not isinstance(header.get("t"), str):
                raise WireError("frame header has no type")
            buf.clear()
            if plen == 0:
                out.append((header, b""))
                continue
            self._header = header
            self._payload = bytearray(plen)
            self._got = 0

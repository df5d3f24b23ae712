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


def encode(header: dict[str, Any], payload: bytes | bytearray | memoryview = b"") -> list[bytes]:
    h = _encoder.encode(header)
    if len(h) > MAX_HEADER or len(payload) > MAX_FRAME_PAYLOAD:
        raise WireError("frame too large")
    if payload:
        return [_LEN.pack(len(h), len(payload)) + h, bytes(payload)]
    return [_LEN.pack(len(h), 0) + h]


class FrameDecoder:
    """Accumulates received bytes and yields complete frames."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes | bytearray | memoryview) -> list[tuple[dict[str, Any], bytes]]:
        self._buf += data
        out: list[tuple[dict[str, Any], bytes]] = []
        buf = self._buf
        pos = 0
        while len(buf) - pos >= _LEN.size:
            hlen, plen = _LEN.unpack_from(buf, pos)
            if hlen > MAX_HEADER or plen > MAX_FRAME_PAYLOAD:
                raise WireError(f"frame lengths {hlen}/{plen} exceed the limits")
            end = pos + _LEN.size + hlen + plen
            if len(buf) < end:
                break
            hstart = pos + _LEN.size
            try:
                header = _decoder.decode(buf[hstart:hstart + hlen])
            except msgspec.DecodeError as e:
                raise WireError(f"undecodable frame header: {e}") from None
            if not isinstance(header.get("t"), str):
                raise WireError("frame header has no type")
            out.append((header, bytes(buf[hstart + hlen:end])))
            pos = end
        if pos:
            del buf[:pos]
        return out

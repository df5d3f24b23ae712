"""How an asyncio `BufferedProtocol` feeds received bytes to the sans-IO machine under
it: the NBD server and client, the host agent's client side and the peer link all do it
the same way, here.

A large payload the machine is waiting for (a write's data, a read reply, a copy chunk)
is received straight into its own buffer, with no copy; everything else goes into one
reused scratch buffer, whose first bytes are handed to the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

SCRATCH_SIZE = 256 * 1024   # one receive can carry many small requests
DIRECT_MIN = 64 * 1024      # payloads at least this big are received in place


class Receiver:
    __slots__ = ("direct", "minimum", "scratch")

    def __init__(self, minimum: int = DIRECT_MIN, size: int = SCRATCH_SIZE) -> None:
        self.scratch = memoryview(bytearray(size))
        self.minimum = minimum
        self.direct = False

    def buffer(self, payload: memoryview | None, limit: int = 0) -> memoryview:
        """What `get_buffer` returns: `payload` (the machine's buffer for the payload it
        waits for) when large enough, else the scratch buffer (its first `limit` bytes
        when given: a caller expecting a large payload next reads only its header)."""
        if payload is not None and len(payload) >= self.minimum:
            self.direct = True
            return payload
        self.direct = False
        return self.scratch[:limit] if limit else self.scratch

    def received(self, nbytes: int) -> memoryview | None:
        """After `buffer_updated(nbytes)`: the bytes to feed the machine, or None when
        they went into its payload buffer (tell it with `payload_received(nbytes)`)."""
        return None if self.direct else self.scratch[:nbytes]


def nodelay(transport: asyncio.BaseTransport) -> None:
    """Small replies and acks must not wait for Nagle (TCP only, not Unix sockets)."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

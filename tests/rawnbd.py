"""A deliberately simple, blocking NBD client for sending malformed traffic in tests.

It frames what it sends with nbdwire's encoders (the same ones the sans-IO server tests
use), so there is one NBD test encoder."""

from __future__ import annotations

import socket
import struct

import nbdwire

from twinvol.nbd.constants import (
    IHAVEOPT,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Opt,
    Rep,
)


class RawClient:
    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        greeting = self.recv_exact(18)
        magic, opt_magic, self.handshake_flags = struct.unpack(">QQH", greeting)
        assert magic == NBDMAGIC and opt_magic == IHAVEOPT

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError(f"server closed after {len(buf)} of {n} bytes")
            buf += chunk
        return buf

    def is_closed(self, timeout: float = 5.0) -> bool:
        """True when the server has hung up (EOF or reset) within `timeout`."""
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False

    # ---- handshake ------------------------------------------------------

    def client_flags(self, flags: int = 3) -> None:
        self.send(nbdwire.client_flags(flags))

    def option(self, opt: int, data: bytes = b"") -> None:
        self.send(nbdwire.option(opt, data))

    def option_reply(self) -> tuple[int, int, bytes]:
        magic, opt, rep, length = struct.unpack(">QIII", self.recv_exact(20))
        assert magic == OPTION_REPLY_MAGIC, hex(magic)
        return opt, rep, self.recv_exact(length)

    def replies_until_final(self) -> list[tuple[int, int, bytes]]:
        out = []
        while True:
            r = self.option_reply()
            out.append(r)
            if r[1] == Rep.ACK or r[1] & (1 << 31):
                return out

    def go(self, name: str, structured: bool = False) -> tuple[int, int]:
        """Negotiate (fixed newstyle, no zeroes) and enter transmission; returns (size, flags)."""
        self.client_flags(3)
        if structured:
            self.option(Opt.STRUCTURED_REPLY)
            assert self.option_reply()[1] == Rep.ACK
        self.option(Opt.GO, nbdwire.info_data(name))
        size = flags = -1
        for _opt, rep, data in self.replies_until_final():
            if rep == Rep.INFO and struct.unpack(">H", data[:2])[0] == 0:
                size, flags = struct.unpack(">QH", data[2:])
            elif rep != Rep.ACK and rep != Rep.INFO:
                raise AssertionError(f"GO failed: {rep:#x} {data!r}")
        return size, flags

    # ---- transmission ---------------------------------------------------

    def request(self, cmd: int, offset: int = 0, length: int = 0, *, flags: int = 0,
                cookie: int = 1, data: bytes = b"", magic: int = REQUEST_MAGIC) -> None:
        self.send(nbdwire.request(cmd, flags=flags, cookie=cookie, offset=offset,
                                  length=length, payload=data, magic=magic))

    def simple_reply(self) -> tuple[int, int]:
        """(error, cookie) of a simple reply."""
        magic, err, cookie = struct.unpack(">IIQ", self.recv_exact(16))
        assert magic == SIMPLE_REPLY_MAGIC, hex(magic)
        return err, cookie

    def structured_chunk(self) -> tuple[int, int, int, bytes]:
        """(flags, type, cookie, payload) of one structured reply chunk."""
        magic, flags, typ, cookie, length = struct.unpack(">IHHQI", self.recv_exact(20))
        assert magic == STRUCTURED_REPLY_MAGIC, hex(magic)
        return flags, typ, cookie, self.recv_exact(length)

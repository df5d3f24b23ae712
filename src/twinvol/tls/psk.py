"""TLS with pre-shared keys for NBD, as nbdkit's `--tls-psk` and qemu's `tls-creds-psk`:
a key file of `identity:hexkey` lines (what `psktool` writes) instead of certificates.

Python's `ssl` has no PSK and pyOpenSSL's `Context` offers no PSK method, but the OpenSSL
functions are in the cffi bindings of `cryptography`, which pyOpenSSL is built on. So a
pyOpenSSL connection in memory-BIO mode does the TLS, and `PskTransport` puts it between
the socket's transport and the NBD protocol: the sans-IO state machine sees plaintext
before and after STARTTLS, as with certificates.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from typing import Any

from OpenSSL import SSL
from OpenSSL._util import ffi, lib  # cryptography's OpenSSL bindings (PSK is there)

_LINE = re.compile(r"^([^:\s]+):([0-9a-fA-F]+)$")
MAX_READ = 256 * 1024
MAX_OUT = 1 << 20  # bytes taken from OpenSSL's outgoing BIO at once


class PskError(OSError):
    """A key file that cannot be used, or a handshake the client lost (the message says
    why, for the one log line)."""


def load_keys(path: str) -> dict[str, bytes]:
    """identity -> key from a psktool file; a clear error for anything else."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise PskError(f"PSK file {path} cannot be read: {e.strerror}") from None
    keys: dict[str, bytes] = {}
    for no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = _LINE.match(line.strip())
        if m is None or len(m.group(2)) % 2:
            raise PskError(f"PSK file {path}, line {no}: not IDENTITY:HEXKEY (make it with "
                           "`psktool -u NAME -p FILE`)")
        keys[m.group(1)] = bytes.fromhex(m.group(2))
    if not keys:
        raise PskError(f"PSK file {path} has no keys")
    return keys


class PskContext:
    """The server side of TLS-PSK (TLS 1.2 and 1.3) for the identities of one key file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.keys = load_keys(path)
        self.refused: dict[int, str] = {}  # SSL* -> why its client's identity was refused
        self.asked: dict[int, str] = {}  # SSL* -> the identity its client named
        ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        ctx.set_cipher_list(b"ECDHE-PSK:DHE-PSK:PSK")
        self._callback = ffi.callback(
            "unsigned int(SSL *, char *, unsigned char *, unsigned int)", self._find)
        lib.SSL_CTX_set_psk_server_callback(ctx._context, self._callback)
        self.ctx = ctx

    def _find(self, ssl: Any, identity: Any, out: Any, room: int) -> int:
        name = ffi.string(identity).decode(errors="replace") if identity != ffi.NULL else ""
        self.asked[int(ffi.cast("uintptr_t", ssl))] = name
        key = self.keys.get(name)
        if key is None or len(key) > room:
            self.refused[int(ffi.cast("uintptr_t", ssl))] = \
                f"the client's PSK identity {name!r} is not in {os.path.basename(self.path)}"
            return 0
        ffi.memmove(out, key, len(key))
        return len(key)

    async def start(self, raw: asyncio.Transport, app: asyncio.BaseProtocol,
                    timeout: float) -> PskTransport:
        """Upgrade `raw` (reading paused) for `app`, as loop.start_tls does."""
        link = PskTransport(self, raw, app)
        raw.set_protocol(link)
        raw.resume_reading()
        try:
            await asyncio.wait_for(link.ready, timeout)
        except TimeoutError:
            raise TimeoutError("the TLS-PSK handshake did not finish in time") from None
        finally:
            self.refused.pop(link.key, None)
            self.asked.pop(link.key, None)
        return link


class PskClientContext:
    """The client side: one identity and its key (the host agent dialing a PSK node)."""

    def __init__(self, path: str, identity: str | None = None) -> None:
        self.path = path
        keys = load_keys(path)
        self.identity = identity or next(iter(keys))
        if self.identity not in keys:
            raise PskError(f"PSK file {path} has no identity {self.identity!r}")
        self.key = keys[self.identity]
        self.refused: dict[int, str] = {}
        self.asked: dict[int, str] = {}
        ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        ctx.set_cipher_list(b"ECDHE-PSK:DHE-PSK:PSK")
        self._callback = ffi.callback(
            "unsigned int(SSL *, char *, char *, unsigned int, unsigned char *, unsigned int)",
            self._give)
        lib.SSL_CTX_set_psk_client_callback(ctx._context, self._callback)
        self.ctx = ctx

    def _give(self, ssl: Any, hint: Any, identity: Any, id_room: int, out: Any,
              room: int) -> int:
        name = self.identity.encode()
        if len(name) + 1 > id_room or len(self.key) > room:
            return 0
        ffi.memmove(identity, name + b"\0", len(name) + 1)
        ffi.memmove(out, self.key, len(self.key))
        return len(self.key)

    async def start(self, raw: asyncio.Transport, app: asyncio.BaseProtocol,
                    timeout: float) -> PskTransport:
        """Upgrade `raw` (reading paused) for `app` as the client."""
        link = PskTransport(self, raw, app, client=True)
        raw.set_protocol(link)
        raw.resume_reading()
        try:
            await asyncio.wait_for(link.start(), timeout)
        except TimeoutError:
            raise TimeoutError("the TLS-PSK handshake did not finish in time") from None
        return link


class _Info:
    """What `get_extra_info("ssl_object")` offers of a PSK connection."""

    def __init__(self, conn: SSL.Connection) -> None:
        self.conn = conn

    def version(self) -> str:
        return str(self.conn.get_protocol_version_name())


class PskTransport(asyncio.Transport, asyncio.BufferedProtocol):
    """The TLS transport an NBD protocol writes to, and the protocol of the raw one."""

    def __init__(self, psk: PskContext | PskClientContext, raw: asyncio.Transport,
                 app: asyncio.BaseProtocol, client: bool = False) -> None:
        super().__init__()
        self.psk, self.raw, self.app = psk, raw, app
        self.conn = SSL.Connection(psk.ctx, None)
        if client:
            self.conn.set_connect_state()
        else:
            self.conn.set_accept_state()
        self.key = int(ffi.cast("uintptr_t", self.conn._ssl))
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._in = bytearray(MAX_READ)
        self._pending = bytearray()  # plaintext the app has not taken (reading paused)
        self._paused = False
        self._closed = False
        self._up = False  # the handshake succeeded: the app owns the connection

    async def start(self) -> None:
        """Client side: send the ClientHello, then wait for the handshake."""
        self._handshake()
        await self.ready

    # ---- the raw transport's protocol ------------------------------------

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self._in)

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(memoryview(self._in)[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        self.conn.bio_write(data)
        if not self.ready.done():
            self._handshake()
        if self._up:
            self._decrypt()

    def _handshake(self) -> None:
        if not self.ready.done():
            try:
                self.conn.do_handshake()
            except SSL.WantReadError:
                self._flush()
                return
            except SSL.Error as e:
                self._flush()
                why = self.psk.refused.get(self.key) or self._why(e)
                self.ready.set_exception(PskError(why))
                return
            self._flush()
            self._up = True
            self.ready.set_result(None)

    def _why(self, e: SSL.Error) -> str:
        name = self.psk.asked.get(self.key)
        if name is None:
            return f"TLS-PSK handshake failed: {e}"
        return (f"TLS-PSK handshake failed: the client's key for identity {name!r} is not the "
                f"one in {os.path.basename(self.psk.path)} ({e})")

    def _decrypt(self) -> None:
        app = self.app
        while not self._closed:  # after close() the app wants nothing more
            try:
                if isinstance(app, asyncio.BufferedProtocol) and not self._pending \
                        and not self._paused:
                    n = self.conn.recv_into(app.get_buffer(-1))  # straight to the app
                    app.buffer_updated(n)
                    continue
                self._pending += self.conn.recv(MAX_READ)
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:
                self._flush()
                self.app.eof_received()  # type: ignore[attr-defined]
                return
            except SSL.Error:
                self.abort()
                return
        self._flush()
        self._deliver()

    def _deliver(self) -> None:
        app = self.app
        while self._pending and not self._paused and not self._closed:
            if isinstance(app, asyncio.BufferedProtocol):
                buf = memoryview(app.get_buffer(len(self._pending)))
                n = min(len(buf), len(self._pending))
                buf[:n] = self._pending[:n]
                del self._pending[:n]
                app.buffer_updated(n)
            else:
                data, self._pending = bytes(self._pending), bytearray()
                app.data_received(data)  # type: ignore[attr-defined]

    def eof_received(self) -> bool:
        if self.ready.done():
            self.app.eof_received()  # type: ignore[attr-defined]
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if not self.ready.done():
            self.ready.set_exception(PskError("the other side hung up during the TLS-PSK "
                                              "handshake (wrong key or identity?)"))
        if self._up:  # else the failed upgrade's caller cleans up
            self.app.connection_lost(exc)

    def pause_writing(self) -> None:
        self.app.pause_writing()

    def resume_writing(self) -> None:
        self.app.resume_writing()

    # ---- the transport the app sees ----------------------------------------

    def _flush(self) -> None:
        """Move what OpenSSL encrypted to the socket, one piece per read of its BIO."""
        while True:
            try:
                out = self.conn.bio_read(MAX_OUT)
            except SSL.WantReadError:
                return
            if not self.raw.is_closing():
                self.raw.write(out)

    def write(self, data: Any) -> None:
        self.writelines((data,))

    def writelines(self, list_of_data: Any) -> None:
        if self._closed or self.raw.is_closing():
            return
        for data in list_of_data:
            self.conn.sendall(data)  # into the memory BIO: it never blocks
        self._flush()

    def can_write_eof(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return _Info(self.conn)
        if name == "peercert":
            return {}
        return self.raw.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self._paused = True
        self.raw.pause_reading()

    def resume_reading(self) -> None:
        self._paused = False
        self._deliver()
        if not self._paused:
            self.raw.resume_reading()

    def is_reading(self) -> bool:
        return not self._paused

    def is_closing(self) -> bool:
        return self._closed or self.raw.is_closing()

    def get_write_buffer_size(self) -> int:
        return self.raw.get_write_buffer_size()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.raw.set_write_buffer_limits(high, low)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.app = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.app

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(SSL.Error):
            self.conn.shutdown()
        self._flush()
        self.raw.close()

    def abort(self) -> None:
        self._closed = True
        self.raw.abort()

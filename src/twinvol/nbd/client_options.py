"""The handshake, client side: the server's greeting, which option the client sends
next, and what each reply means.

`ClientConnection` (nbd/client.py) hands over its received bytes until the handshake
ends; this parses them (the greeting, then the reply to the one option in flight,
checked against it and bounded) and turns each into the next option or an outcome:
`Negotiated`, `Refused` or `ProtocolError`. Pure, like the connection: options go
to the connection's output list.
"""

from __future__ import annotations

import struct
from typing import Any

from twinvol.nbd.client_events import Negotiated, ProtocolError, Refused, TlsReady
from twinvol.nbd.constants import (
    BASE_ALLOCATION,
    FLAG_C_FIXED_NEWSTYLE,
    FLAG_C_NO_ZEROES,
    FLAG_FIXED_NEWSTYLE,
    FLAG_NO_ZEROES,
    GREETING,
    IHAVEOPT,
    MAX_OPTION_DATA,
    MAX_PAYLOAD,
    MAX_STRING,
    NBDMAGIC,
    OPTION_HEADER,
    OPTION_REPLY_HEADER,
    OPTION_REPLY_MAGIC,
    REP_ERR,
    Info,
    Opt,
    Rep,
)

_U32 = struct.Struct(">I")

Outcome = Negotiated | Refused | ProtocolError | TlsReady | None


class Negotiation:
    """One connection's options: asked one at a time, each reply checked against it."""

    def __init__(self, export: str, export_raw: bytes, *, structured: bool, meta_context: bool,
                 out: list[bytes], tls: bool = False) -> None:
        self.export = export
        self.tls = tls  # STARTTLS first, and nothing in clear text if the server says no
        self._export_raw = export_raw
        self.want_structured = structured
        self.want_meta = meta_context
        self._out = out
        self.structured = False
        self.meta_context_id: int | None = None
        self.no_zeroes = False
        self.greeted = False
        self.opt: int | None = None  # option awaiting its reply
        self._info: dict[str, Any] = {}
        self._meta_id: int | None = None

    def receive(self, data: bytes | bytearray | memoryview, pos: int) -> tuple[int, Outcome]:
        """Parse the server's bytes from `pos`: the position after what was used, and
        an outcome (None: go on; more bytes are needed if the position did not move)."""
        avail = len(data) - pos
        if not self.greeted:
            if avail < GREETING.size:
                return pos, None
            magic, opt_magic, flags = GREETING.unpack_from(data, pos)
            pos += GREETING.size
            if magic != NBDMAGIC:
                return pos, ProtocolError(f"bad server greeting magic {magic:#x}")
            if opt_magic != IHAVEOPT:
                return pos, ProtocolError("server does not speak the newstyle handshake "
                                          "(oldstyle server?)")
            if not flags & FLAG_FIXED_NEWSTYLE:
                return pos, ProtocolError("server does not support fixed newstyle negotiation")
            self.greeted = True
            self._start(flags)
            return pos, None
        awaited = self.opt
        if awaited == Opt.EXPORT_NAME:
            need = 10 if self.no_zeroes else 134
            if avail < need:
                return pos, None
            size, flags = struct.unpack_from(">QH", data, pos)
            return pos + need, self._export_name_reply(size, flags)
        if avail < OPTION_REPLY_HEADER.size:
            return pos, None
        magic, opt, rep, length = OPTION_REPLY_HEADER.unpack_from(data, pos)
        if magic != OPTION_REPLY_MAGIC:
            return pos, ProtocolError(f"bad option reply magic {magic:#x}")
        if opt != awaited:
            return pos, ProtocolError(f"reply to option {opt} while waiting for option "
                                      f"{awaited}")
        if length > MAX_OPTION_DATA:
            return pos, ProtocolError(f"option reply of {length} bytes is over the "
                                      f"{MAX_OPTION_DATA} byte bound")
        if avail < OPTION_REPLY_HEADER.size + length:
            return pos, None
        start = pos + OPTION_REPLY_HEADER.size
        return start + length, self._reply(opt, rep, bytes(data[start:start + length]))

    def _start(self, server_flags: int) -> None:
        """The greeting was good: send our flags and the first option."""
        self.no_zeroes = bool(server_flags & FLAG_NO_ZEROES)
        cflags = FLAG_C_FIXED_NEWSTYLE | (FLAG_C_NO_ZEROES if self.no_zeroes else 0)
        self._out.append(_U32.pack(cflags))
        if self.tls:
            self._send_option(Opt.STARTTLS)
        else:
            self.tls_started()

    def tls_started(self) -> None:
        """Options proper: after the TLS handshake, or at once without TLS."""
        if self.want_structured:
            self._send_option(Opt.STRUCTURED_REPLY)
        else:
            self._send_go()

    def _send_option(self, opt: int, data: bytes = b"") -> None:
        self.opt = opt
        self._out.append(OPTION_HEADER.pack(IHAVEOPT, opt, len(data)) + data)

    def _name_field(self) -> bytes:
        return _U32.pack(len(self._export_raw)) + self._export_raw

    def _send_meta(self) -> None:
        query = BASE_ALLOCATION.encode()
        self._meta_id = None
        self._send_option(Opt.SET_META_CONTEXT,
                          self._name_field() + _U32.pack(1) + _U32.pack(len(query)) + query)

    def _send_go(self) -> None:
        self._info = {}
        wanted = (Info.NAME, Info.DESCRIPTION, Info.BLOCK_SIZE)
        self._send_option(Opt.GO, self._name_field() + struct.pack(f">H{len(wanted)}H",
                                                                   len(wanted), *wanted))

    def _reply(self, opt: int, rep: int, data: bytes) -> Outcome:
        if opt == Opt.STARTTLS:
            if rep == Rep.ACK and not data:
                self.opt = None
                return TlsReady()
            if rep & REP_ERR:
                return Refused(rep, f"TLS refused: {data.decode(errors='replace')}")
            return ProtocolError(f"unexpected reply {rep:#x} to NBD_OPT_STARTTLS")
        if opt == Opt.STRUCTURED_REPLY:
            return self._on_structured_reply(rep, data)
        if opt == Opt.SET_META_CONTEXT:
            return self._on_meta_reply(rep, data)
        return self._on_go_reply(rep, data)

    def _on_structured_reply(self, rep: int, data: bytes) -> Outcome:
        if rep == Rep.ACK:
            if data:
                return ProtocolError("NBD_REP_ACK with data")
            self.structured = True
        elif not rep & REP_ERR:
            return ProtocolError(f"unexpected reply {rep:#x} to NBD_OPT_STRUCTURED_REPLY")
        if self.structured and self.want_meta:
            self._send_meta()
        else:
            self._send_go()
        return None

    def _on_meta_reply(self, rep: int, data: bytes) -> Outcome:
        if rep == Rep.META_CONTEXT:
            if len(data) < 5:
                return ProtocolError("NBD_REP_META_CONTEXT too short")
            (ctx_id,) = _U32.unpack_from(data)
            if data[4:] == BASE_ALLOCATION.encode():
                self._meta_id = ctx_id
            # A context we did not ask for is ignored; we only ever send our own id back.
            return None
        if rep == Rep.ACK:
            self.meta_context_id = self._meta_id
        elif not rep & REP_ERR:
            return ProtocolError(f"unexpected reply {rep:#x} to NBD_OPT_SET_META_CONTEXT")
        self._send_go()
        return None

    def _on_go_reply(self, rep: int, data: bytes) -> Outcome:
        if rep == Rep.INFO:
            return self._on_info(data)
        if rep == Rep.ACK:
            if "size" not in self._info:
                return ProtocolError("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT")
            return self._negotiated()
        if rep == Rep.ERR_UNSUP:
            # A server without GO: the old way, which cannot report errors.
            self._send_option(Opt.EXPORT_NAME, self._export_raw)
            return None
        if rep & REP_ERR:
            msg = data[:MAX_STRING].decode("utf-8", "replace")
            self.opt = None
            self._out.append(OPTION_HEADER.pack(IHAVEOPT, Opt.ABORT, 0))
            return Refused(rep, msg)
        return ProtocolError(f"unexpected reply {rep:#x} to NBD_OPT_GO")

    def _on_info(self, data: bytes) -> Outcome:
        if len(data) < 2:
            return ProtocolError("NBD_REP_INFO too short")
        (kind,) = struct.unpack_from(">H", data)
        info = self._info
        if kind == Info.EXPORT:
            if len(data) != 12:
                return ProtocolError("NBD_INFO_EXPORT has the wrong length")
            info["size"], info["flags"] = struct.unpack_from(">QH", data, 2)
        elif kind == Info.NAME:
            info["name"] = data[2:].decode("utf-8", "replace")
        elif kind == Info.DESCRIPTION:
            info["description"] = data[2:].decode("utf-8", "replace")
        elif kind == Info.BLOCK_SIZE:
            if len(data) != 14:
                return ProtocolError("NBD_INFO_BLOCK_SIZE has the wrong length")
            lo, pref, hi = struct.unpack_from(">III", data, 2)
            if not (lo and pref and hi) or lo > pref or (lo & (lo - 1)) or (pref & (pref - 1)):
                return ProtocolError(f"bad block sizes min={lo} preferred={pref} max={hi}")
            info["min_block"], info["preferred_block"], info["max_block"] = lo, pref, hi
        # Unknown information types are ignored, as the spec asks.
        return None

    def _export_name_reply(self, size: int, flags: int) -> Negotiated:
        self._info = {"size": size, "flags": flags}
        # EXPORT_NAME ends haggling: no metadata context can have been agreed for it.
        self.meta_context_id = None
        return self._negotiated()

    def _negotiated(self) -> Negotiated:
        info = self._info
        self.opt = None
        return Negotiated(
            self.export, info["size"], info["flags"], self.structured,
            self.meta_context_id is not None, info.get("name"), info.get("description", ""),
            info.get("min_block", 1), info.get("preferred_block", 4096),
            info.get("max_block", MAX_PAYLOAD))

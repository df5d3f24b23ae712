"""Option haggling, server side: what the sans-IO server answers to each NBD_OPT_*.

`ServerConnection` (nbd/server.py) frames the options and hands each complete one
here; this decides the replies from the exports and what the client asked for, and
says when negotiation ends (`Ready`) or the connection does (`Disconnect`). Pure,
like the connection: replies go to the connection's output list.
"""

from __future__ import annotations

import struct

from twinvol.nbd.constants import (
    BASE_ALLOCATION,
    MAX_OPTION_DATA,
    MAX_STRING,
    MIN_BLOCK,
    OPTION_REPLY_HEADER,
    OPTION_REPLY_MAGIC,
    PREFERRED_BLOCK,
    Info,
    Opt,
    Rep,
    TxFlag,
)
from twinvol.nbd.server_events import (
    Disconnect,
    ExportInfo,
    ExportProvider,
    Ready,
    StartTls,
    TlsMode,
)

META_CONTEXT_ID = 1  # id of base:allocation once selected
_TLS_REQD = "this server requires TLS: send NBD_OPT_STARTTLS first"


class Negotiation:
    """What one connection's client and server agreed so far, and the option replies."""

    def __init__(self, exports: ExportProvider, max_payload: int, out: list[bytes],
                 tls: TlsMode = TlsMode.OFF) -> None:
        self.exports = exports
        self.tls = tls
        self.tls_active = False
        self.max_payload = max_payload
        self._out = out
        self.structured = False
        self.meta_export: str | None = None  # named by the last successful SET_META_CONTEXT
        self.meta_selected = False
        self.no_zeroes = False

    def _reply(self, opt: int, rep: int, data: bytes = b"") -> None:
        self._out.append(OPTION_REPLY_HEADER.pack(OPTION_REPLY_MAGIC, opt, rep, len(data)) + data)

    def _error(self, opt: int, rep: Rep, message: str) -> None:
        self._reply(opt, rep, utf8_bounded(message))

    @property
    def tls_missing(self) -> bool:
        """TLS is required and not yet initiated: every option but STARTTLS and ABORT
        gets NBD_REP_ERR_TLS_REQD (FORCEDTLS)."""
        return self.tls is TlsMode.REQUIRE and not self.tls_active

    def tls_started(self) -> None:
        """The TLS handshake succeeded: whatever was agreed in clear text is forgotten."""
        self.tls_active = True
        self.structured = False
        self.meta_selected = False
        self.meta_export = None

    def oversized(self, opt: int) -> Disconnect | None:
        """Answer an option whose data was over MAX_OPTION_DATA (skipped unread)."""
        if opt == Opt.ABORT:  # data with ABORT is ignored, never refused
            self._reply(Opt.ABORT, Rep.ACK)
            return Disconnect("client aborted negotiation", False)
        if self.tls_missing:
            self._error(opt, Rep.ERR_TLS_REQD, _TLS_REQD)
            return None
        if opt == Opt.SET_META_CONTEXT:  # a failed SET still clears the selection
            self.meta_selected = False
            self.meta_export = None
        self._error(opt, Rep.ERR_TOO_BIG, f"option data larger than {MAX_OPTION_DATA} bytes")
        return None

    def handle(self, opt: int, data: bytes) -> Ready | Disconnect | StartTls | None:
        """Answer one complete option: `Ready` ends negotiation, `Disconnect` the
        connection, `StartTls` upgrades it, None lets it go on."""
        if opt == Opt.ABORT:
            self._reply(opt, Rep.ACK)
            return Disconnect("client aborted negotiation", False)
        if opt == Opt.STARTTLS:
            return self._opt_starttls(data)
        if self.tls_missing:
            if opt == Opt.EXPORT_NAME:  # cannot be answered with an error: hang up
                return Disconnect("client asked for an export with NBD_OPT_EXPORT_NAME "
                                  "without TLS; this server requires TLS", True)
            self._error(opt, Rep.ERR_TLS_REQD, _TLS_REQD)
            return None
        if opt == Opt.EXPORT_NAME:
            return self._opt_export_name(data)
        if opt == Opt.LIST:
            if data:
                self._error(opt, Rep.ERR_INVALID, "NBD_OPT_LIST takes no data")
                return None
            for exp in self.exports.list_exports():
                name = exp.name.encode()
                self._reply(opt, Rep.SERVER,
                            struct.pack(">I", len(name)) + name + exp.description.encode())
            self._reply(opt, Rep.ACK)
            return None
        if opt in (Opt.INFO, Opt.GO):
            return self._opt_info_go(opt, data)
        if opt == Opt.STRUCTURED_REPLY:
            if data:
                self._error(opt, Rep.ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
            elif self.structured:
                self._error(opt, Rep.ERR_INVALID, "structured replies already negotiated")
            else:
                self.structured = True
                self._reply(opt, Rep.ACK)
            return None
        if opt in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
            self._opt_meta_context(opt, data)
            return None
        self._error(opt, Rep.ERR_UNSUP, f"option {opt} is not supported")
        return None

    def _opt_starttls(self, data: bytes) -> StartTls | None:
        if data:
            self._error(Opt.STARTTLS, Rep.ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
        elif self.tls is TlsMode.OFF:
            self._error(Opt.STARTTLS, Rep.ERR_UNSUP, "TLS is not enabled on this server")
        elif self.tls_active:
            self._error(Opt.STARTTLS, Rep.ERR_INVALID, "TLS is already negotiated")
        else:
            self._reply(Opt.STARTTLS, Rep.ACK)
            return StartTls()
        return None

    def _flags_for(self, exp: ExportInfo) -> int:
        f = (TxFlag.HAS_FLAGS | TxFlag.SEND_FLUSH | TxFlag.SEND_FUA | TxFlag.CAN_MULTI_CONN
             | TxFlag.SEND_CACHE)
        if exp.read_only:
            f |= TxFlag.READ_ONLY
        else:
            f |= TxFlag.SEND_TRIM | TxFlag.SEND_WRITE_ZEROES | TxFlag.SEND_FAST_ZERO
        if self.structured:
            f |= TxFlag.SEND_DF
        return int(f)

    def _ready(self, exp: ExportInfo) -> Ready:
        """Transmission on `exp`, with what was agreed for it."""
        return Ready(exp, self.structured, self.meta_selected and self.meta_export == exp.name,
                     self._flags_for(exp))

    def _opt_export_name(self, data: bytes) -> Ready | Disconnect:
        try:
            name = data.decode()
        except UnicodeDecodeError:
            return Disconnect("export name is not valid UTF-8", True)
        exp = self.exports.lookup(name)
        if exp is None or exp.blocked:
            # The spec allows no error reply here: the only answer is to hang up.
            why = "unknown" if exp is None else "blocked"
            return Disconnect(f"{why} export {name!r} requested with NBD_OPT_EXPORT_NAME", True)
        ready = self._ready(exp)
        tail = b"" if self.no_zeroes else bytes(124)
        self._out.append(struct.pack(">QH", exp.size, ready.flags) + tail)
        return ready

    @staticmethod
    def _parse_name(data: bytes) -> tuple[str, int]:
        """Parse a length-prefixed name at the start; returns (name, next offset)."""
        if len(data) < 4:
            raise ValueError("option data too short for a name length")
        (n,) = struct.unpack_from(">I", data)
        if n > len(data) - 4:
            raise ValueError("name length runs past the option data")
        if n > MAX_STRING:
            raise ValueError(f"name longer than {MAX_STRING} bytes")
        return data[4:4 + n].decode(), 4 + n

    def _opt_info_go(self, opt: int, data: bytes) -> Ready | None:
        try:
            name, pos = self._parse_name(data)
            if len(data) - pos < 2:
                raise ValueError("missing the number of information requests")
            (count,) = struct.unpack_from(">H", data, pos)
            pos += 2
            if len(data) - pos != 2 * count:
                raise ValueError("information request list does not match the option length")
            requests = set(struct.unpack_from(f">{count}H", data, pos))
        except (ValueError, UnicodeDecodeError) as e:
            self._error(opt, Rep.ERR_INVALID, str(e))
            return None
        exp = self.exports.lookup(name)
        if exp is None:
            self._error(opt, Rep.ERR_UNKNOWN, f"export {name!r} does not exist on this node")
            return None
        if exp.blocked:
            self._error(opt, Rep.ERR_POLICY, exp.blocked)
            return None
        flags = self._flags_for(exp)
        self._reply(opt, Rep.INFO, struct.pack(">HQH", Info.EXPORT, exp.size, flags))
        if Info.NAME in requests:
            self._reply(opt, Rep.INFO, struct.pack(">H", Info.NAME) + exp.name.encode())
        if Info.DESCRIPTION in requests and exp.description:
            self._reply(opt, Rep.INFO,
                        struct.pack(">H", Info.DESCRIPTION) + exp.description.encode())
        # Block size is sent even unrequested: min 1 imposes nothing on the client.
        self._reply(opt, Rep.INFO, struct.pack(">HIII", Info.BLOCK_SIZE, MIN_BLOCK,
                                               min(PREFERRED_BLOCK, self.max_payload),
                                               self.max_payload))
        self._reply(opt, Rep.ACK)
        if opt == Opt.GO:
            return self._ready(exp)
        return None

    def _opt_meta_context(self, opt: int, data: bytes) -> None:
        setting = opt == Opt.SET_META_CONTEXT
        if setting:
            # A SET replaces the previous selection even when it fails.
            self.meta_selected = False
            self.meta_export = None
        if not self.structured:
            self._error(opt, Rep.ERR_INVALID, "negotiate NBD_OPT_STRUCTURED_REPLY first")
            return
        try:
            name, pos = self._parse_name(data)
            if len(data) - pos < 4:
                raise ValueError("missing the number of queries")
            (count,) = struct.unpack_from(">I", data, pos)
            pos += 4
            queries: list[str] = []
            for _ in range(count):
                if len(data) - pos < 4:
                    raise ValueError("query length runs past the option data")
                (qlen,) = struct.unpack_from(">I", data, pos)
                pos += 4
                if qlen > len(data) - pos:
                    raise ValueError("query runs past the option data")
                queries.append(data[pos:pos + qlen].decode())
                pos += qlen
            if pos != len(data):
                raise ValueError("trailing bytes after the queries")
        except (ValueError, UnicodeDecodeError) as e:
            self._error(opt, Rep.ERR_INVALID, str(e))
            return
        for q in queries:
            if ":" not in q:
                self._error(opt, Rep.ERR_INVALID, f"query {q!r} has no namespace")
                return
        exp = self.exports.lookup(name)
        if exp is None:
            self._error(opt, Rep.ERR_UNKNOWN, f"export {name!r} does not exist on this node")
            return
        if setting:
            match = BASE_ALLOCATION in queries
        else:
            match = not queries or any(q in (BASE_ALLOCATION, "base:") for q in queries)
        if match:
            ctx_id = META_CONTEXT_ID if setting else 0
            self._reply(opt, Rep.META_CONTEXT,
                        struct.pack(">I", ctx_id) + BASE_ALLOCATION.encode())
        if setting and match:
            self.meta_selected = True
            self.meta_export = name
        self._reply(opt, Rep.ACK)


def utf8_bounded(message: str) -> bytes:
    """Encode a message, cut to the spec's string limit on a character boundary."""
    raw = message.encode()
    if len(raw) <= MAX_STRING:
        return raw
    return raw[:MAX_STRING].decode("utf-8", "ignore").encode()

"""Unit tests of the sans-IO NBD server state machine (twinvol.nbd.server), byte by byte.

Spec references are to NetworkBlockDevice/nbd doc/proto.md.
"""

from __future__ import annotations

import struct
import tracemalloc

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from nbdwire import (
    BOTH_CLIENT_FLAGS,
    Chunk,
    Client,
    Exports,
    OptReply,
    SimpleReply,
    as_bytes,
    check_chunk,
    check_option_reply,
    client_flags,
    info_data,
    leading_option_replies,
    meta_data,
    option,
    option_replies,
    parse_replies,
    pieces,
    request,
)

from twinvol.nbd.constants import (
    BASE_ALLOCATION,
    FLAG_C_FIXED_NEWSTYLE,
    FLAG_C_NO_ZEROES,
    FLAG_FIXED_NEWSTYLE,
    FLAG_NO_ZEROES,
    IHAVEOPT,
    MAX_OPTION_DATA,
    MAX_PAYLOAD,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    REPLY_FLAG_DONE,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Cmd,
    CmdFlag,
    Err,
    Info,
    Opt,
    Rep,
    Reply,
    TxFlag,
)
from twinvol.nbd.server import NEED_DATA, ServerConnection
from twinvol.nbd.server_events import Disconnect, ExportInfo, Ready, Request

DISK = ExportInfo("disk", 1 << 20, "a test disk")
RO = ExportInfo("ro", 64 * 1024, "read only", read_only=True)
BIG = ExportInfo("big", 1 << 40, "large enough for maximum-size reads")
PLAIN = ExportInfo("plain", 8192)  # no description

FUA = int(CmdFlag.FUA)
NO_HOLE = int(CmdFlag.NO_HOLE)
DF = int(CmdFlag.DF)
REQ_ONE = int(CmdFlag.REQ_ONE)
FAST_ZERO = int(CmdFlag.FAST_ZERO)


def exports() -> Exports:
    return Exports(DISK, RO, BIG, PLAIN)


def new_client(**kw: int) -> Client:
    return Client.new(exports(), **kw)


def in_options(flags: int = BOTH_CLIENT_FLAGS, **kw: int) -> Client:
    """A connection past the client flags, ready for options."""
    c = new_client(**kw)
    assert c.send(client_flags(flags)) == []
    assert c.take() == b""
    return c


def in_tx(export: str = "disk", *, structured: bool = False, meta: bool = False,
          **kw: int) -> Client:
    """A connection in the transmission phase with no output pending."""
    c = new_client(**kw)
    c.negotiate(export, structured=structured, meta=meta)
    assert c.take() == b""
    return c


def only_reply(c: Client) -> OptReply:
    rs = c.replies()
    assert len(rs) == 1, rs
    return rs[0]


def assert_hard_disconnect(evs: list, c: Client) -> None:
    assert len(evs) == 1 and isinstance(evs[0], Disconnect), evs
    assert evs[0].error is True
    assert c.take() == b"", "a hard disconnect sends nothing"
    # Once closed, nothing more is parsed or produced.
    assert c.send(b"\x00" * 64 + request(Cmd.READ, length=1)) == []
    assert c.conn.next_event() is NEED_DATA
    assert c.take() == b""


def expect_error(c: Client, cookie: int, err: int, *, structured: bool) -> None:
    rs = c.tx_replies()
    assert len(rs) == 1, rs
    r = rs[0]
    if structured:
        assert isinstance(r, Chunk), r
        assert r.type == Reply.ERROR and r.done and r.cookie == cookie
        assert r.error()[0] == err, (r.error(), err)
    else:
        assert r == SimpleReply(err, cookie), (r, err)


def export_flags(ev: Ready) -> TxFlag:
    return TxFlag(ev.flags)


# =====================================================================
# Handshake: greeting and client flags
# =====================================================================


def test_greeting_bytes() -> None:
    conn = ServerConnection(exports())
    g = conn.data_to_send()
    assert g == struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
    assert g[:16] == b"NBDMAGICIHAVEOPT"
    assert len(g) == 18
    assert conn.data_to_send() == b""
    assert conn.next_event() is NEED_DATA
    assert conn.data_to_send() == b""


def test_client_flags_need_all_four_bytes() -> None:
    c = new_client()
    for b in client_flags()[:3]:
        assert c.send(bytes([b])) == []
    assert c.take() == b""
    # The fourth byte completes the flags; an option then follows normally.
    assert c.send(client_flags()[3:] + option(Opt.LIST)) == []
    assert [r.rep for r in c.replies()][-1] == Rep.ACK


@pytest.mark.parametrize("flags", [0, FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES,
                                   FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES])
def test_known_client_flags_accepted(flags: int) -> None:
    c = new_client()
    assert c.send(client_flags(flags)) == []
    assert c.take() == b""
    evs = c.send(option(Opt.EXPORT_NAME, b"disk"))
    assert len(evs) == 1 and isinstance(evs[0], Ready)
    tail = 0 if flags & FLAG_C_NO_ZEROES else 124
    assert len(c.take()) == 10 + tail


@pytest.mark.parametrize("flags", [1 << 2, 1 << 31, 0xFFFFFFFF, 0b111, 1 << 16])
def test_unknown_client_flag_is_hard_disconnect(flags: int) -> None:
    # spec: "the server MUST drop the TCP connection if the client sets an unknown flag"
    c = new_client()
    evs = c.send(client_flags(flags) + option(Opt.LIST))
    assert_hard_disconnect(evs, c)


def test_eof_before_client_flags() -> None:
    c = new_client()
    c.send(b"\x00\x00")
    evs = c.eof()
    assert len(evs) == 1 and isinstance(evs[0], Disconnect)
    assert c.eof() == [], "only one Disconnect"


# =====================================================================
# Option haggling
# =====================================================================


def test_bad_option_magic_is_hard_disconnect() -> None:
    c = in_options()
    evs = c.send(option(Opt.LIST, magic=IHAVEOPT ^ 1))
    assert_hard_disconnect(evs, c)


def test_bad_option_magic_after_good_option() -> None:
    c = in_options()
    assert c.send(option(Opt.LIST)) == []
    assert c.replies()[-1].rep == Rep.ACK
    evs = c.send(b"\x00" * 16, step=1)
    assert_hard_disconnect(evs, c)


def test_option_header_split_byte_by_byte() -> None:
    c = in_options()
    data = option(Opt.INFO, info_data("disk", Info.NAME))
    for i, b in enumerate(data):
        assert c.send(bytes([b])) == []
        if i < len(data) - 1:
            assert c.take() == b"", f"reply before the option was complete (byte {i})"
    assert c.replies()[-1].rep == Rep.ACK


@pytest.mark.parametrize("no_zeroes", [False, True])
def test_export_name_success(no_zeroes: bool) -> None:
    flags = FLAG_C_FIXED_NEWSTYLE | (FLAG_C_NO_ZEROES if no_zeroes else 0)
    c = in_options(flags)
    evs = c.send(option(Opt.EXPORT_NAME, b"disk"), step=1)
    assert len(evs) == 1
    ev = evs[0]
    assert isinstance(ev, Ready)
    assert ev.export == DISK
    assert ev.structured is False and ev.meta_context is False
    out = c.take()
    expected = struct.pack(">QH", DISK.size, ev.flags) + (b"" if no_zeroes else bytes(124))
    assert out == expected
    assert ev.flags & TxFlag.HAS_FLAGS
    assert not ev.flags & TxFlag.SEND_DF, "DF must be clear without structured replies"


def test_export_name_after_structured_reply() -> None:
    c = in_options()
    c.send(option(Opt.STRUCTURED_REPLY))
    assert only_reply(c).rep == Rep.ACK
    (ev,) = c.send(option(Opt.EXPORT_NAME, b"disk"))
    assert isinstance(ev, Ready) and ev.structured is True
    assert ev.flags & TxFlag.SEND_DF
    assert c.take() == struct.pack(">QH", DISK.size, ev.flags)


def test_export_name_unknown_is_hard_disconnect_without_reply() -> None:
    # spec: "If the chosen export does not exist ... the server MUST terminate the session."
    c = in_options()
    evs = c.send(option(Opt.EXPORT_NAME, b"nope"))
    assert_hard_disconnect(evs, c)


def test_export_name_invalid_utf8_is_hard_disconnect() -> None:
    c = in_options()
    evs = c.send(option(Opt.EXPORT_NAME, b"\xff\xfe"))
    assert_hard_disconnect(evs, c)


def test_export_name_oversized_is_hard_disconnect() -> None:
    c = in_options()
    evs = c.send(option(Opt.EXPORT_NAME, length=MAX_OPTION_DATA + 1))
    assert_hard_disconnect(evs, c)


def test_list_exports() -> None:
    c = in_options()
    assert c.send(option(Opt.LIST), step=1) == []
    rs = c.replies()
    assert all(r.opt == Opt.LIST for r in rs)
    assert [r.rep for r in rs] == [Rep.SERVER] * 4 + [Rep.ACK]
    listed = [r.server() for r in rs[:-1]]
    assert listed == [(e.name, e.description) for e in (DISK, RO, BIG, PLAIN)]
    assert rs[0].data == struct.pack(">I", 4) + b"disk" + b"a test disk"


def test_list_exact_bytes_when_empty() -> None:
    c = Client.new(Exports())
    c.send(client_flags() + option(Opt.LIST))
    assert c.take() == struct.pack(">QIII", OPTION_REPLY_MAGIC, Opt.LIST, Rep.ACK, 0)


def test_list_with_data_is_invalid_and_negotiation_continues() -> None:
    c = in_options()
    c.send(option(Opt.LIST, b"x"))
    r = only_reply(c)
    assert (r.opt, r.rep) == (Opt.LIST, Rep.ERR_INVALID)
    c.send(option(Opt.LIST))
    assert c.replies()[-1].rep == Rep.ACK


@pytest.mark.parametrize("data", [b"", b"junk that SHOULD be ignored"])
def test_abort_acks_then_soft_disconnect(data: bytes) -> None:
    # spec: "The server MUST reply with NBD_REP_ACK." / "a server SHOULD ignore any data"
    c = in_options()
    evs = c.send(option(Opt.ABORT, data) + option(Opt.LIST))
    assert len(evs) == 1 and isinstance(evs[0], Disconnect) and evs[0].error is False
    assert c.take() == struct.pack(">QIII", OPTION_REPLY_MAGIC, Opt.ABORT, Rep.ACK, 0)
    assert c.conn.next_event() is NEED_DATA
    assert c.send(option(Opt.LIST)) == [] and c.take() == b""


def test_starttls_unsupported() -> None:
    c = in_options()
    c.send(option(Opt.STARTTLS))
    r = only_reply(c)
    assert (r.opt, r.rep) == (Opt.STARTTLS, Rep.ERR_UNSUP)
    assert r.data == b"TLS is not enabled on this server"
    c.send(option(Opt.STARTTLS, b"\x00"))
    r = only_reply(c)
    assert (r.opt, r.rep) == (Opt.STARTTLS, Rep.ERR_INVALID)
    (ev,) = c.send(option(Opt.GO, info_data("disk")))
    assert isinstance(ev, Ready)


def _info_items(rs: list[OptReply]) -> dict[int, bytes]:
    items: dict[int, bytes] = {}
    for r in rs:
        if r.rep == Rep.INFO:
            typ, payload = r.info()
            assert typ not in items, f"info type {typ} sent twice"
            items[typ] = payload
    return items


@pytest.mark.parametrize("opt", [Opt.INFO, Opt.GO])
def test_info_go_minimal(opt: Opt) -> None:
    c = in_options()
    evs = c.send(option(opt, info_data("disk")), step=1)
    rs = c.replies()
    assert all(r.opt == opt for r in rs)
    assert rs[-1].rep == Rep.ACK and all(r.rep == Rep.INFO for r in rs[:-1])
    items = _info_items(rs)
    assert Info.EXPORT in items, "NBD_INFO_EXPORT is mandatory before ACK"
    size, flags = struct.unpack(">QH", items[Info.EXPORT])
    assert size == DISK.size
    assert Info.NAME not in items and Info.DESCRIPTION not in items
    minimum, preferred, maximum = struct.unpack(">III", items[Info.BLOCK_SIZE])
    assert (minimum, preferred, maximum) == (1, 4096, MAX_PAYLOAD)
    if opt == Opt.INFO:
        assert evs == []
        assert c.conn.phase.value == "options"
    else:
        assert len(evs) == 1 and isinstance(evs[0], Ready)
        assert evs[0].flags == flags and evs[0].export.name == "disk"


def test_info_exact_bytes() -> None:
    c = in_options()
    c.send(option(Opt.INFO, info_data("disk")))
    out = c.take()
    ev_flags = int(TxFlag.HAS_FLAGS | TxFlag.SEND_FLUSH | TxFlag.SEND_FUA | TxFlag.CAN_MULTI_CONN
                   | TxFlag.SEND_CACHE | TxFlag.SEND_TRIM | TxFlag.SEND_WRITE_ZEROES
                   | TxFlag.SEND_FAST_ZERO)
    hdr = struct.Struct(">QIII")
    assert out[:32] == (hdr.pack(OPTION_REPLY_MAGIC, Opt.INFO, Rep.INFO, 12)
                        + struct.pack(">HQH", Info.EXPORT, DISK.size, ev_flags))
    assert out.endswith(hdr.pack(OPTION_REPLY_MAGIC, Opt.INFO, Rep.ACK, 0))


@pytest.mark.parametrize("opt", [Opt.INFO, Opt.GO])
def test_info_go_name_and_description_when_requested(opt: Opt) -> None:
    c = in_options()
    # 0x7fff is an information type the server does not know: it MUST be ignored.
    c.send(option(opt, info_data("disk", Info.DESCRIPTION, 0x7FFF, Info.NAME)))
    items = _info_items(c.replies())
    assert items[Info.NAME] == b"disk"
    assert items[Info.DESCRIPTION] == b"a test disk"
    assert Info.EXPORT in items and Info.BLOCK_SIZE in items


def test_info_then_go_same_information() -> None:
    # spec: no intervening options and same parameters -> "the server MUST reply with the
    # same set of information, such as transmission flags in the NBD_INFO_EXPORT reply"
    c = in_options()
    c.send(option(Opt.INFO, info_data("ro", Info.NAME)))
    info = _info_items(c.replies())
    (ev,) = c.send(option(Opt.GO, info_data("ro", Info.NAME)))
    go = _info_items(c.replies())
    assert info == go
    assert isinstance(ev, Ready) and struct.unpack(">QH", go[Info.EXPORT]) == (RO.size, ev.flags)


@pytest.mark.parametrize("opt", [Opt.INFO, Opt.GO])
def test_info_go_unknown_export(opt: Opt) -> None:
    c = in_options()
    evs = c.send(option(opt, info_data("nope", Info.NAME)))
    assert evs == []
    r = only_reply(c)  # "the server SHOULD NOT send NBD_REP_INFO replies"
    assert (r.opt, r.rep) == (opt, Rep.ERR_UNKNOWN)
    # negotiation continues
    (ev,) = c.send(option(Opt.GO, info_data("disk")))
    assert isinstance(ev, Ready)


_NAME4097 = b"n" * 4097

MALFORMED_INFO = {
    "empty": b"",
    "short-name-length": b"\x00\x00\x00",
    "name-past-end": struct.pack(">I", 10) + b"disk",
    "missing-count": struct.pack(">I", 4) + b"disk",
    "half-count": struct.pack(">I", 4) + b"disk\x00",
    "count-too-big": struct.pack(">I", 4) + b"disk" + struct.pack(">HH", 2, Info.NAME),
    "count-too-small": struct.pack(">I", 4) + b"disk" + struct.pack(">HH", 0, Info.NAME),
    "odd-trailing-byte": struct.pack(">I", 4) + b"disk" + struct.pack(">HHB", 1, 1, 0),
    "name-over-4096": struct.pack(">I", len(_NAME4097)) + _NAME4097 + b"\x00\x00",
    "name-not-utf8": struct.pack(">I", 2) + b"\xc3\x28" + b"\x00\x00",
}


@pytest.mark.parametrize("opt", [Opt.INFO, Opt.GO])
@pytest.mark.parametrize("data", MALFORMED_INFO.values(), ids=MALFORMED_INFO.keys())
def test_info_go_malformed_is_invalid(opt: Opt, data: bytes) -> None:
    c = in_options()
    assert c.send(option(opt, data)) == []
    r = only_reply(c)
    assert (r.opt, r.rep) == (opt, Rep.ERR_INVALID)
    (ev,) = c.send(option(Opt.GO, info_data("disk")))
    assert isinstance(ev, Ready)


@pytest.mark.parametrize("client", [FLAG_C_FIXED_NEWSTYLE, BOTH_CLIENT_FLAGS])
def test_go_enters_transmission_without_padding(client: int) -> None:
    # spec: "The server MUST NOT send any zero padding bytes after the NBD_REP_ACK data,
    # whether or not the client negotiated the NBD_FLAG_C_NO_ZEROES flag."
    c = in_options(client)
    # A request pipelined right behind GO must be parsed as a transmission request.
    evs = c.send(option(Opt.GO, info_data("disk")) + request(Cmd.READ, cookie=9, length=512))
    assert [type(e) for e in evs] == [Ready, Request]
    assert evs[1] == Request(Cmd.READ, 0, 9, 0, 512, None)
    out = c.take()
    assert out.endswith(struct.pack(">QIII", OPTION_REPLY_MAGIC, Opt.GO, Rep.ACK, 0))
    option_replies(out)


@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize("name", ["disk", "ro"])
def test_transmission_flags(structured: bool, name: str) -> None:
    ev = new_client().negotiate(name, structured=structured)
    f = export_flags(ev)
    assert TxFlag.HAS_FLAGS in f
    assert TxFlag.SEND_FLUSH in f and TxFlag.SEND_FUA in f
    assert (TxFlag.SEND_DF in f) == structured
    ro = name == "ro"
    assert (TxFlag.READ_ONLY in f) == ro
    assert (TxFlag.SEND_TRIM in f) == (not ro)
    assert (TxFlag.SEND_WRITE_ZEROES in f) == (not ro)
    # spec: SEND_FAST_ZERO "MUST [be] 0 if NBD_FLAG_SEND_WRITE_ZEROES is not set"
    if TxFlag.SEND_FAST_ZERO in f:
        assert TxFlag.SEND_WRITE_ZEROES in f
    assert ev.structured is structured
    assert ev.export.read_only is ro


def test_structured_reply() -> None:
    c = in_options()
    c.send(option(Opt.STRUCTURED_REPLY))
    assert c.take() == struct.pack(">QIII", OPTION_REPLY_MAGIC, Opt.STRUCTURED_REPLY, Rep.ACK, 0)
    c.send(option(Opt.STRUCTURED_REPLY))
    r = only_reply(c)
    assert (r.opt, r.rep) == (Opt.STRUCTURED_REPLY, Rep.ERR_INVALID)
    (ev,) = c.send(option(Opt.GO, info_data("disk")))
    assert isinstance(ev, Ready) and ev.structured is True


def test_structured_reply_with_data_is_invalid_and_not_negotiated() -> None:
    c = in_options()
    c.send(option(Opt.STRUCTURED_REPLY, b"\x00"))
    r = only_reply(c)
    assert (r.opt, r.rep) == (Opt.STRUCTURED_REPLY, Rep.ERR_INVALID)
    (ev,) = c.send(option(Opt.GO, info_data("disk")))
    assert isinstance(ev, Ready) and ev.structured is False
    assert not ev.flags & TxFlag.SEND_DF


# ---- metadata contexts ---------------------------------------------------


def structured_options() -> Client:
    c = in_options()
    c.send(option(Opt.STRUCTURED_REPLY))
    assert only_reply(c).rep == Rep.ACK
    return c


def meta(c: Client, opt: Opt, name: str | bytes, *queries: str | bytes) -> list[OptReply]:
    assert c.send(option(opt, meta_data(name, *queries))) == []
    rs = c.replies()
    assert rs and rs[-1].final and all(not r.final for r in rs[:-1]), rs
    assert all(r.opt == opt for r in rs)
    return rs


@pytest.mark.parametrize("opt", [Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT])
def test_meta_context_before_structured_reply_is_invalid(opt: Opt) -> None:
    c = in_options()
    rs = meta(c, opt, "disk", BASE_ALLOCATION)
    assert [r.rep for r in rs] == [Rep.ERR_INVALID]
    (ev,) = c.send(option(Opt.GO, info_data("disk")))
    assert isinstance(ev, Ready) and ev.meta_context is False


@pytest.mark.parametrize("queries", [(), ("base:",), (BASE_ALLOCATION,),
                                     ("x-other:thing", "base:")])
def test_list_meta_context_lists_base_allocation(queries: tuple[str, ...]) -> None:
    c = structured_options()
    rs = meta(c, Opt.LIST_META_CONTEXT, "disk", *queries)
    assert [r.rep for r in rs] == [Rep.META_CONTEXT, Rep.ACK]
    # spec: "The metadata context ID in these replies is reserved and SHOULD be set to zero"
    assert rs[0].meta_context() == (0, BASE_ALLOCATION)
    assert rs[0].data == struct.pack(">I", 0) + b"base:allocation"


@pytest.mark.parametrize("queries", [("base:nonexistent",), ("x-foo:bar",), ("qemu:dirty",)])
def test_list_meta_context_ignores_unknown(queries: tuple[str, ...]) -> None:
    # spec: "the server MUST ignore query strings belonging to an unknown namespace.
    # If none of the query strings find any metadata contexts, the server MUST send a
    # single reply of type NBD_REP_ACK."
    c = structured_options()
    assert [r.rep for r in meta(c, Opt.LIST_META_CONTEXT, "disk", *queries)] == [Rep.ACK]


def test_list_meta_context_does_not_select() -> None:
    c = structured_options()
    meta(c, Opt.LIST_META_CONTEXT, "disk", BASE_ALLOCATION)
    (ev,) = c.send(option(Opt.GO, info_data("disk")))
    assert isinstance(ev, Ready) and ev.meta_context is False


def test_set_meta_context_selects_base_allocation() -> None:
    c = structured_options()
    rs = meta(c, Opt.SET_META_CONTEXT, "disk", "x-foo:bar", BASE_ALLOCATION, "base:")
    assert [r.rep for r in rs] == [Rep.META_CONTEXT, Rep.ACK]
    ctx_id, name = rs[0].meta_context()
    assert name == BASE_ALLOCATION and ctx_id != 0
    (ev,) = c.send(option(Opt.GO, info_data("disk")))
    assert isinstance(ev, Ready) and ev.meta_context is True and ev.structured is True


@pytest.mark.parametrize("queries", [(), ("base:",), ("x-foo:bar",), ("base:nonexistent",)])
def test_set_meta_context_selecting_nothing(queries: tuple[str, ...]) -> None:
    # spec: "If zero queries are sent, the server MUST select no metadata contexts";
    # "base:" - "the server MUST ignore this form during NBD_OPT_SET_META_CONTEXT"
    c = structured_options()
    assert [r.rep for r in meta(c, Opt.SET_META_CONTEXT, "disk", *queries)] == [Rep.ACK]
    (ev,) = c.send(option(Opt.GO, info_data("disk")))
    assert isinstance(ev, Ready) and ev.meta_context is False


def test_set_meta_context_for_other_export_than_go() -> None:
    c = structured_options()
    meta(c, Opt.SET_META_CONTEXT, "ro", BASE_ALLOCATION)
    (ev,) = c.send(option(Opt.GO, info_data("disk")))
    assert isinstance(ev, Ready) and ev.meta_context is False
    assert c.replies()[-1].rep == Rep.ACK
    assert c.send(request(Cmd.BLOCK_STATUS, cookie=4, length=512)) == []
    expect_error(c, 4, Err.EINVAL, structured=True)


def test_set_meta_context_export_name_path() -> None:
    c = structured_options()
    meta(c, Opt.SET_META_CONTEXT, "disk", BASE_ALLOCATION)
    (ev,) = c.send(option(Opt.EXPORT_NAME, b"disk"))
    assert isinstance(ev, Ready) and ev.meta_context is True


@pytest.mark.parametrize("second", [
    pytest.param(meta_data("disk"), id="zero-queries"),
    pytest.param(b"\x00\x00\x00\x04disk", id="malformed"),
    pytest.param(meta_data("nope", BASE_ALLOCATION), id="unknown-export"),
    pytest.param(meta_data("disk", "nocolon"), id="no-namespace"),
])
def test_set_meta_context_replaces_selection_even_when_failing(second: bytes) -> None:
    # spec: "Issuing this command replaces all previously-set metadata contexts
    # (including when this command fails)"
    c = structured_options()
    meta(c, Opt.SET_META_CONTEXT, "disk", BASE_ALLOCATION)
    c.send(option(Opt.SET_META_CONTEXT, second))
    assert c.replies()[-1].final
    (ev,) = c.send(option(Opt.GO, info_data("disk")))
    assert isinstance(ev, Ready) and ev.meta_context is False


def test_oversized_set_meta_context_replaces_selection() -> None:
    # spec (NBD_OPT_SET_META_CONTEXT): "Issuing this command replaces all previously-set
    # metadata contexts (including when this command fails)"
    c = structured_options()
    meta(c, Opt.SET_META_CONTEXT, "disk", BASE_ALLOCATION)
    c.send(option(Opt.SET_META_CONTEXT, bytes(MAX_OPTION_DATA + 1)))
    assert only_reply(c).rep == Rep.ERR_TOO_BIG
    (ev,) = c.send(option(Opt.GO, info_data("disk")))
    assert isinstance(ev, Ready)
    assert ev.meta_context is False


@pytest.mark.parametrize("opt", [Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT])
def test_meta_context_unknown_export(opt: Opt) -> None:
    c = structured_options()
    assert [r.rep for r in meta(c, opt, "nope", BASE_ALLOCATION)] == [Rep.ERR_UNKNOWN]


MALFORMED_META = {
    "empty": b"",
    "missing-count": struct.pack(">I", 4) + b"disk",
    "count-past-end": struct.pack(">I", 4) + b"disk" + struct.pack(">I", 1),
    "query-length-past-end": struct.pack(">I", 4) + b"disk" + struct.pack(">II", 1, 99) + b"base:",
    "trailing-bytes": meta_data("disk", BASE_ALLOCATION) + b"\x00",
    "query-not-utf8": struct.pack(">I", 4) + b"disk" + struct.pack(">II", 1, 2) + b"\xc3\x28",
    "no-colon": meta_data("disk", "allocation"),
}


@pytest.mark.parametrize("opt", [Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT])
@pytest.mark.parametrize("data", MALFORMED_META.values(), ids=MALFORMED_META.keys())
def test_meta_context_malformed_is_invalid(opt: Opt, data: bytes) -> None:
    # spec: "If the option request is syntactically invalid (such as a query length that
    # would require reading beyond the original length given in the option header), the
    # server MUST fail the request with NBD_REP_ERR_INVALID."
    c = structured_options()
    c.send(option(opt, data))
    r = only_reply(c)
    assert (r.opt, r.rep) == (opt, Rep.ERR_INVALID)


# ---- unknown and oversized options --------------------------------------


@pytest.mark.parametrize("opt", [0, Opt.PEEK_EXPORT, Opt.EXTENDED_HEADERS, 12, 0x7FFFFFFF,
                                 0xFFFFFFFF])
@pytest.mark.parametrize("data", [b"", b"some data"])
def test_unknown_option_unsupported_and_negotiation_continues(opt: int, data: bytes) -> None:
    c = in_options()
    assert c.send(option(opt, data), step=3) == []
    r = only_reply(c)
    assert (r.opt, r.rep) == (opt, Rep.ERR_UNSUP)
    (ev,) = c.send(option(Opt.GO, info_data("disk")))
    assert isinstance(ev, Ready)


def test_option_at_max_length_is_processed() -> None:
    c = in_options()
    c.send(option(99, bytes(MAX_OPTION_DATA)))
    assert only_reply(c).rep == Rep.ERR_UNSUP


@pytest.mark.parametrize("opt", [Opt.LIST, Opt.GO, Opt.INFO, Opt.STRUCTURED_REPLY, 99])
def test_oversized_option_skipped_and_too_big(opt: int) -> None:
    c = in_options()
    n = MAX_OPTION_DATA + 1
    data = bytes([0x5A]) * n
    stream = option(opt, data) + option(Opt.LIST)
    # everything but the last byte of the oversized data: no reply yet
    assert c.send(stream[:16 + n - 1], step=4096) == []
    assert c.take() == b""
    assert c.send(stream[16 + n - 1:], step=1) == []
    rs = c.replies()
    assert (rs[0].opt, rs[0].rep) == (opt, Rep.ERR_TOO_BIG)
    assert rs[-1].opt == Opt.LIST and rs[-1].rep == Rep.ACK
    (ev,) = c.send(option(Opt.GO, info_data("disk")))
    assert isinstance(ev, Ready)


def test_oversized_option_is_not_buffered() -> None:
    c = in_options()
    c.send(option(Opt.LIST, length=0xFFFFFFFF))
    chunk = bytes(1 << 20)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for _ in range(24):
            assert c.send(chunk) == []
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert peak < 2 << 20, f"{peak} bytes allocated while skipping 24 MiB of option data"
    assert c.take() == b""


def test_oversized_abort_still_acked() -> None:
    # spec (NBD_OPT_ABORT): "The server MUST reply with NBD_REP_ACK." ... "a server SHOULD
    # ignore any data sent by the client rather than rejecting the request as invalid."
    c = in_options()
    evs = c.send(option(Opt.ABORT, bytes(MAX_OPTION_DATA + 1)))
    assert c.replies() == [OptReply(Opt.ABORT, Rep.ACK, b"")]
    assert len(evs) == 1 and isinstance(evs[0], Disconnect) and evs[0].error is False


def test_option_error_message_is_valid_utf8() -> None:
    # spec: a string "is a sequence of UTF-8 code points ... This applies to export names
    # and error messages"; error replies' data "is an error message string".
    c = in_options()
    name = "\u20ac" * 1365  # 4095 bytes of UTF-8: a valid (if long) export name
    c.send(option(Opt.INFO, info_data(name)))
    r = option_replies(c.take())[0]
    assert r.rep == Rep.ERR_UNKNOWN
    r.data.decode()


def test_eof_during_options() -> None:
    c = in_options()
    c.send(option(Opt.LIST)[:10])
    evs = c.eof()
    assert len(evs) == 1 and isinstance(evs[0], Disconnect) and evs[0].error is False
    assert c.conn.next_event() is NEED_DATA


# =====================================================================
# Transmission
# =====================================================================


@pytest.mark.parametrize("structured", [False, True])
def test_read_request(structured: bool) -> None:
    c = in_tx(structured=structured)
    evs = c.send(request(Cmd.READ, cookie=0xDEADBEEFCAFEF00D, offset=4096, length=8192), step=1)
    assert evs == [Request(Cmd.READ, 0, 0xDEADBEEFCAFEF00D, 4096, 8192, None)]
    assert c.take() == b""


@pytest.mark.parametrize("step", [None, 1, 7])
def test_write_request_payload(step: int | None) -> None:
    c = in_tx()
    payload = bytes(range(256)) * 3
    evs = c.send(request(Cmd.WRITE, flags=FUA, cookie=2, offset=100, payload=payload), step=step)
    assert evs == [Request(Cmd.WRITE, FUA, 2, 100, len(payload), payload)]
    assert c.take() == b""


def test_caller_may_reuse_its_buffer_after_need_data() -> None:
    # server.py: "whatever the machine still needs when next_event returns NEED_DATA it has
    # copied, so the caller may then reuse its buffer"
    c = in_tx()
    stream = (request(Cmd.WRITE, cookie=1, payload=b"A" * 40)
              + request(Cmd.WRITE, cookie=2, payload=b"B" * 40)
              + request(Cmd.READ, cookie=3, length=7))
    scratch = bytearray(50)
    evs = []
    for i in range(0, len(stream), 50):
        part = stream[i:i + 50]
        scratch[:len(part)] = part
        c.conn.receive_data(memoryview(scratch)[:len(part)])
        while (ev := c.conn.next_event()) is not NEED_DATA:
            evs.append(as_bytes(ev))
        scratch[:] = b"\xff" * 50  # reuse: scribble over everything the server was given
    assert evs == [Request(Cmd.WRITE, 0, 1, 0, 40, b"A" * 40),
                   Request(Cmd.WRITE, 0, 2, 0, 40, b"B" * 40),
                   Request(Cmd.READ, 0, 3, 0, 7, None)]


def test_receive_data_accepts_bytearray_and_memoryview() -> None:
    c = in_tx()
    hdr = request(Cmd.WRITE, cookie=1, payload=b"xyz")
    c.conn.receive_data(bytearray(hdr[:10]))
    assert c.drain() == []
    c.conn.receive_data(memoryview(hdr)[10:])
    assert c.drain() == [Request(Cmd.WRITE, 0, 1, 0, 3, b"xyz")]


def test_payload_buffer_receives_payload_directly() -> None:
    c = in_tx()
    conn = c.conn
    assert conn.payload_buffer() is None, "no write in progress"
    payload = bytes(range(256)) * 40  # 10240 bytes
    # header plus the first 100 payload bytes in one receive
    assert c.send(request(Cmd.WRITE, cookie=4, offset=512, payload=payload)[:28 + 100]) == []
    view = conn.payload_buffer()
    assert view is not None and len(view) == len(payload) - 100
    view[:5000] = payload[100:5100]
    conn.payload_received(5000)
    assert c.drain() == []
    view = conn.payload_buffer()
    assert view is not None and len(view) == len(payload) - 5100
    view[:] = payload[5100:]
    conn.payload_received(len(view))
    assert c.drain() == [Request(Cmd.WRITE, 0, 4, 512, len(payload), payload)]
    assert conn.payload_buffer() is None
    # the connection keeps parsing normally afterwards, with a smaller reused buffer
    assert c.send(request(Cmd.WRITE, cookie=5, payload=b"tail")[:30]) == []
    view = conn.payload_buffer()
    assert view is not None and len(view) == 2
    view[:] = b"il"
    conn.payload_received(2)
    assert c.drain() == [Request(Cmd.WRITE, 0, 5, 0, 4, b"tail")]
    assert c.take() == b""


def test_payload_buffer_not_offered_while_bytes_are_buffered() -> None:
    c = in_tx()
    c.conn.receive_data(request(Cmd.WRITE, cookie=1, length=100))
    # bytes were received but next_event has not consumed them yet
    assert c.conn.payload_buffer() is None
    assert c.drain() == []
    assert c.conn.payload_buffer() is not None


def test_payload_buffer_not_offered_for_rejected_write() -> None:
    c = in_tx("ro")
    assert c.send(request(Cmd.WRITE, cookie=1, length=100)) == []
    assert c.conn.payload_buffer() is None, "a rejected payload is discarded, not stored"
    assert c.send(b"\x00" * 100 + request(Cmd.FLUSH, cookie=2)) == [
        Request(Cmd.FLUSH, 0, 2, 0, 0, None)]
    expect_error(c, 1, Err.EPERM, structured=False)


def test_zero_length_write() -> None:
    c = in_tx()
    evs = c.send(request(Cmd.WRITE, cookie=5, offset=DISK.size) + request(Cmd.FLUSH, cookie=6))
    assert evs == [Request(Cmd.WRITE, 0, 5, DISK.size, 0, b""),
                                          Request(Cmd.FLUSH, 0, 6, 0, 0, None)]


@pytest.mark.parametrize(("cmd", "flags", "offset", "length"), [
    (Cmd.FLUSH, 0, 0, 0),
    (Cmd.FLUSH, FUA, 0, 0),
    (Cmd.TRIM, 0, 4096, 4096),
    (Cmd.TRIM, FUA, 0, DISK.size),
    (Cmd.CACHE, 0, 0, DISK.size),
    (Cmd.WRITE_ZEROES, NO_HOLE, 512, 1024),
    (Cmd.WRITE_ZEROES, FAST_ZERO, 512, 1024),
    (Cmd.WRITE_ZEROES, FUA | NO_HOLE | FAST_ZERO, 0, DISK.size),
    (Cmd.READ, FUA, DISK.size - 1, 1),
])
def test_simple_commands(cmd: Cmd, flags: int, offset: int, length: int) -> None:
    c = in_tx()
    evs = c.send(request(cmd, flags=flags, cookie=77, offset=offset, length=length), step=5)
    assert evs == [Request(cmd, flags, 77, offset, length, None)]
    assert c.take() == b""


@pytest.mark.parametrize("flags", [0, REQ_ONE, FUA | REQ_ONE])
def test_block_status_request(flags: int) -> None:
    c = in_tx(structured=True, meta=True)
    evs = c.send(request(Cmd.BLOCK_STATUS, flags=flags, cookie=3, offset=0, length=DISK.size))
    assert evs == [Request(Cmd.BLOCK_STATUS, flags, 3, 0, DISK.size, None)]
    assert c.take() == b""


def test_read_with_df_when_structured() -> None:
    c = in_tx(structured=True)
    assert c.send(request(Cmd.READ, flags=DF, cookie=1, length=65536)) == [
        Request(Cmd.READ, DF, 1, 0, 65536, None)]


@pytest.mark.parametrize("flags", [0, FUA])
def test_disc(flags: int) -> None:
    c = in_tx()
    evs = c.send(request(Cmd.DISC, flags=flags, cookie=1) + request(Cmd.READ, length=1))
    assert len(evs) == 1 and isinstance(evs[0], Disconnect) and evs[0].error is False
    assert c.take() == b"", "there is no reply to NBD_CMD_DISC"
    assert c.send(request(Cmd.READ, length=1)) == [] and c.take() == b""
    assert c.eof() == []


@pytest.mark.parametrize("magic", [0, 0x12560953, REQUEST_MAGIC + 1, SIMPLE_REPLY_MAGIC])
def test_bad_request_magic_is_hard_disconnect(magic: int) -> None:
    c = in_tx()
    evs = c.send(request(Cmd.READ, cookie=1, length=1, magic=magic), step=1)
    assert_hard_disconnect(evs, c)


def test_bad_request_magic_after_good_request() -> None:
    c = in_tx()
    evs = c.send(request(Cmd.FLUSH, cookie=1) + b"\x00" * 28)
    assert evs[0] == Request(Cmd.FLUSH, 0, 1, 0, 0, None)
    assert_hard_disconnect(evs[1:], c)


@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize("cmd", [8, 9, 100, 0xFFFF])
def test_unknown_command_einval(structured: bool, cmd: int) -> None:
    c = in_tx(structured=structured)
    evs = c.send(request(cmd, cookie=0x1122, length=4) + request(Cmd.FLUSH, cookie=2), step=3)
    assert evs == [Request(Cmd.FLUSH, 0, 2, 0, 0, None)]
    expect_error(c, 0x1122, Err.EINVAL, structured=structured)


def test_unknown_command_exact_bytes() -> None:
    c = in_tx()
    c.send(request(42, cookie=0x0102030405060708))
    assert c.take() == struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, Err.EINVAL, 0x0102030405060708)


def test_unknown_command_structured_exact_layout() -> None:
    c = in_tx(structured=True)
    c.send(request(42, cookie=7))
    out = c.take()
    magic, flags, typ, cookie, length = struct.unpack_from(">IHHQI", out)
    assert (magic, flags, typ, cookie) == (STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, Reply.ERROR, 7)
    assert length == len(out) - 20
    err, mlen = struct.unpack_from(">IH", out, 20)
    assert err == Err.EINVAL and mlen == length - 6
    assert out[26:].decode()


BAD_FLAGS = [
    (Cmd.READ, NO_HOLE), (Cmd.READ, REQ_ONE), (Cmd.READ, FAST_ZERO), (Cmd.READ, 1 << 5),
    (Cmd.WRITE, DF), (Cmd.WRITE, NO_HOLE), (Cmd.WRITE, FAST_ZERO), (Cmd.WRITE, 1 << 15),
    (Cmd.FLUSH, NO_HOLE), (Cmd.FLUSH, REQ_ONE),
    (Cmd.TRIM, NO_HOLE), (Cmd.TRIM, DF), (Cmd.TRIM, 0xFFFF),
    (Cmd.CACHE, FAST_ZERO), (Cmd.CACHE, DF),
    (Cmd.WRITE_ZEROES, DF), (Cmd.WRITE_ZEROES, REQ_ONE), (Cmd.WRITE_ZEROES, 1 << 9),
    (Cmd.BLOCK_STATUS, NO_HOLE), (Cmd.BLOCK_STATUS, DF), (Cmd.BLOCK_STATUS, 1 << 6),
]


@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize(("cmd", "flags"), BAD_FLAGS)
def test_invalid_flags_einval(structured: bool, cmd: Cmd, flags: int) -> None:
    # spec: "The server SHOULD return NBD_EINVAL if it receives an unknown command flag. It
    # also SHOULD return NBD_EINVAL if it receives a request with a flag not explicitly
    # documented as applicable to the given request."
    c = in_tx(structured=structured, meta=structured)
    payload = b"\xab" * 100 if cmd == Cmd.WRITE else b""
    stream = (request(cmd, flags=flags, cookie=31, offset=0, length=100, payload=payload)
              + request(Cmd.READ, cookie=32, length=10))
    evs = c.send(stream, step=9)
    # the payload of a rejected write is consumed, so the next request parses
    assert evs == [Request(Cmd.READ, 0, 32, 0, 10, None)]
    expect_error(c, 31, Err.EINVAL, structured=structured)


def test_df_without_structured_replies_einval() -> None:
    c = in_tx(structured=False)
    c.send(request(Cmd.READ, flags=DF, cookie=1, length=512))
    expect_error(c, 1, Err.EINVAL, structured=False)


PAST_END_CASES = [
    pytest.param(structured, cmd, err, id=f"{cmd.name}-{'structured' if structured else 'simple'}")
    for structured in (False, True)
    for cmd, err in [(Cmd.READ, Err.EINVAL), (Cmd.TRIM, Err.EINVAL), (Cmd.CACHE, Err.EINVAL),
                     (Cmd.BLOCK_STATUS, Err.EINVAL), (Cmd.WRITE, Err.ENOSPC),
                     (Cmd.WRITE_ZEROES, Err.ENOSPC)]
    if structured or cmd != Cmd.BLOCK_STATUS  # block status needs structured replies
]


@pytest.mark.parametrize(("structured", "cmd", "err"), PAST_END_CASES)
@pytest.mark.parametrize(("offset", "length"), [
    (DISK.size, 1), (DISK.size - 1, 2), (0, DISK.size + 1), (DISK.size + 4096, 4096),
    ((1 << 64) - 1, 1), ((1 << 64) - 4096, 8192),
])
def test_past_end_of_export(structured: bool, cmd: Cmd, err: int, offset: int,
                            length: int) -> None:
    # spec: "The server SHOULD return NBD_ENOSPC if it receives a write request including one
    # or more sectors beyond the size of the device ... It SHOULD return NBD_EINVAL if it
    # receives a read or trim request including one or more sectors beyond the size";
    # write zeroes -> ENOSPC, block status -> EINVAL.
    c = in_tx(structured=structured, meta=structured)
    payload = b""
    if cmd == Cmd.WRITE and length > 8192:  # keep the payload small, still past the end
        offset, length = max(offset, DISK.size - 4096), 8192
    if cmd == Cmd.WRITE:
        payload = b"\x11" * length
    stream = (request(cmd, cookie=5, offset=offset, length=length, payload=payload)
              + request(Cmd.FLUSH, cookie=6))
    evs = c.send(stream, step=11)
    assert evs == [Request(Cmd.FLUSH, 0, 6, 0, 0, None)]
    expect_error(c, 5, err, structured=structured)


@pytest.mark.parametrize("cmd", [Cmd.READ, Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES, Cmd.CACHE])
def test_request_ending_exactly_at_end_is_valid(cmd: Cmd) -> None:
    c = in_tx()
    payload = b"\x01" * 512 if cmd == Cmd.WRITE else b""
    evs = c.send(request(cmd, cookie=8, offset=DISK.size - 512, length=512, payload=payload))
    assert len(evs) == 1 and isinstance(evs[0], Request) and evs[0].command == cmd
    assert c.take() == b""


@pytest.mark.parametrize("cmd", [Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES])
@pytest.mark.parametrize("step", [None, 1])
def test_read_only_export_eperm(cmd: Cmd, step: int | None) -> None:
    # spec: "the server ... SHOULD return NBD_EPERM if it receives a write or trim request on a
    # read-only export"; write zeroes: "It SHOULD return NBD_EPERM if it receives a write
    # zeroes request on a read-only export."
    c = in_tx("ro")
    payload = b"\x22" * 300 if cmd == Cmd.WRITE else b""
    stream = (request(cmd, cookie=12, offset=0, length=300, payload=payload)
              + request(Cmd.READ, cookie=13, length=300))
    evs = c.send(stream, step=step)
    assert evs == [Request(Cmd.READ, 0, 13, 0, 300, None)]
    expect_error(c, 12, Err.EPERM, structured=False)


@pytest.mark.parametrize(("cmd", "length"), [(Cmd.READ, 10), (Cmd.FLUSH, 0), (Cmd.CACHE, 10)])
def test_read_only_export_allows_reads(cmd: Cmd, length: int) -> None:
    c = in_tx("ro")
    evs = c.send(request(cmd, cookie=1, length=length))
    assert evs == [Request(cmd, 0, 1, 0, length, None)]


def test_read_max_payload_ok_and_over_einval() -> None:
    c = in_tx("big")
    evs = c.send(request(Cmd.READ, cookie=1, length=MAX_PAYLOAD)
                 + request(Cmd.READ, cookie=2, length=MAX_PAYLOAD + 1))
    assert evs == [Request(Cmd.READ, 0, 1, 0, MAX_PAYLOAD, None)]
    expect_error(c, 2, Err.EINVAL, structured=False)


def test_read_over_max_payload_with_df_eoverflow() -> None:
    # spec: "Use of this flag MAY trigger an NBD_EOVERFLOW error chunk, if the request length
    # is too large."
    c = in_tx("big", structured=True)
    c.send(request(Cmd.READ, flags=DF, cookie=3, length=MAX_PAYLOAD + 1))
    expect_error(c, 3, Err.EOVERFLOW, structured=True)


def test_structured_read_over_max_payload_eoverflow() -> None:
    # spec (READ): "the server is also permitted to reject large read requests up front with
    # NBD_EOVERFLOW, so a client should be prepared to retry with smaller requests".
    c = in_tx("big", structured=True)
    c.send(request(Cmd.READ, cookie=4, length=MAX_PAYLOAD + 1))
    expect_error(c, 4, Err.EOVERFLOW, structured=True)


def test_write_over_max_payload_hard_disconnect_without_allocating() -> None:
    c = in_tx("big")
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        evs = c.send(request(Cmd.WRITE, cookie=1, length=0xFFFFFFFF) + b"\x00" * 1000)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"{peak} bytes allocated for a write that is refused"
    assert_hard_disconnect(evs, c)


def test_write_over_custom_max_payload() -> None:
    c = in_tx(max_payload=4096)
    ok = c.send(request(Cmd.WRITE, cookie=1, payload=b"x" * 4096))
    assert ok == [Request(Cmd.WRITE, 0, 1, 0, 4096, b"x" * 4096)]
    evs = c.send(request(Cmd.WRITE, cookie=2, length=4097))
    assert_hard_disconnect(evs, c)


def test_block_status_without_meta_context_einval() -> None:
    # spec: "Servers SHOULD reply with NBD_EINVAL to clients sending NBD_CMD_BLOCK_STATUS
    # without selecting at least one metadata context."
    for structured in (False, True):
        c = in_tx(structured=structured)
        c.send(request(Cmd.BLOCK_STATUS, cookie=9, length=512))
        expect_error(c, 9, Err.EINVAL, structured=structured)


def test_block_status_zero_length_einval_without_disconnect() -> None:
    c = in_tx(structured=True, meta=True)
    evs = c.send(request(Cmd.BLOCK_STATUS, cookie=9, length=0) + request(Cmd.FLUSH, cookie=10))
    assert evs == [Request(Cmd.FLUSH, 0, 10, 0, 0, None)]
    expect_error(c, 9, Err.EINVAL, structured=True)


@pytest.mark.parametrize("rejected", [False, True])
def test_eof_in_write_payload_is_error(rejected: bool) -> None:
    c = in_tx("ro" if rejected else "disk")
    assert c.send(request(Cmd.WRITE, cookie=1, length=100) + b"\x00" * 50) == []
    evs = c.eof()
    assert len(evs) == 1 and isinstance(evs[0], Disconnect) and evs[0].error is True
    assert c.take() == b""


def test_eof_between_requests_is_clean() -> None:
    c = in_tx()
    evs = c.send(request(Cmd.FLUSH, cookie=1))
    evs += c.eof()
    assert isinstance(evs[-1], Disconnect) and evs[-1].error is False
    assert c.eof() == []


def test_eof_in_request_header() -> None:
    c = in_tx()
    c.send(request(Cmd.READ, cookie=1, length=1)[:20])
    evs = c.eof()
    assert len(evs) == 1 and isinstance(evs[0], Disconnect)


def test_pipelined_requests_in_one_buffer() -> None:
    c = in_tx(structured=True, meta=True)
    stream = b"".join([
        request(Cmd.WRITE, cookie=1, offset=0, payload=b"abc"),
        request(Cmd.READ, cookie=2, offset=0, length=3),
        request(Cmd.READ, flags=NO_HOLE, cookie=3, length=3),  # rejected
        request(Cmd.WRITE, cookie=4, offset=DISK.size, payload=b"zz"),  # rejected, consumed
        request(Cmd.BLOCK_STATUS, flags=REQ_ONE, cookie=5, length=4096),
        request(Cmd.WRITE_ZEROES, flags=NO_HOLE, cookie=6, offset=10, length=20),
        request(Cmd.FLUSH, cookie=7),
        request(Cmd.DISC, cookie=8),
        request(Cmd.READ, cookie=9, length=1),  # after DISC: ignored
    ])
    evs = c.send(stream)
    assert evs == [
        Request(Cmd.WRITE, 0, 1, 0, 3, b"abc"),
        Request(Cmd.READ, 0, 2, 0, 3, None),
        Request(Cmd.BLOCK_STATUS, REQ_ONE, 5, 0, 4096, None),
        Request(Cmd.WRITE_ZEROES, NO_HOLE, 6, 10, 20, None),
        Request(Cmd.FLUSH, 0, 7, 0, 0, None),
        Disconnect("client sent NBD_CMD_DISC", False),
    ]
    rs = c.tx_replies()
    assert [(r.cookie, r.error()[0]) for r in rs if isinstance(r, Chunk)] == [
        (3, Err.EINVAL), (4, Err.ENOSPC)]
    assert len(rs) == 2


# ---- reply builders ---------------------------------------------------------


def test_reply_ok_bytes() -> None:
    for structured in (False, True):
        c = in_tx(structured=structured)
        assert c.conn.reply_ok(0xA1B2) == struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, 0xA1B2)


def test_reply_read_simple() -> None:
    c = in_tx()
    parts = c.conn.reply_read(5, 4096, b"hello")
    assert b"".join(bytes(p) for p in parts) == struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, 5) + (
        b"hello")
    assert parse_replies(b"".join(bytes(p) for p in parts), {5: 5}) == [
        SimpleReply(0, 5, b"hello")]


def test_reply_read_structured() -> None:
    c = in_tx(structured=True)
    data = memoryview(b"0123456789")
    parts = c.conn.reply_read(6, 4096, data)
    wire = b"".join(bytes(p) for p in parts)
    assert wire == struct.pack(">IHHQIQ", STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE,
                               Reply.OFFSET_DATA, 6, 18, 4096) + b"0123456789"
    (chunk,) = parse_replies(wire)
    assert isinstance(chunk, Chunk) and chunk.done
    check_chunk(chunk)


def test_zero_length_read_structured_reply_is_valid() -> None:
    # spec (NBD_REPLY_TYPE_OFFSET_DATA): "*length* MUST be at least 9"; read: "each chunk MUST
    # describe at least one byte"; and a zero-length read "the server SHOULD NOT disconnect",
    # so the server must answer it with something valid (NONE chunk or an error).
    c = in_tx(structured=True)
    (ev,) = c.send(request(Cmd.READ, cookie=1, offset=0, length=0))
    assert isinstance(ev, Request)
    wire = b"".join(bytes(p) for p in c.conn.reply_read(ev.cookie, ev.offset, b""))
    for chunk in parse_replies(wire):
        assert isinstance(chunk, Chunk)
        check_chunk(chunk)


def test_reply_read_hole() -> None:
    c = in_tx()
    assert c.conn.reply_read_hole(3, 0, 4) == struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, 3) + (
        bytes(4))
    s = in_tx(structured=True)
    wire = s.conn.reply_read_hole(3, 512, 4096)
    assert wire == struct.pack(">IHHQIQI", STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE,
                               Reply.OFFSET_HOLE, 3, 12, 512, 4096)
    (chunk,) = parse_replies(wire)
    assert isinstance(chunk, Chunk)
    check_chunk(chunk)


def test_reply_error_simple() -> None:
    c = in_tx()
    assert c.conn.reply_error(7, Err.EIO, "ignored") == [
        struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, Err.EIO, 7)]


def test_reply_error_structured() -> None:
    c = in_tx(structured=True)
    wire = b"".join(c.conn.reply_error(7, Err.EIO, "disk on fire"))
    assert wire == (struct.pack(">IHHQI", STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, Reply.ERROR,
                                7, 6 + 12) + struct.pack(">IH", Err.EIO, 12) + b"disk on fire")
    empty = b"".join(c.conn.reply_error(8, Err.ENOSPC))
    assert empty == (struct.pack(">IHHQI", STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, Reply.ERROR,
                                 8, 6) + struct.pack(">IH", Err.ENOSPC, 0))


def test_reply_error_message_capped_at_4096() -> None:
    c = in_tx(structured=True)
    (chunk,) = parse_replies(b"".join(c.conn.reply_error(1, Err.EIO, "x" * 10000)))
    assert isinstance(chunk, Chunk)
    check_chunk(chunk)
    assert chunk.error() == (Err.EIO, "x" * 4096)


def test_reply_block_status() -> None:
    c = in_tx(structured=True, meta=True)
    wire = c.conn.reply_block_status(11, [(4096, 0), (8192, 3)])
    assert wire == (struct.pack(">IHHQI", STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE,
                                Reply.BLOCK_STATUS, 11, 4 + 16)
                    + struct.pack(">IIIII", 1, 4096, 0, 8192, 3))


def test_block_status_reply_uses_selected_context_id() -> None:
    c = new_client()
    c.send(client_flags() + option(Opt.STRUCTURED_REPLY)
           + option(Opt.SET_META_CONTEXT, meta_data("disk", BASE_ALLOCATION)))
    rs = c.replies()
    ctx_id, _ = rs[1].meta_context()
    (ev,) = c.send(option(Opt.GO, info_data("disk")))
    assert isinstance(ev, Ready) and ev.meta_context
    wire = c.conn.reply_block_status(1, [(512, 1)])
    (chunk,) = parse_replies(wire)
    assert isinstance(chunk, Chunk)
    check_chunk(chunk)
    assert struct.unpack_from(">I", chunk.payload)[0] == ctx_id


# =====================================================================
# Property tests
# =====================================================================

PROP = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

SIZE = DISK.size
u64 = st.integers(0, (1 << 64) - 1)


@st.composite
def valid_requests(draw: st.DrawFn, structured: bool) -> Request:
    cmds = [Cmd.READ, Cmd.WRITE, Cmd.FLUSH, Cmd.TRIM, Cmd.CACHE, Cmd.WRITE_ZEROES]
    if structured:
        cmds.append(Cmd.BLOCK_STATUS)
    cmd = draw(st.sampled_from(cmds))
    cookie = draw(u64)
    fua = draw(st.sampled_from([0, FUA]))
    if cmd == Cmd.FLUSH:
        return Request(cmd, fua, cookie, 0, 0, None)
    if cmd == Cmd.WRITE:
        payload = draw(st.binary(max_size=700))
        offset = draw(st.integers(0, SIZE - len(payload)))
        return Request(cmd, fua, cookie, offset, len(payload), payload)
    offset = draw(st.integers(0, SIZE))
    low = 1 if cmd == Cmd.BLOCK_STATUS else 0
    if offset + low > SIZE:
        offset = SIZE - low
    length = draw(st.one_of(st.integers(low, min(SIZE - offset, 4096)),
                            st.integers(low, SIZE - offset)))
    extra = 0
    if cmd == Cmd.READ and structured:
        extra = draw(st.sampled_from([0, DF]))
    elif cmd == Cmd.WRITE_ZEROES:
        extra = draw(st.sampled_from([0, NO_HOLE, FAST_ZERO, NO_HOLE | FAST_ZERO]))
    elif cmd == Cmd.BLOCK_STATUS:
        extra = draw(st.sampled_from([0, REQ_ONE]))
    return Request(cmd, fua | extra, cookie, offset, length, None)


def encode(r: Request) -> bytes:
    return request(r.command, flags=r.flags, cookie=r.cookie, offset=r.offset, length=r.length,
                   payload=bytes(r.data) if r.data is not None else b"")


@st.composite
def split_points(draw: st.DrawFn, n: int) -> list[int]:
    mode = draw(st.sampled_from(["random", "bytewise", "whole", "small"]))
    if mode == "bytewise":
        return list(range(1, n))
    if mode == "whole":
        return []
    if mode == "small":
        step = draw(st.integers(1, 40))
        return list(range(step, n, step))
    return draw(st.lists(st.integers(1, max(1, n - 1)), max_size=60))


delivery = st.sampled_from([(False, False), (True, False), (False, True), (True, True)])


@PROP
@given(st.data(), st.booleans(), delivery)
def test_property_requests_parse_regardless_of_split(data: st.DataObject, structured: bool,
                                                     mode: tuple[bool, bool]) -> None:
    reqs = data.draw(st.lists(valid_requests(structured), max_size=25), label="requests")
    disc = data.draw(st.booleans(), label="disc")
    stream = b"".join(encode(r) for r in reqs)
    if disc:
        stream += request(Cmd.DISC, cookie=1)
    cuts = data.draw(split_points(len(stream)), label="cuts")
    c = in_tx(structured=structured, meta=structured)
    scratch, direct = mode
    got = c.send_pieces(pieces(stream, cuts), scratch=scratch, direct=direct)
    expected: list[Request | Disconnect] = list(reqs)
    if disc:
        assert isinstance(got[-1], Disconnect) and got[-1].error is False
        got = got[:-1]
    assert got == expected
    assert c.take() == b"", "valid requests produce no output from the state machine"
    assert c.conn.next_event() is NEED_DATA


# ---- garbage -------------------------------------------------------------

def mostly(common: st.SearchStrategy, rare: st.SearchStrategy) -> st.SearchStrategy:
    """`common` about nine times in ten, else `rare`."""
    return st.integers(0, 9).flatmap(lambda i: rare if i == 0 else common)


_CMDS_NO_DISC = [c for c in Cmd if c != Cmd.DISC]
cmd_numbers = mostly(st.sampled_from(_CMDS_NO_DISC),
                     st.one_of(st.sampled_from([Cmd.DISC, 8, 0xFFFF]), st.integers(0, 0xFFFF)))
flag_numbers = mostly(st.sampled_from([0, 0, 0, FUA, DF, NO_HOLE, REQ_ONE, FAST_ZERO,
                                       NO_HOLE | FAST_ZERO]),
                      st.integers(0, 0xFFFF))
lengths = mostly(st.integers(0, 300),
                 st.one_of(st.integers(0, 0xFFFFFFFF),
                           st.sampled_from([MAX_PAYLOAD, MAX_PAYLOAD + 1, 0xFFFFFFFF])))
offsets = mostly(st.integers(0, SIZE + 10), u64)


@st.composite
def request_garbage(draw: st.DrawFn) -> bytes:
    """Mostly plausible requests (valid or not), sometimes raw junk or misframed data."""
    if draw(st.integers(0, 14)) == 0:
        return draw(st.binary(max_size=64))
    cmd, length = draw(cmd_numbers), draw(lengths)
    hdr = struct.pack(">IHHQQI", REQUEST_MAGIC, draw(flag_numbers), cmd, draw(u64),
                      draw(offsets), length)
    if cmd == Cmd.WRITE and length <= 300:
        return hdr + draw(st.binary(min_size=length, max_size=length))
    if draw(st.integers(0, 14)) == 0:
        return hdr + draw(st.binary(max_size=300))  # misframed
    return hdr


def check_tx_event(ev: object, size: int, structured: bool, max_payload: int) -> None:
    assert isinstance(ev, Request | Disconnect), ev
    if isinstance(ev, Request):
        assert ev.command in set(Cmd) and ev.command != Cmd.DISC
        allowed = {Cmd.READ: FUA | (DF if structured else 0), Cmd.WRITE: FUA, Cmd.FLUSH: FUA,
                   Cmd.TRIM: FUA, Cmd.CACHE: FUA, Cmd.WRITE_ZEROES: FUA | NO_HOLE | FAST_ZERO,
                   Cmd.BLOCK_STATUS: FUA | REQ_ONE}[ev.command]
        assert ev.flags & ~allowed == 0, ev
        if ev.command != Cmd.FLUSH:
            assert ev.offset + ev.length <= size, ev
        if ev.command == Cmd.WRITE:
            assert ev.data is not None and len(ev.data) == ev.length
        else:
            assert ev.data is None
        if ev.command in (Cmd.READ, Cmd.WRITE):
            assert ev.length <= max_payload
        if ev.command == Cmd.BLOCK_STATUS:
            assert structured and ev.length > 0


@PROP
@given(st.data(), st.booleans(), st.sampled_from(["disk", "ro"]), delivery)
def test_property_garbage_in_transmission(data: st.DataObject, structured: bool,
                                          name: str, mode: tuple[bool, bool]) -> None:
    parts = data.draw(st.lists(request_garbage(), max_size=12), label="garbage")
    stream = b"".join(parts)
    cuts = data.draw(split_points(len(stream)), label="cuts")
    eof = data.draw(st.booleans(), label="eof")
    c = in_tx(name, structured=structured, meta=structured)
    size = exports().by_name[name].size
    scratch, direct = mode
    evs = c.send_pieces(pieces(stream, cuts), scratch=scratch, direct=direct)
    if eof:
        evs += c.eof()
    for i, ev in enumerate(evs):
        check_tx_event(ev, size, structured, MAX_PAYLOAD)
        if isinstance(ev, Disconnect):
            assert i == len(evs) - 1, "nothing after a Disconnect"
            if not ev.error:
                assert eof or "DISC" in ev.reason
    event(f"tx garbage: {min(sum(isinstance(e, Request) for e in evs), 3)} requests, "
          f"end={[type(e).__name__ + str(getattr(e, 'error', '')) for e in evs[-1:]]}")
    out = c.take()
    # Every 28-byte header yields at most one error reply of bounded size.
    assert len(out) <= (len(stream) // 28 + 1) * 300
    for r in parse_replies(out):
        if isinstance(r, Chunk):
            check_chunk(r)
            assert r.type == Reply.ERROR
        else:
            assert r.error != 0 and r.data == b""
    assert c.conn.next_event() is NEED_DATA


option_numbers = mostly(
    st.sampled_from([Opt.LIST, Opt.STARTTLS, Opt.INFO, Opt.GO, Opt.STRUCTURED_REPLY,
                     Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT] * 3
                    + [Opt.EXPORT_NAME, Opt.ABORT, Opt.PEEK_EXPORT, Opt.EXTENDED_HEADERS]),
    st.integers(0, 0xFFFFFFFF))


@st.composite
def option_data(draw: st.DrawFn, opt: int) -> bytes:
    """Data for `opt`: mostly well-formed for it, sometimes anything."""
    names = mostly(st.sampled_from(["disk", "disk", "ro", "", "nope"]), st.text(max_size=20))
    if opt in (Opt.INFO, Opt.GO):
        natural = "info"
    elif opt in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
        natural = "meta"
    elif opt == Opt.EXPORT_NAME:
        natural = "name"
    else:
        natural = "empty"
    kind = draw(st.sampled_from([natural] * 6 + ["empty", "bytes", "info", "meta"]))
    if kind == "name":
        return draw(names).encode()
    if kind == "empty":
        return b""
    if kind == "info":
        infos = draw(st.lists(st.integers(0, 5), max_size=5))
        return info_data(draw(names), *infos)
    if kind == "meta":
        queries = draw(st.lists(st.one_of(
            st.sampled_from([BASE_ALLOCATION, "base:", "x-a:b", "nocolon", ""]),
            st.text(max_size=10)), max_size=4))
        return meta_data(draw(names), *queries)
    return draw(st.binary(max_size=300))


@st.composite
def option_garbage(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["bytes"] + ["option"] * 12 + ["lying-length"]))
    if kind == "bytes":
        return draw(st.binary(max_size=40))
    opt = draw(option_numbers)
    body = draw(option_data(opt))
    if kind == "lying-length":
        return option(opt, body, length=draw(lengths))
    return option(opt, body)


@PROP
@given(st.data())
def test_property_garbage_in_option_haggling(data: st.DataObject) -> None:
    flags = data.draw(mostly(st.sampled_from([0, 1, 2, 3]), st.integers(0, 0xFFFFFFFF)),
                      label="client flags")
    parts = data.draw(st.lists(option_garbage(), max_size=12), label="garbage")
    after = data.draw(st.lists(request_garbage(), max_size=4), label="then requests")
    stream = client_flags(flags) + b"".join(parts) + b"".join(after)
    cuts = data.draw(split_points(len(stream)), label="cuts")
    eof = data.draw(st.booleans(), label="eof")
    c = new_client()
    c.take()
    total_out = 0
    in_tx_phase = False
    evs: list[object] = []
    for p in pieces(stream, cuts) + ([b""] if eof else []):
        c.conn.receive_data(p)
        while True:
            ev = c.conn.next_event()
            out = c.conn.data_to_send()
            total_out += len(out)
            if not in_tx_phase:
                # One next_event call may handle several options before returning.
                rs, rest = leading_option_replies(out)
                for r in rs:
                    check_option_reply(r)
                if rest:
                    # only NBD_OPT_EXPORT_NAME ends with a non-option reply: size, flags and
                    # 124 zeroes unless NBD_FLAG_C_NO_ZEROES
                    assert isinstance(ev, Ready), (ev, rest)
                    assert len(rest) == (10 if flags & FLAG_C_NO_ZEROES else 134), rest
                    assert struct.unpack_from(">QH", rest) == (ev.export.size, ev.flags)
                    assert rest[10:] == bytes(len(rest) - 10)
            else:
                for r in parse_replies(out):
                    if isinstance(r, Chunk):
                        check_chunk(r)
            if ev is NEED_DATA:
                break
            evs.append(ev)
            assert isinstance(ev, Ready | Request | Disconnect)
            if isinstance(ev, Ready):
                assert not in_tx_phase, "only one Ready"
                in_tx_phase = True
                assert ev.export in (DISK, RO, BIG, PLAIN)
                assert ev.flags == c.conn.tx_flags
    for i, ev in enumerate(evs):
        if isinstance(ev, Request):
            check_tx_event(ev, c.conn.export.size, c.conn.structured,  # type: ignore[union-attr]
                           MAX_PAYLOAD)
        if isinstance(ev, Disconnect):
            assert i == len(evs) - 1
            if not ev.error:
                assert eof or "abort" in ev.reason or "DISC" in ev.reason, ev
    event(f"options garbage: ready={in_tx_phase}, "
          f"end={[type(e).__name__ + str(getattr(e, 'error', '')) for e in evs[-1:]]}")
    # Bounded amplification: a little per input byte plus one export list.
    assert total_out <= 16 * len(stream) + 4096
    assert c.conn.next_event() is NEED_DATA


# ---- one final reply per option ------------------------------------------

haggling_options = mostly(
    st.sampled_from([Opt.LIST, Opt.PEEK_EXPORT, Opt.STARTTLS, Opt.INFO, Opt.STRUCTURED_REPLY,
                     Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT, Opt.EXTENDED_HEADERS]),
    st.integers(0, 0xFFFFFFFF).filter(lambda o: o not in (Opt.EXPORT_NAME, Opt.ABORT, Opt.GO)))

NON_FINAL = {Opt.LIST: {Rep.SERVER}, Opt.INFO: {Rep.INFO},
             Opt.LIST_META_CONTEXT: {Rep.META_CONTEXT}, Opt.SET_META_CONTEXT: {Rep.META_CONTEXT}}


@PROP
@given(st.data())
def test_property_one_final_reply_per_option(data: st.DataObject) -> None:
    opts = data.draw(st.lists(haggling_options.flatmap(
        lambda o: st.tuples(st.just(o), option_data(o))), max_size=15), label="options")
    stream = client_flags() + b"".join(option(o, d) for o, d in opts)
    cuts = data.draw(split_points(len(stream)), label="cuts")
    c = new_client()
    c.take()
    assert c.send_pieces(pieces(stream, cuts)) == []
    replies = option_replies(c.take())
    pos = 0
    for opt, _d in opts:
        group: list[OptReply] = []
        while True:
            assert pos < len(replies), f"no final reply for option {opt}"
            r = replies[pos]
            pos += 1
            check_option_reply(r)
            assert r.opt == opt, (r, opt)
            group.append(r)
            if r.final:
                break
            assert r.rep in NON_FINAL.get(opt, set()), (opt, r)
        if opt not in (Opt.LIST, Opt.INFO, Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT,
                       Opt.STRUCTURED_REPLY):
            assert group[-1].rep == Rep.ERR_UNSUP or opt == Opt.STARTTLS, group
    assert pos == len(replies), "replies left over"
    event(f"haggling: {min(sum(not g.is_error for g in replies if g.final), 4)} successes")
    # negotiation is still going on: GO works
    (ev,) = c.send(option(Opt.GO, info_data("disk")))
    assert isinstance(ev, Ready)

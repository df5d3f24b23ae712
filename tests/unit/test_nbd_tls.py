"""The sans-IO server's TLS policy (NBD_OPT_STARTTLS, FORCEDTLS) and bounded option
haggling, byte by byte. Spec: NetworkBlockDevice/nbd doc/proto.md, "TLS support"."""

from __future__ import annotations

import struct

from nbdwire import BOTH_CLIENT_FLAGS, Client, Exports, client_flags, info_data, option

from twinvol.nbd.constants import OPTION_REPLY_MAGIC, Opt, Rep
from twinvol.nbd.server_events import Disconnect, ExportInfo, Ready, StartTls, TlsMode

DISK = ExportInfo("disk", 1 << 20, "a test disk")


def in_options(tls: TlsMode, **kw: int) -> Client:
    c = Client.new(Exports(DISK), tls=tls, **kw)
    assert c.send(client_flags(BOTH_CLIENT_FLAGS)) == []
    return c


def ack(opt: int) -> bytes:
    return struct.pack(">QIII", OPTION_REPLY_MAGIC, opt, Rep.ACK, 0)


def test_require_refuses_every_option_but_starttls_and_abort() -> None:
    c = in_options(TlsMode.REQUIRE)
    for opt, data in [(Opt.LIST, b""), (Opt.GO, info_data("disk")),
                      (Opt.INFO, info_data("disk")), (Opt.STRUCTURED_REPLY, b""),
                      (Opt.SET_META_CONTEXT, b"x"), (999, b"")]:
        assert c.send(option(opt, data)) == []
        (r,) = c.replies()
        assert (r.opt, r.rep) == (opt, Rep.ERR_TLS_REQD)
        assert r.data == b"this server requires TLS: send NBD_OPT_STARTTLS first"
    (ev,) = c.send(option(Opt.STARTTLS))
    assert isinstance(ev, StartTls)
    assert c.take() == ack(Opt.STARTTLS)


def test_require_export_name_without_tls_hangs_up() -> None:
    c = in_options(TlsMode.REQUIRE)
    (ev,) = c.send(option(Opt.EXPORT_NAME, b"disk"))
    assert isinstance(ev, Disconnect) and ev.error
    assert "requires TLS" in ev.reason
    assert c.take() == b""


def test_require_abort_is_still_acknowledged() -> None:
    c = in_options(TlsMode.REQUIRE)
    (ev,) = c.send(option(Opt.ABORT))
    assert isinstance(ev, Disconnect) and not ev.error
    assert c.take() == ack(Opt.ABORT)


def test_after_handshake_options_work_and_state_is_reset() -> None:
    c = in_options(TlsMode.REQUIRE)
    c.send(option(Opt.STARTTLS))
    c.take()
    assert c.conn.next_event() is not None  # NEED_DATA while the handshake runs
    c.conn.tls_started()
    assert c.conn.tls_active
    assert c.send(option(Opt.STRUCTURED_REPLY)) == []
    assert c.take() == ack(Opt.STRUCTURED_REPLY)
    # A second STARTTLS is invalid, never TLS_REQD once TLS is up.
    c.send(option(Opt.STARTTLS))
    (r,) = c.replies()
    assert (r.opt, r.rep) == (Opt.STARTTLS, Rep.ERR_INVALID)
    evs = c.send(option(Opt.GO, info_data("disk")))
    assert isinstance(evs[-1], Ready) and evs[-1].structured


def test_clear_text_agreements_are_forgotten_after_starttls() -> None:
    c = in_options(TlsMode.ALLOW)
    c.send(option(Opt.STRUCTURED_REPLY))
    c.take()
    c.send(option(Opt.STARTTLS))
    c.take()
    c.conn.tls_started()
    evs = c.send(option(Opt.GO, info_data("disk")))
    assert isinstance(evs[-1], Ready) and not evs[-1].structured


def test_allow_serves_plain_clients() -> None:
    c = in_options(TlsMode.ALLOW)
    evs = c.send(option(Opt.GO, info_data("disk")))
    assert isinstance(evs[-1], Ready)
    assert not c.conn.tls_active


def test_data_pipelined_after_starttls_is_a_protocol_error() -> None:
    c = in_options(TlsMode.ALLOW)
    (ev,) = c.send(option(Opt.STARTTLS) + option(Opt.LIST))  # no StartTls: hang up
    assert isinstance(ev, Disconnect) and ev.error
    assert ev.reason == ("client sent data after NBD_OPT_STARTTLS before the TLS "
                             "handshake")


def test_option_haggling_is_bounded() -> None:
    c = in_options(TlsMode.OFF, max_options=3)
    assert c.send(option(Opt.LIST) * 3) == []
    c.take()
    (ev,) = c.send(option(Opt.LIST))
    assert isinstance(ev, Disconnect) and ev.error
    assert ev.reason == "more than 3 options in one negotiation"
    assert c.take() == b""

"""The I/O gate's policy: what is held, what a read sees, and that held requests are
applied exactly once, in order, however often they are handed over."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from twinvol.nbd.constants import Cmd
from twinvol.vm.gate import Action, Gate, GateMode, HeldOp, decode_held, encode_held

W, T, Z, F, R = (int(Cmd.WRITE), int(Cmd.TRIM), int(Cmd.WRITE_ZEROES), int(Cmd.FLUSH),
                 int(Cmd.READ))


def test_open_forwards_everything() -> None:
    g = Gate()
    assert g.admit(W, 0, 0, 3, b"abc") is Action.FORWARD
    assert g.admit(R, 0, 0, 3) is Action.FORWARD
    assert g.held == []


def test_holding_acks_writes_in_order_and_forwards_reads() -> None:
    g = Gate()
    g.hold()
    g.stopped = True  # the VM stopped: even FUA and FLUSH are acknowledged from the queue
    assert g.admit(W, 1, 0, 3, b"abc") is Action.ACK
    assert g.admit(F, 0, 0, 0) is Action.ACK
    assert g.admit(Z, 0, 1, 1) is Action.ACK
    assert g.admit(R, 0, 0, 3) is Action.FORWARD
    assert [(op.seq, op.command) for op in g.held] == [(1, W), (2, F), (3, Z)]
    assert g.held[0].flags == 1  # FUA kept
    assert g.status()["held"] == 3 and g.held_bytes == 3


def test_flush_and_fua_while_the_guest_runs_wait_for_storage() -> None:
    """A guest that still runs may act on a FLUSH or FUA acknowledgement: those are held
    in order but answered only once on storage (SYNC); plain writes are acknowledged."""
    g = Gate()
    g.hold()
    assert g.admit(W, 0, 0, 3, b"abc") is Action.ACK
    assert g.admit(F, 0, 0, 0) is Action.SYNC
    assert g.admit(W, 1, 8, 3, b"fua") is Action.SYNC
    assert g.admit(T, 0, 0, 1) is Action.ACK
    assert [(op.seq, op.command) for op in g.held] == [(1, W), (2, F), (3, W), (4, T)]
    g.stopped = True  # QEMU's STOP: what it flushes now nobody sees before the handover
    assert g.admit(F, 0, 0, 0) is Action.ACK
    assert g.admit(W, 1, 0, 3, b"xyz") is Action.ACK
    for op in g.take_snapshot():
        g.applied(op)
    g.open()
    assert not g.stopped  # the next hold starts with the guest running
    g.stopped = True
    g.hold()
    assert not g.stopped and g.admit(F, 0, 0, 0) is Action.SYNC


def test_a_read_is_overlaid_with_what_was_held_when_it_was_sent() -> None:
    """A held write that reaches storage (and leaves the queue) while a read is out may
    not have been in what the read saw there: the read is overlaid with it anyway."""
    g = Gate()
    g.hold()
    g.admit(W, 0, 2, 2, b"AA")
    then = g.take_snapshot()
    g.admit(W, 0, 6, 2, b"BB")
    for op in g.take_snapshot()[:1]:
        g.applied(op)  # the first write is on storage now, no longer held
    ops = g.held_since(then)
    assert [op.seq for op in ops] == [1, 2]
    buf = bytearray(b"0123456789")  # storage's answer, from before either write
    assert g.overlaps_held(0, 10, ops) and not g.overlaps_held(0, 2, ops)
    g.overlay(0, buf, ops)
    assert bytes(buf) == b"01AA45BB89"


def test_read_while_holding_sees_held_writes_in_order() -> None:
    g = Gate()
    g.hold()
    g.admit(W, 0, 2, 4, b"AAAA")
    g.admit(W, 0, 4, 4, b"BBBB")
    g.admit(T, 0, 7, 2)
    buf = bytearray(b"0123456789")
    assert g.overlaps_held(0, 10) and not g.overlaps_held(9, 1)
    g.overlay(0, buf)
    assert bytes(buf) == b"01AABBB\0\x009"


def test_waiting_parks_writes_but_lets_reads_through() -> None:
    g = Gate(GateMode.WAITING)
    assert g.admit(W, 0, 0, 1, b"x") is Action.WAIT
    assert g.admit(F, 0, 0, 0) is Action.WAIT
    assert g.admit(R, 0, 0, 512) is Action.FORWARD
    with pytest.raises(ValueError):
        g.hold()
    g.open()
    assert g.admit(W, 0, 0, 1, b"x") is Action.FORWARD


def test_open_refused_while_requests_are_held() -> None:
    g = Gate()
    g.hold()
    g.admit(W, 0, 0, 1, b"x")
    with pytest.raises(ValueError, match="1 held requests not applied"):
        g.open()


def test_handover_applied_exactly_once_even_when_retried() -> None:
    origin = Gate()
    origin.hold()
    for i in range(5):
        origin.admit(W, 0, 0, 1, bytes([i]))
    sent = decode_held(encode_held({"disk0": origin.take_snapshot()}))["disk0"]
    dest = Gate(GateMode.WAITING)
    first = dest.to_apply(sent[:3])  # the destination died after applying three...
    for op in first:
        dest.applied(op)
    again = dest.to_apply(reversed(sent))  # ...and the whole queue comes again, shuffled
    assert [op.seq for op in again] == [4, 5]
    for op in again:
        dest.applied(op)
    assert dest.replayed_total == 5 and dest.applied_seq == 5
    with pytest.raises(ValueError, match="out of order"):
        dest.applied(sent[0])
    origin.discard_through(sent[-1].seq)
    assert origin.held == [] and origin.held_bytes == 0
    origin.open()


def test_release_at_origin_consumes_the_queue() -> None:
    g = Gate()
    g.hold()
    g.admit(W, 0, 0, 2, b"ab")
    g.admit(F, 0, 0, 0)
    for op in g.to_apply(g.take_snapshot()):
        g.applied(op)
    assert g.held == []
    g.open()
    assert g.mode is GateMode.OPEN


@pytest.mark.parametrize("bad", [
    b"\x93",  # truncated msgpack
    encode_held({"d": [HeldOp(1, R, 0, 0, 4)]}),  # a read is not a held request
    encode_held({"d": [HeldOp(1, W, 0, 0, 4, b"ab")]}),  # payload shorter than length
    encode_held({"d": [HeldOp(1, W, 0, -1, 2, b"ab")]}),
])
def test_malformed_handover_is_refused(bad: bytes) -> None:
    with pytest.raises((msgspec.DecodeError, msgspec.ValidationError)):
        decode_held(bad)


@given(st.lists(st.tuples(st.sampled_from([W, Z, T]), st.integers(0, 60),
                          st.integers(1, 8)), max_size=20))
def test_overlay_equals_applying_the_queue(ops: list[tuple[int, int, int]]) -> None:
    """A read overlaid with the held queue shows what storage will hold once the queue
    is applied in order."""
    disk = bytearray(b"." * 64)
    g = Gate()
    g.hold()
    for n, (cmd, off, length) in enumerate(ops):
        length = min(length, 64 - off)
        data = bytes([65 + n % 26]) * length if cmd == W else None
        g.admit(cmd, 0, off, length, data)
    view = bytearray(disk)
    g.overlay(0, view)
    for op in g.to_apply(g.take_snapshot()):
        disk[op.offset:op.offset + op.length] = op.data if op.data is not None \
            else bytes(op.length)
    assert view == disk

"""The I/O gate's policy, as a pure state machine: which guest requests go to storage,
which are held, which wait, and what a read sees while writes are held.

A gate sits between QEMU and the hypervisor host's storage path for one disk of one VM.

- `open`: every request goes to storage.
- `holding` (the origin, during switchover): writes, trims, zeroes and flushes are put
  in an ordered held queue and acknowledged at once, so QEMU's drain when it stops the
  VM completes without waiting for storage. Reads still go to storage and are overlaid
  with the held writes (a read sees every write acknowledged before it). The exception
  is a FLUSH or FUA write while the guest still runs (holding starts shortly before
  QEMU stops it): it is held in order but acknowledged only once it and everything held
  before it are on storage and flushed (`Action.SYNC`), since a running guest may act on
  that acknowledgement. Once the VM has stopped (`stopped`), flushes are QEMU's own and
  are acknowledged at once: nothing can observe them before the queue reaches storage.
- `waiting` (the destination, until the held requests have arrived): writes, trims,
  zeroes and flushes wait, so none reaches storage before the origin's held writes.
  Reads pass: QEMU reads the first sector when it opens a disk for incoming migration
  (and waits for the answer in its main loop); the guest itself does not run before
  the held writes are applied.

Guarantee: an acknowledged held write is never lost while one of origin or
destination survives. The origin keeps its queue until the destination has applied it
(`discard_through`); if the destination dies or the migration fails, the origin applies
the queue itself, in order, before its VM runs again. Each held request carries a
sequence number and a gate applies each number at most once, so a handover that is
retried (or an origin that applies what a dying destination may have applied) still
applies every request exactly once, in order, before any later request. The queue is
in the memory of the host manager process that runs the VM: losing that process
during the switchover (milliseconds) loses the VM's memory too.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum

import msgspec

from twinvol.nbd.constants import Cmd, CmdFlag

WRITE = int(Cmd.WRITE)
TRIM = int(Cmd.TRIM)
WRITE_ZEROES = int(Cmd.WRITE_ZEROES)
FLUSH = int(Cmd.FLUSH)
FUA = int(CmdFlag.FUA)
HELD_COMMANDS = frozenset((WRITE, TRIM, WRITE_ZEROES, FLUSH))


class GateMode(Enum):
    OPEN = "open"
    HOLDING = "holding"
    WAITING = "waiting"


class Action(Enum):
    FORWARD = "forward"  # send to storage (a read: then `overlay` the reply)
    ACK = "ack"          # held: acknowledge now
    SYNC = "sync"        # held: acknowledge once the queue through it is on storage
    WAIT = "wait"        # park until the gate opens


class HeldOp(msgspec.Struct, array_like=True, frozen=True):
    """One held request: what storage must still be asked to do, in `seq` order."""

    seq: int
    command: int
    flags: int
    offset: int
    length: int
    data: bytes | None = None


class Gate:
    """Policy of one disk's gate. No I/O: the asyncio layer asks `admit` for each request
    and carries out the answer."""

    def __init__(self, mode: GateMode = GateMode.OPEN) -> None:
        self.mode = mode
        self.held: list[HeldOp] = []
        self.held_bytes = 0
        self._seq = 0          # last sequence number given to a held request
        self.applied_seq = 0   # highest sequence number applied to storage by this gate
        self.held_total = 0    # counters for status and reports
        self.replayed_total = 0
        # The VM's vCPUs are stopped (QEMU's STOP event at switchover): flushes held from
        # then on are QEMU's, not the guest's.
        self.stopped = False

    # ---- mode changes ------------------------------------------------------

    def hold(self) -> None:
        """Start holding (origin, switchover). Holding again is harmless."""
        if self.mode is GateMode.WAITING:
            raise ValueError("a waiting gate cannot hold")
        if self.mode is GateMode.OPEN:
            self.stopped = False  # a hold starts before the switchover: the guest runs
        self.mode = GateMode.HOLDING

    def open(self) -> None:
        """Back to forwarding. Only with nothing held: held requests must reach storage
        (`to_apply` + `applied`) first, or they would be overtaken."""
        if self.held:
            raise ValueError(f"{len(self.held)} held requests not applied yet")
        self.mode = GateMode.OPEN
        self.stopped = False

    # ---- requests ------------------------------------------------------------

    def admit(self, command: int, flags: int, offset: int, length: int,
              data: bytes | None = None) -> Action:
        """What to do with a request from QEMU. For ACK and SYNC the request is the last
        in `held` now (`data` must be the caller's own bytes)."""
        if self.mode is GateMode.OPEN:
            return Action.FORWARD
        if command not in HELD_COMMANDS:
            return Action.FORWARD
        if self.mode is GateMode.WAITING:
            return Action.WAIT
        self._seq += 1
        op = HeldOp(self._seq, command, flags, offset, length,
                    data if command == WRITE else None)
        self.held.append(op)
        self.held_bytes += len(data) if command == WRITE and data is not None else 0
        self.held_total += 1
        if not self.stopped and (command == FLUSH or (command == WRITE and flags & FUA)):
            return Action.SYNC
        return Action.ACK

    def overlay(self, offset: int, buf: bytearray, ops: Iterable[HeldOp] | None = None
                ) -> None:
        """Make a read result from storage show the held writes it overlaps, in order
        (trimmed and zeroed ranges read as zeroes): those of `ops` (default: `held`)."""
        end = offset + len(buf)
        for op in self.held if ops is None else ops:
            if op.command == FLUSH:
                continue
            lo, hi = max(offset, op.offset), min(end, op.offset + op.length)
            if lo >= hi:
                continue
            if op.command == WRITE:
                assert op.data is not None
                buf[lo - offset:hi - offset] = op.data[lo - op.offset:hi - op.offset]
            else:
                buf[lo - offset:hi - offset] = bytes(hi - lo)

    def overlaps_held(self, offset: int, length: int,
                      ops: Iterable[HeldOp] | None = None) -> bool:
        end = offset + length
        return any(op.command != FLUSH and op.offset < end and offset < op.offset + op.length
                   for op in (self.held if ops is None else ops))

    def held_since(self, before: list[HeldOp]) -> list[HeldOp]:
        """`before` (a snapshot taken earlier) plus what was held after it: what a read
        sent to storage while `before` was held must be overlaid with, even if some of
        `before` reached storage (and left `held`) while the read was out."""
        last = before[-1].seq if before else 0
        return before + [op for op in self.held if op.seq > last]

    # ---- handing held requests on ----------------------------------------------

    def take_snapshot(self) -> list[HeldOp]:
        """The held requests, oldest first; they stay held until `discard_through`."""
        return list(self.held)

    def discard_through(self, seq: int) -> None:
        """Requests up to `seq` are on storage (here or at the destination): forget them."""
        keep = [op for op in self.held if op.seq > seq]
        self.held_bytes = sum(len(op.data or b"") for op in keep)
        self.held = keep

    def to_apply(self, ops: Iterable[HeldOp]) -> list[HeldOp]:
        """Of `ops` (received from the origin, or our own held queue), those this gate has
        not applied yet, in order: a retried handover applies nothing twice."""
        out = sorted((op for op in ops if op.seq > self.applied_seq), key=lambda op: op.seq)
        return out

    def applied(self, op: HeldOp) -> None:
        """`op` is on storage."""
        if op.seq <= self.applied_seq:
            raise ValueError(f"held request {op.seq} applied out of order "
                             f"(already at {self.applied_seq})")
        self.applied_seq = op.seq
        self.replayed_total += 1
        if self.held and self.held[0].seq == op.seq:
            self.discard_through(op.seq)

    def status(self) -> dict[str, object]:
        return {"mode": self.mode.value, "held": len(self.held), "held_bytes": self.held_bytes,
                "held_total": self.held_total, "replayed_total": self.replayed_total,
                "applied_seq": self.applied_seq}


_held_encoder = msgspec.msgpack.Encoder()
_held_decoder = msgspec.msgpack.Decoder(dict[str, list[HeldOp]])


def encode_held(held: dict[str, list[HeldOp]]) -> bytes:
    """Held requests of every disk of a VM (disk id -> ops), for the handover."""
    return _held_encoder.encode(held)


def decode_held(data: bytes) -> dict[str, list[HeldOp]]:
    """Raises msgspec.DecodeError / ValidationError for a malformed handover."""
    held = _held_decoder.decode(data)
    for ops in held.values():
        for op in ops:
            if op.command not in HELD_COMMANDS or op.offset < 0 or op.length < 0:
                raise msgspec.ValidationError(f"held request {op.seq}: not a write")
            if op.command == WRITE and (op.data is None or len(op.data) != op.length):
                raise msgspec.ValidationError(f"held request {op.seq}: payload length")
    return held

"""Issue 15, finding 1: a far copy that stops must say so and catch up by itself, and a
mirrored write on a closing link must not leave its sequence number in flight.

Two real nodes in this process (A feeds an async copy to C over loopback). C is made to
refuse every journal batch, a stall no status showed before: A kept `mirrored` while
its lag grew. Now A's watch sees that C applies nothing while records wait, reports
`remote_stalled`, marks what C lacks dirty and copies it by chunks; once C takes
records again the group is mirrored and C equals A byte for byte."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from inproc import loopback_cluster, two_nodes, until

from twinvol.nbd.constants import Cmd
from twinvol.node.daemon import Node
from twinvol.replication.core.stall import CopyProgress
from twinvol.replication.peer import PeerDown, RemoteError
from twinvol.replication.writes import WriteFailed

SIZE = 1024 * 1024


async def stall(tmp: str) -> None:
    async with two_nodes(tmp, ("A", "C"), "stall", SIZE) as (a, c):
        await a.replication.create("dr", "v", "C", "v", mode="async")
        g = a.replication.remote.groups["dr"]
        gc = c.replication.remote.groups["dr"]
        await until(lambda: g.rec.state == "mirrored" and gc.rec.state == "mirrored",
                    "the initial copy")
        g.progress = CopyProgress(apply_after=0.5)
        events: list[dict[str, Any]] = []
        a.events.listen(events.append)
        real = c.replication.remote.target.on_records

        def refuse(peer: str, h: dict[str, Any], payload: Any) -> Any:
            raise RemoteError("busy applying (test)", "busy")

        c.replication.remote.target.on_records = refuse  # type: ignore[method-assign]
        pa = a.replication.pairs["dr"]
        backend = a.replication.backend_for(pa.vol)
        assert backend is not None
        await backend.submit(Cmd.WRITE, 8192, 4096, b"\x5a" * 4096, 0)
        # Seen, reported, caught up by chunks (one chunk: it may all pass in a moment).
        await until(lambda: any(e["type"] == "journal_resumed" for e in events),
                    "the stall to be seen and caught up", timeout=10)
        c.replication.remote.target.on_records = real  # type: ignore[method-assign]
        stalled = [e for e in events if e["type"] == "remote_stalled"]
        assert len(stalled) == 1 and stalled[0]["group"] == "dr", events
        assert stalled[0]["reason"].startswith("the copy stalled: the target applied nothing for")
        states = [(e["state"], e["reason"]) for e in events
                  if e["type"] == "pair_state" and e["pair"] == "dr"]
        assert states[0][0] == "copying" and states[0][1].startswith(
            "catching up from dirty chunks: the copy stalled: the target applied nothing")
        assert states[-1] == ("mirrored", ""), states
        assert g.rec.state == "mirrored" and g.rec.mode == "journal"
        assert c.volumes.get("v").store.pread(8192, 4096) == b"\x5a" * 4096
        await backend.submit(Cmd.WRITE, 65536, 4096, b"\xa5" * 4096, 0)
        await until(lambda: gc.rec.applied == g.rec.written, "records again", timeout=10)
        assert c.volumes.get("v").store.pread(0, SIZE) == a.volumes.get("v").store.pread(0, SIZE)


def test_a_stalled_far_copy_says_so_and_catches_up(tmp_path: pytest.TempPathFactory) -> None:
    asyncio.run(stall(str(tmp_path)))


@contextlib.asynccontextmanager
async def three_sites(tmp: str) -> AsyncIterator[tuple[Node, Node, Node]]:
    """A-B mirrored (pair `p`), an async copy `dr` of the same volume to C, B standby."""
    cfg = loopback_cluster(tmp, ("A", "B", "C"), "stall")
    a, b, c = Node(cfg, "A"), Node(cfg, "B"), Node(cfg, "C")
    for n in (a, b, c):
        await n.start()
    try:
        a.volumes.create("v", SIZE)
        await until(lambda: a.replication.peers.is_up("B") and a.replication.peers.is_up("C")
                    and b.replication.peers.is_up("C"), "the peer links")
        await a.replication.create("p", "v", "B", "v")
        pa = a.replication.pairs["p"]
        await until(lambda: pa.rec.state == "mirrored" and pa.rec.io_mode == "mirror",
                    "the initial copy")
        await a.replication.create("dr", "v", "C", "v", mode="async")
        g = a.replication.remote.groups["dr"]
        await until(lambda: g.rec.state == "mirrored", "the far copy")
        yield a, b, c
    finally:
        for n in (a, b, c):
            await n.stop()


async def closing_link(tmp: str) -> None:
    async with three_sites(tmp) as (a, _b, c):
        pa = a.replication.pairs["p"]
        g = a.replication.remote.groups["dr"]
        w = a.replication.writes
        await w.host_write(pa, Cmd.WRITE, 0, 4096, b"\x11" * 4096, 0)
        # The partner link is closing as the next mirrored write leaves.
        link = a.replication.peers.links["B"]
        real = link.request_row

        def closing(*args: Any, **kw: Any) -> int:
            link.request_row = real  # type: ignore[method-assign]
            raise PeerDown("link to B is closing (test)")

        link.request_row = closing  # type: ignore[method-assign]
        try:
            await w.host_write(pa, Cmd.WRITE, 4096, 4096, b"\x22" * 4096, 0)
        except Exception as e:  # the write may fail: it must not stop the far copy
            assert "partner" in str(e), e
        # Failed on this copy alone while it still serves (the link came straight back):
        # its data stands, so its record ships once the watch sees the copy serving.
        await until(lambda: not g.inflight and not g.undecided, "the write to be settled",
                    timeout=5)
        await w.host_write(pa, Cmd.WRITE, 8192, 4096, b"\x33" * 4096, 0)
        gc = c.replication.remote.groups["dr"]
        await until(lambda: gc.rec.applied == g.rec.written, "the far copy to advance",
                    timeout=10)


def test_a_mirrored_write_on_a_closing_link_never_stops_the_far_copy(
        tmp_path: pytest.TempPathFactory) -> None:
    asyncio.run(closing_link(str(tmp_path)))


async def lost_write(tmp: str) -> None:
    async with three_sites(tmp) as (a, _b, c):
        pa = a.replication.pairs["p"]
        g = a.replication.remote.groups["dr"]
        gc = c.replication.remote.groups["dr"]
        w = a.replication.writes
        await w.host_write(pa, Cmd.WRITE, 0, 4096, b"\x11" * 4096, 0)
        await until(lambda: gc.rec.applied == g.rec.written, "the first write at C")
        # The partner misses the next write and this side loses the decision (the witness
        # gave the pair to B): the write fails here, and B may now write alone under the
        # same sequence number. A's record of it must not reach C.
        link = a.replication.peers.links["B"]
        real_row, real_missing = link.request_row, w.partner_missing

        def closing(*args: Any, **kw: Any) -> int:
            link.request_row = real_row  # type: ignore[method-assign]
            raise PeerDown("link to B is closing (test)")

        async def lost(pr: Any, chunks: range) -> None:
            a.replication.set_mode(pr, "block", "the witness gave the pair to B (test)")
            raise WriteFailed(5, "partner lost and this copy may not continue (test)")

        link.request_row = closing  # type: ignore[method-assign]
        w.partner_missing = lost  # type: ignore[method-assign]
        with pytest.raises(WriteFailed):
            await w.host_write(pa, Cmd.WRITE, 4096, 4096, b"\x22" * 4096, 0)
        w.partner_missing = real_missing  # type: ignore[method-assign]
        seq = g.rec.written
        assert g.undecided == {seq} and g.committed() == seq - 1
        await asyncio.sleep(1.0)  # several shipping rounds and watches
        assert gc.rec.received == seq - 1, "a write that failed on a losing copy shipped"
        assert c.volumes.get("v").store.pread(4096, 4096) == bytes(4096)
        # This copy serves again with its data standing (no resync from B): it ships.
        a.replication.set_mode(pa, "mirror", "back (test)")
        await until(lambda: gc.rec.applied == seq, "the record once this copy serves")
        assert c.volumes.get("v").store.pread(4096, 4096) == b"\x22" * 4096


def test_a_write_failed_on_a_losing_copy_never_reaches_the_far_copy(
        tmp_path: pytest.TempPathFactory) -> None:
    asyncio.run(lost_write(str(tmp_path)))


async def takeover_mid_catch_up(tmp: str) -> None:
    async with three_sites(tmp) as (a, b, c):
        g = a.replication.remote.groups["dr"]
        gc = c.replication.remote.groups["dr"]
        pc = c.replication.pairs["dr"]
        # The initial copy's chunk bits close once A says its writes are all committed.
        await until(lambda: pc.dirty.count() == 0, "C's initial copy bits closed")
        # A applied a write that B never got (in flight when A's site is lost) ...
        a.volumes.get("v").store.pwrite(0, b"\xee" * 4096)
        seq = a.replication.remote.on_applied("v", Cmd.WRITE, 0, 4096, b"\xee" * 4096, 0,
                                              committed=False)
        # ... and its journal overflows: A catches C up by chunks, that write's included.
        a.replication.remote.overflow(g, "test")
        await until(lambda: gc.rec.state == "mirrored" and g.rec.mode == "journal",
                    "the catch-up")
        assert c.volumes.get("v").store.pread(0, 4096) == b"\xee" * 4096
        # C is consistent at A's point, but its chunk may hold a write B lacks: the bit
        # stays while A says the write is not committed.
        await asyncio.sleep(1.5)     # several of A's jstat rounds
        assert (pc.dirty.count(), gc.rec.bits_until) == (1, seq)
        await a.stop()
        await until(lambda: not b.replication.peers.is_up("A"), "A's loss seen by B")
        # (No witness in this test: B goes on alone as the witness would let it.)
        b.replication.set_mode(b.replication.pairs["p"], "local", "the witness (test)")
        report = (await b.replication.remote.dr.takeover())[0]
        # C's chunk goes again, from B (B's data wins: the write was never acknowledged).
        assert (report["method"], report["chunks"]) == ("bitmap", 1), report
        await until(lambda: gc.rec.state == "mirrored" and gc.rec.feeder == "B",
                    "C consistent again", timeout=10)
        await until(lambda: c.volumes.get("v").store.pread(0, SIZE)
                    == b.volumes.get("v").store.pread(0, SIZE), "C equal to B", timeout=10)
        assert c.volumes.get("v").store.pread(0, 4096) == bytes(4096)


def test_a_takeover_at_the_standby_mid_catch_up_sends_again_what_c_got(
        tmp_path: pytest.TempPathFactory) -> None:
    asyncio.run(takeover_mid_catch_up(str(tmp_path)))

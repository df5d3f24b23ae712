"""Finding 3 of the consistency issue, replayed deterministically: a primary write that
waits for its dirty bit to be durable while a resync copy starts, sends the chunk and
finishes. Two real nodes run in this process (loopback sockets, files under tmp_path);
the write is held at its await point by a gate, the copy runs, then the write goes on.

Before the fix the write had decided "local only" before the await: it landed on A
alone after the copy had sent the old chunk and cleared its bit, and the pair said
`mirrored` with B holding old data."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from inproc import loopback_cluster, until

from twinvol.nbd.constants import Cmd
from twinvol.node.daemon import Node

SIZE = 1024 * 1024


async def race(tmp: str) -> tuple[bytes, bytes, str]:
    cfg = loopback_cluster(tmp, ("A", "B"), "race")
    a, b = Node(cfg, "A"), Node(cfg, "B")
    await a.start()
    await b.start()
    try:
        a.volumes.create("v", SIZE)
        await until(lambda: a.replication.peers.is_up("B"), "the peer link")
        await a.replication.create("p", "v", "B", "v")
        pa = a.replication.pairs["p"]
        await until(lambda: pa.rec.state == "mirrored" and pa.rec.io_mode == "mirror",
                    "the initial copy")
        await b.stop()  # A goes on alone (no witness: the primary continues)
        await until(lambda: pa.rec.io_mode == "local", "A alone")

        gate = asyncio.Event()
        entered = asyncio.Event()
        real_sync = pa.dirty.sync
        calls = []

        async def held_sync(executor: Any) -> None:
            calls.append(1)
            if len(calls) == 1:  # the host write's wait for its dirty bit
                entered.set()
                await gate.wait()
            await real_sync(executor)

        pa.dirty.sync = held_sync  # type: ignore[method-assign]
        write = asyncio.ensure_future(a.replication.writes.host_write(
            pa, Cmd.WRITE, 0, 4096, b"\x77" * 4096, 0))
        await entered.wait()
        b2 = Node(cfg, "B")  # B comes back: A meets it and runs the resync copy
        await b2.start()
        b = b2
        pb = b.replication.pairs["p"]
        await until(lambda: pa.rec.state == "mirrored" and pb.rec.state == "mirrored"
                    and pa.rec.io_mode == "mirror", "the resync")
        gate.set()
        await asyncio.wait_for(write, 10)
        await asyncio.sleep(0.2)
        return (pa.vol.store.pread(0, 4096), pb.vol.store.pread(0, 4096),
                f"{pa.rec.state}/{pb.rec.state}")
    finally:
        await a.stop()
        await b.stop()


def test_a_write_held_across_a_resync_reaches_both_copies(tmp_path: Any) -> None:
    got_a, got_b, states = asyncio.run(race(str(tmp_path)))
    assert got_a == b"\x77" * 4096
    assert got_b == got_a, f"B kept the old data while the pair said {states}"


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-q"])

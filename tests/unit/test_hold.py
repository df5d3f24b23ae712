"""A held copy (a far copy took over, or a restarted feeder asks whether it did) keeps
its active-active partner from serving too: no lease is granted, and a write the
partner forwards is refused. Before, the partner kept serving writes that the failback
would then roll back (the three-site sweep's seed 5, DR variant "both back").
Two real nodes in this process (loopback sockets, files under tmp_path)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from inproc import two_nodes, until

from twinvol.nbd.constants import Cmd
from twinvol.replication.writes import WriteFailed

SIZE = 1024 * 1024
HELD = "the far copy at C was taken over"


async def held_partner(tmp: str) -> tuple[str, str, bytes, bool]:
    async with two_nodes(tmp, ("A", "B"), "hold", SIZE) as (a, b):
        await a.replication.create("p", "v", "B", "v")
        pa, pb = a.replication.pairs["p"], b.replication.pairs["p"]
        await until(lambda: pb.rec.state == "mirrored" and pb.rec.io_mode == "mirror"
                    and pb.vol.export.blocked is None, "B serving under A's lease")
        a.replication.hold("v", HELD)
        # B's lease runs out and is not renewed: B stops serving by itself.
        await until(lambda: pb.vol.export.blocked is not None, "B fenced", timeout=10)
        fenced = str(pb.vol.export.blocked)
        # A write B still has in hand is refused by A, not acknowledged.
        with pytest.raises(WriteFailed) as refused:
            await asyncio.wait_for(b.replication.writes.slow_write(
                pb, Cmd.WRITE, 0, 4096, b"\x55" * 4096, 0), 10)
        data = pa.vol.store.pread(0, 4096)
        a.replication.unhold("v")
        await until(lambda: pb.vol.export.blocked is None, "B serving again", timeout=10)
        return fenced, str(refused.value), data, pa.rec.io_mode == "mirror"


def test_a_held_copy_keeps_its_partner_from_serving(tmp_path: Any) -> None:
    fenced, refused, data, mirror = asyncio.run(held_partner(str(tmp_path)))
    assert "no lease from partner A" in fenced
    assert f"volume v on node A is held: {HELD}" in refused
    assert data == b"\0" * 4096, "A applied a write it had refused"
    assert mirror

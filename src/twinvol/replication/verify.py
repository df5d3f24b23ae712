"""`twinvol pair verify`: compare a mirrored pair's copies chunk by chunk and repair the
stale side from the primary, which holds the latest data (it applies every write first).

Hashes are computed where the data lives (xxh3 of each 64 KiB chunk), so only hashes
cross the link, and chunks that differ are looked at again before they count: a write
in flight during hashing differs for a moment. Each side first says which chunks hold
data (SEEK_DATA); a chunk that is a hole on both sides is equal without being read, so
verify costs by what is allocated. A hole on one side is hashed as the zeroes it reads.
"""

from __future__ import annotations

import asyncio
import struct

import xxhash

from twinvol import clock
from twinvol.replication import data_messages as dm
from twinvol.replication.bitmap import CHUNK, nchunks
from twinvol.replication.copier import Copier
from twinvol.replication.core.spans import data_chunk_bits, set_bits
from twinvol.replication.messages import (
    MAX_MAP_CHUNKS,
    DataMapRequest,
    HashRequest,
    PairBlock,
    PairUnblock,
    encode,
)
from twinvol.replication.peer import Message, PeerDown, RemoteError
from twinvol.replication.ports import ManagerPort
from twinvol.replication.runtime import PairRuntime
from twinvol.storage.volumes import VolumeError


class Verifier:
    def __init__(self, mgr: ManagerPort, copier: Copier) -> None:
        self.mgr = mgr
        self.copier = copier

    def start(self, name: str) -> PairRuntime:
        pr = self.mgr.get(name)
        rec = pr.rec
        if rec.role != "primary":
            raise VolumeError(f"run verify on the primary ({rec.partner})")
        if rec.state != "mirrored":
            raise VolumeError(f"pair {name!r} is {rec.state}; verify compares mirrored copies")
        if not self.mgr.peers.is_up(rec.partner):
            raise VolumeError(f"node {rec.partner} is not connected", "io")
        if pr.verify_task is None or pr.verify_task.done():
            pr.verify = {"running": True, "checked_chunks": 0,
                         "total_chunks": nchunks(pr.vol.record.size), "mismatched_chunks": [],
                         "skipped_chunks": 0, "repaired_chunks": 0, "repaired_bytes": 0,
                         "started": clock.wall()}
            pr.verify_task = asyncio.ensure_future(self.run(pr))
        return pr

    async def hashes(self, pr: PairRuntime, chunks: list[int]) -> list[int]:
        store, size = pr.vol.store, pr.vol.record.size

        def work() -> list[int]:
            return [xxhash.xxh3_64_intdigest(store.pread(c * CHUNK, min(CHUNK, size - c * CHUNK)))
                    for c in chunks]

        return await asyncio.get_running_loop().run_in_executor(self.mgr.node.executor, work)

    async def peer_hashes(self, pr: PairRuntime, chunks: list[int]) -> list[int]:
        _, payload = await self.mgr.peers.link(pr.rec.partner).request(
            encode(HashRequest(pr.rec.name, chunks)))
        return list(struct.unpack(f">{len(chunks)}Q", payload))

    async def data_map(self, pr: PairRuntime, first: int, count: int) -> bytes:
        """Bit i: chunk first + i holds data here (two lseeks per data run, no reads)."""
        store, size = pr.vol.store, pr.vol.record.size

        def work() -> bytes:
            runs = store.data_runs(first * CHUNK, min((first + count) * CHUNK, size))
            return data_chunk_bits(runs, first, count, CHUNK)

        return await asyncio.get_running_loop().run_in_executor(self.mgr.node.executor, work)

    async def peer_data_map(self, pr: PairRuntime, first: int, count: int) -> bytes:
        try:
            _, payload = await self.mgr.peers.link(pr.rec.partner).request(
                encode(DataMapRequest(pr.rec.name, first, count)))
        except RemoteError as e:
            if e.code != "invalid":
                raise
            # A partner that predates data maps: every chunk counts as data there.
            return b"\xff" * ((count + 7) // 8)
        if len(payload) != (count + 7) // 8:
            raise RemoteError(f"data map of {len(payload)} bytes for {count} chunks", "invalid")
        return bytes(payload)

    async def on_data_map(self, pr: PairRuntime, msg: DataMapRequest) -> Message:
        if msg.first + msg.count > nchunks(pr.vol.record.size):
            raise RemoteError("bad chunk range", "invalid")
        return {}, await self.data_map(pr, msg.first, msg.count)

    async def on_hash(self, pr: PairRuntime, msg: HashRequest) -> Message:
        chunks = msg.chunks
        n = nchunks(pr.vol.record.size)
        if any(c >= n for c in chunks):
            raise RemoteError("bad chunk list", "invalid")
        hashes = await self.hashes(pr, chunks)
        return {}, struct.pack(f">{len(hashes)}Q", *hashes)

    async def run(self, pr: PairRuntime) -> None:
        """Compare chunk hashes computed where the data lives; repair from the latest copy.

        The primary holds the latest data of a mirrored pair (it applies every write first
        and orders them), so the secondary is the stale side of any mismatch.
        """
        rec, v = pr.rec, pr.verify
        total = v["total_chunks"]
        suspects: list[int] = []
        try:
            for start in range(0, total, MAX_MAP_CHUNKS):
                count = min(MAX_MAP_CHUNKS, total - start)
                here, there = await asyncio.gather(self.data_map(pr, start, count),
                                                   self.peer_data_map(pr, start, count))
                either = int.from_bytes(here, "little") | int.from_bytes(there, "little")
                todo = set_bits(either.to_bytes(len(here), "little"), start)
                for i in range(0, len(todo), 256):
                    batch = todo[i:i + 256]
                    mine, theirs = await asyncio.gather(self.hashes(pr, batch),
                                                        self.peer_hashes(pr, batch))
                    suspects += [c for c, a, b in zip(batch, mine, theirs, strict=True)
                                 if a != b]
                    v["checked_chunks"] = batch[-1] + 1
                v["checked_chunks"] = start + count
                v["skipped_chunks"] += count - len(todo)
            if suspects:
                # Writes in flight during hashing differ for a moment: look again.
                await asyncio.sleep(0.2)
                mine, theirs = await asyncio.gather(self.hashes(pr, suspects),
                                                    self.peer_hashes(pr, suspects))
                suspects = [c for c, a, b in zip(suspects, mine, theirs, strict=True) if a != b]
            v["mismatched_chunks"] = suspects
            v["latest"] = self.mgr.node.name
            v["stale"] = rec.partner if suspects else None
            if suspects:
                self.mgr.node.events.publish("verify_mismatch", pair=rec.name, chunks=len(suspects),
                                         stale=rec.partner, latest=self.mgr.node.name)
                link = self.mgr.peers.link(rec.partner)
                await link.request(encode(PairBlock(
                    rec.name, f"verify found {len(suspects)} stale chunk(s)")))
                for c in suspects:
                    pr.dirty.set(c)
                for c in suspects:
                    await self.copier.send_chunk(pr, link, c)
                    pr.dirty.clear(c)
                    v["repaired_chunks"] += 1
                    v["repaired_bytes"] += min(CHUNK, pr.vol.record.size - c * CHUNK)
                await link.request(dm.encode(dm.Flush(rec.name)))
                await link.request(encode(PairUnblock(rec.name)))
            self.mgr.node.events.publish("verify_done", pair=rec.name, mismatches=len(suspects),
                                     repaired=v["repaired_chunks"])
        except (PeerDown, RemoteError) as e:
            v["error"] = str(e)
        finally:
            v["running"] = False
            v["seconds"] = round(clock.wall() - v["started"], 3)

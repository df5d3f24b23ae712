"""The copy of a pair's dirty chunks to the partner (initial copy, resync, failback):
send each chunk, checkpoint progress durably, then declare the pair mirrored.

A chunk is read and sent in the same event-loop step, so a host write to it can only
follow it on the ordered peer link; a chunk's dirty bit is cleared only once the partner
acknowledged it, and not if a write marked it again while it was in flight.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from twinvol import clock
from twinvol.replication import data_messages as dm
from twinvol.replication.bitmap import CHUNK, nchunks
from twinvol.replication.core.pace import Pace
from twinvol.replication.core.spans import ZERO_SPAN, zero_chunks
from twinvol.replication.core.types import Role
from twinvol.replication.messages import PairDone, encode
from twinvol.replication.peer import Message, PeerDown, RemoteError, forget
from twinvol.replication.ports import CopyFeedPort, ManagerPort
from twinvol.replication.runtime import PairRuntime

log = logging.getLogger("twinvol.replication")

COPY_WINDOW = 16    # chunks in flight
COPY_RETRY = 2.0    # seconds before a copy stopped by an I/O error here starts again
CURSOR_EVERY = 64   # chunks between durable checkpoints of the copy cursor
PACE_EVERY = 4      # chunks between looks at the copy rate


class Copier:
    def __init__(self, mgr: ManagerPort, remote: CopyFeedPort) -> None:
        self.mgr = mgr
        self.remote = remote

    async def run(self, pr: PairRuntime) -> None:
        """Send every dirty chunk at or after the cursor to the partner, then go mirrored."""
        rec = pr.rec
        pr.copied_bytes = 0
        pr.copy_started = clock.monotonic()
        rec.copy_source = self.mgr.node.name
        rec.copy_total = pr.dirty.count()
        self.mgr.save(pr)
        # In send order (a list, not a set: replies come in order on the ordered link,
        # and waiting in one order every run lets the simulator replay a seed).
        inflight: list[asyncio.Future[Message]] = []
        # Spans (first chunk, count) sent since the last checkpoint: bits cleared once acked.
        sent: list[tuple[int, int]] = []
        pace = Pace()
        try:
            link = self.mgr.peers.link(rec.partner)
            # Walk the bits as they are (no list of every chunk first: 16.7 million ints
            # and a 2 s loop step at 1 TiB). A bit set behind the walk is a write that
            # the mirrored path carries; one set ahead is copied, as it should be. A span
            # of dirty chunks that reads as zeroes here goes as one zero message.
            nb = nchunks(pr.vol.record.size)
            pr.dirty.fill(nb, pr.dirty.nbits, False)   # bits past the end: nothing to copy
            pos = 0
            data_end = 0   # bytes below this are known data (data stays data, holes do not)
            while (first := pr.dirty.next_set(pos)) < nb:
                fut, count, nbytes, data_end = self.send_span(
                    pr, link, first, pr.dirty.next_clear(first, first + ZERO_SPAN), data_end)
                pos = first + count
                pr.copied_bytes += nbytes
                sent.append((first, count))
                inflight.append(fut)
                if len(inflight) >= COPY_WINDOW:
                    await inflight[0]   # the oldest; a failure raises (the rest: below)
                    while inflight and inflight[0].done():
                        inflight.pop(0).result()
                if len(sent) >= CURSOR_EVERY:
                    await self.checkpoint(pr, inflight, sent)
                    inflight = []
                if len(sent) % PACE_EVERY == 0:
                    wait = pace.delay(rec.copy_rate, pr.copied_bytes, clock.monotonic())
                    if wait:
                        await asyncio.sleep(wait)
            await self.checkpoint(pr, inflight, sent)
            # Both sides now hold the same data: one generation, mirrored.
            # A far copy is consistent once it also applied every record up to here.
            finish = PairDone(rec.name, rec.gen_current, list(rec.gen_history),
                              "secondary" if rec.role == "primary" else "primary",
                              self.remote.written_for(rec.volume) if rec.remote else 0,
                              self.remote.committed_for(rec.volume) if rec.remote else -1)
            if not rec.remote:
                pr.lease.resume()  # the partner serves from the moment it is mirrored
            lease_seq = pr.lease.request(clock.monotonic())
            reply, _ = await link.request(encode(finish))
            pr.lease.on_reply(lease_seq, bool(reply.get("lease")))
            rec.copy_cursor = 0
            if rec.remote and rec.role == "secondary":
                self.remote.failback_copied(pr)
            elif rec.remote:
                self.mgr.set_state(pr, "mirrored")
                self.remote.copy_done(pr)
            else:
                rec.copy_source = ""
                self.mgr.set_state(pr, "mirrored")
                self.mgr.set_mode(pr, "mirror")
                self.mgr.release(pr)
            pr.copy_error = ""
            self.mgr.node.events.publish("copy_done", pair=rec.name, bytes=pr.copied_bytes,
                                     seconds=round(clock.monotonic() - pr.copy_started, 3))
        except (PeerDown, RemoteError) as e:
            # Chunks sent but not acknowledged keep their dirty bit: they go again next time.
            log.warning("copy interrupted", extra={"pair": rec.name, "error": str(e)})
            forget(inflight)   # their failure is this one
            self.mgr.save(pr)
        except OSError as e:
            # This disk failed a read (or the bitmap a write): the chunks keep their bits
            # and the copy starts again in a while; nothing else would restart it (the
            # link stays up), and the partner waits blocked until it is done.
            if pr.copy_error != str(e):
                pr.copy_error = str(e)
                log.warning("copy stopped by an I/O error here; retrying", extra={
                    "pair": rec.name, "error": str(e)})
                self.mgr.node.events.publish("copy_failed", pair=rec.name, error=str(e))
            forget(inflight)
            self.mgr.spawn(self._again(pr))

    async def _again(self, pr: PairRuntime) -> None:
        await asyncio.sleep(COPY_RETRY)
        if pr.rec.copy_source == self.mgr.node.name and self.mgr.pairs.get(pr.rec.name) is pr \
                and self.mgr.peers.is_up(pr.rec.partner):
            self.mgr.start_copy(pr)

    def send_chunk(self, pr: PairRuntime, link: Any, chunk: int) -> asyncio.Future[Message]:
        """Send one chunk (verify's repair); its reply future."""
        return self.send_span(pr, link, chunk, chunk + 1, 0)[0]

    def send_span(self, pr: PairRuntime, link: Any, first: int, run_end: int, data_end: int
                  ) -> tuple[asyncio.Future[Message], int, int, int]:
        """Send chunk `first` or, if it reads as zeroes, every chunk up to `run_end` that
        does as one zero message (the target punches or zeroes it: old data there must
        read back as zeroes). Read and sent in the same loop step, so a host write can
        only follow it on the ordered link. `data_end`: bytes below it are known to be
        data. Returns the reply future, the chunks sent, the payload bytes and the new
        `data_end`."""
        store = pr.vol.store
        size = pr.vol.record.size
        off = first * CHUNK
        # A partner that feeds a far copy learns which write this span reflects.
        j = self.remote.written_for(pr.rec.volume) if self.remote.feeds else 0
        if off >= data_end:
            is_data, stop = store.data_at(off, min(run_end * CHUNK, size))
            if is_data:
                data_end = stop
            elif count := zero_chunks(first, run_end, stop, size, CHUNK):
                n = min(count * CHUNK, size - off)
                return link.request(dm.encode(dm.Copy(pr.rec.name, off=off, length=n, j=j,
                                                      zero=True))), count, 0, data_end
        n = min(CHUNK, size - off)
        return link.request(dm.encode(dm.Copy(pr.rec.name, off=off, length=n, j=j)),
                            store.pread(off, n)), 1, n, data_end

    async def checkpoint(self, pr: PairRuntime, inflight: list[asyncio.Future[Message]],
                          sent: list[tuple[int, int]]) -> None:
        """Wait for acks, then durably record the progress (bits and cursor)."""
        if inflight:
            await asyncio.gather(*inflight)
        for first, count in sent:
            # A chunk marked again while in flight keeps its bit (`recopy`).
            again = [c for c in pr.recopy if first <= c < first + count] if pr.recopy else []
            pr.dirty.fill(first, first + count, False)
            for c in again:
                pr.dirty.set(c)
            pr.recopy.difference_update(again)
        last = sum(sent[-1]) if sent else None
        sent.clear()
        # Bits first: the cursor shown (and saved) never runs ahead of what is durable.
        await pr.dirty.sync(self.mgr.node.executor)
        if last is not None:
            pr.rec.copy_cursor = last
        self.mgr.save(pr)

    def on_done(self, pr: PairRuntime, msg: PairDone) -> Message:
        rec = pr.rec
        if rec.remote:
            # The far copy is complete but serves no host until a DR takeover. Its dirty
            # bits (the chunks the copy brought) stay until the feeder says every write
            # they may hold is committed (`FarTarget.committed`).
            rec.copy_cursor = 0
            self.mgr.set_state(pr, "mirrored")
            self.remote.target_copied(pr, msg.j, msg.committed)
            return {}, b""
        rec.gen_current = msg.gen
        rec.gen_history = list(msg.history)
        rec.role = Role(msg.role)
        rec.copy_cursor = 0
        rec.copy_source = ""
        pr.dirty.clear_all()
        pr.dirty.sync_now()
        self.mgr.set_state(pr, "mirrored")
        self.mgr.set_mode(pr, "mirror")
        self.mgr.release(pr)
        # The copy source goes on serving, now under a lease granted with this answer.
        return {"lease": pr.lease.grant(clock.monotonic())}, b""

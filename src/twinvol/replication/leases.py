"""Leases (core/lease.py) on a running node: renew the leases of mirrored copies, grant
the partner's, fence a copy whose lease ran out, and wait out the partner's lease
before this copy acts alone."""

from __future__ import annotations

import asyncio
import logging
import math

from twinvol import clock
from twinvol.replication.messages import LeaseRequest, encode
from twinvol.replication.peer import Message, PeerDown
from twinvol.replication.ports import ManagerPort
from twinvol.replication.runtime import PairRuntime

log = logging.getLogger("twinvol.replication")


def leased(pr: PairRuntime) -> bool:
    """Does this copy serve under its partner's lease (a mirrored active-active copy)?"""
    return pr.rec.io_mode == "mirror" and not pr.rec.remote


class Leases:
    def __init__(self, mgr: ManagerPort) -> None:
        self.mgr = mgr

    def gate(self, pr: PairRuntime) -> None:
        """Tell the NBD layer until when this copy may answer host I/O."""
        rec = pr.rec
        export = pr.vol.export
        if self.mgr.by_volume.get(rec.volume) is not pr or rec.volume in self.mgr.holds:
            return
        if leased(pr):
            export.serve_until = pr.lease.held_until
            if pr.lease.valid(clock.monotonic()):
                self.mgr.node.unfence(rec.volume)
            else:
                self.mgr.node.fence(rec.volume, f"no lease from partner {rec.partner}")
        else:
            export.serve_until = 0.0 if rec.io_mode == "block" else math.inf

    async def keeper(self) -> None:
        """Renew the leases of mirrored copies, and fence those whose lease ran out."""
        while True:
            await asyncio.sleep(self.mgr.lease_config.renew_every)
            now = clock.monotonic()
            partners = set()
            for pr in list(self.mgr.pairs.values()):
                if not leased(pr):
                    continue
                partners.add(pr.rec.partner)
                if not pr.lease.valid(now) and pr.vol.export.blocked is None:
                    self.gate(pr)
            for peer in partners:
                self.request(peer)

    def request(self, peer: str) -> None:
        """Ask `peer` for the leases of every mirrored pair we share with it."""
        link = self.mgr.peers.links.get(peer)
        if link is None or link.closed or not link.authed:
            return
        now = clock.monotonic()
        asks = {name: pr.lease.request(now) for name, pr in self.mgr.pairs.items()
                if pr.rec.partner == peer and leased(pr)}
        if not asks:
            return

        def answered(f: asyncio.Future[Message]) -> None:
            if f.cancelled() or f.exception() is not None:
                return
            granted = set(f.result()[0].get("granted", ()))
            for name, seq in asks.items():
                pr = self.mgr.pairs.get(name)
                if pr is not None and pr.lease.on_reply(seq, name in granted):
                    self.gate(pr)

        try:
            link.request(encode(LeaseRequest(sorted(asks)))).add_done_callback(answered)
        except PeerDown:
            return

    def on_request(self, peer: str, msg: LeaseRequest) -> Message:
        """The partner asks to serve its copies: grant each pair that is mirrored here."""
        now = clock.monotonic()
        granted = []
        for name in msg.pairs:
            pr = self.mgr.pairs.get(name)
            if pr is None or pr.rec.remote or pr.rec.partner != peer:
                continue
            if pr.rec.volume in self.mgr.holds:
                continue  # held (a far copy took over, or asked after a restart): the
                # partner must not serve the old data either
            if pr.lease.grant(now):
                granted.append(pr.rec.name)
        return {"granted": granted}, b""

    async def fence_partner(self, pr: PairRuntime) -> None:
        """Before this copy acknowledges writes alone: stop granting leases, and wait
        until every lease granted to the partner has run out (it stops serving)."""
        wait = pr.lease.revoke() - clock.monotonic()
        if wait > 0:
            log.info("waiting for the partner's lease to run out",
                     extra={"pair": pr.rec.name, "seconds": round(wait, 3)})
            await asyncio.sleep(wait)

"""The seeded simulator (twinvol.testing): many seeds pass, and it has teeth.

The teeth tests switch off one safety rule at a time (`SimOptions`) and show the
simulator then finds the consistency issue's findings, each in a fixed scenario."""

from __future__ import annotations

import os

import pytest

from twinvol.replication.core.lease import LeaseConfig
from twinvol.testing.node import SimNode, SimOptions
from twinvol.testing.run import Cluster, Result, run

pytestmark = pytest.mark.sim

SEEDS = int(os.environ.get("TWINVOL_SIM_SEEDS", "500"))


def test_many_seeds_find_nothing() -> None:
    failed = [r.line() for r in (run(seed) for seed in range(SEEDS)) if not r.ok]
    assert failed == []


def test_one_way_cuts_find_nothing_either() -> None:
    """Links cut in one direction only (a peer that still hears its partner while the
    partner hears nothing; a witness that hears a node that cannot hear it)."""
    results = [run(seed, options=SimOptions(one_way=True)) for seed in range(SEEDS // 3)]
    assert sum(1 for r in results for f in r.faults if "one_way" in f) > len(results) // 2
    assert [r.line() for r in results if not r.ok] == []


def test_a_seed_replays_exactly() -> None:
    a, b = run(7), run(7)
    assert a.trace == b.trace and a.faults == b.faults and a.ops == b.ops
    assert a.trace != run(8).trace


def scenario(seed: int, kind: str, node: str, options: SimOptions) -> Result:
    c = Cluster(seed, options, LeaseConfig())
    c.sched.at(3.0, c.fault, kind, node, 4.7)
    c.sched.run_until(12.0)
    return c.finish(seed, [kind])


@pytest.mark.parametrize(("kind", "node"), [
    ("isolate", "A"),   # finding 1: the isolated old primary kept serving reads
    ("pause", "A"),     # finding 1: a paused primary answered from its old copy on resume
    ("cut_peer", "A"),  # finding 2: the secondary served reads after the primary went alone
])
def test_without_leases_the_simulator_finds_stale_reads(kind: str, node: str) -> None:
    broken = [scenario(s, kind, node, SimOptions(leases=False)) for s in range(12)]
    assert any(r.findings.stale or r.findings.alone for r in broken)
    fixed = [scenario(s, kind, node, SimOptions()) for s in range(12)]
    assert [r.line() for r in fixed if not r.ok] == []


def resync_cut(seed: int, options: SimOptions) -> Result:
    """A-B cut, so A goes alone; after healing, A's end of the peer connection fails
    just as the resync ends: B is mirrored and leased, A never heard the end and goes
    on alone until B learns the connection is gone."""
    c = Cluster(seed, options, LeaseConfig())
    a = c.nodes["A"]
    real_done = a._copy_done
    fired = []

    def lost_ack(msg: object) -> None:
        if not fired and c.sched.now > 4.0:  # the resync after the first cut
            fired.append(True)
            c.sched.at(c.sched.now + 0.05, a._down, "connection error")
            return
        real_done(msg)  # type: ignore[arg-type]

    a._copy_done = lost_ack  # type: ignore[method-assign]
    c.sched.at(2.0, c.fault, "cut_peer", "A", 3.0)
    c.sched.run_until(16.0)
    assert fired, "the scenario did not reach the end of a resync"
    return c.finish(seed, ["cut_peer", "connection error at the end of the resync"])


def test_a_write_alone_waits_out_the_lease_granted_for_the_resync() -> None:
    broken = [resync_cut(s, SimOptions(fence_alone=False)) for s in range(6)]
    assert any(r.findings.alone for r in broken)
    fixed = [resync_cut(s, SimOptions()) for s in range(6)]
    assert [r.line() for r in fixed if not r.ok] == []


def test_nodes_use_the_core() -> None:
    """The simulated node is driven by the same lease and partner-loss code as a node."""
    from twinvol.replication import manager, partners
    from twinvol.testing import node

    assert node.PeerLease is manager.PeerLease
    assert node.PartnerLoss is partners.PartnerLoss
    assert issubclass(SimNode, object)


def test_a_meeting_counts_mirrored_writes_still_in_flight() -> None:
    """Found by the fault sweep (seed 13) and replayed here: a paused old primary applied
    mirrored writes whose link then died; its partner took over, and they met again
    before the failures of those writes were handled (asyncio runs them a moment later),
    so the bitmap sent at the meeting lacked them and the copies stayed different while
    both said mirrored. Seed 295 (of the pair without its far copy, as when it was found)
    replays it when meetings send dirty bits only."""
    broken = run(295, options=SimOptions(meeting_inflight=False, far=False))
    assert broken.findings.divergent
    assert run(295, options=SimOptions(far=False)).ok


def test_a_write_that_failed_on_an_old_link_starts_no_decision() -> None:
    """Found by a long simulator run (seed 11504): a paused old primary resumed, its link
    was replaced, and the late failure of a write on the old link started a decision
    after the partners had met again: it revoked the partner's lease and the witness
    blocked this copy for good, while the pair said mirrored."""
    broken = run(11504, options=SimOptions(skip_when_up=False, far=False))
    assert broken.findings.other
    assert run(11504, options=SimOptions(far=False)).ok


# ---- the far site (C): the remote copy's rules have teeth too --------------------------

def test_without_marking_a_catch_up_the_far_copy_claims_a_mix() -> None:
    """The three-site sweep's seed 4, in the simulator: a catch-up by blocks that C does
    not know about leaves C claiming a consistent copy it does not have."""
    broken = [run(s, options=SimOptions(far_inconsistent=False)) for s in range(10)]
    assert sum(1 for r in broken if r.findings.far) >= 3
    assert all(not r.findings.far for r in (run(s) for s in range(10)))


def lost_site(seed: int, options: SimOptions) -> Result:
    """A loses its peer and witness links with writes in flight; it learns it lost (the
    witness link heals first) while B writes alone under the same numbers; then A's site
    is lost and the operator takes over at B."""
    c = Cluster(seed, options, LeaseConfig())
    c.sched.at(3.0, c.fault, "cut_peer", "A", 8.0)
    c.sched.at(3.0, c.fault, "cut_witness", "A", 4.0)
    c.sched.at(7.6, c.fault, "dr_standby", "A", 6.0)
    c.sched.run_until(20.0)
    assert any("took over the far copy" in line for line in c.trace)
    return c.finish(seed, ["cut_peer A", "cut_witness A", "dr_standby"])


def test_a_losing_copy_never_feeds_the_far_copy() -> None:
    # Shipping while blocked lets A's failed writes reach C under numbers B reuses.
    broken = [lost_site(s, SimOptions(far_serving=False)) for s in range(12)]
    assert any(r.findings.far for r in broken)
    fixed = [lost_site(s, SimOptions()) for s in range(12)]
    assert [r.line() for r in fixed if not r.ok] == []


def test_a_seed_with_the_far_copy_replays_and_takes_over() -> None:
    r = lost_site(3, SimOptions())
    assert r.trace == lost_site(3, SimOptions()).trace


@pytest.mark.parametrize("seed", [50, 281, 284])
def test_a_takeover_mid_catch_up_copies_again_what_c_got(seed: int) -> None:
    """Seeds the simulator found: the feeder's site is lost while C is caught up by
    blocks; a takeover at the standby that ignores C's blocks leaves C inconsistent."""
    assert run(seed, options=SimOptions(far_chunked=False)).findings.far
    assert run(seed).ok


@pytest.mark.parametrize("seed", [31061, 32629, 32739])
def test_a_standby_never_numbers_its_writes_from_a_stale_count(seed: int) -> None:
    """Seeds a 4,000-seed run found: a standby that was just demoted (31061), wrote as the
    active-active primary while the feeder numbered its writes (32629) or got the
    feeder's writes as resync chunks (32739) went on alone from its old last number,
    reusing numbers the far copy held; a takeover there then skipped its writes."""
    assert run(seed, options=SimOptions(far_numbering=False)).findings.far
    assert run(seed).ok

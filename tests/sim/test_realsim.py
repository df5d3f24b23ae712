"""The node's real code (replication, peer links, NBD server and client, catalog,
bitmaps, the witness arbiter, the asynchronous remote copy to C) under the deterministic
runtime (`twinvol.testing.simloop`): many seeds pass, a seed replays exactly, and
breaking the lease rule or the far copy's order is found."""

from __future__ import annotations

import os

import pytest

from twinvol.replication.remote_target import FarTarget
from twinvol.replication.runtime import GroupRuntime
from twinvol.storage.journal import Record
from twinvol.testing.realrun import Fault, run_real

pytestmark = pytest.mark.sim

SEEDS = int(os.environ.get("TWINVOL_REAL_SIM_SEEDS", "40"))


def test_many_seeds_of_the_real_code_find_nothing() -> None:
    results = [run_real(seed) for seed in range(SEEDS)]
    assert [r.line() for r in results if not r.ok] == []
    # The runs did real work: requests answered, faults of every kind.
    assert all(r.ops > 500 for r in results)
    kinds = {f.split()[1] for r in results for f in r.faults}
    assert {"kill", "pause", "cut_peer", "isolate", "kill_witness", "one_way_to_peer",
            "kill_far", "pause_far", "cut_far", "power", "power_far", "read_errors"} <= kinds
    assert all(r.far_samples > 50 for r in results)  # C's copy was looked at, often


def test_a_seed_of_the_real_code_replays_exactly() -> None:
    a, b = run_real(3, 12), run_real(3, 12)
    assert (a.digest, a.trace, a.faults) == (b.digest, b.trace, b.faults)
    assert a.digest != run_real(4, 12).digest


def isolate_a(seed: int) -> list[Fault]:
    return [Fault(3.0 + 0.1 * seed, "isolate", "A", 4.7)]


def test_without_leases_the_real_code_serves_stale_reads() -> None:
    """The consistency issue's finding 1, on the real node code: the isolated primary,
    serving without its partner's lease, answers reads from its old copy while B writes
    alone. With leases, the same schedules are clean."""
    broken = [run_real(s, 12, leases=False, far=False, plan=isolate_a(s)) for s in range(8)]
    assert any(r.findings.stale for r in broken)
    fixed = [run_real(s, 12, far=False, plan=isolate_a(s)) for s in range(8)]
    assert [r.line() for r in fixed if not r.ok] == []


def test_a_far_copy_missing_records_is_found(monkeypatch: pytest.MonkeyPatch) -> None:
    """C skips one record in 50 yet says it is consistent: the prefix check sees it."""
    apply = FarTarget.apply_record

    def skip_some(self: FarTarget, g: GroupRuntime, r: Record) -> None:
        if r.seq % 50:
            apply(self, g, r)

    monkeypatch.setattr(FarTarget, "apply_record", skip_some)
    broken = [run_real(seed, 8) for seed in range(1, 4)]
    assert all(any("not a prefix" in f for f in r.findings.far) for r in broken)

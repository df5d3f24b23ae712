"""The nemesis schedule is a pure function of the seed (no processes)."""

from __future__ import annotations

import time
from itertools import pairwise

import pytest

from .nemesis import KINDS, SETTLE, Fault, Nemesis, resources, schedule


@pytest.mark.parametrize("overlap", [False, True])
def test_same_seed_same_schedule_within_the_run(overlap: bool) -> None:
    for seed in range(1, 30):
        faults = schedule(seed, 45, overlap=overlap)
        assert faults == schedule(seed, 45, overlap=overlap)
        assert faults, seed
        for f in faults:
            targets, lo, hi = KINDS[f.kind]
            assert f.target in targets and lo <= f.length <= hi
            assert f.at >= 1.0 and f.at + f.length <= 45 - SETTLE
    assert schedule(1, 45) != schedule(2, 45)


def test_one_at_a_time_leaves_a_gap_between_faults() -> None:
    for seed in range(1, 30):
        faults = schedule(seed, 45)
        for a, b in pairwise(faults):
            assert b.at >= a.at + a.length + 1.0


def test_overlapping_faults_never_share_a_process_or_link() -> None:
    overlapped = 0
    for seed in range(1, 30):
        faults = schedule(seed, 45, overlap=True)
        for i, a in enumerate(faults):
            for b in faults[i + 1:]:
                if b.at < a.at + a.length:
                    overlapped += 1
                    assert not resources(a) & resources(b), (seed, a, b)
    assert overlapped > 10


def test_kinds_can_be_narrowed() -> None:
    faults = schedule(5, 60, ("pause", "kill"))
    assert {f.kind for f in faults} <= {"pause", "kill"}
    assert all(resources(f) <= {"A", "B", "W"} for f in faults)


class Recorder:
    """Stands in for the harness and the network: records what the nemesis does."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def kill9(self, name: str) -> None:
        self.calls.append(("kill9", name))

    def start_one(self, name: str, wait: bool = True) -> None:
        self.calls.append(("start", name))

    def pause(self, name: str) -> None:
        self.calls.append(("pause", name))

    def resume(self, name: str) -> None:
        self.calls.append(("resume", name))

    def mirrored(self) -> bool:
        return True

    def cut(self, link: str) -> None:
        self.calls.append(("cut", link))

    def heal(self, link: str) -> None:
        self.calls.append(("heal", link))


def test_nemesis_applies_and_heals_in_time_order() -> None:
    rec = Recorder()
    faults = [Fault(0.0, "isolate", "A", 0.1), Fault(0.05, "pause", "B", 0.1),
              Fault(0.3, "witness-kill", "W", 0.05)]
    nem = Nemesis(rec, rec, faults, time.monotonic(), time.monotonic() + 5, overlap=True)
    nem.start()
    assert nem.wait_done(5)
    nem.stop()
    assert rec.calls == [("cut", "AB"), ("cut", "AW"), ("pause", "B"), ("heal", "AB"),
                         ("heal", "AW"), ("resume", "B"), ("kill9", "W"), ("start", "W")]
    assert [x["kind"] for x in nem.log] == ["isolate", "pause", "witness-kill"]
    assert all(x["end"] >= x["start"] for x in nem.log) and nem.error is None


def test_stopping_the_nemesis_heals_what_is_active() -> None:
    rec = Recorder()
    nem = Nemesis(rec, rec, [Fault(0.0, "kill", "A", 30.0)], time.monotonic(),
                  time.monotonic() + 60)
    nem.start()
    time.sleep(0.2)
    nem.stop()
    assert rec.calls == [("kill9", "A"), ("start", "A")]
    assert not nem.thread.is_alive()

"""The pure replication core: leases, the partner-loss machine, and its purity."""

from __future__ import annotations

import ast
import pathlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from twinvol.replication.core.decide import (
    AskWitness,
    GoAlone,
    PartnerLoss,
    Phase,
    SetMode,
    Suspend,
)
from twinvol.replication.core.lease import LeaseConfig, PeerLease
from twinvol.replication.core.types import Mode, Role, Verdict

CORE = pathlib.Path(__file__).parents[2] / "src" / "twinvol" / "replication" / "core"


def test_lease_counts_from_the_request_and_only_grows() -> None:
    cfg = LeaseConfig()
    side = PeerLease(cfg)
    s1 = side.request(10.0)
    s2 = side.request(10.1)
    assert side.on_reply(s2, True) and side.held_until == pytest.approx(11.1)
    assert not side.on_reply(s1, True)  # an older answer neither extends nor shortens
    assert side.valid(11.0) and not side.valid(11.1)
    assert not side.on_reply(side.request(10.2), False)
    assert side.held_until == pytest.approx(11.1)
    side.drop()
    assert not side.valid(10.5)


def test_a_granting_side_is_bound_until_its_promise_ends() -> None:
    cfg = LeaseConfig()
    side = PeerLease(cfg)
    assert not side.grant(5.0)  # not mirrored: nothing granted
    side.resume()
    assert side.grant(5.0)
    until = side.revoke()
    assert until == pytest.approx(5.0 + cfg.fence_span)
    assert not side.grant(5.5)  # revoked: the partner gets nothing more
    assert not side.partner_fenced(until - 0.001) and side.partner_fenced(until)
    assert not side.may_act_alone(until - 0.001) and side.may_act_alone(until)
    side.resume()
    assert not side.may_act_alone(until + 10)  # granting again: never alone


def test_a_restarted_side_assumes_it_granted_just_before() -> None:
    cfg = LeaseConfig()
    side = PeerLease.after_start(cfg, 100.0)
    assert not side.partner_fenced(100.0 + cfg.fence_span - 0.01)


def test_bad_lease_configs_are_refused() -> None:
    with pytest.raises(ValueError, match="renew_every"):
        LeaseConfig(duration=1.0, renew_every=1.0)
    with pytest.raises(ValueError, match="margin too small"):
        LeaseConfig(drift=0.2, margin=0.0)


@given(rate_x=st.floats(0.99, 1.01), rate_y=st.floats(0.99, 1.01),
       sent=st.floats(0, 1000), transit=st.floats(0, 5), back=st.floats(0, 5))
def test_the_promise_outlasts_the_lease_in_real_time(rate_x: float, rate_y: float,
                                                     sent: float, transit: float,
                                                     back: float) -> None:
    """X asks at real time `sent`, Y grants `transit` later, X hears it `back` later.
    With clock rates within the drift, X's lease ends (real time) before Y may act."""
    cfg = LeaseConfig()
    x, y = PeerLease(cfg), PeerLease(cfg)
    y.resume()
    seq = x.request(sent * rate_x)
    assert y.grant((sent + transit) * rate_y)
    x.on_reply(seq, True)
    x_end_real = x.held_until / rate_x
    y_free_real = y.revoke() / rate_y
    assert x_end_real < y_free_real


def loss(role: Role = Role.PRIMARY, mode: Mode = Mode.MIRROR) -> PartnerLoss:
    lease = PeerLease(LeaseConfig())
    lease.resume()
    lease.grant(0.0)  # the partner holds a lease until fence_span
    return PartnerLoss(lease, role, mode)


def test_a_primary_keeps_serving_then_waits_out_the_partners_lease() -> None:
    p = loss()
    assert p.start(0.5, "link down") == [Suspend("link down"), AskWitness()]
    assert not p.lease.granting
    assert p.on_verdict(Verdict.CONTINUE, 0.6) == []  # the partner may still serve
    assert p.phase is Phase.FENCING and p.next_timer() == p.lease.granted_until
    assert p.handle_timer(0.7) == []
    assert p.handle_timer(p.lease.granted_until) == [GoAlone("link down", fork=True)]
    assert p.done


def test_a_secondary_blocks_at_once_and_waits_for_the_witness() -> None:
    p = loss(Role.SECONDARY)
    assert p.start(0.0, "lost") == [SetMode(Mode.BLOCK, "lost"), Suspend("lost"), AskWitness()]
    assert p.on_verdict(Verdict.WAIT, 0.1) == []
    assert p.phase is Phase.WAITING and p.next_timer() == pytest.approx(0.4)
    assert p.handle_timer(0.4) == [AskWitness()]
    assert p.on_witness_error(0.5, "timeout") == []
    assert "witness unreachable" in p.reason
    assert p.handle_timer(0.8) == [AskWitness()]
    assert p.on_verdict(Verdict.BLOCK, 0.9) == [
        SetMode(Mode.BLOCK, "the partner continues: this copy is stale")]
    assert p.done and p.on_verdict(Verdict.CONTINUE, 1.0) == []


def test_a_copy_target_blocks_and_a_copy_source_continues_once_fenced() -> None:
    target = PartnerLoss(PeerLease(LeaseConfig()), Role.SECONDARY, Mode.BLOCK, copying=True)
    assert target.start(0.0, "lost") == [SetMode(Mode.BLOCK, "lost")] and target.done
    source = PartnerLoss(PeerLease(LeaseConfig()), Role.PRIMARY, Mode.LOCAL, copying=True,
                         copy_source=True)
    assert source.start(0.0, "lost") == [GoAlone("lost", fork=False)]


FORBIDDEN = {"asyncio", "socket", "time", "os", "selectors", "threading", "subprocess",
             "sqlite3"}


def test_the_core_does_no_io() -> None:
    """No clock, socket, file or event loop inside the core: it takes `now`."""
    for path in sorted(CORE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                assert top not in FORBIDDEN, f"{path.name} imports {name}"
                if top == "twinvol":
                    assert name.startswith("twinvol.replication.core"), \
                        f"{path.name} imports {name} from outside the core"


def test_the_witness_hint_times_the_next_question() -> None:
    from twinvol.witness.logic import Arbiter, ArbitrateRequest

    arb = Arbiter(["A", "B"], now=0.0, takeover_after=1.5)
    arb.heartbeat("A", 10.0)
    d = arb.arbitrate(ArbitrateRequest("p", "B", "A", "secondary", "g"), 10.4)
    assert d.decision == "wait" and d.retry_after == pytest.approx(1.1)
    p = loss(Role.SECONDARY)
    p.start(10.4, "lost")
    assert p.on_verdict(Verdict(d.decision), 10.4, d.reason, d.retry_after) == []
    assert p.next_timer() == pytest.approx(11.51)  # not a polling step late
    assert arb.arbitrate(ArbitrateRequest("p", "B", "A", "secondary", "g"),
                         11.51).decision == "continue"


def test_pace_holds_a_copy_to_its_rate_and_follows_a_change() -> None:
    from twinvol.replication.core.pace import Pace
    p = Pace()
    assert p.delay(0, 10 << 20, 5.0) == 0.0                 # unlimited
    assert p.delay(1 << 20, 0, 10.0) == 0.0                 # a new rate starts the reckoning
    assert p.delay(1 << 20, 2 << 20, 10.5) == pytest.approx(1.5)   # 2 MiB in 0.5 s: 1.5 ahead
    assert p.delay(1 << 20, 2 << 20, 12.5) == 0.0           # behind: never a negative wait
    # Raised to 4 MiB/s: the bytes sent at the old rate are not paid for again.
    assert p.delay(4 << 20, 3 << 20, 13.0) == 0.0
    assert p.delay(4 << 20, 5 << 20, 13.25) == pytest.approx(0.25)


def test_a_copy_that_applies_nothing_while_records_wait_is_stalled() -> None:
    from twinvol.replication.core.stall import CopyProgress
    p = CopyProgress(apply_after=10.0, inflight_after=30.0)
    kw = {"written": 5, "committed": 5, "sent": 5, "oldest_inflight": 0,
          "target_up": True, "streaming": True}
    assert p.observe(0.0, applied=3, **kw) is None
    assert p.observe(9.0, applied=3, **kw) is None
    s = p.observe(10.5, applied=3, **kw)
    assert s is not None and s.reason == ("the target applied nothing for 10 s with the "
                                          "link up (written 5, sent 5, applied 3)")
    p.reset(11.0)
    assert p.observe(11.0, applied=4, **kw) is None
    assert p.observe(30.0, applied=5, **kw) is None          # advancing: never stalled
    # Link down, bitmap catch-up, nothing committed: waiting is no stall.
    assert p.observe(100.0, applied=4, **{**kw, "target_up": False}) is None
    assert p.observe(200.0, applied=4, **{**kw, "streaming": False}) is None
    assert p.observe(300.0, applied=4, **{**kw, "committed": 4}) is None


def test_a_write_that_never_commits_is_a_stall() -> None:
    from twinvol.replication.core.stall import CopyProgress
    p = CopyProgress(apply_after=10.0, inflight_after=30.0)
    kw = {"written": 9, "committed": 6, "sent": 6, "applied": 6, "target_up": True,
          "streaming": True}
    assert p.observe(0.0, oldest_inflight=7, **kw) is None
    assert p.observe(20.0, oldest_inflight=7, **kw) is None
    assert p.observe(25.0, oldest_inflight=8, **kw) is None  # 7 committed, 8 is new
    s = p.observe(56.0, oldest_inflight=8, **kw)
    assert s is not None and s.reason.startswith("write 8 stayed uncommitted for 31 s")

"""The witness's rules (`Arbiter`) with a fake clock, its config parsing and its state file."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest
from aiohttp import test_utils
from hypothesis import given, settings
from hypothesis import strategies as st

from twinvol.cluster import ClusterError
from twinvol.witness import witness_config, witness_settings
from twinvol.witness.client import (
    HttpWitness,
    LocalWitness,
    Witness,
    WitnessRejected,
    WitnessUnreachable,
)
from twinvol.witness.logic import (
    Arbiter,
    ArbitrateRequest,
    Conflict,
    RequestError,
    Role,
    StateError,
)
from twinvol.witness.server import StateStore, WitnessServer, WitnessStartError, make_app

T = 2.0


def ask(arb: Arbiter, node: str, role: Role, now: float, pair: str = "P",
        generation: str = "g1") -> tuple[str, str | None]:
    partner = "B" if node == "A" else "A"
    d = arb.arbitrate(ArbitrateRequest(pair, node, partner, role, generation), now)
    return d.decision, d.holder


@pytest.fixture
def arb() -> Arbiter:
    return Arbiter(["A", "B", "C"], now=0.0, takeover_after=T)


# ---- the rules ------------------------------------------------------------


def test_primary_continues_at_once_and_the_grant_is_sticky(arb: Arbiter) -> None:
    arb.heartbeat("B", 0.1)
    assert ask(arb, "A", "primary", 0.2) == ("continue", "A")
    assert ask(arb, "B", "secondary", 0.3) == ("block", "A")
    assert ask(arb, "A", "primary", 0.4) == ("continue", "A")
    # B claiming to be primary changes nothing, nor does A going silent forever.
    assert ask(arb, "B", "primary", 0.5) == ("block", "A")
    assert ask(arb, "B", "secondary", 1e6) == ("block", "A")
    assert arb.holder("P") == "A"


def test_link_cut_secondary_waits_then_is_blocked_by_the_primary(arb: Arbiter) -> None:
    for t in (0.5, 1.0, 1.5, 2.0, 2.5):
        arb.heartbeat("A", t)
        assert ask(arb, "B", "secondary", t + 0.1) == ("wait", None)
    assert arb.holds == {}
    assert ask(arb, "A", "primary", 2.7) == ("continue", "A")
    assert ask(arb, "B", "secondary", 2.8) == ("block", "A")


def test_secondary_takes_over_after_the_primary_is_silent(arb: Arbiter) -> None:
    arb.heartbeat("A", 1.0)
    assert ask(arb, "B", "secondary", 1.0 + T - 0.01)[0] == "wait"
    d = arb.arbitrate(ArbitrateRequest("P", "B", "A", "secondary", "g2"), 1.0 + T)
    assert (d.decision, d.holder) == ("continue", "B")
    assert "silent" in d.reason
    # The primary comes back: it is the stale side now.
    arb.heartbeat("A", 10.0)
    assert ask(arb, "A", "primary", 10.1) == ("block", "B")
    assert arb.holds["P"].generation == "g2"


def test_a_fresh_witness_gives_the_primary_time_to_check_in() -> None:
    arb = Arbiter(["A", "B"], now=100.0, takeover_after=T)
    assert ask(arb, "B", "secondary", 100.0)[0] == "wait"
    assert ask(arb, "B", "secondary", 100.0 + T - 0.01)[0] == "wait"
    assert ask(arb, "B", "secondary", 100.0 + T) == ("continue", "B")


def test_arbitrate_and_release_count_as_liveness(arb: Arbiter) -> None:
    assert ask(arb, "A", "primary", 1.0, pair="Q") == ("continue", "A")
    assert ask(arb, "B", "secondary", 1.0 + T - 0.5)[0] == "wait"
    assert arb.release("Q", "A", 2.5)
    assert ask(arb, "B", "secondary", 2.5 + T - 0.5)[0] == "wait"
    assert ask(arb, "B", "secondary", 2.5 + T)[0] == "continue"


def test_both_claim_secondary_and_both_alive_nobody_writes(arb: Arbiter) -> None:
    for t in range(1, 10):
        arb.heartbeat("A", t)
        arb.heartbeat("B", t)
        assert ask(arb, "A", "secondary", t)[0] == "wait"
        assert ask(arb, "B", "secondary", t)[0] == "wait"


def test_holder_asking_again_records_its_new_generation(arb: Arbiter) -> None:
    ask(arb, "A", "primary", 1.0)
    seq = arb.seq
    ask(arb, "A", "primary", 2.0)
    assert arb.seq == seq  # nothing to persist
    ask(arb, "A", "primary", 3.0, generation="g9")
    assert arb.seq == seq + 1 and arb.holds["P"].generation == "g9"


def test_release(arb: Arbiter) -> None:
    assert arb.release("P", "A", 0.0) is False  # not held: a no-op success
    assert arb.seq == 0
    ask(arb, "A", "primary", 1.0)
    with pytest.raises(Conflict, match="only the holder"):
        arb.release("P", "B", 1.1)
    assert arb.holder("P") == "A"
    assert arb.release("P", "A", 1.2) is True
    assert arb.holds == {}
    # After the release the pair can be granted afresh, to the primary as ever.
    assert ask(arb, "A", "primary", 1.3) == ("continue", "A")


def test_pairs_are_independent(arb: Arbiter) -> None:
    assert ask(arb, "A", "primary", 1.0, pair="P") == ("continue", "A")
    d = arb.arbitrate(ArbitrateRequest("Q", "B", "A", "primary", "x"), 1.0)
    assert (d.decision, d.holder) == ("continue", "B")
    assert ask(arb, "A", "secondary", 1.1, pair="Q") == ("block", "B")


@pytest.mark.parametrize(("req", "msg"), [
    (ArbitrateRequest("P", "X", "B", "primary", "g"), "node 'X' is not in the cluster"),
    (ArbitrateRequest("P", "A", "Y", "primary", "g"), "partner 'Y' is not in the cluster"),
    (ArbitrateRequest("P", "A", "A", "primary", "g"), "both 'A'"),
    (ArbitrateRequest("P", "A", "B", "leader", "g"), "role must be"),
    (ArbitrateRequest("", "A", "B", "primary", "g"), "pair must be"),
    (ArbitrateRequest("P" * 300, "A", "B", "primary", "g"), "pair must be"),
    (ArbitrateRequest("P", "", "B", "primary", "g"), "non-empty"),
    (ArbitrateRequest("P", "A", "B", "primary", 7), "generation"),
    (ArbitrateRequest("H", "C", "B", "primary", "g"), "held between A and B"),
])
def test_bad_requests_change_nothing(arb: Arbiter, req: ArbitrateRequest, msg: str) -> None:
    ask(arb, "A", "primary", 1.0, pair="H")
    before, seen = arb.snapshot(), dict(arb.last_seen)
    with pytest.raises(RequestError, match=msg):
        arb.arbitrate(req, 5.0)
    assert arb.snapshot() == before and arb.last_seen == seen


def test_bad_heartbeat_and_release(arb: Arbiter) -> None:
    with pytest.raises(RequestError, match="not in the cluster"):
        arb.heartbeat("Z", 1.0)
    with pytest.raises(RequestError, match="not in the cluster"):
        arb.release("P", "Z", 1.0)
    with pytest.raises(RequestError, match="pair must be"):
        arb.release("", "A", 1.0)
    assert arb.last_seen == {}


def test_node_status(arb: Arbiter) -> None:
    arb.heartbeat("A", 1.0)
    st_ = arb.node_status(1.5)
    assert st_["A"] == {"last_heartbeat_ago": 0.5, "gone": False}
    assert st_["B"] == {"last_heartbeat_ago": None, "gone": False}
    assert arb.node_status(10.0)["B"]["gone"] is True


def test_constructor_checks() -> None:
    with pytest.raises(ValueError, match="at least one node"):
        Arbiter([], now=0.0)
    with pytest.raises(ValueError, match="positive"):
        Arbiter(["A"], now=0.0, takeover_after=0)


# ---- snapshot / restore ------------------------------------------------------


def test_snapshot_restore_keeps_grants(arb: Arbiter) -> None:
    ask(arb, "A", "primary", 1.0, pair="P", generation="gen-7")
    data = msgspec.json.decode(msgspec.json.encode(arb.snapshot()))
    again = Arbiter(["A", "B", "C"], now=50.0, takeover_after=T)
    again.restore(data)
    assert again.holds == arb.holds and again.seq == arb.seq
    assert ask(again, "B", "secondary", 1e6) == ("block", "A")


@pytest.mark.parametrize("data", [
    None, [], "x", {}, {"format": "twinvol-witness/1", "seq": 1},
    {"format": "other/9", "seq": 1, "holds": {}},
    {"format": "twinvol-witness/1", "seq": "1", "holds": {}},
    {"format": "twinvol-witness/1", "seq": 1, "holds": {"P": {"node": "A"}}},
    {"format": "twinvol-witness/1", "seq": 1,
     "holds": {"P": {"node": "A", "partner": "A", "role": "primary", "generation": ""}}},
    {"format": "twinvol-witness/1", "seq": 1,
     "holds": {"P": {"node": "A", "partner": "B", "role": "boss", "generation": ""}}},
])
def test_restore_refuses_damaged_state(arb: Arbiter, data: Any) -> None:
    ask(arb, "A", "primary", 1.0)
    before = arb.snapshot()
    with pytest.raises(StateError):
        arb.restore(data)
    assert arb.snapshot() == before


def test_state_store(tmp_path: Any) -> None:
    store = StateStore(str(tmp_path))
    assert store.load() is None
    arb = Arbiter(["A", "B"], now=0.0)
    ask(arb, "A", "primary", 0.0)
    store.save(arb.snapshot())
    assert store.load() == arb.snapshot()
    assert not os.path.exists(store.path + ".tmp")
    with open(store.path, "w") as f:
        f.write('{"format": "twinvol-witn')
    with pytest.raises(WitnessStartError, match="is damaged"):
        store.load()


def test_a_decision_that_cannot_be_persisted_is_not_made(tmp_path: Any) -> None:
    path = write(tmp_path, NODE_TABLES + '[witness]\naddr = "127.0.0.1:9"\ndata_dir = "w"\n')
    server = WitnessServer(witness_settings(path), takeover_after=T)

    def broken(_: Any) -> None:
        raise OSError(28, "No space left on device")

    async def go() -> None:
        async with test_utils.TestServer(make_app(server), host="127.0.0.1") as ts, \
                HttpWitness(f"127.0.0.1:{ts.port}") as w:
            server.store.save = broken
            with pytest.raises(WitnessUnreachable, match="No space left"):
                await w.arbitrate("P", "A", "B", "primary", "g")
            assert server.arbiter.holds == {} and server.arbiter.seq == 0
            assert await w.pairs() == []
            await w.heartbeat("A")  # nothing to persist: still answered
            del server.store.save
            assert (await w.arbitrate("P", "A", "B", "primary", "g")).decision == "continue"
        await server.stop()

    asyncio.run(go())
    again = WitnessServer(witness_settings(path), takeover_after=T)
    assert again.arbiter.holder("P") == "A"
    asyncio.run(again.stop())


# ---- the client interface over an in-process arbiter -----------------------------


def test_local_witness() -> None:
    now = [0.0]
    w = LocalWitness(Arbiter(["A", "B"], now=0.0, takeover_after=T), clock=lambda: now[0])
    assert isinstance(w, Witness)

    async def go() -> None:
        await w.heartbeat("A")
        assert (await w.arbitrate("P", "B", "A", "secondary", "g")).decision == "wait"
        now[0] = 5.0
        assert (await w.arbitrate("P", "B", "A", "secondary", "g")).decision == "continue"
        with pytest.raises(WitnessRejected) as e:
            await w.release("P", "A")
        assert (e.value.status, e.value.code) == (409, "conflict")
        with pytest.raises(WitnessRejected) as e:
            await w.heartbeat("nope")
        assert (e.value.status, e.value.code) == (400, "invalid")
        assert await w.release("P", "B") is True
        assert await w.release("P", "B") is False
        await w.close()

    asyncio.run(go())


# ---- interleavings -----------------------------------------------------------

NODES = ("A", "B")
PAIRS = ("P", "Q")
ROLES: dict[str, dict[str, Role]] = {"P": {"A": "primary", "B": "secondary"},
                                     "Q": {"A": "secondary", "B": "primary"}}

op = st.one_of(
    st.tuples(st.just("tick"), st.sampled_from([0.25, 0.5, 1.0, 1.75, 2.0, 3.0])),
    st.tuples(st.just("heartbeat"), st.sampled_from(NODES)),
    st.tuples(st.just("arbitrate"), st.sampled_from(NODES), st.sampled_from(PAIRS),
              st.sampled_from(["primary", "secondary"])),
    st.tuples(st.just("release"), st.sampled_from(NODES), st.sampled_from(PAIRS)),
    st.tuples(st.just("restart")),
)


@dataclass
class Model:
    """What the witness must have decided, tracked independently of the arbiter."""

    now: float = 0.0
    started: float = 0.0
    seen: dict[str, float] = field(default_factory=dict)
    holder: dict[str, str] = field(default_factory=dict)
    granted: dict[str, set[str]] = field(default_factory=dict)  # continues since a release


def run_ops(ops: list[tuple[Any, ...]], fixed_roles: bool) -> None:
    arb = Arbiter(NODES, now=0.0, takeover_after=T)
    m = Model()
    for o in ops:
        kind = o[0]
        if kind == "tick":
            m.now += o[1]
        elif kind == "heartbeat":
            arb.heartbeat(o[1], m.now)
            m.seen[o[1]] = m.now
        elif kind == "restart":  # kill -9 and restart: only the persisted snapshot survives
            data = msgspec.json.decode(msgspec.json.encode(arb.snapshot()))
            arb = Arbiter(NODES, now=m.now, takeover_after=T)
            arb.restore(data)
            m.started, m.seen = m.now, {}
        elif kind == "release":
            node, pair = o[1], o[2]
            held = m.holder.get(pair)
            if held is not None and held != node:
                with pytest.raises(Conflict):
                    arb.release(pair, node, m.now)
                continue
            assert arb.release(pair, node, m.now) is (held is not None)
            m.holder.pop(pair, None)
            m.granted[pair] = set()
            m.seen[node] = m.now
        else:
            node, pair = o[1], o[2]
            partner = "B" if node == "A" else "A"
            role: Role = ROLES[pair][node] if fixed_roles else o[3]
            d = arb.arbitrate(ArbitrateRequest(pair, node, partner, role, "g"), m.now)
            held = m.holder.get(pair)
            want: tuple[str, str | None]
            if held is not None:
                want = ("continue" if held == node else "block", held)
            elif role == "primary":
                want = ("continue", node)  # the primary wins when nobody holds
            elif m.now - m.seen.get(partner, m.started) >= T:
                want = ("continue", node)
            else:
                want = ("wait", None)
            assert (d.decision, d.holder) == want, (o, m)
            m.seen[node] = m.now
            if d.decision == "continue":
                m.holder[pair] = node
                m.granted.setdefault(pair, set()).add(node)
                # The invariant: never both sides told to write without a release between.
                assert len(m.granted[pair]) == 1, (o, m)
        assert {p: h.node for p, h in arb.holds.items()} == m.holder


@settings(max_examples=400, deadline=None)
@given(st.lists(op, max_size=60))
def test_interleavings_with_fixed_roles(ops: list[tuple[Any, ...]]) -> None:
    run_ops(ops, fixed_roles=True)


@settings(max_examples=400, deadline=None)
@given(st.lists(op, max_size=60))
def test_interleavings_with_any_role_claims(ops: list[tuple[Any, ...]]) -> None:
    run_ops(ops, fixed_roles=False)


# ---- configuration -------------------------------------------------------------

NODE_TABLES = """
[nodes.A]
site = "A"
nbd = "127.0.0.1:1"
api = "127.0.0.1:2"
data_dir = "A"

[nodes.B]
site = "B"
nbd = "127.0.0.1:3"
api = "127.0.0.1:4"
data_dir = "B"
"""


def write(tmp_path: Any, text: str) -> str:
    path = os.path.join(str(tmp_path), "cluster.toml")
    with open(path, "w") as f:
        f.write(text)
    return path


def test_witness_settings(tmp_path: Any) -> None:
    path = write(tmp_path, '[cluster]\nname = "x"\nsecret = "s"\n' + NODE_TABLES +
                 '[witness]\naddr = "127.0.0.1:9"\ndata_dir = "w"\n')
    s = witness_settings(path)
    assert s.nodes == ("A", "B") and s.secret == "s"
    assert s.data_dir == os.path.join(str(tmp_path), "w")
    assert s.config.url == "http://127.0.0.1:9"
    assert witness_config(path) == s.config
    assert s.config.data_path("/elsewhere/c.toml") == "/elsewhere/w"


@pytest.mark.parametrize(("text", "msg"), [
    (NODE_TABLES, "no \\[witness\\] table"),
    (NODE_TABLES + '[witness]\naddr = "nope"\ndata_dir = "w"\n', "not HOST:PORT"),
    (NODE_TABLES + '[witness]\naddr = "127.0.0.1:9"\n', "data_dir"),
    (NODE_TABLES + '[witness]\naddr = "127.0.0.1:9"\ndata_dir = "w"\nx = 1\n', "unknown field"),
    ('[witness]\naddr = "127.0.0.1:9"\ndata_dir = "w"\n', "names no nodes"),
    ('[cluster]\nsecret = 5\n' + NODE_TABLES + '[witness]\naddr = "h:9"\ndata_dir = "w"\n',
     "secret must be"),
    ("[witness", "not valid TOML"),
])
def test_witness_settings_errors(tmp_path: Any, text: str, msg: str) -> None:
    with pytest.raises(ClusterError, match=msg):
        witness_settings(write(tmp_path, text))


def test_witness_settings_missing_file(tmp_path: Any) -> None:
    with pytest.raises(ClusterError, match="does not exist"):
        witness_settings(os.path.join(str(tmp_path), "none.toml"))

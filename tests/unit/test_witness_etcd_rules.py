"""The etcd backend's pure parts: the Arbiter's verdicts over what etcd holds, the
transactions' encoding and the ``[witness]`` table for ``backend = "etcd"``."""

from __future__ import annotations

import asyncio
import os
import re
import time
from typing import Any

import msgspec
import pytest

from twinvol.cluster import ClusterError
from twinvol.witness import Backend, WitnessConfig, witness_config
from twinvol.witness import etcd_rules as rules
from twinvol.witness.client import WitnessUnreachable
from twinvol.witness.etcd import EtcdWitness, ssl_context
from twinvol.witness.logic import ArbitrateRequest, Conflict, Hold, RequestError

NODES = ("A", "B")
TTL = 2.0


def seen(hold: Hold | None = None, left: float | None = None) -> rules.Seen:
    return rules.Seen(hold, 7 if hold else 0, left, 9 if left is not None else 0)


def req(node: str, role: str, pair: str = "P", gen: str = "g1") -> ArbitrateRequest:
    return ArbitrateRequest(pair, node, "B" if node == "A" else "A", role,  # type: ignore[arg-type]
                            gen)


def test_primary_gets_the_free_pair_and_a_write() -> None:
    out = rules.arbitrate(req("A", "primary"), NODES, TTL, seen(left=1.0))
    assert out.decision.decision == "continue" and out.decision.holder == "A"
    assert out.write == Hold("A", "B", "primary", "g1")


def test_secondary_waits_while_the_primary_lease_runs() -> None:
    out = rules.arbitrate(req("B", "secondary"), NODES, TTL, seen(left=1.5))
    assert out.decision.decision == "wait" and out.write is None
    assert out.decision.retry_after == 1.5  # asks again when the lease would run out


def test_secondary_takes_over_once_the_primary_lease_is_gone() -> None:
    out = rules.arbitrate(req("B", "secondary"), NODES, TTL, seen(left=None))
    assert out.decision.decision == "continue"
    assert out.decision.reason == "primary A has no live etcd lease (no keepalive for 2s)"
    assert out.write == Hold("B", "A", "secondary", "g1")


def test_holds_are_sticky_and_a_new_generation_is_written() -> None:
    held = Hold("B", "A", "secondary", "g1")
    out = rules.arbitrate(req("A", "primary"), NODES, TTL, seen(held, left=None))
    assert (out.decision.decision, out.decision.holder, out.write) == ("block", "B", None)
    out = rules.arbitrate(req("B", "primary", gen="g2"), NODES, TTL, seen(held, left=2.0))
    assert out.decision.decision == "continue"
    assert out.write == Hold("B", "A", "primary", "g2")
    out = rules.arbitrate(req("B", "secondary"), NODES, TTL, seen(held))
    assert out.decision.decision == "continue" and out.write is None


def test_bad_requests_are_refused_like_the_builtin_witness() -> None:
    with pytest.raises(RequestError, match="'C' is not in the cluster file"):
        rules.arbitrate(ArbitrateRequest("P", "C", "A", "primary", "g"), NODES, TTL, seen())
    with pytest.raises(RequestError, match="held between A and B"):
        rules.arbitrate(ArbitrateRequest("P", "A", "C", "primary", "g"), ("A", "B", "C"), TTL,
                        seen(Hold("A", "B", "primary", "g")))


def test_release_only_by_the_holder() -> None:
    held = Hold("A", "B", "primary", "g")
    assert rules.release("P", "A", NODES, held) is True
    assert rules.release("P", "A", NODES, None) is False
    with pytest.raises(Conflict, match="held by A; only the holder"):
        rules.release("P", "B", NODES, held)


def test_encoding() -> None:
    assert rules.range_end("/t/holds/") == rules.b64("/t/holds0")
    assert rules.compare_mod("/k", 0) == {"key": "L2s=", "target": "MOD", "result": "EQUAL",
                                          "mod_revision": "0"}
    assert rules.compare_lease("/k", 5)["lease"] == "5"
    assert rules.put("/k", b"v", lease=3) == {"request_put": {"key": "L2s=", "value": "dg==",
                                                              "lease": "3"}}
    kv = rules.kvs({"kvs": [{"key": "L2s=", "value": rules.b64(b'{"node":"A","lease":4}'),
                             "mod_revision": "12", "lease": "4"}]})
    assert kv == [rules.Kv("/k", b'{"node":"A","lease":4}', 12, 4)]
    assert rules.decode_alive(kv[0].value) == rules.Alive("A", 4)
    with pytest.raises(msgspec.ValidationError):
        rules.decode_hold(b'{"node": 1}')


NODE_TABLES = ('[nodes.A]\nsite = "A"\nnbd = "127.0.0.1:1"\napi = "127.0.0.1:2"\n'
               'data_dir = "a"\n[nodes.B]\nsite = "B"\nnbd = "127.0.0.1:3"\n'
               'api = "127.0.0.1:4"\ndata_dir = "b"\n')


def write(tmp_path: Any, witness: str) -> str:
    path = os.path.join(str(tmp_path), "cluster.toml")
    with open(path, "w") as f:
        f.write(NODE_TABLES + "[witness]\n" + witness)
    return path


def test_etcd_table(tmp_path: Any) -> None:
    cfg = witness_config(write(tmp_path, 'backend = "etcd"\n'
                                         'endpoints = ["127.0.0.1:2379", "10.0.0.2:2379"]\n'))
    assert cfg.backend is Backend.ETCD and cfg.lease_ttl == 2 and not cfg.tls
    assert cfg.key_prefix("prod") == "/twinvol/prod/"
    cfg = witness_config(write(tmp_path, 'backend = "etcd"\nendpoints = ["h:1"]\n'
                                         'prefix = "/x/"\nca_file = "ca.pem"\n'))
    assert cfg.key_prefix("prod") == "/x/" and cfg.tls
    assert cfg.resolve(os.path.join("/etc/tv", "c.toml")).ca_file == "/etc/tv/ca.pem"


@pytest.mark.parametrize(("text", "msg"), [
    ('backend = "etcd"\n', 'needs endpoints = ["HOST:PORT", ...]'),
    ('backend = "etcd"\nendpoints = ["nope"]\n', "not HOST:PORT"),
    ('backend = "etcd"\nendpoints = ["h:1"]\naddr = "h:2"\n', "addr is for the builtin"),
    ('backend = "etcd"\nendpoints = ["h:1"]\nlease_ttl = 1\n', "at least 2 seconds"),
    ('backend = "etcd"\nendpoints = ["h:1"]\ncert_file = "c.pem"\n', "go together"),
    ('backend = "etcd"\nendpoints = ["h:1"]\nprefix = "x"\n', "must start with /"),
    ('backend = "zookeeper"\n', "Invalid enum value 'zookeeper' - at `$.backend`"),
    ('addr = "h:1"\ndata_dir = "w"\nendpoints = ["h:1"]\n', 'endpoints is for backend = "etcd"'),
    ('data_dir = "w"\n', "builtin witness needs addr"),
])
def test_etcd_table_errors(tmp_path: Any, text: str, msg: str) -> None:
    with pytest.raises(ClusterError, match=re.escape(msg)):
        witness_config(write(tmp_path, text))


def test_tls_files_missing_is_a_clear_error(tmp_path: Any) -> None:
    cfg = witness_config(write(tmp_path, 'backend = "etcd"\nendpoints = ["h:1"]\n'
                                         'cert_file = "c.pem"\nkey_file = "k.pem"\n'))
    with pytest.raises(WitnessUnreachable, match=r"etcd TLS files unusable .*c\.pem"):
        ssl_context(cfg.resolve(os.path.join(str(tmp_path), "cluster.toml")))


class FakeGate:
    def __init__(self, alone: list[str]) -> None:
        self.pairs = alone
        self.calls: list[tuple[str, list[str]]] = []

    def alone(self) -> list[str]:
        return list(self.pairs)

    def fence(self, pairs: list[str], reason: str) -> None:
        self.calls.append(("fence", pairs))
        assert reason == "A lost its etcd lease: a copy serves alone only while it holds one"

    def unfence(self) -> None:
        self.calls.append(("unfence", []))


def test_lease_guard_fences_lone_copies_and_a_watched_delete_is_a_loss_at_once() -> None:
    cfg = msgspec.convert({"backend": "etcd", "endpoints": ["127.0.0.1:1"]}, WitnessConfig)
    gate = FakeGate(["p1"])
    w = EtcdWitness(cfg, "x", NODES, gate)

    async def run() -> None:
        w.node = "A"
        w.lease, w.lease_until = 7, time.monotonic() + 60
        guard = asyncio.ensure_future(w._guard())
        try:
            await asyncio.sleep(0.25)
            assert gate.calls == []
            # etcd's watch: our alive key was deleted (the lease expired there).
            w._on_watch(b'{"result":{"events":[{"type":"DELETE","kv":{"key":"eA=="}}]}}')
            assert not w.has_lease() and w.lease == 0
            await asyncio.sleep(0.25)
            gate.pairs.append("p2")  # another pair left alone while still without a lease
            await asyncio.sleep(0.25)
            w.lease_until = time.monotonic() + 60  # a keepalive succeeded
            await asyncio.sleep(0.25)
        finally:
            guard.cancel()
            await w.close()

    asyncio.run(run())
    assert gate.calls == [("fence", ["p1"]), ("fence", ["p2"]), ("unfence", [])]

"""`twinvol token create` is all or nothing across real node processes: with a node
down it fails with one clear line and leaves the token nowhere; a name another
component already holds is refused and that component's token is left alone; of two
concurrent creates of one name at most one wins, and never half of each."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from clusterproc import ClusterProc
from twinvol.access import hash_token

pytestmark = pytest.mark.e2e


def held(c: ClusterProc, node: str) -> dict[str, str]:
    status, body = c.api(node, "GET", "/api/v1/tokens")
    assert status == 200, body
    return {t["name"]: t["scope"] for t in body["tokens"]}


def works(c: ClusterProc, node: str, token: str) -> bool:
    return c.api(node, "GET", "/api/v1/node", secret=token)[0] == 200


def test_create_with_a_node_down_makes_nothing(two: ClusterProc) -> None:
    c = two
    c.sup.stop("B")
    p = c.cli("token", "create", "ci", "--scope", "operate", "--json")
    assert p.returncode == 1 and p.stdout == ""
    line = p.stderr.strip()
    assert line.startswith("twinvol: error: token ci was not created: node B (http://127.0.0.1:")
    assert "is not reachable" in line and line.endswith("; removed again from node A"), line
    assert "ci" not in held(c, "A")
    c.start("B")
    assert "ci" not in held(c, "B")
    p = c.cli("token", "create", "ci", "--scope", "operate", "--json")
    assert p.returncode == 0, p.stderr
    token = json.loads(p.stdout)["token"]
    assert works(c, "A", token) and works(c, "B", token)


def test_existing_name_is_refused_and_left_alone(two: ClusterProc) -> None:
    c = two
    theirs = hash_token("tvt_someone-elses")
    status, _ = c.api("B", "POST", "/api/v1/tokens",
                      {"name": "ops", "scope": "admin", "hash": theirs})
    assert status == 201
    p = c.cli("token", "create", "ops", "--scope", "read")
    assert p.returncode == 1
    assert p.stderr.strip() == ("twinvol: error: token ops was not created: node B: a token "
                                "named 'ops' already exists on node B (delete it first); "
                                "removed again from node A")
    assert "ops" not in held(c, "A") and held(c, "B")["ops"] == "admin"
    # A removal naming another hash leaves the token there.
    status, body = c.api("B", "DELETE", f"/api/v1/tokens/ops?hash={hash_token('x')}")
    assert status == 409 and held(c, "B")["ops"] == "admin", body


def test_concurrent_creates_of_one_name(two: ClusterProc) -> None:
    c = two
    env = {**os.environ, "TWINVOL_CLUSTER": c.path}
    procs = [subprocess.Popen([sys.executable, "-m", "twinvol", "token", "create", "race",
                               "--scope", "read", "--json"], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(2)]
    outs = [p.communicate(timeout=60) for p in procs]
    won = [json.loads(out) for (out, _), p in zip(outs, procs, strict=True)
           if p.returncode == 0]
    assert len(won) <= 1, outs
    for (_, err), p in zip(outs, procs, strict=True):
        if p.returncode != 0:
            assert "token race was not created" in err and "already exists" in err, err
    on = ["race" in held(c, n) for n in ("A", "B")]
    if won:  # the winner's token everywhere
        assert on == [True, True]
        assert works(c, "A", won[0]["token"]) and works(c, "B", won[0]["token"])
    else:    # or nowhere
        assert on == [False, False]

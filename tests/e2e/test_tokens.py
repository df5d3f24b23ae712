"""Scoped API tokens and the audit log on a real node: tokens made by `twinvol token`,
stored hashed; a read token scrapes /metrics but cannot delete a volume (403), and the
audit log shows the attempt; the cluster secret keeps working as admin."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from nodeproc import NodeProc

pytestmark = pytest.mark.e2e

SECRET = "s3cret-for-tests"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProc]:
    n = NodeProc(str(tmp_path_factory.mktemp("tokens")), secret=SECRET)
    n.start()
    yield n
    n.stop()


def cli(node: NodeProc, *args: str, token: str | None = None
        ) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TWINVOL_CLUSTER": node.cluster_path}
    env.pop("TWINVOL_TOKEN", None)
    if token is not None:
        env["TWINVOL_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "twinvol", *args], env=env, text=True,
                          capture_output=True, timeout=60)


def http(node: NodeProc, method: str, path: str, token: str | None,
         body: dict[str, Any] | None = None) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(node.config.api_url + path, data=data, method=method,
                                 headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def audit(node: NodeProc) -> list[dict[str, Any]]:
    with open(os.path.join(node.data_dir, "audit.log")) as f:
        return [json.loads(line) for line in f]


def make_token(node: NodeProc, name: str, scope: str) -> str:
    p = cli(node, "token", "create", name, "--scope", scope, "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert (out["name"], out["scope"], out["nodes"]) == (name, scope, ["A"])
    return str(out["token"])


def test_read_token_cannot_delete_and_is_audited(node: NodeProc) -> None:
    node.create_volume("keep", 1 << 20)
    viewer = make_token(node, "viewer", "read")
    with open(os.path.join(node.data_dir, "tokens.json")) as f:
        stored = f.read()
    assert viewer not in stored and '"hash":"sha256:' in stored

    p = cli(node, "volume", "delete", "keep", "--node", "A", token=viewer)
    assert p.returncode == 1
    assert ("token 'viewer' has scope read; DELETE /api/v1/volumes/keep needs admin"
            in p.stderr)
    status, _ = http(node, "GET", "/api/v1/volumes/keep", viewer)
    assert status == 200  # still there, and a read token may look at it
    denied = [r for r in audit(node) if r["method"] == "DELETE"]
    assert len(denied) == 1
    r = denied[0]
    assert (r["token"], r["object"], r["result"], r["outcome"]) == (
        "viewer", "/api/v1/volumes/keep", 403, "denied")
    assert r["source"] == "127.0.0.1" and r["time"].endswith("Z")


def test_scopes_and_metrics(node: NodeProc) -> None:
    viewer = make_token(node, "viewer2", "read")
    ops = make_token(node, "ops", "operate")
    assert http(node, "GET", "/metrics", viewer)[0] == 200
    assert http(node, "GET", "/metrics", None)[0] == 401
    assert http(node, "GET", "/metrics", "tvt_not-a-token")[0] == 401
    status, body = http(node, "POST", "/api/v1/volumes", ops, {"name": "x", "size": 4096})
    assert status == 403 and b"needs admin" in body
    assert http(node, "GET", "/api/v1/tokens", ops)[0] == 403  # listing tokens is admin
    # The cluster secret is admin: creating works and is audited under its name.
    assert cli(node, "volume", "create", "made", "--size", "1M", "--node", "A").returncode == 0
    made = [r for r in audit(node) if r["object"] == "/api/v1/volumes"
            and r["outcome"] == "ok"]
    assert made and made[-1]["token"] == "cluster-secret" and made[-1]["result"] == 201
    listed = json.loads(cli(node, "token", "list", "--json").stdout)["tokens"]
    assert {(t["name"], t["scope"]) for t in listed} >= {("viewer2", "read"), ("ops", "operate")}
    assert cli(node, "token", "delete", "ops").returncode == 0
    assert http(node, "GET", "/metrics", ops)[0] == 401


def test_bad_token_requests(node: NodeProc) -> None:
    status, body = http(node, "POST", "/api/v1/tokens", SECRET,
                        {"name": "bad name!", "scope": "read", "hash": "sha256:" + "0" * 64})
    assert status == 400 and b"not allowed" in body
    status, body = http(node, "POST", "/api/v1/tokens", SECRET,
                        {"name": "t", "scope": "root", "hash": "sha256:" + "0" * 64})
    assert status == 400 and b"scope 'root' is not one of read, operate, admin" in body
    p = cli(node, "token", "create", "t", "--scope", "root")
    assert p.returncode == 2

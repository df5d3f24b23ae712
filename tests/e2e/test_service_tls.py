"""Every HTTP API over HTTPS ([tls] api), not only the nodes': the host agent's, the
witness's and a VM host's answer callers that show a certificate of the cluster CA,
refuse plain HTTP and a foreign certificate with one clear log line each, and take
scoped tokens as the nodes do: a read token reads but gets 403 on a change, and the
component's audit log shows the attempt. The nodes heartbeat to the witness over HTTPS
with their own certificates."""

from __future__ import annotations

import http.client
import json
import os
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from clusterproc import ClusterProc
from twinvol.cluster import TlsConfig, VmHostConfig
from twinvol.supervisor import free_ports, twinvol_argv
from twinvol.tls.certs import Role, init_ca, issue
from twinvol.tls.context import use_for_urllib

pytestmark = pytest.mark.e2e


@pytest.fixture
def cluster(tmp_path: Any) -> Iterator[ClusterProc]:
    d = str(tmp_path)
    c = ClusterProc(d, witness=True, host=True)
    certs = os.path.join(d, "tls")
    init_ca(certs)
    issue(certs, Role.SERVER, hosts=["127.0.0.1", "localhost"])
    issue(certs, Role.CLIENT)
    for n in c.cfg.nodes:
        issue(certs, Role.NODE, name=n, hosts=["127.0.0.1"])
    foreign = os.path.join(d, "foreign")
    init_ca(foreign, "someone-else")
    issue(foreign, Role.CLIENT)
    c.cfg.vmhosts = {"H1": VmHostConfig(site="A", api=f"127.0.0.1:{free_ports(1)[0]}",
                                        storage="A", data_dir="vm-H1")}
    c.cfg.tls = TlsConfig(dir=certs, api=True, peer=True)
    c.rewrite()
    use_for_urllib(c.cfg)  # this test process calls the APIs too
    try:
        c.start()
        c.sup.start("H1", twinvol_argv("vm", "host", "run", "--cluster", c.path, "--name",
                                       "H1"), os.path.join(d, "H1.log"))
        c.sup.wait_http("H1", c.cfg.vmhost("H1").api_url + "/api/v1/health",
                        headers={"Authorization": f"Bearer {c.cfg.cluster.secret}"})
        yield c
    finally:
        c.stop()
        urllib.request.install_opener(urllib.request.build_opener())


def call(url: str, token: str | None, method: str = "GET",
         body: dict[str, Any] | None = None) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def log_lines(path: str, text: str, want: int = 1, wait: float = 10.0) -> list[str]:
    deadline = time.monotonic() + wait
    while True:
        with open(path) as f:
            got = [line for line in f if text in line]
        if len(got) >= want or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def audit(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_every_api_is_https_with_scoped_tokens(cluster: ClusterProc) -> None:
    c = cluster
    assert c.cfg.host is not None and c.cfg.witness is not None
    secret = c.cfg.cluster.secret
    apis = {  # name: (base URL, log, audit log, a read, a change)
        "host agent": (c.cfg.service_url(str(c.cfg.host["api"])),
                       os.path.join(c.dir, "host.log"), os.path.join(c.dir, "host-audit.log"),
                       "/api/v1/status", ("/api/v1/switch", {"export": "x", "to": "y"})),
        "witness": (c.cfg.service_url(str(c.cfg.witness["addr"])),
                    os.path.join(c.dir, "witness.log"),
                    os.path.join(c.dir, "witness", "audit.log"),
                    "/api/v1/status", ("/api/v1/release", {"pair": "p", "node": "A"})),
        "vmhost H1": (c.cfg.vmhost("H1").api_url, os.path.join(c.dir, "H1.log"),
                      os.path.join(c.dir, "vm-H1", "audit.log"), "/api/v1/host",
                      ("/api/v1/vms/none/start", {})),
    }
    ca = os.path.join(c.dir, "tls", "ca-cert.pem")
    foreign = ssl.create_default_context(cafile=ca)
    foreign.load_cert_chain(os.path.join(c.dir, "foreign", "client-cert.pem"),
                            os.path.join(c.dir, "foreign", "client-key.pem"))
    for name, (base, log, _, read, _) in apis.items():
        assert base.startswith("https://127.0.0.1:"), name
        status, body = call(base + read, secret)
        assert status == 200, (name, body)
        with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
            urllib.request.build_opener().open(base.replace("https://", "http://")
                                               + "/api/v1/health", timeout=5)
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            urllib.request.urlopen(base + "/api/v1/health", timeout=5, context=foreign)
        plain = log_lines(log, "the client did not speak TLS")
        assert plain and '"https connection refused"' in plain[0], (name, plain)
        refused = log_lines(log, "the client's certificate was refused")
        assert refused and "unable to get local issuer certificate" in refused[0], name

    # The nodes heartbeat to the witness over HTTPS, each with its own certificate.
    deadline = time.monotonic() + 10
    while True:
        nodes = call(apis["witness"][0] + "/api/v1/status", secret)[1]["nodes"]
        if all(v["last_heartbeat_ago"] is not None for v in nodes.values()):
            break
        assert time.monotonic() < deadline, nodes
        time.sleep(0.2)

    p = c.cli("token", "create", "viewer", "--scope", "read", "--json")
    assert p.returncode == 0, p.stderr
    made = json.loads(p.stdout)
    assert made["components"] == ["node A", "node B", "host agent", "witness", "vmhost H1"]
    token = made["token"]
    listed = json.loads(c.cli("token", "list", "--json").stdout)["tokens"]
    assert sorted(t["node"] for t in listed if t["name"] == "viewer") == [
        "A", "B", "host agent", "vmhost H1", "witness"]
    for name, (base, _, audit_log, read, (path, body)) in apis.items():
        assert call(base + read, token)[0] == 200, name
        assert call(base + read, None)[0] == 401, name
        status, answer = call(base + path, token, "POST", body)
        assert status == 403, (name, answer)
        assert answer["error"]["message"] == (f"token 'viewer' has scope read; POST {path} "
                                              "needs operate")
        last = audit(audit_log)[-1]
        assert (last["token"], last["method"], last["object"], last["result"],
                last["outcome"]) == ("viewer", "POST", path, 403, "denied"), name

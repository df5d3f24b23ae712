"""Node HTTP APIs over HTTPS with client certificates ([tls] api): the CLI, node-to-node
calls (switching) and readiness probes show the cluster's certificates; a caller
without a client certificate, or speaking plain HTTP, gets nothing."""

from __future__ import annotations

import json
import os
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from clusterproc import ClusterProc
from twinvol import cluster as cluster_mod
from twinvol.cluster import TlsConfig
from twinvol.tls.certs import Role, init_ca, issue
from twinvol.tls.context import use_for_urllib

pytestmark = pytest.mark.e2e

MiB = 1 << 20


@pytest.fixture
def cluster(tmp_path: object) -> Iterator[ClusterProc]:
    d = str(tmp_path)
    c = ClusterProc(d)
    certs = os.path.join(d, "tls")
    init_ca(certs)
    issue(certs, Role.CLIENT)
    for n in c.cfg.nodes:
        issue(certs, Role.NODE, name=n, hosts=["127.0.0.1"])
    c.cfg.tls = TlsConfig(dir=certs, api=True, peer=True)
    c.rewrite()
    use_for_urllib(c.cfg)  # this test process calls the APIs too
    yield c
    c.stop()
    urllib.request.install_opener(urllib.request.build_opener())


def test_https_apis_cli_and_node_to_node(cluster: ClusterProc) -> None:
    assert cluster.cfg.node("A").api_url.startswith("https://127.0.0.1:")
    cluster.start()
    p = cluster.cli("volume", "create", "hv", "--size", "8M", "--node", "A", "--json")
    assert p.returncode == 0, p.stderr
    p = cluster.cli("pair", "create", "hv", "--mode", "active-active", "--primary", "A",
                    "--secondary", "B", "--wait", "--json")
    assert p.returncode == 0, p.stderr
    # A switch needs A to call B's API (switching/apply): node to node over HTTPS.
    status, body = cluster.api("A", "POST", "/api/v1/switching",
                               {"host_id": "hv", "to": "B:hv", "nodes": ["A", "B"]})
    assert status == 201, body
    status, body = cluster.api("B", "GET", "/api/v1/switching")
    assert [e["host_id"] for e in body["entries"]] == ["hv"]
    st = json.loads(cluster.cli("node", "status", "--json").stdout)
    assert st  # the CLI reads every node over HTTPS

    url = cluster.cfg.node("A").api_url + "/api/v1/health"
    no_cert = ssl.create_default_context(cafile=os.path.join(cluster.dir, "tls",
                                                             "ca-cert.pem"))
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(url, timeout=5, context=no_cert)
    plain = url.replace("https://", "http://")
    with pytest.raises((urllib.error.URLError, ConnectionError, http_error())):
        urllib.request.build_opener().open(plain, timeout=5)
    assert cluster_mod.load(cluster.path).node("B").api_tls is True


def http_error() -> type[Exception]:
    import http.client
    return http.client.HTTPException

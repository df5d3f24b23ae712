"""Peer links over mutual TLS between real nodes: a pair mirrors over it; a peer whose
certificate is from another CA, or names another node, is refused with a clear log
line on the node that checked it."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest

from clusterproc import ClusterProc
from twinvol.cluster import TlsConfig
from twinvol.tls.certs import Role, init_ca, issue

pytestmark = pytest.mark.e2e

MiB = 1 << 20


def wait_log(path: str, text: str, timeout: float = 15) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(path) as f:
            for line in f:
                if text in line:
                    return line
        time.sleep(0.1)
    with open(path) as f:
        raise AssertionError(f"{text!r} not in {path}:\n{f.read()[-3000:]}")


def tls_cluster(directory: str) -> ClusterProc:
    c = ClusterProc(directory)
    certs = os.path.join(directory, "tls")
    init_ca(certs)
    for n in c.cfg.nodes:
        issue(certs, Role.NODE, name=n, hosts=["127.0.0.1"])
    c.cfg.tls = TlsConfig(dir=certs, peer=True)
    c.rewrite()
    return c


@pytest.fixture
def cluster(tmp_path: object) -> Iterator[ClusterProc]:
    c = tls_cluster(str(tmp_path))
    yield c
    c.stop()


def test_pair_mirrors_over_mutual_tls(cluster: ClusterProc) -> None:
    cluster.start()
    cluster.wait_peer("A", "B")
    status, body = cluster.api("A", "POST", "/api/v1/volumes", {"name": "v", "size": 16 * MiB})
    assert status == 201, body
    status, body = cluster.api("A", "POST", "/api/v1/pairs", {"name": "v", "secondary": "B"})
    assert status in (200, 201), body
    cluster.wait_pair("A", "v")
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x3c 0 1M",
                    cluster.uri("A", "v")], check=True, capture_output=True, timeout=60)
    out = subprocess.run(["qemu-io", "-f", "raw", "-c", "read -P 0x3c 0 1M",
                          cluster.uri("B", "v")], check=True, capture_output=True, text=True,
                         timeout=60).stdout
    assert "Pattern verification failed" not in out and "read 1048576/1048576" in out
    with open(os.path.join(cluster.dir, "A.log")) as f:
        assert "TLS handshake failed" not in f.read()


def test_foreign_and_misnamed_peer_certificates_are_refused(cluster: ClusterProc) -> None:
    certs = os.path.join(cluster.dir, "tls")
    mine = os.path.join(certs, "nodes", "B")
    # B shows a certificate of another CA: A (which dials B) refuses it.
    foreign = os.path.join(cluster.dir, "foreign")
    init_ca(foreign, "foreign")
    shutil.move(mine, mine + ".good")
    issue(foreign, Role.NODE, name="B", hosts=["127.0.0.1"], out_dir=mine)
    shutil.copy(os.path.join(certs, "ca-cert.pem"), os.path.join(mine, "ca-cert.pem"))
    cluster.start()
    line = wait_log(os.path.join(cluster.dir, "A.log"),
                    "TLS handshake failed: the peer's certificate was refused: "
                    "unable to get local issuer certificate")
    assert '"msg": "peer refused"' in line and '"peer": "B"' in line
    time.sleep(1.5)  # retries go on, the refusal is logged once
    with open(os.path.join(cluster.dir, "A.log")) as f:
        assert f.read().count('"msg": "peer refused"') == 1
    cluster.stop()

    # B shows A's certificate (valid, same CA) but says it is B: refused by name.
    shutil.rmtree(mine)
    shutil.copytree(os.path.join(certs, "nodes", "A"), mine)
    cluster.start()
    wait_log(os.path.join(cluster.dir, "A.log"),
             "the peer's certificate names node 'A', but it says it is node 'B'")
    status, _ = cluster.api("A", "GET", "/api/v1/node")
    assert status == 200
    cluster.stop()

    # Its own certificate back: the link comes up.
    shutil.rmtree(mine)
    shutil.move(mine + ".good", mine)
    cluster.start()
    cluster.wait_peer("A", "B")

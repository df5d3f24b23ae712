"""NBD over TLS with pre-shared keys (`tls_psk`, a psktool file), on a node and on the
host agent, with the real clients: nbdinfo (`nbds://USER@HOST/EXPORT?tls-psk-file=F`),
qemu-img and qemu-io (`--object tls-creds-psk`). Bytes written through PSK TLS read back;
an unknown identity and a wrong key are refused with one clear log line; a plain client
gets nothing from a `require` export. The agent dials the PSK node with PSK as well."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from clusterproc import ClusterProc
from twinvol.nbd.server_events import TlsMode

pytestmark = pytest.mark.e2e

MiB = 1 << 20


@pytest.fixture
def cluster(tmp_path: Any) -> Iterator[ClusterProc]:
    """PSK on node A and on the host agent, which dials A with PSK too."""
    d = str(tmp_path)
    c = ClusterProc(d, names=("A",), host=True)
    key = os.urandom(32).hex()
    for sub, lines in (("keys", f"alice:{key}\n"), ("other", f"bob:{key}\n"),
                       ("wrong", f"alice:{os.urandom(32).hex()}\n")):
        os.makedirs(os.path.join(d, sub))
        with open(os.path.join(d, sub, "keys.psk"), "w") as f:  # qemu's name in its dir
            f.write(lines)
    assert c.cfg.host is not None
    c.cfg.host.update({"tls": "require", "tls_psk": "keys/keys.psk"})
    c.cfg.nodes["A"].tls = TlsMode.REQUIRE
    c.cfg.nodes["A"].tls_psk = "keys/keys.psk"
    c.rewrite()
    try:
        c.start()
        status, body = c.api("A", "POST", "/api/v1/volumes", {"name": "vol", "size": 8 * MiB})
        assert status == 201, body
        yield c
    finally:
        c.stop()


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=60)


def qemu(tool: str, c: ClusterProc, hostport: str, keys: str, user: str,
         *args: str) -> subprocess.CompletedProcess[str]:
    host, port = hostport.rsplit(":", 1)
    return run(tool, *args, "--object", f"tls-creds-psk,id=t0,dir={os.path.join(c.dir, keys)},"
               f"endpoint=client,username={user}", "--image-opts",
               f"driver=nbd,host={host},port={port},export=vol,tls-creds=t0")


def log_has(path: str, text: str, wait: float = 10.0) -> bool:
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        with open(path) as f:
            if text in f.read():
                return True
        time.sleep(0.1)
    return False


def test_psk_on_node_and_host_agent(cluster: ClusterProc) -> None:
    c = cluster
    assert c.cfg.host is not None
    servers = {"node": (c.cfg.node("A").nbd, os.path.join(c.dir, "A.log")),
               "host": (str(c.cfg.host["nbd"]), os.path.join(c.dir, "host.log"))}
    for i, (name, (hostport, log)) in enumerate(servers.items()):
        keys = os.path.join(c.dir, "keys", "keys.psk")
        uri = f"nbds://alice@{hostport}/vol?tls-psk-file={keys}"
        p = run("nbdinfo", "--size", uri)
        assert (p.returncode, p.stdout.strip()) == (0, str(8 * MiB)), (name, p.stderr)
        pattern = 0x40 + i
        p = qemu("qemu-io", c, hostport, "keys", "alice", "-c", f"write -P {pattern} 0 4M")
        assert p.returncode == 0 and "wrote 4194304/4194304" in p.stdout, (name, p.stderr)
        p = qemu("qemu-io", c, hostport, "keys", "alice", "-c", f"read -P {pattern} 0 4M")
        assert p.returncode == 0 and "read 4194304/4194304" in p.stdout, (name, p.stdout)
        p = qemu("qemu-img", c, hostport, "keys", "alice", "info")
        assert p.returncode == 0 and "virtual size: 8 MiB" in p.stdout, (name, p.stderr)

        other = os.path.join(c.dir, "other", "keys.psk")
        p = run("nbdinfo", "--size", f"nbds://bob@{hostport}/vol?tls-psk-file={other}")
        assert p.returncode != 0, name
        assert log_has(log, "the client's PSK identity 'bob' is not in keys.psk"), name
        p = qemu("qemu-img", c, hostport, "wrong", "alice", "info")
        assert p.returncode != 0, name
        assert log_has(log, "TLS-PSK handshake failed: the client's key for identity "
                            "'alice' is not the one in keys.psk"), name
        p = run("nbdinfo", "--size", f"nbd://{hostport}/vol")
        assert p.returncode != 0 and "TLS" in p.stderr, (name, p.stderr)
    # Random bytes in and out with nbdcopy (many TLS records, both directions).
    data = os.urandom(8 * MiB)
    src, back = os.path.join(c.dir, "src.img"), os.path.join(c.dir, "back.img")
    with open(src, "wb") as f:
        f.write(data)
    keys = os.path.join(c.dir, "keys", "keys.psk")
    via_host = f"nbds://alice@{c.cfg.host['nbd']}/vol?tls-psk-file={keys}"
    assert run("nbdcopy", src, via_host).returncode == 0
    assert run("nbdcopy", via_host, back).returncode == 0
    with open(back, "rb") as f:
        assert f.read() == data
    # What the agent wrote reached node A over the agent's own PSK link.
    p = run("nbdcopy", f"nbds://alice@{c.cfg.node('A').nbd}/vol?tls-psk-file={keys}", back)
    assert p.returncode == 0, p.stderr
    with open(back, "rb") as f:
        assert f.read() == data

"""The host agent over TLS, with real clients: nodes require TLS (and client
certificates), the agent speaks TLS to them and requires it from its own clients:
nbdinfo, nbdcopy, qemu-io and fio (libnbd) through `nbds://` to the agent."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator

import pytest

from clusterproc import ClusterProc
from rawnbd import RawClient
from twinvol.cluster import TlsConfig, split_hostport
from twinvol.nbd.constants import Opt, Rep
from twinvol.nbd.server_events import TlsMode
from twinvol.tls.certs import Role, init_ca, issue

pytestmark = pytest.mark.e2e

MiB = 1 << 20


def run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(list(argv), capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0, f"{argv} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"
    return p


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterProc]:
    d = str(tmp_path_factory.mktemp("hosttls"))
    c = ClusterProc(d, host=True)
    certs = os.path.join(d, "tls")
    init_ca(certs)
    issue(certs, Role.SERVER, hosts=["127.0.0.1"])
    issue(certs, Role.CLIENT)
    c.cfg.tls = TlsConfig(dir=certs, nbd=TlsMode.REQUIRE, verify_clients=True)
    c.rewrite()
    c.start()
    status, body = c.api("A", "POST", "/api/v1/volumes", {"name": "hv", "size": 32 * MiB})
    assert status == 201, body
    yield c
    c.stop()


def agent(c: ClusterProc, export: str) -> str:
    assert c.cfg.host is not None
    return f"nbds://{c.cfg.host['nbd']}/{export}?tls-certificates={c.dir}/tls"


def test_clients_through_the_agent_over_tls(cluster: ClusterProc) -> None:
    info = json.loads(run("nbdinfo", "--json", agent(cluster, "hv")).stdout)
    assert info["TLS"] is True and info["exports"][0]["export-size"] == 32 * MiB
    assert cluster.cfg.host is not None
    host, port = split_hostport(cluster.cfg.host["nbd"])
    opts = ["--object", f"tls-creds-x509,id=t0,dir={cluster.dir}/tls,endpoint=client",
            "--image-opts", f"driver=nbd,host={host},port={port},export=hv,tls-creds=t0"]
    run("qemu-io", *opts, "-c", "write -P 0x6b 2M 1M")
    out = run("qemu-io", *opts, "-c", "read -P 0x6b 2M 1M").stdout
    assert "read 1048576/1048576" in out
    data = os.urandom(MiB)
    src = os.path.join(cluster.dir, "src.bin")
    with open(src, "wb") as f:
        f.write(data)
    run("nbdcopy", src, agent(cluster, "hv"))
    back = subprocess.run(["nbdcopy", agent(cluster, "hv"), "-"], capture_output=True,
                          timeout=60, check=True).stdout
    assert back[:MiB] == data
    home = os.path.join(cluster.dir, "home")
    os.makedirs(os.path.join(home, ".pki"))
    os.symlink(os.path.join(cluster.dir, "tls"), os.path.join(home, ".pki", "libnbd"))
    p = run("unshare", "-U", "fio", "--name=t", "--ioengine=nbd",
            f"--uri=nbds://{cluster.cfg.host['nbd']}/hv", "--rw=randwrite", "--bs=4k",
            "--size=4M", "--verify=crc32c", "--output-format=json",
            env={**os.environ, "HOME": home})
    assert json.loads(p.stdout[p.stdout.index("{"):])["jobs"][0]["error"] == 0
    with open(os.path.join(cluster.dir, "host.log")) as f:
        log = f.read()
    assert '"data_path": "python"' in log  # the native relay is plain TCP only


def test_plain_client_to_the_agent_gets_tls_reqd(cluster: ClusterProc) -> None:
    assert cluster.cfg.host is not None
    _, port = split_hostport(cluster.cfg.host["nbd"])
    c = RawClient(port)
    c.client_flags(3)
    c.option(Opt.LIST)
    opt, rep, msg = c.option_reply()
    assert (opt, rep, msg) == (Opt.LIST, Rep.ERR_TLS_REQD,
                               b"this server requires TLS: send NBD_OPT_STARTTLS first")
    c.close()

"""NBD over TLS against a real node, with the real clients: certificates made by
`twinvol certs`, nbdinfo/nbdcopy (nbds://...?tls-certificates=DIR), qemu-img/qemu-io
(tls-creds-x509), fio through libnbd; plain clients get NBD_REP_ERR_TLS_REQD; a wrong
CA, an expired or a foreign client certificate are refused with a clear log line."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from nodeproc import NodeProc
from rawnbd import RawClient
from twinvol.cluster import TlsConfig
from twinvol.nbd.constants import Opt, Rep
from twinvol.nbd.server_events import TlsMode
from twinvol.tls.certs import Role, init_ca, issue

pytestmark = pytest.mark.e2e

MiB = 1 << 20


def run(*argv: str, check: bool = True, env: dict[str, str] | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                       env=env)
    if check and p.returncode != 0:
        raise AssertionError(f"{argv} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def twinvol(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(sys.executable, "-m", "twinvol", *args, check=check)


def wait_log(node: NodeProc, text: str, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in node.log().splitlines():
            if text in line:
                return line
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not in the node log:\n{node.log()[-3000:]}")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> str:
    d = str(tmp_path_factory.mktemp("certs") / "tls")
    assert json.loads(twinvol("certs", "init", "--dir", d, "--json").stdout) == {
        "ca_cert": f"{d}/ca-cert.pem"}
    twinvol("certs", "issue", "server", "--dir", d)
    twinvol("certs", "issue", "client", "--dir", d, "--name", "tester")
    return d


@pytest.fixture(scope="module")
def tls_node(tmp_path_factory: pytest.TempPathFactory, certs: str) -> Iterator[NodeProc]:
    n = NodeProc(str(tmp_path_factory.mktemp("tlsnode")),
                 tls=TlsConfig(dir=certs, nbd=TlsMode.REQUIRE, verify_clients=True))
    n.start()
    n.create_volume("t1", 64 * MiB)
    yield n
    n.stop()


def nbds(node: NodeProc, export: str, certs: str) -> str:
    return f"nbds://127.0.0.1:{node.nbd_port}/{export}?tls-certificates={certs}"


def qemu_opts(node: NodeProc, export: str, certs: str) -> list[str]:
    return ["--object", f"tls-creds-x509,id=tls0,dir={certs},endpoint=client",
            "--image-opts", f"driver=nbd,host=127.0.0.1,port={node.nbd_port},"
                            f"export={export},tls-creds=tls0"]


def test_certs_cli_layout_and_mistakes(certs: str) -> None:
    names = sorted(os.listdir(certs))
    assert names == ["ca-cert.pem", "ca-key.pem", "client-cert.pem", "client-key.pem",
                     "server-cert.pem", "server-key.pem"]
    for key in ("ca-key.pem", "client-key.pem", "server-key.pem"):
        assert os.stat(os.path.join(certs, key)).st_mode & 0o077 == 0, key
    again = twinvol("certs", "init", "--dir", certs, check=False)
    assert again.returncode == 1
    assert "exists: a new CA would invalidate every certificate" in again.stderr
    usage = twinvol("certs", "issue", "node", "--dir", certs, check=False)
    assert usage.returncode == 2
    assert "a node certificate needs --name NODE" in usage.stderr
    no_ca = twinvol("certs", "issue", "server", "--dir", certs + "-missing", check=False)
    assert no_ca.returncode == 1 and "run `twinvol certs init` first" in no_ca.stderr


def test_nbdinfo_and_nbdcopy_over_tls(tls_node: NodeProc, certs: str, tmp_path: object) -> None:
    out = run("nbdinfo", "--json", nbds(tls_node, "t1", certs)).stdout
    info = json.loads(out)
    assert info["TLS"] is True
    assert info["exports"][0]["export-size"] == 64 * MiB
    src = os.path.join(str(tmp_path), "src.bin")
    data = os.urandom(3 * MiB)
    with open(src, "wb") as f:
        f.write(data)
    run("nbdcopy", src, nbds(tls_node, "t1", certs))
    back = subprocess.run(["nbdcopy", nbds(tls_node, "t1", certs), "-"], capture_output=True,
                          timeout=120, check=True).stdout
    assert back[:3 * MiB] == data
    line = wait_log(tls_node, '"nbd TLS established"')
    assert '"client_cert": "tester"' in line


def test_qemu_img_and_qemu_io_over_tls(tls_node: NodeProc, certs: str) -> None:
    tls_node.create_volume("q1", 32 * MiB)
    run("qemu-io", *qemu_opts(tls_node, "q1", certs), "-c", "write -P 0x5a 1M 2M",
        "-c", "flush")
    out = run("qemu-io", *qemu_opts(tls_node, "q1", certs), "-c", "read -P 0x5a 1M 2M",
              "-c", "read -P 0 0 1M").stdout
    assert "Pattern verification failed" not in out and out.count("read ") == 2
    info = json.loads(run("qemu-img", "info", "--output=json",
                          *qemu_opts(tls_node, "q1", certs)).stdout)
    assert info["virtual-size"] == 32 * MiB


def test_fio_through_libnbd_over_tls(tls_node: NodeProc, certs: str, tmp_path: object) -> None:
    """fio's nbd engine may not name local files in its URI, so libnbd finds the
    certificates in its default place, $HOME/.pki/libnbd, which it reads only when not
    root: fio runs in a user namespace (uid 65534 there), with HOME pointing at a copy."""
    tls_node.create_volume("f1", 32 * MiB)
    home = os.path.join(str(tmp_path), "home")
    os.makedirs(os.path.join(home, ".pki"))
    os.symlink(certs, os.path.join(home, ".pki", "libnbd"))
    env = {**os.environ, "HOME": home}
    p = run("unshare", "-U", "fio", "--name=tls", "--ioengine=nbd",
            f"--uri=nbds://127.0.0.1:{tls_node.nbd_port}/f1", "--rw=randwrite", "--bs=4k",
            "--size=8M", "--verify=crc32c", "--do_verify=1", "--output-format=json", env=env)
    job = json.loads(p.stdout[p.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == 8 * MiB


def test_plain_client_gets_tls_reqd(tls_node: NodeProc) -> None:
    c = RawClient(tls_node.nbd_port)
    c.client_flags(3)
    c.option(Opt.LIST)
    opt, rep, msg = c.option_reply()
    assert (opt, rep) == (Opt.LIST, Rep.ERR_TLS_REQD)
    assert msg == b"this server requires TLS: send NBD_OPT_STARTTLS first"
    c.option(Opt.EXPORT_NAME, b"t1")  # cannot be refused with an error: hang-up
    assert c.is_closed()
    c.close()
    p = run("nbdinfo", f"nbd://127.0.0.1:{tls_node.nbd_port}/t1", check=False)
    assert p.returncode != 0
    wait_log(tls_node, "without TLS; this server requires TLS")


def test_wrong_ca_is_refused(tls_node: NodeProc, tmp_path: object) -> None:
    """The client trusts another CA: the client hangs up, the node says why."""
    other = os.path.join(str(tmp_path), "other")
    init_ca(other, "other")
    issue(other, Role.CLIENT)
    p = run("nbdinfo", nbds(tls_node, "t1", other), check=False)
    assert p.returncode != 0 and "certificate" in p.stderr.lower(), p.stderr
    line = wait_log(tls_node, "the client hung up during the TLS handshake (does it trust the "
                              "CA of this server's certificate?)")
    assert '"msg": "nbd TLS handshake failed, connection dropped"' in line


def test_expired_and_foreign_client_certificates_are_refused(tls_node: NodeProc, certs: str,
                                                             tmp_path: object) -> None:
    expired = os.path.join(str(tmp_path), "expired")
    os.makedirs(expired)
    for f in ("ca-cert.pem",):
        os.symlink(os.path.join(certs, f), os.path.join(expired, f))
    long_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=30)
    issue(certs, Role.CLIENT, days=1, valid_from=long_ago, out_dir=expired)
    p = run("nbdinfo", nbds(tls_node, "t1", expired), check=False)
    assert p.returncode != 0
    wait_log(tls_node, "the client's certificate was refused: certificate has expired")

    # Signed by another CA, presented with our CA trusted for the server.
    foreign = os.path.join(str(tmp_path), "foreign")
    init_ca(foreign, "foreign")
    issue(foreign, Role.CLIENT)
    os.replace(os.path.join(foreign, "ca-cert.pem"), os.path.join(foreign, "their-ca.pem"))
    os.symlink(os.path.join(certs, "ca-cert.pem"), os.path.join(foreign, "ca-cert.pem"))
    p = run("nbdinfo", nbds(tls_node, "t1", foreign), check=False)
    assert p.returncode != 0
    wait_log(tls_node, "the client's certificate was refused: unable to get local issuer")


def test_allow_serves_plain_and_tls_clients(tmp_path: object, certs: str) -> None:
    n = NodeProc(str(tmp_path), tls=TlsConfig(dir=certs, nbd=TlsMode.ALLOW))
    n.start()
    try:
        n.create_volume("a1", 8 * MiB)
        plain = json.loads(run("nbdinfo", "--json", n.uri("a1")).stdout)
        assert plain["TLS"] is False and plain["exports"][0]["export-size"] == 8 * MiB
        secure = json.loads(run("nbdinfo", "--json", nbds(n, "a1", certs)).stdout)
        assert secure["TLS"] is True
        # No client certificate needed without verify_clients: the CA alone will do.
        ca_only = os.path.join(str(tmp_path), "ca-only")
        os.makedirs(ca_only)
        os.symlink(os.path.join(certs, "ca-cert.pem"), os.path.join(ca_only, "ca-cert.pem"))
        assert json.loads(run("nbdinfo", "--json", nbds(n, "a1", ca_only)).stdout)["TLS"]
        check = twinvol("config", "check", "--cluster", n.cluster_path, check=False)
        assert check.returncode == 0, check.stdout + check.stderr
    finally:
        n.stop()

"""The etcd witness backend with a real three-member etcd cluster and real nodes: failover
with a member down, no quorum means no lone writes, a node cut from etcd stops serving,
decisions survive etcd restarting from its data, and `twinvol up --witness etcd`."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import pytest

from clusterproc import ClusterProc, qemu_io
from linkproxy import LinkProxy
from twinvol.cluster import split_hostport
from twinvol.witness import Backend, WitnessConfig
from twinvol.witness.client import WitnessUnreachable
from twinvol.witness.etcd import EtcdWitness

pytestmark = pytest.mark.e2e

MiB = 1 << 20
TTL = 2  # the etcd lease TTL (the default): a silent node is gone after it

# One write on a new connection: "completed", "held" (no answer) or the client's error.
ONE_WRITE = r"""
import sys, time, nbd
h = nbd.NBD()
try:
    h.connect_uri(sys.argv[1])
    h.pwrite(b"w" * 4096, 0)
    h.flush()
    print("completed")
except nbd.Error as e:
    print("failed", e)
"""


def one_write(uri: str) -> str:
    out = subprocess.run(["/usr/bin/python3", "-c", ONE_WRITE, uri], capture_output=True,
                         text=True, timeout=60)
    return out.stdout.strip() + out.stderr.strip()


def make_pair(c: ClusterProc, size: int = 8 * MiB) -> None:
    status, body = c.api("A", "POST", "/api/v1/volumes", {"name": "vol", "size": size})
    assert status == 201, body
    p = c.cli("pair", "create", "vol", "--primary", "A", "--secondary", "B", "--wait",
              "--json")
    assert p.returncode == 0, p.stderr
    c.wait_pair("B", "vol", "mirrored", "mirror")


def witness_status(c: ClusterProc) -> dict[str, Any]:
    p = c.cli("witness", "status", "--json")
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)  # type: ignore[no-any-return]


def wait_for(cond: Any, what: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def peer_proxied(directory: str) -> tuple[ClusterProc, LinkProxy]:
    """Nodes A and B with an etcd witness; their peer link crosses a proxy."""
    c = ClusterProc(directory, etcd=True)
    real_b = c.cfg.node("B").peer
    assert real_b is not None
    proxy = LinkProxy(split_hostport(real_b))
    c.route_peer("A", "B", proxy.addr)
    return c, proxy


def test_primary_killed_secondary_takes_over_with_one_member_killed(tmp_path: Any) -> None:
    c = ClusterProc(str(tmp_path), etcd=True)
    try:
        c.start()
        c.wait_peer("A", "B")
        make_pair(c)
        st = witness_status(c)
        assert st["backend"] == "etcd" and st["pairs"] == []
        assert st["nodes"] == {"A": True, "B": True}
        c.kill9("etcd1")
        killed = time.monotonic()
        c.kill9("A")
        b = c.wait_pair("B", "vol", "suspended", "local", timeout=30)
        print(f"B served alone {time.monotonic() - killed:.2f}s after A was killed")
        assert b["role"] == "primary"
        qemu_io(c.uri("B", "vol"), "write -P 0x6b 0 64k", "flush")
        st = witness_status(c)
        assert [(p["pair"], p["holder"]) for p in st["pairs"]] == [("vol", "B")]
        assert [m["reachable"] for m in st["members"]] == [False, True, True]
        assert st["nodes"]["A"] is False
        # A comes back: it is the stale side, resyncs from B, and B gives the hold back.
        c.start("A")
        c.wait_pair("A", "vol", "mirrored", "mirror", timeout=30)
        c.wait_pair("B", "vol", "mirrored", "mirror", timeout=30)
        qemu_io(c.uri("A", "vol"), "read -P 0x6b 0 64k")
        wait_for(lambda: witness_status(c)["pairs"] == [], "B to release the hold")
    finally:
        c.stop()


def test_no_quorum_no_takeover_and_no_lone_write(tmp_path: Any) -> None:
    c, proxy = peer_proxied(str(tmp_path))
    try:
        c.start()
        c.wait_peer("A", "B")
        make_pair(c)
        c.kill9("etcd1")
        c.kill9("etcd2")
        proxy.cut()
        c.wait_pair("B", "vol", "suspended", "block", timeout=20)
        c.wait_pair("A", "vol", "suspended", timeout=20)
        time.sleep(2 * TTL + 1)  # long past any lease: still nobody may write alone
        a, b = c.pair("A", "vol"), c.pair("B", "vol")
        assert (a["io_mode"], a["role"]) == ("mirror", "primary"), a
        assert (b["io_mode"], b["role"]) == ("block", "secondary"), b
        for node in ("A", "B"):
            _, events = c.api(node, "GET", "/api/v1/events")
            errors = [e["error"] for e in events["events"] if e["type"] == "witness_unreachable"]
            assert errors and errors[-1].startswith("no etcd quorum reachable ("), errors
        for node in ("A", "B"):
            out = one_write(c.uri(node, "vol"))
            assert out.startswith("failed"), (node, out)
        # A quorum again (two members of three): the primary is granted and writes alone.
        c.start_etcd("etcd1")
        c.wait_pair("A", "vol", "suspended", "local", timeout=20)
        assert one_write(c.uri("A", "vol")) == "completed"
        assert c.pair("B", "vol")["io_mode"] == "block"
        proxy.restore()
        c.wait_pair("B", "vol", "mirrored", "mirror", timeout=30)
    finally:
        c.stop()
        proxy.close()


def test_node_cut_from_etcd_loses_its_lease_and_stops_serving(tmp_path: Any) -> None:
    c = ClusterProc(str(tmp_path), etcd=True)
    assert c.etcd is not None
    proxy = LinkProxy(split_hostport(c.etcd.endpoints[0]))
    c.route_etcd("A", [proxy.addr])  # A reaches etcd only through the proxy
    try:
        c.start()
        c.wait_peer("A", "B")
        make_pair(c)
        c.kill9("B")
        c.wait_pair("A", "vol", "suspended", "local", timeout=30)  # A holds the pair alone
        assert one_write(c.uri("A", "vol")) == "completed"
        cut = time.monotonic()
        proxy.cut()
        wait_for(lambda: one_write(c.uri("A", "vol")).startswith("failed"),
                 "A to stop serving", timeout=TTL + 5)
        stopped = time.monotonic() - cut
        print(f"A stopped serving {stopped:.2f}s after it was cut from etcd")
        assert stopped <= TTL + 2.5, stopped
        _, events = c.api("A", "GET", "/api/v1/events")
        lost = [e for e in events["events"] if e["type"] == "witness_lease_lost"]
        assert lost and lost[-1]["pair"] == "vol"
        assert "A lost its etcd lease" in lost[-1]["reason"]
        # The hold stays A's (sticky): B, back but cut from A, would be the stale side.
        assert [(p["pair"], p["holder"]) for p in witness_status(c)["pairs"]] == [("vol", "A")]
        # Restarted still cut off, A may serve alone only until its first lease would
        # have run out.
        c.kill9("A")
        c.start("A")
        wait_for(lambda: one_write(c.uri("A", "vol")).startswith("failed"),
                 "A, restarted without etcd, to stop serving", timeout=TTL + 5)
        _, events = c.api("A", "GET", "/api/v1/events")  # the restarted process's events
        assert [e["pair"] for e in events["events"] if e["type"] == "witness_lease_lost"] \
            == ["vol"]
        proxy.restore()
        wait_for(lambda: one_write(c.uri("A", "vol")) == "completed", "A to serve again",
                 timeout=TTL + 10)
        assert c.pair("A", "vol")["io_mode"] == "local"
    finally:
        c.stop()
        proxy.close()


def test_etcd_restarted_from_its_data_keeps_every_decision(tmp_path: Any) -> None:
    c = ClusterProc(str(tmp_path), etcd=True)
    assert c.etcd is not None
    cfg = WitnessConfig(backend=Backend.ETCD, endpoints=c.etcd.endpoints)

    async def ask(node: str, pair: str, role: str) -> tuple[str, str | None]:
        w = EtcdWitness(cfg, "test", ("A", "B"))
        try:
            await w.heartbeat(node)
            d = await w.arbitrate(pair, node, "B" if node == "A" else "A", role,  # type: ignore[arg-type]
                                  "g1")
            return d.decision, d.holder
        finally:
            await w.close()

    try:
        c.start_etcd()
        assert asyncio.run(ask("A", "p1", "primary")) == ("continue", "A")
        assert asyncio.run(ask("B", "p2", "primary")) == ("continue", "B")
        for m in ("etcd1", "etcd2", "etcd3"):
            c.kill9(m)
        c.start_etcd()
        assert asyncio.run(ask("B", "p1", "secondary")) == ("block", "A")
        assert asyncio.run(ask("A", "p2", "secondary")) == ("block", "B")
        held = {p["pair"]: p["holder"] for p in witness_status(c)["pairs"]}
        assert held == {"p1": "A", "p2": "B"}
    finally:
        c.stop()


def _pids_alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ")[-1].split()[0] != "Z":
                    alive.append(pid)
        except FileNotFoundError:
            pass
    return alive


def test_up_with_etcd_fio_verify_survives_kill9_of_a_with_one_member_killed(
        tmp_path: Any) -> None:
    directory = os.path.join(str(tmp_path), "up")
    proc = subprocess.Popen([sys.executable, "-m", "twinvol", "up", "--dir", directory,
                             "--witness", "etcd", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = proc.stdout.readline()
        assert line, proc.stderr.read()  # up exited without its ready line
        ready = json.loads(line)
        assert ready["witness"] is None
        etcd = ready["etcd"]
        assert len(etcd["endpoints"]) == 3 and len(_pids_alive(etcd["pids"])) == 3
        env = {**os.environ, "TWINVOL_CLUSTER": ready["cluster"]}

        def cli(*args: str) -> Any:
            p = subprocess.run([sys.executable, "-m", "twinvol", *args, "--json"], env=env,
                               capture_output=True, text=True, timeout=60)
            assert p.returncode == 0, p.stderr
            return json.loads(p.stdout)

        assert cli("witness", "status")["endpoints"] == etcd["endpoints"]
        os.kill(etcd["pids"][0], signal.SIGKILL)
        result: dict[str, Any] = {}

        def fio() -> None:
            p = subprocess.run(
                ["fio", "--name=etcd", "--ioengine=nbd", f"--uri={ready['volumes']['demo']}",
                 "--rw=randwrite", "--bs=4k", "--iodepth=8", "--size=24m",
                 "--verify=crc32c", "--verify_state_save=0", "--verify_fatal=1",
                 "--do_verify=1", "--rate_iops=3072", "--output-format=json"],
                capture_output=True, text=True, timeout=600)
            result["rc"], result["stderr"] = p.returncode, p.stderr
            if p.returncode == 0:
                job = json.loads(p.stdout[p.stdout.index("{"):])["jobs"][0]
                result["job"] = job

        t = threading.Thread(target=fio)
        t.start()
        time.sleep(1.0)  # in the write phase
        os.kill(ready["nodes"]["A"]["pid"], signal.SIGKILL)
        t.join()
        assert result["rc"] == 0, result["stderr"]
        job = result["job"]
        assert job["error"] == 0
        assert job["write"]["io_bytes"] == job["read"]["io_bytes"] == 24 * MiB
        side = cli("pair", "show", "demo")["sides"]["B"]
        assert (side["state"], side["io_mode"], side["role"]) == ("suspended", "local",
                                                                  "primary")
        st = cli("witness", "status")
        assert [(p["pair"], p["holder"]) for p in st["pairs"]] == [("demo", "B")]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        pids = etcd["pids"] + [n["pid"] for n in ready["nodes"].values()]
        wait_for(lambda: not _pids_alive(pids), "every process to stop")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def make_pki(directory: str) -> dict[str, str]:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate."""
    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    ssl("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=twinvol test CA")
    for name, usage in (("server", "serverAuth,clientAuth"), ("client", "clientAuth")):
        with open(os.path.join(directory, f"{name}.ext"), "w") as f:
            f.write(f"subjectAltName=IP:127.0.0.1\nextendedKeyUsage={usage}\n")
        ssl("req", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        ssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")
    return {n: os.path.join(directory, n) for n in
            ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


def test_tls_with_client_certificates(tmp_path: Any) -> None:
    pki = make_pki(str(tmp_path))
    c = ClusterProc(str(tmp_path), etcd=True)
    assert c.etcd is not None and c.cfg.witness is not None
    c.etcd = dataclasses.replace(c.etcd, tls=(pki["ca.pem"], pki["server.pem"],
                                              pki["server.key"]))
    c.cfg.witness.update(ca_file="ca.pem", cert_file="client.pem", key_file="client.key")
    c.rewrite()
    try:
        c.start()
        c.wait_peer("A", "B")
        make_pair(c)
        c.kill9("B")
        a = c.wait_pair("A", "vol", "suspended", "local", timeout=30)  # granted over TLS
        assert a["role"] == "primary"
        st = witness_status(c)
        assert [(p["pair"], p["holder"]) for p in st["pairs"]] == [("vol", "A")]
        assert all(m["reachable"] for m in st["members"])

        async def heartbeat(**tls: str) -> None:
            cfg = WitnessConfig(backend=Backend.ETCD, endpoints=c.etcd.endpoints, **tls)
            w = EtcdWitness(cfg, "test", ("A", "B"))
            try:
                await w.heartbeat("B")
            finally:
                await w.close()

        # Without a client certificate, or without TLS, etcd answers nobody.
        with pytest.raises(WitnessUnreachable, match="no etcd quorum reachable"):
            asyncio.run(heartbeat(ca_file=pki["ca.pem"]))
        with pytest.raises(WitnessUnreachable, match="no etcd quorum reachable"):
            asyncio.run(heartbeat())
    finally:
        c.stop()


def test_usage_errors(tmp_path: Any) -> None:
    from twinvol import cluster as cluster_mod
    from twinvol.cli.up import _new_cluster

    directory = str(tmp_path)
    path = os.path.join(directory, "cluster.toml")
    cluster_mod.dump(_new_cluster(directory), path)  # a builtin-witness directory

    def twinvol(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "twinvol", *args], capture_output=True,
                              text=True, timeout=60)

    p = twinvol("up", "--dir", directory, "--witness", "etcd")
    assert p.returncode == 2
    assert (f"the cluster in {directory} uses the builtin witness, not etcd: run without "
            "--witness or choose another --dir") in p.stderr
    p = twinvol("up", "--dir", directory, "--witness", "zookeeper")
    assert p.returncode == 2 and "'zookeeper' is not one of 'builtin', 'etcd'" in p.stderr
    etcd_path = os.path.join(directory, "etcd.toml")
    cluster_mod.dump(_new_cluster(os.path.join(directory, "e"), Backend.ETCD), etcd_path)
    p = twinvol("witness", "run", "--cluster", etcd_path)
    assert p.returncode == 1
    assert "uses the etcd backend" in p.stderr and "there is no witness process" in p.stderr
    p = twinvol("witness", "status", "--cluster", etcd_path, "--json")  # no etcd runs there
    assert p.returncode == 1
    assert "etcd witness: no etcd quorum reachable (127.0.0.1:" in p.stderr

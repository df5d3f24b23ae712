"""Test helper: several real node processes sharing one cluster (peers, secret)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from twinvol import cluster as cluster_mod
from twinvol.cluster import ClusterConfig, ClusterSection, NodeConfig
from twinvol.supervisor import Supervisor, free_ports, twinvol_argv
from twinvol.witness.etcd_cluster import EtcdCluster


class ClusterProc:
    """Nodes `names` on loopback. `overrides[node]` rewrites peer addresses in that node's
    own copy of the cluster file (to route a link through a proxy)."""

    def __init__(self, directory: str, names: tuple[str, ...] = ("A", "B"),
                 secret: str = "test-secret", witness: bool = False,
                 takeover_after: float = 1.0, host: bool = False, etcd: bool = False) -> None:
        self.dir = directory
        self.takeover_after = takeover_after
        # etcd: the witness is a real three-member etcd cluster (members etcd1..etcd3)
        self.etcd = EtcdCluster.open(os.path.join(directory, "etcd")) if etcd else None
        ports = iter(free_ports(3 * len(names) + 3))
        self.cfg = ClusterConfig(
            nodes={n: NodeConfig(site=n, nbd=f"127.0.0.1:{next(ports)}",
                                 api=f"127.0.0.1:{next(ports)}", data_dir=f"data-{n}",
                                 peer=f"127.0.0.1:{next(ports)}") for n in names},
            cluster=ClusterSection(name="test", secret=secret),
            witness={"backend": "etcd", "endpoints": self.etcd.endpoints} if self.etcd
            else {"addr": f"127.0.0.1:{next(ports)}", "data_dir": "witness"}
            if witness else None,
            host={"nbd": f"127.0.0.1:{next(ports)}", "api": f"127.0.0.1:{next(ports)}",
                  "nodes": list(names), "hold_timeout": 30.0} if host else None)
        self.path = os.path.join(directory, "cluster.toml")
        cluster_mod.dump(self.cfg, self.path)
        self.cfg = cluster_mod.load(self.path)
        self.sup = Supervisor()
        self.node_files: dict[str, str] = {n: self.path for n in names}

    def route_peer(self, node: str, target: str, addr: str) -> None:
        """Make `node` reach `target`'s peer port at `addr` (e.g. a proxy)."""
        raw = cluster_mod.load(self.path)
        raw.nodes[target].peer = addr
        path = os.path.join(self.dir, f"cluster-{node}.toml")
        cluster_mod.dump(raw, path)
        self.node_files[node] = path

    def route_api(self, node: str, target: str, addr: str) -> None:
        """Make `node` reach `target`'s API (fault relay) at `addr`; composes with earlier
        routes of the same node."""
        raw = cluster_mod.load(self.node_files[node])
        raw.nodes[target].api = addr
        path = os.path.join(self.dir, f"cluster-{node}.toml")
        cluster_mod.dump(raw, path)
        self.node_files[node] = path

    def rewrite(self) -> None:
        """Write `self.cfg` (edited by a test before start) back to the cluster file."""
        cluster_mod.dump(self.cfg, self.path)
        self.cfg = cluster_mod.load(self.path)

    def route_etcd(self, node: str, endpoints: list[str]) -> None:
        """Make `node` reach etcd at `endpoints` only (e.g. through a proxy)."""
        raw = cluster_mod.load(self.node_files[node])
        assert raw.witness is not None
        raw.witness["endpoints"] = endpoints
        path = os.path.join(self.dir, f"cluster-{node}.toml")
        cluster_mod.dump(raw, path)
        self.node_files[node] = path

    def start_etcd(self, *members: str) -> None:
        """Start etcd members (all by default) and wait until they have a quorum."""
        assert self.etcd is not None
        self.etcd.start(self.sup, self.dir, *members)
        self.etcd.wait_ready(self.sup)

    def start_witness(self) -> None:
        if self.etcd is not None:
            self.start_etcd()
            return
        assert self.cfg.witness is not None
        self.sup.start("witness", twinvol_argv("witness", "run", "--cluster", self.path,
                                               "--takeover-after", str(self.takeover_after)),
                       os.path.join(self.dir, "witness.log"))
        self.sup.wait_http("witness", self.cfg.service_url(str(self.cfg.witness["addr"]))
                           + "/api/v1/health",
                           headers={"Authorization": f"Bearer {self.cfg.cluster.secret}"})

    def start(self, *names: str) -> None:
        if not names and self.cfg.witness is not None:
            self.start_witness()
        for n in names or tuple(self.cfg.nodes):
            self.sup.start(n, twinvol_argv("node", "run", "--cluster", self.node_files[n],
                                           "--node", n), os.path.join(self.dir, f"{n}.log"))
        for n in names or tuple(self.cfg.nodes):
            self.sup.wait_http(n, self.cfg.node(n).api_url + "/api/v1/health")
        if not names and self.cfg.host is not None:
            self.sup.start("host", twinvol_argv("host", "run", "--cluster", self.path),
                           os.path.join(self.dir, "host.log"))
            self.sup.wait_http("host", self.cfg.service_url(str(self.cfg.host["api"]))
                               + "/api/v1/health")

    def host_uri(self, export: str) -> str:
        assert self.cfg.host is not None
        return f"nbd://{self.cfg.host['nbd']}/{export}"

    def stop(self) -> None:
        self.sup.stop_all()

    def kill9(self, name: str) -> None:
        self.sup.kill(name)

    def uri(self, node: str, export: str) -> str:
        return self.cfg.node(node).nbd_uri(export)

    def api(self, node: str, method: str, path: str, body: dict[str, Any] | None = None,
            secret: str | None = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.cfg.node(node).api_url + path, data=data,
                                     method=method,
                                     headers={"Content-Type": "application/json",
                                              "Authorization": "Bearer "
                                              + (secret or self.cfg.cluster.secret)})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "TWINVOL_CLUSTER": self.path}
        return subprocess.run([sys.executable, "-m", "twinvol", *args], env=env, text=True,
                              capture_output=True, timeout=timeout)

    def pair(self, node: str, name: str) -> dict[str, Any]:
        status, body = self.api(node, "GET", f"/api/v1/pairs/{name}")
        assert status == 200, body
        return body  # type: ignore[no-any-return]

    def wait_pair(self, node: str, name: str, state: str = "mirrored", io_mode: str | None = None,
                  timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        view: dict[str, Any] = {}
        while time.monotonic() < deadline:
            status, view = self.api(node, "GET", f"/api/v1/pairs/{name}")
            if status == 200 and view["state"] == state and (io_mode is None
                                                              or view["io_mode"] == io_mode):
                return view
            time.sleep(0.1)
        raise AssertionError(f"pair {name} on {node} did not reach {state}/{io_mode}: {view}")

    def wait_peer(self, a: str, b: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            _, body = self.api(a, "GET", "/api/v1/events")
            ups = [e for e in body["events"] if e["type"] in ("peer_up", "peer_down")
                   and e.get("peer") == b]
            if ups and ups[-1]["type"] == "peer_up":
                return
            time.sleep(0.1)
        raise AssertionError(f"no peer link {a}->{b}")


def qemu_io(uri: str, *cmds: str) -> str:
    """Run qemu-io commands against `uri`; its output (a failed verify fails the test)."""
    argv = ["qemu-io", "-f", "raw"]
    for cmd in cmds:
        argv += ["-c", cmd]
    p = subprocess.run([*argv, uri], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "verification failed" not in p.stdout, p.stdout + p.stderr
    return p.stdout

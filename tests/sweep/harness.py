"""The sweep's cluster: witness W and nodes A, B in their namespaces, the host agent and
the clients in the root namespace, one active-active pair `sweep` between A and B.

Processes are started through `twinvol.supervisor` (prefixed with `ip netns exec`, which
execs, so the supervisor's pid is the node's own: kill -9 and SIGSTOP reach it).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from typing import Any

from twinvol import cluster as cluster_mod
from twinvol.cluster import ClusterConfig, ClusterSection, NodeConfig
from twinvol.supervisor import Supervisor, free_ports, twinvol_argv
from twinvol.witness.etcd_cluster import MEMBERS, EtcdCluster, Member

from .blocks import BLOCK
from .netns import Net

PAIR = "sweep"
SECRET = "sweep-secret"
NBD_PORT, API_PORT, PEER_PORT, WITNESS_PORT = 10809, 8701, 8801, 8790
ETCD_PORT = 2379   # member i listens on ETCD_PORT + 100 i (clients) and + 1 (peers)
SYSTEM_PYTHON = "/usr/bin/python3"  # has the libnbd bindings (python3-libnbd)
CLIENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "client.py")


def _die_with_parent() -> None:
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Harness:
    """One cluster in namespaces. `close` stops every process it started, by pid."""

    def __init__(self, directory: str, net: Net, blocks: int,
                 hold_timeout: float = 30.0, takeover_after: float | None = None,
                 nodes: tuple[str, ...] = ("A", "B"), witness: str = "builtin") -> None:
        self.dir = directory
        self.nodes = nodes
        self.net = net
        self.blocks = blocks
        self.hold_timeout = hold_timeout
        self.takeover_after = takeover_after
        self.sup = Supervisor()
        self.paused: set[str] = set()
        self.closed = False
        self.clients: list[subprocess.Popen[bytes]] = []
        host_nbd, host_api = free_ports(2)
        # witness "etcd": W runs a three-member etcd cluster; "W" in faults means all of it
        self.etcd: EtcdCluster | None = None
        wtable: dict[str, Any] = {"addr": f"{net.addr('W')}:{WITNESS_PORT}",
                                  "data_dir": "witness"}
        if witness == "etcd":
            w = net.addr("W")
            self.etcd = EtcdCluster(
                os.path.join(directory, "etcd"),
                [Member(m, f"{w}:{ETCD_PORT + 100 * i}", f"{w}:{ETCD_PORT + 100 * i + 1}")
                 for i, m in enumerate(MEMBERS)], f"sweep-{net.tag}",
                tuple(net.exec_prefix("W")))
            wtable = {"backend": "etcd", "endpoints": self.etcd.endpoints}
        cfg = ClusterConfig(
            nodes={n: NodeConfig(site=n, nbd=f"{net.addr(n)}:{NBD_PORT}",
                                 api=f"{net.addr(n)}:{API_PORT}", data_dir=f"data-{n}",
                                 peer=f"{net.addr(n)}:{PEER_PORT}") for n in nodes},
            cluster=ClusterSection(name=f"sweep-{net.tag}", secret=SECRET),
            witness=wtable,
            host={"nbd": f"127.0.0.1:{host_nbd}", "api": f"127.0.0.1:{host_api}",
                  "nodes": ["A", "B"], "hold_timeout": hold_timeout})
        self.path = os.path.join(directory, "cluster.toml")
        cluster_mod.dump(cfg, self.path)
        self.cfg = cluster_mod.load(self.path)

    # ---- processes -------------------------------------------------------------

    def argv(self, name: str) -> list[str]:
        if name == "W":
            extra = [] if self.takeover_after is None else \
                ["--takeover-after", str(self.takeover_after)]
            return self.net.exec_prefix("W") + twinvol_argv(
                "witness", "run", "--cluster", self.path, *extra)
        if name == "host":
            return twinvol_argv("host", "run", "--cluster", self.path)
        return self.net.exec_prefix(name) + twinvol_argv(
            "node", "run", "--cluster", self.path, "--node", name)

    def health_url(self, name: str) -> str:
        if name == "W":
            return f"http://{self.net.addr('W')}:{WITNESS_PORT}/api/v1/health"
        if name == "host":
            assert self.cfg.host is not None
            return f"http://{self.cfg.host['api']}/api/v1/health"
        return self.cfg.node(name).api_url + "/api/v1/health"

    def start_one(self, name: str, wait: bool = True) -> None:
        if self.closed:
            return  # a late heal by the nemesis must not outlive close()
        self.paused.discard(name)
        if name == "W" and self.etcd is not None:
            dead = [m for m in MEMBERS if m not in self.sup.components
                    or not self.sup.components[m].alive()]
            if dead:
                self.etcd.start(self.sup, self.dir, *dead)
            if wait:
                self.etcd.wait_ready(self.sup)
            return
        self.sup.start(name, self.argv(name), os.path.join(self.dir, f"{name}.log"))
        if wait:
            self.sup.wait_http(name, self.health_url(name), timeout=30,
                               headers={"Authorization": f"Bearer {SECRET}"})

    def parts(self, name: str) -> list[str]:
        """The supervised processes behind `name` (W with etcd: its three members)."""
        return list(MEMBERS) if name == "W" and self.etcd is not None else [name]

    def pid(self, name: str) -> int:
        return self.sup.components[name].pid

    def alive(self, name: str) -> bool:
        return all(self.sup.components[p].alive() for p in self.parts(name))

    def tail(self, name: str, lines: int = 3) -> str:
        return " | ".join(self.sup.components[p].tail(lines) for p in self.parts(name))

    def kill9(self, name: str) -> None:
        self.paused.discard(name)
        for p in self.parts(name):
            self.sup.kill(p)

    def pause(self, name: str) -> None:
        if self.closed:
            return
        for p in self.parts(name):
            os.kill(self.pid(p), signal.SIGSTOP)
        self.paused.add(name)

    def resume(self, name: str) -> None:
        self.paused.discard(name)
        for p in self.parts(name):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid(p), signal.SIGCONT)

    def start(self) -> None:
        """Everything up, the pair created and mirrored."""
        for name in ("W", *self.nodes):
            self.start_one(name)
        self.start_one("host")
        size = self.blocks * BLOCK
        status, body = self.api("A", "POST", "/api/v1/volumes", {"name": PAIR, "size": size})
        if status != 201:
            raise RuntimeError(f"volume create: {status} {body}")
        deadline = time.monotonic() + 30
        while True:  # the peer link may still be connecting
            status, body = self.api("A", "POST", "/api/v1/pairs",
                                    {"name": PAIR, "secondary": "B"})
            if status == 201:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"pair create: {status} {body}")
            time.sleep(0.2)
        if not self.wait_mirrored(60):
            raise RuntimeError(f"pair never mirrored: {self.views()}")
        for target in ("agent", "A", "B"):  # a broken setup is not a finding
            _, why = self.dump(target, timeout=15, blocks=1)
            if why:
                raise RuntimeError(f"{target} does not serve {PAIR} before any fault: {why}")

    def close(self) -> None:
        self.closed = True
        for p in self.clients:
            if p.poll() is None:
                p.kill()
            p.wait()
        for name in list(self.sup.components):
            self.resume(name)  # a stopped process would sit on SIGTERM
        self.sup.stop_all()

    # ---- API -------------------------------------------------------------------

    def api(self, node: str, method: str, path: str, body: dict[str, Any] | None = None,
            timeout: float = 5.0) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.cfg.node(node).api_url + path, data=data,
                                     method=method,
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {SECRET}"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")
        except (OSError, ValueError) as e:
            return 0, str(e)

    def views(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for n in ("A", "B"):
            status, body = self.api(n, "GET", f"/api/v1/pairs/{PAIR}", timeout=2)
            out[n] = body if status == 200 else None
        return out

    def mirrored(self) -> bool:
        views = self.views()
        return all(v is not None and v["state"] == "mirrored" and v["io_mode"] == "mirror"
                   for v in views.values())

    def wait_mirrored(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.mirrored():
                return True
            time.sleep(0.2)
        return False

    def verify(self, timeout: float = 120) -> tuple[int | None, str]:
        """`twinvol pair verify`: mismatched chunks (None and why when it failed)."""
        p = subprocess.run([*twinvol_argv("pair", "verify", PAIR, "--json",
                                          "--cluster", self.path)],
                           capture_output=True, text=True, timeout=timeout)
        if p.returncode != 0:
            return None, p.stderr.strip()
        report = json.loads(p.stdout)
        return int(report["mismatched_chunks"]), p.stdout.strip()

    # ---- clients ---------------------------------------------------------------

    def uri(self, target: str) -> str:
        if target == "agent":
            assert self.cfg.host is not None
            return f"nbd://{self.cfg.host['nbd']}/{PAIR}"
        return self.cfg.node(target).nbd_uri(PAIR)

    def start_client(self, target: str, out: str, until: float, seed: int, uid_base: int,
                     writers: int, readers: int, timeout: float, think: float,
                     flush_every: int = 0) -> subprocess.Popen[bytes]:
        argv = [SYSTEM_PYTHON, CLIENT, "ops", "--uri", self.uri(target), "--label", target,
                "--out", out, "--blocks", str(self.blocks), "--until", repr(until),
                "--seed", str(seed), "--uid-base", str(uid_base), "--writers", str(writers),
                "--readers", str(readers), "--timeout", str(timeout), "--think", str(think),
                "--flush-every", str(flush_every)]
        with open(out + ".stderr", "wb") as err:
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=err, preexec_fn=_die_with_parent)
        self.clients.append(p)
        return p

    def dump(self, node: str, timeout: float = 30, blocks: int | None = None
             ) -> tuple[list[int | str] | None, str]:
        """Every block of `node`'s copy, read directly (None and why if it refuses)."""
        count = self.blocks if blocks is None else blocks
        try:
            p = subprocess.run([SYSTEM_PYTHON, CLIENT, "dump", "--uri", self.uri(node),
                                "--blocks", str(count), "--timeout", str(timeout)],
                               capture_output=True, text=True, timeout=timeout + 10,
                               preexec_fn=_die_with_parent)
            out = json.loads(p.stdout)
        except (subprocess.TimeoutExpired, ValueError) as e:
            return None, str(e)
        if "values" in out:
            return out["values"], ""
        return None, str(out.get("error"))


def client_python_ok() -> str | None:
    """Why the libnbd clients cannot run here, or None."""
    if not os.path.exists(SYSTEM_PYTHON):
        return f"{SYSTEM_PYTHON} is missing"
    p = subprocess.run([SYSTEM_PYTHON, "-c", "import nbd"], capture_output=True)
    if p.returncode != 0:
        return f"{SYSTEM_PYTHON} has no nbd module (install python3-libnbd)"
    return None


__all__ = ["PAIR", "Harness", "client_python_ok"]

"""`twinvol up`: the local demo cluster on loopback, in the foreground.

Starts nodes A, B and C (sites A, B, C), each its own process, the witness (the
builtin one, or with `--witness etcd` a three-member etcd cluster), the host agent,
hypervisor hosts H1 (site A, through node A) and H2 (site B, through node B) and the
dashboard, creates the
volume `demo` (1 GiB) on A as an active-active pair with B plus an async copy to C
(pair `demo-dr`, consistency group `demo`), waits until both are mirrored, prints
one ready line (or one JSON object with `--json`) and runs until SIGINT/SIGTERM,
then stops everything. Running it again on the same directory reuses the cluster
file and the data.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

import typer

from twinvol import cluster as cluster_mod
from twinvol.cli import up_tls
from twinvol.cli.common import ApiError, CliError, api
from twinvol.cluster import (
    ClusterConfig,
    ClusterError,
    ClusterSection,
    NodeConfig,
    VmHostConfig,
)
from twinvol.host import UNIX_PATH_MAX
from twinvol.supervisor import AlreadyRunning, Supervisor, free_ports, hold_dir_lock, twinvol_argv
from twinvol.witness import Backend
from twinvol.witness.etcd_cluster import EtcdCluster, EtcdStartError

NODES = ("A", "B", "C")
DEMO_VOLUME = "demo"
DEMO_SIZE = 1 << 30
PAIR_PRIMARY = "A"
PAIR_SECONDARY = "B"
REMOTE_SECONDARY = "C"      # the far site: async copy of demo (three-data-centre layout)
REMOTE_PAIR = "demo-dr"
HOST_SOCKET = "host.sock"  # the host agent's Unix socket, next to the cluster file
ETCD_DIR = "etcd"          # the etcd members' data and ports, under DIR
VMHOSTS = {"H1": PAIR_PRIMARY, "H2": PAIR_SECONDARY}  # hypervisor host -> its site and node


WitnessOpt = typer.Option(
    None, "--witness", help="Who decides for broken pairs: the builtin witness process "
    "(default) or a three-member etcd cluster on loopback (etcd must be installed).")


def _backend(cfg: ClusterConfig) -> Backend | None:
    if not cfg.witness:
        return None
    return Backend(cfg.witness.get("backend", Backend.BUILTIN))


def _vmhosts(ports: Iterator[int]) -> dict[str, VmHostConfig]:
    """The demo's hypervisor hosts: each reaches `volume:NAME` through its own site's node,
    so a VM migrated from H1 to H2 moves from node A's path to node B's."""
    return {name: VmHostConfig(site=node, api=f"127.0.0.1:{next(ports)}", storage=node,
                               data_dir=f"vm-{name}", cpus=2, memory="1G",
                               networks={"lan": "isolated"})
            for name, node in VMHOSTS.items()}


def _add_vmhosts(cfg: ClusterConfig, path: str) -> ClusterConfig:
    """A cluster file made before the demo had hypervisor hosts gets them (written back)."""
    if cfg.vmhosts or not all(n in cfg.nodes for n in VMHOSTS.values()):
        return cfg
    # Nothing runs yet: free_ports cannot see the file's own ports, so skip them.
    taken = {a for n in cfg.nodes.values() for a in (n.nbd, n.api, n.peer)} | {
        str(a) for sec in (cfg.witness or {}, cfg.host or {}) for k, a in sec.items()
        if k in ("addr", "nbd", "api")}
    cfg.vmhosts = _vmhosts(p for p in free_ports(len(VMHOSTS) + len(taken))
                           if f"127.0.0.1:{p}" not in taken)
    cluster_mod.dump(cfg, path)
    return cluster_mod.load(path)


def _new_cluster(directory: str, backend: Backend = Backend.BUILTIN) -> ClusterConfig:
    ports = iter(free_ports(3 * len(NODES) + 3 + len(VMHOSTS)))
    nodes = {
        name: NodeConfig(site=name, nbd=f"127.0.0.1:{next(ports)}",
                         api=f"127.0.0.1:{next(ports)}", data_dir=name,
                         peer=f"127.0.0.1:{next(ports)}")
        for name in NODES
    }
    witness: dict[str, Any] = {"addr": f"127.0.0.1:{next(ports)}", "data_dir": "witness"}
    if backend is Backend.ETCD:
        etcd = EtcdCluster.open(os.path.join(directory, ETCD_DIR))
        witness = {"backend": str(Backend.ETCD), "endpoints": etcd.endpoints}
    return ClusterConfig(nodes=nodes, cluster=ClusterSection(name="twinvol-up",
                                                             secret=secrets.token_hex(16)),
                         witness=witness,
                         host={"nbd": f"127.0.0.1:{next(ports)}",
                               "api": f"127.0.0.1:{next(ports)}",
                               "nodes": [PAIR_PRIMARY, PAIR_SECONDARY],
                               # deep --dirs go without: the path would not fit a Unix socket
                               **({"socket": HOST_SOCKET} if len(os.fsencode(
                                   os.path.join(directory, HOST_SOCKET))) <= UNIX_PATH_MAX
                                  else {})},
                         vmhosts=_vmhosts(ports))


def up(
    directory: str = typer.Option("twinvol-data", "--dir", "-d",
                                  help="Directory for the cluster file, data and logs."),
    json_out: bool = typer.Option(False, "--json", help="Print the ready object as JSON."),
    witness: Backend | None = WitnessOpt,
    tls: bool = typer.Option(False, "--tls", help="TLS everywhere: a CA and certificates in "
                             "DIR/tls, NBD over TLS (nbds://), mutual TLS between nodes."),
) -> None:
    """Start the local demo cluster (nodes A, B, C and volume `demo`) until Ctrl-C."""
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    try:
        lock_fd = hold_dir_lock(directory, "twinvol up")  # noqa: F841 (held until exit)
    except AlreadyRunning as e:
        raise CliError(str(e)) from None
    path = os.path.join(directory, "cluster.toml")
    if os.path.exists(path):
        try:
            cfg = cluster_mod.load(path)
        except ClusterError as e:
            raise CliError(f"{e}; remove it or choose another --dir") from None
        if witness is not None and _backend(cfg) is not witness:
            raise CliError(f"the cluster in {directory} uses the {_backend(cfg) or 'no'} "
                           f"witness, not {witness}: run without --witness or choose "
                           "another --dir", exit_code=2)
        up_tls.check(cfg, directory, tls)
    else:
        try:
            cfg = _new_cluster(directory, witness or Backend.BUILTIN)
        except EtcdStartError as e:
            raise CliError(str(e)) from None
        if tls:
            up_tls.enable(cfg, directory)
        cluster_mod.dump(cfg, path)
        cfg = cluster_mod.load(path)
    cfg = _add_vmhosts(cfg, path)
    etcd = (EtcdCluster.open(os.path.join(directory, ETCD_DIR))
            if _backend(cfg) is Backend.ETCD else None)
    up_tls.use_for_urllib(cfg)

    # A plain flag, not a threading.Event: the handler runs in the main thread, and
    # Event.set() from it deadlocks when the signal lands while wait() holds the lock.
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _frame: stopping.append(signum))
    signal.signal(signal.SIGINT, lambda signum, _frame: stopping.append(signum))

    sup = Supervisor()
    try:
        if etcd is not None:
            try:
                etcd.start(sup, os.path.join(directory, "logs"))
                etcd.wait_ready(sup)
            except EtcdStartError as e:
                raise CliError(f"etcd failed to start: {e}") from None
        elif cfg.witness:
            sup.start("witness", twinvol_argv("witness", "run", "--cluster", path),
                      os.path.join(directory, "logs", "witness.log"))
            try:
                sup.wait_http("witness",
                              cfg.service_url(str(cfg.witness["addr"])) + "/api/v1/health",
                              headers={"Authorization": f"Bearer {cfg.cluster.secret}"})
            except RuntimeError as e:
                raise CliError(f"the witness failed to start: {e}") from None
        for name in cfg.nodes:
            sup.start(name, twinvol_argv("node", "run", "--cluster", path, "--node", name),
                      os.path.join(directory, "logs", f"{name}.log"))
        for name in cfg.vmhosts:  # QEMU probing takes a while: waited for at the end
            sup.start(name, twinvol_argv("vm", "host", "run", "--cluster", path, "--name", name),
                      os.path.join(directory, "logs", f"{name}.log"))
        for name, node in cfg.nodes.items():
            try:
                sup.wait_http(name, node.api_url + "/api/v1/health")
            except RuntimeError as e:
                raise CliError(f"node {name} failed to start: {e}") from None
        first = next(iter(cfg.nodes))
        try:
            api(cfg, first, "GET", f"/api/v1/volumes/{DEMO_VOLUME}")
        except ApiError as e:
            if e.status != 404:
                raise
            api(cfg, first, "POST", "/api/v1/volumes",
                {"name": DEMO_VOLUME, "size": DEMO_SIZE,
                 "description": "twinvol demo volume"})
        _ensure_pair(cfg, first, DEMO_VOLUME,
                     {"name": DEMO_VOLUME, "mode": "active-active", "secondary": PAIR_SECONDARY})
        if REMOTE_SECONDARY in cfg.nodes:
            _ensure_pair(cfg, first, REMOTE_PAIR,
                         {"name": REMOTE_PAIR, "mode": "async", "secondary": REMOTE_SECONDARY,
                          "primary_volume": DEMO_VOLUME, "secondary_volume": DEMO_VOLUME,
                          "group": DEMO_VOLUME})
        if cfg.host:
            sup.start("host", twinvol_argv("host", "run", "--cluster", path),
                      os.path.join(directory, "logs", "host.log"))
            try:
                sup.wait_http("host", cfg.service_url(str(cfg.host["api"])) + "/api/v1/health")
            except RuntimeError as e:
                raise CliError(f"the host agent failed to start: {e}") from None
        dash_addr = f"127.0.0.1:{free_ports(1)[0]}"  # the read-only page: a new port each run
        dashboard = f"http://{dash_addr}/"
        sup.start("dashboard", twinvol_argv("dashboard", "--cluster", path, "--listen",
                                            dash_addr),
                  os.path.join(directory, "logs", "dashboard.log"))
        try:
            sup.wait_http("dashboard", dashboard + "api/v1/health")
        except RuntimeError as e:
            raise CliError(f"the dashboard failed to start: {e}") from None
        for name, vh in cfg.vmhosts.items():
            try:
                sup.wait_http(name, vh.api_url + "/api/v1/health",
                              headers={"Authorization": f"Bearer {cfg.cluster.secret}"})
            except RuntimeError as e:
                raise CliError(f"hypervisor host {name} failed to start: {e}") from None
        ready = up_tls.decorate({**_ready(cfg, sup, path, first, etcd),
                                 "dashboard": dashboard}, cfg)
        if json_out:
            sys.stdout.write(json.dumps(ready) + "\n")
        else:
            nodes = " ".join(f"{n}(pid {v['pid']}, {v['nbd']}, {v['api']})"
                             for n, v in ready["nodes"].items())
            vols = " ".join(f"{k}={v}" for k, v in ready["volumes"].items())
            vmhosts = " ".join(f"{n}(site {v['site']}, {v['api']})"
                               for n, v in ready["vmhosts"].items())
            sys.stdout.write(f"twinvol up: ready; cluster {path}; nodes {nodes}; "
                             f"volumes {vols}; hypervisor hosts {vmhosts or 'none'}; "
                             f"dashboard {dashboard}; Ctrl-C stops\n")
        sys.stdout.flush()
        reported: set[str] = set()
        while not stopping:
            time.sleep(0.2)
            for name, comp in sup.components.items():
                if comp.proc is not None and not comp.alive() and name not in reported:
                    reported.add(name)
                    sys.stderr.write(f"twinvol up: warning: {name} exited with status "
                                     f"{comp.proc.returncode}; see {comp.log_path}\n")
    finally:
        sup.stop_all()


def _ensure_pair(cfg: ClusterConfig, primary: str, name: str, body: dict[str, Any]) -> None:
    """Create pair `name` unless it exists, and wait until it is mirrored."""
    deadline = time.monotonic() + 120
    while True:
        try:
            view = api(cfg, primary, "GET", f"/api/v1/pairs/{name}")
            break
        except ApiError as e:
            if e.status != 404:
                raise
        try:
            api(cfg, primary, "POST", "/api/v1/pairs", body)
        except ApiError as e:
            if "not connected" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    while view["state"] != "mirrored":
        if time.monotonic() > deadline:
            raise CliError(f"pair {name} is still {view['state']} after 120s")
        time.sleep(0.2)
        view = api(cfg, primary, "GET", f"/api/v1/pairs/{name}")


def _ready(cfg: ClusterConfig, sup: Supervisor, path: str, first: str,
           etcd: EtcdCluster | None) -> dict[str, Any]:
    sock = None
    if cfg.host and cfg.host.get("socket"):
        sock = os.path.join(os.path.dirname(path), str(cfg.host["socket"]))
    return {
        "cluster": path,
        "nodes": {name: {"pid": sup.components[name].pid, "nbd": node.nbd_uri(),
                         "api": node.api_url, "site": node.site}
                  for name, node in cfg.nodes.items()},
        "witness": ({"pid": sup.components["witness"].pid, "addr": cfg.witness["addr"]}
                    if cfg.witness and etcd is None else None),
        "etcd": ({"endpoints": etcd.endpoints, "pids": etcd.pids(sup)} if etcd else None),
        "host": ({"pid": sup.components["host"].pid, "nbd": f"nbd://{cfg.host['nbd']}/",
                  "api": cfg.service_url(str(cfg.host["api"])), "socket": sock}
                 if cfg.host else None),
        "volumes": {DEMO_VOLUME: (f"nbd://{cfg.host['nbd']}/{DEMO_VOLUME}" if cfg.host
                                  else cfg.node(first).nbd_uri(DEMO_VOLUME))},
        # the same volumes through the host agent's Unix socket (local clients)
        "unix_volumes": ({DEMO_VOLUME: f"nbd+unix:///{DEMO_VOLUME}?socket={sock}"} if sock
                         else {}),
        "vmhosts": {name: {"pid": sup.components[name].pid, "api": vh.api_url,
                           "site": vh.site} for name, vh in cfg.vmhosts.items()},
    }

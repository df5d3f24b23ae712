"""How a node's cost grows: volumes per node, client connections, and thin volume size.

    .venv/bin/python bench/scale.py [--quick] [--parts volumes,conns,thin]
        [--volumes 1,10,100,1000] [--conns 1,16,64,256] [--sizes 1G,16G,256G,1T]
        [--timeout S] [--json-out FILE]

Real node processes on loopback (a witness and nodes A and B, as bench/pairs.py starts
them). Every phase reports wall time and the CPU seconds of each node (utime + stime
from /proc), which stays meaningful on a shared machine where wall time does not.

- volumes: one node; create N sparse 1 MiB volumes through the API (latency of each
  create), then GET /api/v1/volumes latency, RSS per volume, and the time a restarted
  node takes until its API answers and lists all N.
- conns: K libnbd connections to one export (a small /usr/bin/python3 reader): setup
  time per connection, the node's RSS per connection and one 4 KiB read on each.
- thin: an active-active pair of a sparse volume of each size with 16 written chunks:
  the initial copy, a resync of 4 chunks written while split, `pair verify`, and a
  restart of the primary. A phase that does not finish within --timeout is reported as
  its progress rate and the time the whole would take at that rate.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pairs import api, cpu_seconds
from rich.console import Console
from rich.table import Table

from twinvol import cluster as cluster_mod
from twinvol.cluster import ClusterConfig, ClusterSection, LimitsConfig, NodeConfig
from twinvol.sizes import format_size, parse_size
from twinvol.supervisor import Supervisor, free_ports, twinvol_argv

CHUNK = 64 * 1024
PY3 = "/usr/bin/python3"  # the interpreter with libnbd's Python binding

# Opens K connections one after another (timing each), reads 4 KiB on each, then waits
# for a line on stdin so the caller can look at the node with all of them open.
CONNECT = r"""
import sys, time, nbd
uri, k = sys.argv[1], int(sys.argv[2])
hs, times = [], []
for _ in range(k):
    t = time.perf_counter()
    h = nbd.NBD()
    h.connect_uri(uri)
    times.append(time.perf_counter() - t)
    hs.append(h)
t = time.perf_counter()
for h in hs:
    h.pread(4096, 0)
print(" ".join(f"{x:.6f}" for x in times), time.perf_counter() - t, flush=True)
sys.stdin.readline()
for h in hs:
    h.shutdown()
"""

# Writes 64 KiB of data at each given chunk number.
WRITE = r"""
import sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
for c in sys.argv[2:]:
    h.pwrite(b"w" * 65536, int(c) * 65536)
h.flush()
h.shutdown()
"""


def rss(pid: int, key: str = "VmRSS") -> int:
    """Resident memory of a process in bytes (VmRSS; VmHWM for the peak)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def disk_writes(pid: int) -> int:
    """Bytes a process caused to be written to storage (/proc/PID/io write_bytes)."""
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    return 0


def spread(n: int, total: int) -> list[int]:
    """`n` chunk numbers spread evenly over `total` chunks (the first one included)."""
    return sorted({i * total // n for i in range(n)}) if total else []


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


@dataclass
class Cluster:
    """A witness and nodes on loopback, in a temporary directory."""

    d: str
    names: tuple[str, ...]
    sup: Supervisor = field(default_factory=Supervisor)
    cfg: ClusterConfig = field(init=False)
    path: str = field(init=False)

    def __post_init__(self) -> None:
        ports = iter(free_ports(3 * len(self.names) + 1))
        cfg = ClusterConfig(
            nodes={n: NodeConfig(site=n, nbd=f"127.0.0.1:{next(ports)}",
                                 api=f"127.0.0.1:{next(ports)}", data_dir=n,
                                 peer=f"127.0.0.1:{next(ports)}") for n in self.names},
            cluster=ClusterSection(name="scale", secret=secrets.token_hex(8)),
            witness={"addr": f"127.0.0.1:{next(ports)}", "data_dir": "witness"},
            limits=LimitsConfig(nbd_max_per_client=1024))
        self.path = os.path.join(self.d, "cluster.toml")
        cluster_mod.dump(cfg, self.path)
        self.cfg = cluster_mod.load(self.path)
        assert self.cfg.witness is not None
        self.sup.start("witness", twinvol_argv("witness", "run", "--cluster", self.path),
                       os.path.join(self.d, "witness.log"))
        self.sup.wait_http("witness", f"http://{self.cfg.witness['addr']}/api/v1/health",
                           headers={"Authorization": f"Bearer {self.cfg.cluster.secret}"})
        for n in self.names:
            self.start(n)

    def start(self, node: str, timeout: float = 120.0) -> float:
        """Start a node; seconds until its API answers."""
        t = time.perf_counter()
        self.sup.start(node, twinvol_argv("node", "run", "--cluster", self.path, "--node", node),
                       os.path.join(self.d, f"{node}.log"))
        self.sup.wait_http(node, self.cfg.node(node).api_url + "/api/v1/health", timeout)
        return time.perf_counter() - t

    def pid(self, node: str) -> int:
        return self.sup.components[node].pid

    def api(self, node: str, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        return api(self.cfg, node, method, path, body)

    def pair(self, name: str, secondary: str, timeout: float = 30.0) -> None:
        """Create a pair once the nodes have met (the API refuses until then)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.api("A", "POST", "/api/v1/pairs", {"name": name, "secondary": secondary})
                return
            except urllib.error.HTTPError as e:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"pair create: {e.read().decode(errors='replace')}"
                                       ) from None
                time.sleep(0.2)

    def uri(self, node: str, export: str) -> str:
        return self.cfg.node(node).nbd_uri(export)


class Meter:
    """CPU seconds and disk writes of each node over one phase."""

    def __init__(self, c: Cluster) -> None:
        self.pids = {n: c.pid(n) for n in c.names}
        self.cpu0 = {n: cpu_seconds(p) for n, p in self.pids.items()}
        self.io0 = {n: disk_writes(p) for n, p in self.pids.items()}
        self.t0 = time.perf_counter()

    def read(self) -> dict[str, Any]:
        return {"seconds": time.perf_counter() - self.t0,
                "cpu": {n: cpu_seconds(p) - self.cpu0[n] for n, p in self.pids.items()},
                "disk_writes": {n: disk_writes(p) - self.io0[n] for n, p in self.pids.items()}}


def volumes_case(n: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="twinvol-scale-") as d:
        c = Cluster(d, ("A",))
        try:
            rss0 = rss(c.pid("A"))
            creates = []
            for i in range(n):
                t = time.perf_counter()
                c.api("A", "POST", "/api/v1/volumes", {"name": f"v{i}", "size": 1 << 20})
                creates.append(time.perf_counter() - t)
            rss1 = rss(c.pid("A"))
            lists = [timed(lambda: c.api("A", "GET", "/api/v1/volumes")) for _ in range(10)]
            c.sup.stop("A")
            start = c.start("A")
            t = time.perf_counter()
            while len(c.api("A", "GET", "/api/v1/volumes")["volumes"]) < n:
                time.sleep(0.02)
            listed = start + time.perf_counter() - t
            return {"volumes": n, "create_ms": 1e3 * statistics.median(creates),
                    "create_last_ms": 1e3 * statistics.median(creates[-max(1, n // 10):]),
                    "list_ms": 1e3 * statistics.median(lists),
                    "rss_per_volume": (rss1 - rss0) / n, "rss": rss1,
                    "start_s": start, "start_listed_s": listed,
                    "restart_rss": rss(c.pid("A"))}
        finally:
            c.sup.stop_all()


def conns_case(c: Cluster, k: int) -> dict[str, Any]:
    pid = c.pid("A")
    rss0, cpu0 = rss(pid), cpu_seconds(pid)
    p = subprocess.Popen([PY3, "-c", CONNECT, c.uri("A", "c"), str(k)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdin is not None and p.stdout is not None
    try:
        *times_s, reads_s = p.stdout.readline().split()
        times = [float(x) for x in times_s]
        rss1, cpu1 = rss(pid), cpu_seconds(pid)
    finally:
        p.stdin.write("\n")
        p.stdin.close()
        p.wait(30)
    return {"connections": k, "connect_ms": 1e3 * statistics.median(times),
            "connect_max_ms": 1e3 * max(times), "read_all_ms": 1e3 * float(reads_s),
            "rss_per_conn": (rss1 - rss0) / k, "node_cpu_us_per_conn": (cpu1 - cpu0) * 1e6 / k}


def wait_for(check: Callable[[], tuple[bool, float]], timeout: float) -> tuple[bool, float]:
    """Poll `check` (done, fraction done) until done or timeout; returns the last answer."""
    deadline = time.monotonic() + timeout
    while True:
        done, frac = check()
        if done or time.monotonic() > deadline:
            return done, frac
        time.sleep(0.1)


def phase(c: Cluster, begin: Callable[[], object], check: Callable[[], tuple[bool, float]],
          timeout: float) -> dict[str, Any]:
    """Measure from `begin` (the request that starts the work) until `check` says done."""
    m = Meter(c)
    begin()
    done, frac = wait_for(check, timeout)
    out = m.read()
    out.update(done=done, fraction=frac)
    if not done and frac > 0:
        out["projected_s"] = out["seconds"] / frac
    return out


def copy_state(c: Cluster) -> tuple[bool, float]:
    """Pair t is mirrored; the fraction of its copy done."""
    p = c.api("A", "GET", "/api/v1/pairs/t")
    left = p["copy"]["remaining_chunks"]
    return p["state"] == "mirrored", 1 - left / max(1, p["copy"]["total_chunks"])


def resync_and_verify(c: Cluster, out: dict[str, Any], total: int, timeout: float) -> None:
    """Split, write 4 chunks, resync (only those 4 need to travel); then `pair verify`."""
    c.api("A", "POST", "/api/v1/pairs/t/split")
    subprocess.run([PY3, "-c", WRITE, c.uri("A", "t"), *map(str, spread(4, total))],
                   check=True)

    out["resync"] = phase(c, lambda: c.api("A", "POST", "/api/v1/pairs/t/resync"),
                          lambda: copy_state(c), timeout)

    def verify_state() -> tuple[bool, float]:
        v = c.api("A", "GET", "/api/v1/pairs/t").get("verify", {})
        return (not v.get("running", True),
                v.get("checked_chunks", 0) / max(1, v.get("total_chunks", 1)))

    out["verify"] = phase(c, lambda: c.api("A", "POST", "/api/v1/pairs/t/verify"),
                          verify_state, timeout)
    out["verify"]["mismatches"] = len(c.api("A", "GET", "/api/v1/pairs/t")
                                      .get("verify", {}).get("mismatched_chunks", []))


def thin_case(size: int, timeout: float) -> dict[str, Any]:
    total = (size + CHUNK - 1) // CHUNK
    out: dict[str, Any] = {"size": size, "chunks": total}
    with tempfile.TemporaryDirectory(prefix="twinvol-scale-") as d:
        c = Cluster(d, ("A", "B"))
        try:
            c.api("A", "POST", "/api/v1/volumes", {"name": "t", "size": size})
            subprocess.run([PY3, "-c", WRITE, c.uri("A", "t"),
                            *map(str, spread(16, total))], check=True)

            out["copy"] = cp = phase(c, lambda: c.pair("t", "B"), lambda: copy_state(c), timeout)
            done = cp["done"]
            p = c.api("A", "GET", "/api/v1/pairs/t")
            out["copy"]["bytes_sent"] = p["copy"]["bytes_sent"]
            out["copy"]["a_peak_rss"] = rss(c.pid("A"), "VmHWM")
            out["copy"]["b_allocated"] = c.api("B", "GET", "/api/v1/volumes/"
                                               + p["partner_volume"]).get("allocated")
            if done:
                resync_and_verify(c, out, total, timeout)
            c.sup.stop("A")
            start = c.start("A")
            out["restart"] = {"seconds": start, "cpu": {"A": cpu_seconds(c.pid("A"))}}

            def remirrored() -> tuple[bool, float]:
                return c.api("A", "GET", "/api/v1/pairs/t")["state"] == "mirrored", 0.0

            if done:
                out["restart"]["mirrored_s"] = start + timed(lambda: wait_for(remirrored,
                                                                              timeout))
        finally:
            c.sup.stop_all()
    return out


def kib(b: float) -> str:
    return f"{max(0.0, b) / 1024:,.1f} KiB"


def mib(b: float) -> str:
    return f"{b / 2**20:,.1f} MiB"


def ms(v: float) -> str:
    return f"{v:,.1f} ms" if v < 10_000 else f"{v / 1e3:,.0f} s"


def secs(ph: dict[str, Any] | None) -> str:
    """A phase's wall time, or its progress and the time the whole would take."""
    if ph is None:
        return "-"
    if ph["done"]:
        return f"{ph['seconds']:.2f} s"
    proj = ph.get("projected_s")
    left = f", whole ~{proj:,.0f} s" if proj else ""
    return f"> {ph['seconds']:.0f} s ({100 * ph['fraction']:.2f}%{left})"


def cpu(ph: dict[str, Any] | None) -> str:
    if ph is None:
        return "-"
    return " + ".join(f"{v:.2f}" for v in ph["cpu"].values()) + " s"


def restart(rt: dict[str, Any] | None) -> str:
    if rt is None:
        return "-"
    mirrored = f"{rt['mirrored_s']:.2f} s" if "mirrored_s" in rt else "-"
    return f"{rt['seconds']:.2f} s / {mirrored}"


def report(console: Console, res: dict[str, list[dict[str, Any]]]) -> None:
    if res.get("volumes"):
        t = Table(title="Volumes per node (1 MiB sparse volumes, one node)")
        for h in ("volumes", "create (median / last 10%)", "GET /volumes", "RSS per volume",
                  "node RSS", "restart: API up", "restart: all listed"):
            t.add_column(h, justify="right")
        for r in res["volumes"]:
            t.add_row(str(r["volumes"]), f"{ms(r['create_ms'])} / {ms(r['create_last_ms'])}",
                      ms(r["list_ms"]), kib(r["rss_per_volume"]),
                      mib(r["rss"]), f"{r['start_s']:.2f} s",
                      f"{r['start_listed_s']:.2f} s")
        console.print(t)
    if res.get("conns"):
        t = Table(title="Client connections to one node (libnbd, one export)")
        for h in ("connections", "setup (median / max)", "4 KiB read on each, total",
                  "RSS per connection", "node CPU per connection"):
            t.add_column(h, justify="right")
        for r in res["conns"]:
            t.add_row(str(r["connections"]),
                      f"{ms(r['connect_ms'])} / {ms(r['connect_max_ms'])}",
                      ms(r["read_all_ms"]), kib(r["rss_per_conn"]),
                      f"{r['node_cpu_us_per_conn']:,.0f} us")
        console.print(t)
    if res.get("thin"):
        t = Table(title="Thin volumes in an active-active pair (16 chunks written; "
                        "CPU is A + B)")
        for h in ("size", "initial copy", "copy CPU", "copy: A disk writes", "A peak RSS",
                  "B allocated",
                  "resync of 4 chunks", "resync CPU", "verify", "verify CPU",
                  "restart A: API / mirrored"):
            t.add_column(h, justify="right")
        for r in res["thin"]:
            cp, rs, vf, rt = (r.get(k) for k in ("copy", "resync", "verify", "restart"))
            assert cp is not None
            t.add_row(format_size(r["size"]), secs(cp), cpu(cp),
                      mib(cp["disk_writes"]["A"]), mib(cp["a_peak_rss"]),
                      mib(cp["b_allocated"] or 0), secs(rs), cpu(rs),
                      secs(vf), cpu(vf), restart(rt))
        console.print(t)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="smaller run: up to 100 volumes, 64 connections, 1G and 16G")
    ap.add_argument("--parts", default="volumes,conns,thin",
                    help="comma-separated subset of: volumes, conns, thin")
    ap.add_argument("--volumes", help="volume counts (default 1,10,100,1000)")
    ap.add_argument("--conns", help="connection counts (default 1,16,64,256)")
    ap.add_argument("--sizes", help="thin volume sizes (default 1G,16G,256G,1T)")
    ap.add_argument("--timeout", type=float, default=20.0,
                    help="seconds a thin-volume phase may take before it is projected")
    ap.add_argument("--json-out", default="bench/results/scale.json")
    args = ap.parse_args()
    # SIGTERM (a timeout, CI) unwinds like Ctrl-C: nodes stopped, temporary files removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        vols = [int(x) for x in (args.volumes or ("1,10,100" if args.quick else
                                                  "1,10,100,1000")).split(",")]
        conns = [int(x) for x in (args.conns or ("1,16,64" if args.quick else
                                                 "1,16,64,256")).split(",")]
        sizes = [parse_size(x) for x in (args.sizes or ("1G,16G" if args.quick else
                                                        "1G,16G,256G,1T")).split(",")]
    except ValueError as e:
        ap.error(str(e))
    parts = set(args.parts.split(","))
    if parts - {"volumes", "conns", "thin"}:
        ap.error(f"unknown part(s): {', '.join(sorted(parts - {'volumes', 'conns', 'thin'}))}")
    console = Console(width=None if sys.stdout.isatty() else 150)
    res: dict[str, list[dict[str, Any]]] = {"volumes": [], "conns": [], "thin": []}
    if "volumes" in parts:
        for n in vols:
            console.log(f"volumes: {n}")
            res["volumes"].append(volumes_case(n))
    if "conns" in parts:
        with tempfile.TemporaryDirectory(prefix="twinvol-scale-") as d:
            c = Cluster(d, ("A",))
            try:
                c.api("A", "POST", "/api/v1/volumes", {"name": "c", "size": 1 << 20})
                for k in conns:
                    console.log(f"connections: {k}")
                    res["conns"].append(conns_case(c, k))
            finally:
                c.sup.stop_all()
    if "thin" in parts:
        for size in sizes:
            console.log(f"thin volume: {format_size(size)}")
            res["thin"].append(thin_case(size, args.timeout))
    report(console, res)
    os.makedirs(os.path.dirname(args.json_out) or ".", exist_ok=True)
    with open(args.json_out, "w") as f:
        json.dump({"time": time.time(), "load": os.getloadavg(), **res}, f, indent=1)


if __name__ == "__main__":
    main()

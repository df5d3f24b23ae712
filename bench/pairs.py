"""Active-active pair benchmark: mirrored writes and local reads as ratios to a single node,
and the write stall a host sees through the host agent when the primary is killed.

    .venv/bin/python bench/pairs.py [--runtime S] [--size SIZE] [--json-out FILE]

Starts a witness and nodes A and B on loopback, makes one plain volume and one
active-active pair, and runs fio's nbd engine against: the plain volume on A
(baseline), the pair through A (primary), through B (secondary) and through the
host agent. Then it writes through the host agent with one request in flight,
kills the primary A with SIGKILL, and reports the longest gap between
acknowledged writes: failover to B, which asks the witness and takes over.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any

from rich.console import Console
from rich.table import Table

from twinvol import cluster as cluster_mod
from twinvol.cluster import ClusterConfig, ClusterSection, NodeConfig
from twinvol.sizes import parse_size
from twinvol.supervisor import Supervisor, free_ports, twinvol_argv

WORKLOADS = [("randwrite-4k", "randwrite", "4k", 32), ("write-1m", "write", "1m", 16),
             ("randread-4k", "randread", "4k", 32)]

STALL = r"""
import sys, time, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
end = time.monotonic() + float(sys.argv[2])
last = time.monotonic()
worst = 0.0
i = 0
while time.monotonic() < end:
    h.pwrite(b"s" * 4096, (i % 1024) * 4096)
    now = time.monotonic()
    worst = max(worst, now - last)
    last = now
    i += 1
    if i == 200:
        print("go", flush=True)
print(f"{worst:.6f} {i}", flush=True)
"""


def api(cfg: ClusterConfig, node: str, method: str, path: str,
        body: dict[str, Any] | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(cfg.node(node).api_url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json",
                                          "Authorization": f"Bearer {cfg.cluster.secret}"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


PROFILERS = ("py-spy", "native", "perf")


def profiler_argv(tool: str, pid: int, seconds: int, out: str) -> list[str]:
    """The sampler for one process: py-spy (Python frames only, never pauses it), py-spy
    --native (also C frames: uvloop, the agent's relay, libc; pauses it per sample) or
    perf (user and kernel frames, for where the kernel's share goes)."""
    if tool == "perf":
        return ["perf", "record", "-g", "-F", "499", "-p", str(pid), "-o", f"{out}.perf",
                "--", "sleep", str(seconds)]
    native = ["--native"] if tool == "native" else ["--nonblocking"]
    return [os.path.join(os.path.dirname(sys.executable), "py-spy"), "record", "--pid",
            str(pid), "--format", "raw", *native, "--duration", str(seconds),
            "--output", f"{out}.txt"]


def fio(uri: str, rw: str, bs: str, qd: int, size: int, runtime: float,
        pids: dict[str, int] | None = None, profile: str | None = None,
        profiler: str = "py-spy") -> dict[str, Any]:
    """One fio run. With `pids`, also each process's CPU microseconds per completed
    request (`cpu_us`); with `profile` (a path prefix), `profiler` samples every pid."""
    pids = pids or {}
    spies = [subprocess.Popen(profiler_argv(profiler, pid, max(1, int(runtime)),
                                            f"{profile}-{name}"),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for name, pid in pids.items() if profile is not None]
    cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
    p = subprocess.run(["fio", "--name=b", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}",
                        f"--bs={bs}", f"--iodepth={qd}", f"--size={size}", "--time_based",
                        f"--runtime={runtime}", "--output-format=json"],
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"fio {rw} {bs} on {uri} failed: {p.stderr.strip()[-2000:]}")
    out = p.stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    io = job["write"] if "write" in rw else job["read"]
    ios = max(1, int(io["total_ios"]))
    cpu_us = {name: (cpu_seconds(pid) - cpu0[name]) * 1e6 / ios for name, pid in pids.items()}
    for spy in spies:
        spy.wait()
    return {"iops": io["iops"], "mbps": io["bw_bytes"] / 1e6, "ios": ios, "cpu_us": cpu_us}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runtime", type=float, default=8.0)
    ap.add_argument("--size", default="512M")
    ap.add_argument("--json-out", default="bench/results/pairs.json")
    ap.add_argument("--workloads", default=",".join(w[0] for w in WORKLOADS),
                    help="comma-separated subset of: " + ", ".join(w[0] for w in WORKLOADS))
    ap.add_argument("--targets", default="single,via A,via B,agent,agent unix",
                    help="comma-separated subset of: single, via A, via B, agent (TCP), "
                         "agent unix (the agent's Unix socket)")
    ap.add_argument("--no-stall", action="store_true", help="skip the failover stall test")
    ap.add_argument("--profile", metavar="DIR",
                    help="profile nodes A and B (and the agent) into DIR per case")
    ap.add_argument("--profiler", choices=PROFILERS, default="py-spy",
                    help="py-spy (Python frames), native (py-spy --native) or perf")
    args = ap.parse_args()
    size = parse_size(args.size)
    console = Console(width=150)
    with tempfile.TemporaryDirectory(prefix="twinvol-pairbench-") as d:
        ports = iter(free_ports(9))
        cfg = ClusterConfig(
            nodes={n: NodeConfig(site=n, nbd=f"127.0.0.1:{next(ports)}",
                                 api=f"127.0.0.1:{next(ports)}", data_dir=n,
                                 peer=f"127.0.0.1:{next(ports)}") for n in ("A", "B")},
            cluster=ClusterSection(name="bench", secret=secrets.token_hex(8)),
            witness={"addr": f"127.0.0.1:{next(ports)}", "data_dir": "witness"},
            host={"nbd": f"127.0.0.1:{next(ports)}", "api": f"127.0.0.1:{next(ports)}",
                  "nodes": ["A", "B"], "socket": "host.sock"})
        path = os.path.join(d, "cluster.toml")
        cluster_mod.dump(cfg, path)
        cfg = cluster_mod.load(path)
        sup = Supervisor()
        try:
            assert cfg.witness is not None
            sup.start("witness", twinvol_argv("witness", "run", "--cluster", path),
                      os.path.join(d, "witness.log"))
            sup.wait_http("witness", f"http://{cfg.witness['addr']}/api/v1/health",
                          headers={"Authorization": f"Bearer {cfg.cluster.secret}"})
            for n in ("A", "B"):
                sup.start(n, twinvol_argv("node", "run", "--cluster", path, "--node", n),
                          os.path.join(d, f"{n}.log"))
            for n in ("A", "B"):
                sup.wait_http(n, cfg.node(n).api_url + "/api/v1/health")
            api(cfg, "A", "POST", "/api/v1/volumes", {"name": "single", "size": size})
            api(cfg, "A", "POST", "/api/v1/volumes", {"name": "pair", "size": size})
            deadline = time.monotonic() + 30
            while True:
                try:
                    api(cfg, "A", "POST", "/api/v1/pairs", {"name": "pair", "secondary": "B"})
                    break
                except urllib.error.HTTPError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            while api(cfg, "A", "GET", "/api/v1/pairs/pair")["state"] != "mirrored":
                time.sleep(0.2)
            assert cfg.host is not None
            sup.start("host", twinvol_argv("host", "run", "--cluster", path),
                      os.path.join(d, "host.log"))
            sup.wait_http("host", f"http://{cfg.host['api']}/api/v1/health")
            targets = {"single": cfg.node("A").nbd_uri("single"),
                       "via A": cfg.node("A").nbd_uri("pair"),
                       "via B": cfg.node("B").nbd_uri("pair"),
                       "agent": f"nbd://{cfg.host['nbd']}/pair",
                       "agent unix": f"nbd+unix:///pair?socket={d}/host.sock"}
            for uri in targets.values():  # write everything once so reads are of data
                fio(uri, "write", "1m", 8, size, 2) if "single" in uri else None
            fio(targets["via A"], "write", "1m", 8, size, 3)
            chosen = args.targets.split(",")
            targets = {t: u for t, u in targets.items() if t in chosen or t == "single"}
            pids = {n: sup.components[n].pid for n in ("A", "B", "host")}
            if args.profile:
                os.makedirs(args.profile, exist_ok=True)
            results: dict[str, dict[str, dict[str, Any]]] = {}
            for wl, rw, bs, qd in WORKLOADS:
                if wl not in args.workloads.split(","):
                    continue
                results[wl] = {
                    name: fio(uri, rw, bs, qd, size, args.runtime, pids,
                              os.path.join(args.profile, f"{wl}-{name.replace(' ', '')}")
                              if args.profile else None, args.profiler)
                    for name, uri in targets.items()}
            worst, count = "nan", "0"
            if args.no_stall:
                return report(console, args, size, targets, results, float(worst), count)
            # The stall a host sees when the secondary dies mid-stream.
            w = subprocess.Popen(["/usr/bin/python3", "-c", STALL, targets["agent"],
                                  "8"],
                                 stdout=subprocess.PIPE, text=True)
            assert w.stdout is not None
            w.stdout.readline()
            time.sleep(1)
            sup.kill("A")  # the primary: the host agent fails over, B takes over
            worst, count = w.stdout.readline().split()
            w.wait()
        finally:
            sup.stop_all()
    report(console, args, size, targets, results, float(worst), count)


def report(console: Console, args: argparse.Namespace, size: int, targets: dict[str, str],
           results: dict[str, dict[str, dict[str, Any]]], worst: float, count: str) -> None:
    others = [t for t in targets if t != "single"]
    table = Table("workload", *(f"{t} IOPS" for t in targets),
                  *(f"{t.split()[-1]}/single" for t in others))
    for wl, r in results.items():
        base = r["single"]["iops"]
        table.add_row(wl, *(f"{r[t]['iops'] / 1000:.1f}k" for t in targets),
                      *(f"{r[t]['iops'] / base:.2f}x" for t in others))
    console.print(table)
    # CPU cost per request: the single volume lives on A, so its cost is A's alone.
    cpu = Table("workload", "target", "A us/req", "B us/req", "host us/req", "A+B us/req")
    for wl, r in results.items():
        for t in targets:
            c = r[t]["cpu_us"]
            cpu.add_row(wl, t, f"{c['A']:.1f}", f"{c['B']:.1f}", f"{c['host']:.1f}",
                        f"{c['A'] + c['B']:.1f}")
    console.print(cpu)
    console.print("goals through the host agent: writes >= 0.5x, reads >= 0.8x of single")
    if worst == worst:  # not NaN: the stall test ran
        console.print(f"write stall seen through the host agent when the primary was killed: "
                      f"{worst * 1000:.0f} ms ({count} writes, 1 in flight)")
    os.makedirs(os.path.dirname(args.json_out) or ".", exist_ok=True)
    with open(args.json_out, "w") as f:
        json.dump({"time": time.time(), "size": size, "runtime": args.runtime,
                   "results": results,
                   "stall_seconds": worst if worst == worst else None}, f, indent=2)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    main()

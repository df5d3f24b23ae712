"""Benchmark the host agent: fio through the agent vs. fio straight to a storage node.

Starts two twinvol nodes (A, B) serving one volume with the same virtual identity,
fills both copies with the same bytes, and starts two host agents: one with both nodes
as paths (reads balanced, writes to one path) and one with node A only. Every case runs
against node A directly and through each agent, alternating, with fio's nbd engine, and
prints IOPS / bandwidth and the ratio to the direct run measured in the same pass. The
ratio is the point: absolute numbers depend on the machine and its load.

    .venv/bin/python bench/hostagent.py [--runtime SECONDS] [--size SIZE] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import tomli_w
from rich.console import Console
from rich.table import Table

try:
    from twinvol.sizes import parse_size
    from twinvol.supervisor import Supervisor, free_ports, twinvol_argv
except ImportError:  # pragma: no cover - only when run with the wrong interpreter
    sys.exit("bench/hostagent.py needs twinvol importable: run it with the project's "
             "virtualenv (.venv/bin/python)")

EXPORT = "bench"
console = Console(width=None if sys.stdout.isatty() else 120)

CASES = (
    ("4k randread", "randread", "4k", 32),
    ("4k randwrite", "randwrite", "4k", 32),
    ("64k randread", "randread", "64k", 16),
    ("1M seq write", "write", "1m", 8),
)


@dataclass
class Result:
    case: str
    target: str
    iops: float = 0.0
    bw_bytes: float = 0.0
    lat_p99_us: float = 0.0
    error: str | None = None
    # CPU microseconds per request of each process serving it (nodes and agent)
    cpu_us: dict[str, float] | None = None


def agent_argv(cluster: str) -> list[str]:
    from twinvol.cli import main

    if any(g.name == "host" for g in main.app.registered_groups):
        return twinvol_argv("host", "run", "--cluster", cluster)
    return [sys.executable, "-c", "from twinvol.cli import main, host; "
            "main.app.add_typer(host.app, name='host'); main.main()",
            "host", "run", "--cluster", cluster]


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def post(url: str, body: dict[str, object]) -> None:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        if r.status != 201:
            raise RuntimeError(f"POST {url}: HTTP {r.status}")


def fio(uri: str, rw: str, bs: str, depth: int, size: int, runtime: float) -> Result:
    argv = ["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}",
            f"--bs={bs}", f"--iodepth={depth}", f"--size={size}", "--time_based",
            f"--runtime={runtime}", "--ramp_time=1", "--output-format=json"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    p = subprocess.run(argv, capture_output=True, text=True, timeout=runtime + 60)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    fio_cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    if p.returncode != 0 or "{" not in p.stdout:
        return Result("", "", error=(p.stderr or p.stdout).strip()[-300:])
    job = json.loads(p.stdout[p.stdout.index("{"):])["jobs"][0]
    d = job["read" if "read" in rw else "write"]
    p99 = d.get("clat_ns", {}).get("percentile", {}).get("99.000000", 0) / 1000
    r = Result("", "", d["iops"], d["bw_bytes"], p99,
               None if job["error"] == 0 else f"fio error {job['error']}")
    if r.iops:
        r.cpu_us = {"fio": fio_cpu / (r.iops * (runtime + 1)) * 1e6}
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runtime", type=float, default=5.0, help="seconds per case (default 5)")
    ap.add_argument("--size", default="256M", help="volume size (default 256M)")
    ap.add_argument("--json-out", help="also write the results as JSON here")
    ap.add_argument("--cases", help="comma-separated subset of the cases, e.g. '4k randread'")
    ap.add_argument("--python-agent", action=argparse.BooleanOptionalAction, default=True,
                    help="also run an agent on the Python data path (default: yes)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=TUNING",
                    help="also run an A+B agent with relay tuning, e.g. "
                         "'d1=defer_min=1,batch_slack=8' (TWINVOL_RELAY_TUNING)")
    args = ap.parse_args()
    size = parse_size(args.size)
    sup = Supervisor()
    tmp = Path(tempfile.mkdtemp(prefix="twinvol-hostbench-"))
    ports = free_ports(10 + 2 * len(args.variant))
    nodes = {n: {"site": n, "nbd": f"127.0.0.1:{ports[2 * i]}",
                 "api": f"127.0.0.1:{ports[2 * i + 1]}", "data_dir": f"data-{n}"}
             for i, n in enumerate("AB")}
    agents = {"agent A+B": (["A", "B"], ports[4], ports[5], "native"),
              "agent A only": (["A"], ports[6], ports[7], "native")}
    if args.python_agent:
        agents["agent A+B python"] = (["A", "B"], ports[8], ports[9], "python")
    tuning: dict[str, str] = {}
    for i, v in enumerate(args.variant):
        name, _, spec = v.partition("=")
        agents[f"agent A+B {name}"] = (["A", "B"], ports[10 + 2 * i], ports[11 + 2 * i],
                                       "native")
        tuning[f"agent A+B {name}"] = spec
    cases = [c for c in CASES if not args.cases or c[0] in args.cases.split(",")]
    results: list[Result] = []
    try:
        for label, (paths, nbd, api, data_path) in agents.items():
            cfg = tmp / f"{label.replace(' ', '-').replace('+', '')}.toml"
            with open(cfg, "wb") as f:
                tomli_w.dump({"cluster": {"name": "bench"}, "nodes": nodes,
                              "host": {"nbd": f"127.0.0.1:{nbd}", "api": f"127.0.0.1:{api}",
                                       "nodes": paths, "data_path": data_path}}, f)
        cluster = str(tmp / "agent-AB.toml")
        for n in "AB":
            sup.start(n, twinvol_argv("node", "run", "--cluster", cluster, "--node", n),
                      str(tmp / f"{n}.log"))
        for n in "AB":
            sup.wait_http(n, f"http://{nodes[n]['api']}/api/v1/health")
            post(f"http://{nodes[n]['api']}/api/v1/volumes",
                 {"name": EXPORT, "size": size, "serial": "BENCH-1", "volume_id": 1})
        direct = f"nbd://{nodes['A']['nbd']}/{EXPORT}"
        console.print(f"filling both copies with the same {args.size} of data ...")
        subprocess.run(["fio", "--name=fill", "--ioengine=nbd", f"--uri={direct}", "--rw=write",
                        "--bs=1m", "--iodepth=8", f"--size={size}"], check=True,
                       capture_output=True)
        subprocess.run(["nbdcopy", direct, f"nbd://{nodes['B']['nbd']}/{EXPORT}"], check=True)
        targets = {"node A direct": direct}
        for label, (_, nbd, api, _dp) in agents.items():
            cfg = tmp / f"{label.replace(' ', '-').replace('+', '')}.toml"
            env = {**os.environ, "TWINVOL_RELAY_TUNING": tuning[label]} \
                if label in tuning else None
            sup.start(label, agent_argv(str(cfg)), str(tmp / f"{label}.log"), env=env)
            sup.wait_http(label, f"http://127.0.0.1:{api}/api/v1/health")
            targets[label] = f"nbd://127.0.0.1:{nbd}/{EXPORT}"
        for case, rw, bs, depth in cases:
            for target, uri in targets.items():
                console.print(f"  {case:14} {target} ...")
                serving = ["A", "B"] + ([target] if target in agents else [])
                before = {n: cpu_seconds(sup.components[n].pid) for n in serving}
                r = fio(uri, rw, bs, depth, size, args.runtime)
                ios = r.iops * (args.runtime + 1)  # + the ramp, which CPU time includes
                if ios:
                    r.cpu_us = {**(r.cpu_us or {}), **{
                        ("agent" if n in agents else n):
                        (cpu_seconds(sup.components[n].pid) - before[n]) / ios * 1e6
                        for n in serving}}
                r.case, r.target = case, target
                results.append(r)
                time.sleep(0.2)
    finally:
        sup.stop_all()
    table = Table("case", "target", "IOPS", "MB/s", "p99 µs", "vs direct",
                  "CPU µs/req A", "B", "agent", "fio")
    base = {r.case: r for r in results if r.target == "node A direct"}
    for r in results:
        if r.error:
            table.add_row(r.case, r.target, "-", "-", "-", f"[red]{r.error}[/]")
            continue
        ref = base.get(r.case)
        ratio = f"{r.iops / ref.iops:.2f}" if ref and ref.iops and not ref.error else "-"
        cpu = r.cpu_us or {}
        table.add_row(r.case, r.target, f"{r.iops:,.0f}", f"{r.bw_bytes / 1e6:,.0f}",
                      f"{r.lat_p99_us:,.0f}", ratio,
                      *(f"{cpu[k]:.1f}" if k in cpu else "-" for k in ("A", "B", "agent", "fio")))
    console.print(table)
    console.print(f"cpus: {os.cpu_count()}  load: {os.getloadavg()[0]:.2f}  (fio, both nodes and "
                  "the agents share the machine)")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"runtime": args.runtime, "size": size,
                       "results": [asdict(r) for r in results]}, f, indent=2)
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())

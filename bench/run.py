"""Benchmark a twinvol node against nbdkit's file plugin and qemu-nbd, in one run.

All three servers serve an equal sparse file on loopback and are driven by the same fio
commands (nbd engine), case by case, so the ratios compare like with like on this machine at
this moment; absolute numbers from different runs or machines are not comparable.

    python bench/run.py [--runtime SECONDS] [--size SIZE] [--json-out FILE] [--quick]
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import linecache
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from rich.console import Console
from rich.table import Table

try:
    from twinvol import __version__ as twinvol_version
    from twinvol.sizes import SizeError, format_size, parse_size
    from twinvol.supervisor import Supervisor, free_ports, twinvol_argv
except ImportError:  # pragma: no cover - only when run with the wrong interpreter
    sys.exit("bench/run.py needs twinvol importable: run it with /work/main/.venv/bin/python "
             "(or the project's virtualenv)")

from hotspots import format_hotspots, summarise

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SERVERS = ("twinvol", "nbdkit", "qemu-nbd")
PEERS = ("nbdkit", "qemu-nbd")
EXPORT = "bench"
# Piped output (logs, CI) gets a width that fits the table instead of rich's 80-column default.
console = Console(width=None if sys.stdout.isatty() else 120)


@dataclass(frozen=True)
class Workload:
    """One fio access pattern; each runs with every connection count."""

    name: str
    rw: str  # fio rw= value
    bs: str
    iodepth: int

    @property
    def direction(self) -> str:
        """The key of fio's JSON section that carries this workload's numbers."""
        return "read" if "read" in self.rw else "write"


WORKLOADS = (
    Workload("4k randread", "randread", "4k", 32),
    Workload("4k randwrite", "randwrite", "4k", 32),
    Workload("1M seq write", "write", "1m", 16),
)


@dataclass
class Result:
    """One (workload, connections, server) measurement; `error` set instead of numbers."""

    workload: str
    connections: int
    server: str
    iops: float = 0.0
    bw_bytes: float = 0.0
    lat_mean_us: float = 0.0
    lat_p99_us: float = 0.0
    server_cpu_cores: float = 0.0  # server CPU seconds / wall seconds over the fio run
    machine_busy_cores: float = 0.0  # all processes (server, fio and anything else running)
    fio_cpu: dict[str, float] = field(default_factory=dict)
    profile: str | None = None
    error: str | None = None


@dataclass
class Server:
    name: str
    uri: str
    pid: int = 0


# ---- process plumbing ---------------------------------------------------------------------


def _raise_interrupt(signum: int, _frame: FrameType | None) -> None:
    """SIGTERM to the bench behaves like Ctrl-C, so the `finally` cleanup runs."""
    raise KeyboardInterrupt(f"signal {signum}")


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all threads), from /proc; 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine, to see load from outside the bench."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    hz = os.sysconf("SC_CLK_TCK")
    return (total - idle) / hz, total / hz


def _version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    return out.strip().splitlines()[0] if out.strip() else "unknown"


def _wait_nbd(sup: Supervisor, name: str, uri: str, size: int, timeout: float = 30.0) -> None:
    """Wait until the export completes an NBD handshake and reports the expected size."""
    comp = sup.components[name]
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if not comp.alive():
            raise RuntimeError(f"{name} exited: {comp.tail()}")
        p = subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True)
        if p.returncode == 0:
            got = int(p.stdout.strip())
            if got != size:
                raise RuntimeError(f"{name} exports {got} bytes, expected {size}")
            return
        last = p.stderr.strip()
        time.sleep(0.1)
    raise RuntimeError(f"{name} did not serve {uri} within {timeout:.0f}s: {last}")


_SOURCES: dict[str, list[str]] = {}


def snapshot_sources() -> None:
    """Keep the project's sources as the node imports them, so profiles quote the code that ran
    even if someone edits the tree during the benchmark."""
    for f in (REPO / "src").rglob("*.py"):
        _SOURCES[str(f)] = f.read_text().splitlines()


def source_line(path: str, lineno: int) -> str:
    lines = _SOURCES.get(path)
    if lines is None:
        return linecache.getline(path, lineno)
    return lines[lineno - 1] if 0 < lineno <= len(lines) else ""


def start_servers(sup: Supervisor, tmp: Path, size: int, names: list[str]) -> dict[str, Server]:
    """One sparse file and one server per name, each on fresh loopback ports."""
    servers: dict[str, Server] = {}
    nbd_port, api_port, nbdkit_port, qemu_port = free_ports(4)
    files = {}
    for name in names:
        files[name] = tmp / f"{name}.img"
        with open(files[name], "wb") as f:
            f.truncate(size)
    logs = tmp / "logs"
    if "twinvol" in names:
        cluster = tmp / "cluster.toml"
        cluster.write_text(
            '[cluster]\nname = "bench"\n\n[nodes.A]\nsite = "A"\n'
            f'nbd = "127.0.0.1:{nbd_port}"\napi = "127.0.0.1:{api_port}"\n'
            f'data_dir = "{tmp / "twinvol-data"}"\n')
        api = f"http://127.0.0.1:{api_port}/api/v1"
        snapshot_sources()
        sup.start("twinvol", twinvol_argv("node", "run", "--cluster", str(cluster), "--node", "A"),
                  str(logs / "twinvol.log"))
        sup.wait_http("twinvol", f"{api}/health")
        body = json.dumps({"name": EXPORT, "path": str(files["twinvol"]),
                           "adopt": True}).encode()
        req = urllib.request.Request(f"{api}/volumes", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            if r.status != 201:
                raise RuntimeError(f"creating the twinvol volume: HTTP {r.status}")
        servers["twinvol"] = Server("twinvol", f"nbd://127.0.0.1:{nbd_port}/{EXPORT}")
    if "nbdkit" in names:
        sup.start("nbdkit", ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(nbdkit_port),
                             "--exit-with-parent", "file", str(files["nbdkit"])],
                  str(logs / "nbdkit.log"))
        servers["nbdkit"] = Server("nbdkit", f"nbd://127.0.0.1:{nbdkit_port}/")
    if "qemu-nbd" in names:
        sup.start("qemu-nbd", ["qemu-nbd", "-f", "raw", "-x", EXPORT, "-p", str(qemu_port),
                               "-b", "127.0.0.1", "-e", "8", "-t", "--cache=writeback",
                               str(files["qemu-nbd"])],
                  str(logs / "qemu-nbd.log"))
        servers["qemu-nbd"] = Server("qemu-nbd", f"nbd://127.0.0.1:{qemu_port}/{EXPORT}")
    for s in servers.values():
        _wait_nbd(sup, s.name, s.uri, size)
        s.pid = sup.components[s.name].pid
    return servers


# ---- fio ----------------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return f"{round(seconds * 1000)}ms"


def fio(uri: str, name: str, opts: dict[str, str | int], timeout: float) -> dict[str, Any]:
    """Run one fio job group against `uri` and return its (group-reported) JSON job."""
    argv = ["fio", f"--name={name}", "--ioengine=nbd", f"--uri={uri}", "--group_reporting",
            "--output-format=json", *(f"--{k}={v}" for k, v in opts.items())]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    # The nbd engine prints "fio: connected to NBD server" lines before the JSON document.
    start = p.stdout.find("{")
    if p.returncode != 0 or start < 0:
        msg = (p.stderr.strip() or p.stdout.strip()).splitlines()
        raise RuntimeError(f"fio exited {p.returncode}: {' | '.join(msg[-3:])}")
    job: dict[str, Any] = json.loads(p.stdout[start:])["jobs"][0]
    if job.get("error"):
        raise RuntimeError(f"fio job error {job['error']}")
    return job


def prefill(server: Server, size: int) -> float:
    """Write the whole export once (1 MiB sequential) so randread reads real data; MB/s."""
    t0 = time.monotonic()
    fio(server.uri, "prefill", {"rw": "write", "bs": "1m", "iodepth": 16, "size": size},
        timeout=600)
    return size / (time.monotonic() - t0) / 1e6


def case_opts(w: Workload, conns: int, size: int, runtime: float,
              ramp: float) -> dict[str, str | int]:
    opts: dict[str, str | int] = {
        "rw": w.rw, "bs": w.bs, "iodepth": w.iodepth, "numjobs": conns,
        "time_based": 1, "runtime": _ms(runtime), "ramp_time": _ms(ramp),
        "norandommap": 1, "randrepeat": 0,
    }
    if w.rw == "write" and conns > 1:
        # Each connection streams through its own slice instead of all rewriting the start.
        opts["size"] = opts["offset_increment"] = size // conns
    return opts


def run_case(server: Server, w: Workload, conns: int, args: argparse.Namespace,
             profile_dir: Path | None) -> Result:
    res = Result(w.name, conns, server.name)
    opts = case_opts(w, conns, args.size, args.runtime, args.ramp)
    tag = f"{w.rw}-{w.bs}-x{conns}"
    spy: subprocess.Popen[bytes] | None = None
    if profile_dir is not None and server.name == "twinvol":
        res.profile = str(profile_dir / f"twinvol-{tag}.txt")
        # Sample only the measured part (after ramp-up); --nonblocking keeps the node running.
        spy = subprocess.Popen(
            ["sh", "-c", f'sleep {args.ramp}; exec "$0" "$@"', args.py_spy, "record",
             "--pid", str(server.pid), "--format", "raw", "--nonblocking",
             "--duration", str(max(1, int(args.runtime))), "--output", res.profile],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cpu0, t0, busy0 = _cpu_seconds(server.pid), time.monotonic(), _machine_busy()[0]
    try:
        job = fio(server.uri, tag, opts, timeout=args.runtime + args.ramp + 120)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        res.error = str(e)
        return res
    finally:
        if spy is not None:
            try:
                spy.wait(timeout=args.runtime + 30)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait()
    wall = time.monotonic() - t0
    res.server_cpu_cores = (_cpu_seconds(server.pid) - cpu0) / wall
    res.machine_busy_cores = (_machine_busy()[0] - busy0) / wall
    d = job[w.direction]
    res.iops, res.bw_bytes = float(d["iops"]), float(d["bw_bytes"])
    res.lat_mean_us = float(d["clat_ns"]["mean"]) / 1000
    res.lat_p99_us = float(d["clat_ns"].get("percentile", {}).get("99.000000", 0)) / 1000
    res.fio_cpu = {"usr": float(job["usr_cpu"]), "sys": float(job["sys_cpu"])}
    return res


# ---- reporting ----------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    git = _version(["git", "-C", str(REPO), "describe", "--always", "--dirty"])
    # The tree may hold uncommitted edits; a digest of the sources pins what was measured.
    digest = hashlib.sha256()
    for f in sorted((REPO / "src").rglob("*.py")):
        digest.update(f.relative_to(REPO).as_posix().encode() + b"\0" + f.read_bytes())
    return {
        "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "loadavg_start": list(os.getloadavg()),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "twinvol": twinvol_version,
        "git": git,
        "src_sha256": digest.hexdigest()[:16],
        "fio": _version(["fio", "--version"]),
        "nbdkit": _version(["nbdkit", "--version"]),
        "qemu-nbd": _version(["qemu-nbd", "--version"]),
    }


def _iops(v: float) -> str:
    return f"{v / 1000:.1f}k" if v >= 1000 else f"{v:.0f}"


def _ratio(a: Result | None, b: Result | None) -> str:
    if a is None or b is None or a.error or b.error or not b.iops:
        return "-"
    r = a.iops / b.iops
    colour = "green" if r >= 1.0 else "yellow" if r >= 0.5 else "red"
    return f"[{colour}]{r:.2f}x[/]"


def ratios(results: list[Result]) -> list[dict[str, Any]]:
    """twinvol IOPS divided by each peer's, per case (same block size, so same as MB/s)."""
    out = []
    by = {(r.workload, r.connections, r.server): r for r in results}
    for (wl, conns, server), r in by.items():
        if server != "twinvol" or r.error:
            continue
        row: dict[str, Any] = {"workload": wl, "connections": conns}
        for peer in PEERS:
            p = by.get((wl, conns, peer))
            row[f"vs_{peer}"] = round(r.iops / p.iops, 3) if p and not p.error and p.iops else None
        out.append(row)
    return out


def print_table(results: list[Result], names: list[str], title: str) -> None:
    table = Table(title=title, title_justify="left")
    table.add_column("workload", no_wrap=True)
    table.add_column("conns", justify="right")
    for name in names:
        table.add_column(f"{name}\nIOPS    MB/s", justify="right", no_wrap=True)
    if "twinvol" in names:
        for peer in PEERS:
            if peer in names:
                table.add_column(f"twinvol/\n{peer}", justify="right", no_wrap=True)
    by = {(r.workload, r.connections, r.server): r for r in results}
    cases = list(dict.fromkeys((r.workload, r.connections) for r in results))
    for wl, conns in cases:
        cells = [wl, str(conns)]
        for name in names:
            r = by.get((wl, conns, name))
            if r is None or r.error:
                cells.append("[red]error[/]" if r else "-")
            else:
                cells.append(f"{_iops(r.iops):>6}  {r.bw_bytes / 1e6:6,.0f}")
        if "twinvol" in names:
            cells += [_ratio(by.get((wl, conns, "twinvol")), by.get((wl, conns, p)))
                      for p in PEERS if p in names]
        table.add_row(*cells)
    console.print(table)
    cpu = Table(title="server CPU: cores busy, and IOPS per busy core (fio shares these cores)",
                title_justify="left")
    cpu.add_column("workload")
    cpu.add_column("conns", justify="right")
    for name in names:
        cpu.add_column(f"{name}\ncores  IOPS/core", justify="right", no_wrap=True)
    for wl, conns in cases:
        row = [wl, str(conns)]
        for name in names:
            r = by.get((wl, conns, name))
            if r is None or r.error:
                row.append("-")
            else:
                per_core = r.iops / r.server_cpu_cores if r.server_cpu_cores else 0.0
                row.append(f"{r.server_cpu_cores:.2f}  {_iops(per_core):>6}")
        cpu.add_row(*row)
    console.print(cpu)


# ---- main ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--runtime", type=float, default=None,
                    help="measured seconds per case (default 10, or 3 with --quick)")
    ap.add_argument("--ramp", type=float, default=None,
                    help="warm-up seconds per case, not measured (default 1, or 0.5 with --quick)")
    ap.add_argument("--size", default="1G", help="size of each served file (default 1G)")
    ap.add_argument("--json-out", type=Path, default=HERE / "results" / "latest.json",
                    help="where to write all results (default bench/results/latest.json)")
    ap.add_argument("--quick", action="store_true",
                    help="3 s per case and 1 connection only: a smoke test, not a measurement")
    ap.add_argument("--servers", default=",".join(SERVERS),
                    help=f"comma-separated subset of {','.join(SERVERS)} (default all)")
    ap.add_argument("--workloads", default=None,
                    help="comma-separated subset of: "
                         + ", ".join(w.rw + "-" + w.bs for w in WORKLOADS))
    ap.add_argument("--connections", default=None,
                    help="comma-separated connection counts (default 1,4; 1 with --quick)")
    ap.add_argument("--profile", action="store_true",
                    help="record the twinvol node with py-spy during its cases (slows it: the "
                         "sampler competes for the same cores); stacks go next to --json-out")
    ap.add_argument("--dir", default=None, help="parent of the temporary directory")
    args = ap.parse_args(argv)
    if args.runtime is None:
        args.runtime = 3.0 if args.quick else 10.0
    if args.ramp is None:
        args.ramp = 0.5 if args.quick else 1.0
    try:
        args.size = parse_size(args.size)
    except SizeError as e:
        ap.error(str(e))
    if args.size < 4 << 20 or args.size % (4 << 20):
        ap.error("--size must be a multiple of 4 MiB (the 1 MiB writes are split across up to "
                 "4 connections)")
    args.server_names = [s for s in SERVERS if s in args.servers.split(",")]
    if not args.server_names or set(args.servers.split(",")) - set(SERVERS):
        ap.error(f"--servers takes a subset of {','.join(SERVERS)}")
    wanted = args.workloads.split(",") if args.workloads else None
    args.workload_list = [w for w in WORKLOADS if not wanted or f"{w.rw}-{w.bs}" in wanted]
    if not args.workload_list:
        ap.error("--workloads matched nothing")
    default_conns = "1" if args.quick else "1,4"
    args.conn_list = [int(c) for c in (args.connections or default_conns).split(",")]
    args.py_spy = ""
    if args.profile:
        args.py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not os.access(args.py_spy, os.X_OK):
            ap.error("--profile needs py-spy (pip install py-spy into the virtualenv)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = [t for t in ("fio", "nbdkit", "qemu-nbd", "nbdinfo") if not shutil.which(t)]
    if missing:
        console.print(f"[red]missing tools: {', '.join(missing)}[/]")
        return 2
    signal.signal(signal.SIGTERM, _raise_interrupt)
    names: list[str] = args.server_names
    info = machine_info()
    cases = [(w, c) for w in args.workload_list for c in args.conn_list]
    total = len(cases) * len(names)
    est = total * (args.runtime + args.ramp)
    console.print(f"[bold]twinvol bench[/] {info['timestamp']}  nproc={info['nproc']}  "
                  f"size={format_size(args.size)}  {total} runs x "
                  f"{args.ramp:g}+{args.runtime:g} s  (~{est / 60:.1f} min + prefill)")
    console.print(f"[dim]{info['fio']}, {info['nbdkit']}, {info['qemu-nbd']}[/]")
    if info["cpus_usable"] <= 2:
        console.print("[yellow]note: few cores - fio and the servers share them, and anything "
                      "else running skews results; compare ratios, rerun to check noise[/]")
    b0 = _machine_busy()[0]
    time.sleep(1.0)
    info["busy_cores_before"] = round(_machine_busy()[0] - b0, 2)
    if info["busy_cores_before"] > 0.25:
        console.print(f"[yellow]warning: the machine is already busy "
                      f"({info['busy_cores_before']:.2f} cores in use before starting)[/]")
    results: list[Result] = []
    prefill_mbs: dict[str, float] = {}
    sup = Supervisor()
    profile_dir = args.json_out.parent / "profiles" / args.json_out.stem if args.profile else None
    if profile_dir is not None:
        profile_dir.mkdir(parents=True, exist_ok=True)
    interrupted = False
    with tempfile.TemporaryDirectory(prefix="twinvol-bench-", dir=args.dir) as tmpname:
        tmp = Path(tmpname)
        try:
            servers = start_servers(sup, tmp, args.size, names)
            for s in servers.values():
                console.print(f"  {s.name:9} pid {s.pid:<7} {s.uri}")
            for s in servers.values():
                with console.status(f"prefilling {s.name} ({format_size(args.size)})"):
                    prefill_mbs[s.name] = prefill(s, args.size)
                console.print(f"  prefilled {s.name:9} {prefill_mbs[s.name]:8,.0f} MB/s")
            n = 0
            for w, conns in cases:
                # Servers alternate within each case so drift in machine load hits all alike.
                for name in names:
                    n += 1
                    s = servers[name]
                    label = f"[{n}/{total}] {w.name} qd{w.iodepth} x{conns} conn -> {name}"
                    if not sup.components[name].alive():
                        results.append(Result(w.name, conns, name, error="server not running"))
                        console.print(f"{label}: [red]server not running[/]")
                        continue
                    with console.status(label):
                        r = run_case(s, w, conns, args, profile_dir)
                    results.append(r)
                    if r.error:
                        console.print(f"{label}: [red]{r.error}[/]")
                    else:
                        console.print(f"{label}: {_iops(r.iops):>7} IOPS {r.bw_bytes / 1e6:8,.0f}"
                                      f" MB/s  p99 {r.lat_p99_us:,.0f} us  "
                                      f"server cpu {r.server_cpu_cores:.2f}")
        except KeyboardInterrupt:
            interrupted = True
            console.print("[yellow]interrupted - stopping servers[/]")
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
            console.print(f"[red]setup failed: {e}[/]")
            return 1
        finally:
            # A second Ctrl-C or SIGTERM must not skip stopping the servers.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            dead = [c for c in sup.components.values()
                    if c.proc is not None and c.proc.poll() not in (None, 0, -signal.SIGINT)]
            for c in dead:
                console.print(f"[red]{c.name} exited with {c.proc.returncode if c.proc else '?'}"
                              f":[/]\n{c.tail(10)}")
            sup.stop_all()
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, _raise_interrupt)
    info["loadavg_end"] = list(os.getloadavg())
    if results:
        title = (f"fio nbd engine, {format_size(args.size)} files, {args.runtime:g} s per case"
                 + (" (twinvol profiled by py-spy)" if args.profile else ""))
        print_table(results, names, title)
    doc = {
        "machine": info,
        "config": {"runtime_s": args.runtime, "ramp_s": args.ramp, "size": args.size,
                   "quick": args.quick, "profiled": args.profile, "servers": names,
                   "connections": args.conn_list,
                   "workloads": [asdict(w) for w in args.workload_list]},
        "prefill_mb_s": prefill_mbs,
        "results": [asdict(r) for r in results],
        "ratios": ratios(results),
        "interrupted": interrupted,
    }
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(doc, indent=2) + "\n")
    console.print(f"results written to {args.json_out}")
    for r in results:
        if r.profile and os.path.exists(r.profile):
            console.print(f"\n[bold]py-spy: twinvol during {r.workload} x{r.connections}[/] "
                          f"({r.profile})")
            text = format_hotspots(summarise(Path(r.profile).read_text(), source_line), top=15)
            Path(r.profile).with_suffix(".summary.txt").write_text(text + "\n")
            console.print(text, markup=False, highlight=False, soft_wrap=True)
    if interrupted:
        return 130
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())

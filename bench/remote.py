"""Async remote copy benchmark: write throughput with a far copy as a ratio to a single
node, the far copy's lag (RPO) under a load at half the single-node write rate, and the
bytes a delta resync ships against the bytes that changed.

    .venv/bin/python bench/remote.py [--runtime S] [--size SIZE] [--json-out FILE]

Starts nodes A, B and C on loopback. Baseline: fio's nbd engine writing to a plain volume
on A. Then the same against a volume with an async copy to C, and against an
active-active A-B volume that also has an async copy to C (three data centres). The lag
run writes at half the baseline rate and samples the far copy's lag every 0.1 s. The
delta run freezes C (SIGSTOP), writes a known amount, kills A, takes over at B and
compares what B ships with what was written while C was frozen.
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
import threading
import time
from typing import Any

from rich.console import Console
from rich.table import Table

sys.path.insert(0, os.path.dirname(__file__))
from pairs import api, fio

from twinvol import cluster as cluster_mod
from twinvol.cluster import ClusterConfig, ClusterSection, NodeConfig
from twinvol.sizes import parse_size
from twinvol.supervisor import Supervisor, free_ports, twinvol_argv


def start(directory: str, sup: Supervisor) -> ClusterConfig:
    ports = iter(free_ports(10))
    cfg = ClusterConfig(
        nodes={n: NodeConfig(site=n, nbd=f"127.0.0.1:{next(ports)}",
                             api=f"127.0.0.1:{next(ports)}", data_dir=n,
                             peer=f"127.0.0.1:{next(ports)}") for n in "ABC"},
        cluster=ClusterSection(name="bench", secret=secrets.token_hex(16)),
        witness={"addr": f"127.0.0.1:{next(ports)}", "data_dir": "witness"})
    path = os.path.join(directory, "cluster.toml")
    cluster_mod.dump(cfg, path)
    cfg = cluster_mod.load(path)
    assert cfg.witness is not None
    # The witness lets B continue when A is lost (without it the secondary blocks).
    sup.start("witness", twinvol_argv("witness", "run", "--cluster", path,
                                      "--takeover-after", "1"),
              os.path.join(directory, "witness.log"))
    sup.wait_http("witness", f"http://{cfg.witness['addr']}/api/v1/health",
                  headers={"Authorization": f"Bearer {cfg.cluster.secret}"})
    for n in "ABC":
        sup.start(n, twinvol_argv("node", "run", "--cluster", path, "--node", n),
                  os.path.join(directory, f"{n}.log"))
    for n in "ABC":
        sup.wait_http(n, cfg.node(n).api_url + "/api/v1/health")
    time.sleep(1.0)  # peer links
    return cfg


def wait_state(cfg: ClusterConfig, node: str, pair: str, state: str) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        v = api(cfg, node, "GET", f"/api/v1/pairs/{pair}")
        if v["state"] == state:
            return dict(v)
        time.sleep(0.1)
    raise SystemExit(f"pair {pair} on {node} never reached {state}")


def caught_up(cfg: ClusterConfig, node: str, pair: str) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        rc = api(cfg, node, "GET", f"/api/v1/pairs/{pair}")["remote_copy"]
        if rc["sequence"]["applied"] >= rc["sequence"]["written"] \
                and rc["journal_mode"] == "journal":
            return dict(rc)
        time.sleep(0.1)
    raise SystemExit(f"{pair} never caught up")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runtime", type=float, default=5.0)
    ap.add_argument("--size", default="256M")
    ap.add_argument("--json-out")
    args = ap.parse_args()
    size = parse_size(args.size)
    console = Console()
    sup = Supervisor()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="twinvol-bench-remote-") as d:
        try:
            cfg = start(d, sup)
            for name in ("plain", "rc", "tri"):
                api(cfg, "A", "POST", "/api/v1/volumes", {"name": name, "size": size})
            api(cfg, "A", "POST", "/api/v1/pairs", {"name": "rc-dr", "mode": "async",
                                                    "secondary": "C", "primary_volume": "rc",
                                                    "secondary_volume": "rc"})
            api(cfg, "A", "POST", "/api/v1/pairs", {"name": "tri", "secondary": "B"})
            wait_state(cfg, "A", "tri", "mirrored")
            api(cfg, "A", "POST", "/api/v1/pairs", {"name": "tri-dr", "mode": "async",
                                                    "secondary": "C", "primary_volume": "tri",
                                                    "secondary_volume": "tri"})
            for p in ("rc-dr", "tri-dr"):
                wait_state(cfg, "A", p, "mirrored")
            uri = cfg.node("A").nbd_uri
            for label, rw, bs, qd in (("randwrite-4k", "randwrite", "4k", 32),
                                      ("write-1m", "write", "1m", 16)):
                base = fio(uri("plain"), rw, bs, qd, size, args.runtime)
                rc = fio(uri("rc"), rw, bs, qd, size, args.runtime)
                caught_up(cfg, "A", "rc-dr")
                tri = fio(uri("tri"), rw, bs, qd, size, args.runtime)
                caught_up(cfg, "A", "tri-dr")
                results[label] = {"single": base, "async": rc, "aa+async": tri,
                                  "async_ratio": rc["iops"] / base["iops"],
                                  "aa_async_ratio": tri["iops"] / base["iops"]}
            # Lag (RPO) at half the single-node 4k write rate.
            half = int(results["randwrite-4k"]["single"]["iops"] / 2)
            samples: list[dict[str, Any]] = []
            stop = threading.Event()

            def sample() -> None:
                while not stop.is_set():
                    samples.append(api(cfg, "A", "GET", "/api/v1/pairs/rc-dr")["remote_copy"]
                                   ["lag"])
                    time.sleep(0.1)

            t = threading.Thread(target=sample)
            t.start()
            out = subprocess.run(["fio", "--name=lag", "--ioengine=nbd", f"--uri={uri('rc')}",
                                  "--rw=randwrite", "--bs=4k", "--iodepth=16",
                                  f"--size={size}", "--time_based",
                                  f"--runtime={args.runtime}", f"--rate_iops={half}",
                                  "--output-format=json"], capture_output=True, text=True,
                                 check=True).stdout
            stop.set()
            t.join()
            got = json.loads(out[out.index("{"):])["jobs"][0]["write"]["iops"]
            secs = sorted(s["seconds"] for s in samples)
            byts = sorted(s["bytes"] for s in samples)
            results["lag_at_half_rate"] = {
                "target_iops": half, "iops": got,
                "seconds_p50": secs[len(secs) // 2], "seconds_max": secs[-1],
                "bytes_p50": byts[len(byts) // 2], "bytes_max": byts[-1]}
            caught_up(cfg, "A", "rc-dr")
            # Delta resync: freeze C, write 8 MiB of 4k blocks through A, lose A.
            api(cfg, "A", "GET", "/api/v1/pairs/tri-dr")
            os.kill(sup.components["C"].pid or 0, signal.SIGSTOP)
            changed = 8 * 1024 * 1024
            subprocess.run(["fio", "--name=delta", "--ioengine=nbd", f"--uri={uri('tri')}",
                            "--rw=randwrite", "--bs=4k", "--iodepth=8", f"--size={size}",
                            f"--io_size={changed}", "--randrepeat=0"], check=True,
                           capture_output=True)
            sup.kill("A")
            os.kill(sup.components["C"].pid or 0, signal.SIGCONT)
            wait_state(cfg, "B", "tri", "suspended")
            time.sleep(3.0)
            report = api(cfg, "B", "POST", "/api/v1/dr/takeover", {})["groups"][0]
            caught_up(cfg, "B", "tri-dr")
            results["delta_resync"] = {"written_while_far_site_frozen": changed,
                                       "method": report["method"],
                                       "shipped_bytes": report["bytes"],
                                       "volume_size": size,
                                       "ratio_to_changed": report["bytes"] / changed}
        finally:
            sup.stop_all()
    table = Table("measure", "value")
    for label in ("randwrite-4k", "write-1m"):
        r = results[label]
        table.add_row(f"{label} single node", f"{r['single']['iops']:.0f} IOPS")
        table.add_row(f"{label} with async copy", f"{r['async']['iops']:.0f} IOPS "
                                                  f"({r['async_ratio']:.2f}x)")
        table.add_row(f"{label} active-active + async", f"{r['aa+async']['iops']:.0f} IOPS "
                                                        f"({r['aa_async_ratio']:.2f}x)")
    lag = results["lag_at_half_rate"]
    table.add_row("lag at half rate (p50 / max)",
                  f"{lag['seconds_p50']:.3f} s / {lag['seconds_max']:.3f} s, "
                  f"{lag['bytes_p50']} / {lag['bytes_max']} bytes at {lag['iops']:.0f} IOPS")
    dr = results["delta_resync"]
    table.add_row("delta resync shipped vs changed",
                  f"{dr['shipped_bytes']} vs {dr['written_while_far_site_frozen']} bytes "
                  f"({dr['ratio_to_changed']:.2f}x, {dr['method']}); volume {dr['volume_size']}")
    console.print(table)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()

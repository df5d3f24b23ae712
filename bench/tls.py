"""The cost of TLS on NBD: plain against TLS, twinvol against `nbdkit --tls=require`.

Starts one twinvol node with `tls = "allow"` (the same listener serves plain and TLS
clients) and two nbdkit memory exports (plain, and `--tls=require` with the same
certificates), then runs fio through libnbd (its nbd engine) on each: 4k random reads,
4k random writes and 1 MiB sequential writes, `--runtime` seconds each. It prints the
rates and the ratios TLS/plain for each server and twinvol/nbdkit for each mode.

fio's nbd engine may not name local files in its URI, so libnbd finds the certificates
in $HOME/.pki/libnbd, which it reads only when not root: fio runs in a user namespace
(`unshare -U`).

    .venv/bin/python bench/tls.py [--runtime 5] [--iodepth 16] [--size 256M]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any

from rich.console import Console
from rich.table import Table

try:
    from twinvol import cluster as cluster_mod
    from twinvol.cluster import ClusterConfig, NodeConfig, TlsConfig
    from twinvol.nbd.server_events import TlsMode
    from twinvol.supervisor import Supervisor, free_ports, twinvol_argv
    from twinvol.tls.certs import Role, init_ca, issue
except ImportError:  # pragma: no cover - only when run with the wrong interpreter
    sys.exit("bench/tls.py needs twinvol importable: run it with .venv/bin/python")

console = Console(width=None if sys.stdout.isatty() else 120)
WORKLOADS = {  # name -> fio arguments
    "4k randread": ["--rw=randread", "--bs=4k"],
    "4k randwrite": ["--rw=randwrite", "--bs=4k"],
    "1M write": ["--rw=write", "--bs=1M"],
}


def fio(uri: str, args: list[str], runtime: float, iodepth: int, size: str,
        home: str) -> float:
    """Bytes per second fio moved through libnbd against `uri`."""
    cmd = ["unshare", "-U", "fio", "--name=b", "--ioengine=nbd", f"--uri={uri}",
           f"--iodepth={iodepth}", f"--size={size}", "--time_based",
           f"--runtime={runtime}", "--output-format=json", *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=runtime + 60,
                       env={**os.environ, "HOME": home})
    if p.returncode != 0:
        raise SystemExit(f"fio failed on {uri}: {p.stderr.strip() or p.stdout[-500:]}")
    job = json.loads(p.stdout[p.stdout.index("{"):])["jobs"][0]
    side = "read" if "read" in args[0] else "write"
    return float(job[side]["bw_bytes"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runtime", type=float, default=5.0, help="seconds per run")
    ap.add_argument("--iodepth", type=int, default=16)
    ap.add_argument("--size", default="256M", help="export size and fio's range")
    opts = ap.parse_args()
    size_bytes = int(opts.size.rstrip("M")) << 20
    work = tempfile.mkdtemp(prefix="twinvol-bench-tls-")
    certs = os.path.join(work, "tls")
    init_ca(certs)
    issue(certs, Role.SERVER, hosts=["127.0.0.1", "localhost"])
    issue(certs, Role.CLIENT)
    home = os.path.join(work, "home")
    os.makedirs(os.path.join(home, ".pki"))
    os.symlink(certs, os.path.join(home, ".pki", "libnbd"))

    nbd, api, kit_plain, kit_tls = free_ports(4)
    cfg = ClusterConfig(nodes={"A": NodeConfig(site="A", nbd=f"127.0.0.1:{nbd}",
                                               api=f"127.0.0.1:{api}", data_dir="A")},
                        tls=TlsConfig(dir=certs, nbd=TlsMode.ALLOW))
    path = os.path.join(work, "cluster.toml")
    cluster_mod.dump(cfg, path)
    sup = Supervisor()
    try:
        sup.start("A", twinvol_argv("node", "run", "--cluster", path, "--node", "A"),
                  os.path.join(work, "A.log"))
        sup.wait_http("A", f"http://127.0.0.1:{api}/api/v1/health")
        req = urllib.request.Request(f"http://127.0.0.1:{api}/api/v1/volumes",
                                     data=json.dumps({"name": "b", "size": size_bytes}).encode(),
                                     headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=10).read()
        common = ["nbdkit", "--foreground", "--exit-with-parent", "-i", "127.0.0.1"]
        sup.start("kit-plain", [*common, "-p", str(kit_plain), "memory", opts.size],
                  os.path.join(work, "kit-plain.log"))
        sup.start("kit-tls", [*common, "-p", str(kit_tls), "--tls=require",
                              f"--tls-certificates={certs}", "memory", opts.size],
                  os.path.join(work, "kit-tls.log"))
        time.sleep(0.5)
        uris = {("twinvol", "plain"): f"nbd://127.0.0.1:{nbd}/b",
                ("twinvol", "tls"): f"nbds://127.0.0.1:{nbd}/b",
                ("nbdkit", "plain"): f"nbd://127.0.0.1:{kit_plain}/",
                ("nbdkit", "tls"): f"nbds://127.0.0.1:{kit_tls}/"}
        rates: dict[tuple[str, str, str], float] = {}
        for wl, args in WORKLOADS.items():
            for (server, mode), uri in uris.items():
                console.print(f"{wl}: {server} {mode} ...", highlight=False)
                rates[(wl, server, mode)] = fio(uri, args, opts.runtime, opts.iodepth,
                                                opts.size, home)
        report(rates, opts)
    finally:
        sup.stop_all()


def report(rates: dict[tuple[str, str, str], float], opts: Any) -> None:
    t = Table(title=f"TLS cost, fio via libnbd, iodepth {opts.iodepth}, {opts.runtime:g} s "
                    "per run (MiB/s; ratios)")
    for col in ("workload", "twinvol plain", "twinvol TLS", "TLS/plain", "nbdkit plain",
                "nbdkit TLS", "TLS/plain ", "twinvol/nbdkit plain", "twinvol/nbdkit TLS"):
        t.add_column(col, justify="right")
    for wl in WORKLOADS:
        r = {(s, m): rates[(wl, s, m)] for s in ("twinvol", "nbdkit") for m in ("plain", "tls")}
        mib = {k: v / (1 << 20) for k, v in r.items()}
        t.add_row(wl, f"{mib['twinvol', 'plain']:.1f}", f"{mib['twinvol', 'tls']:.1f}",
                  f"{r['twinvol', 'tls'] / r['twinvol', 'plain']:.2f}",
                  f"{mib['nbdkit', 'plain']:.1f}", f"{mib['nbdkit', 'tls']:.1f}",
                  f"{r['nbdkit', 'tls'] / r['nbdkit', 'plain']:.2f}",
                  f"{r['twinvol', 'plain'] / r['nbdkit', 'plain']:.2f}",
                  f"{r['twinvol', 'tls'] / r['nbdkit', 'tls']:.2f}")
    console.print(t)


if __name__ == "__main__":
    main()

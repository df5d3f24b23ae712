"""A few short seeds of the fault sweep, and the namespace topology it relies on.

The long sweep is `bench/sweep.py --seeds 50 --duration 45`; these seeds were chosen so
that together they apply every fault kind in 20 s each. `TWINVOL_SWEEP_SEEDS=1,2,3`
and `TWINVOL_SWEEP_DURATION=30` change them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .__main__ import cannot_run
from .netns import Net, ip
from .run import run_seed

WHY_NOT = cannot_run()
if WHY_NOT is not None and os.environ.get("CI"):
    # In CI a sweep that cannot run is a failure, never a quiet skip.
    raise pytest.UsageError(f"CI: the fault sweep cannot run here: {WHY_NOT}")

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(WHY_NOT is not None, reason=str(WHY_NOT))]

SEEDS = [int(s) for s in os.environ.get("TWINVOL_SWEEP_SEEDS", "1,7,12").split(",")]
# With the etcd witness (W is then a three-member etcd cluster): TWINVOL_SWEEP_ETCD_SEEDS.
ETCD_SEEDS = [int(s) for s in os.environ.get("TWINVOL_SWEEP_ETCD_SEEDS", "1").split(",")]
DURATION = float(os.environ.get("TWINVOL_SWEEP_DURATION", "20"))


@pytest.mark.parametrize("seed", SEEDS)
def test_seed_keeps_every_promise(seed: int, tmp_path: Path) -> None:
    res = run_seed(seed, DURATION, base_dir=str(tmp_path))
    assert res.verdict == "PASS", "\n".join([res.line(), *res.details(),
                                             f"logs: {res.directory}"])
    assert res.report is not None and res.report.acked_writes > 0 and res.report.reads > 0


@pytest.mark.parametrize("seed", ETCD_SEEDS)
def test_seed_keeps_every_promise_with_etcd(seed: int, tmp_path: Path) -> None:
    res = run_seed(seed, DURATION, base_dir=str(tmp_path), witness="etcd")
    assert res.verdict == "PASS", "\n".join([res.line(), *res.details(),
                                             f"logs: {res.directory}"])
    assert res.report is not None and res.report.acked_writes > 0 and res.report.reads > 0


def _reaches(net: Net, src: str | None, dst: str) -> bool:
    """Can `src` (a namespace, None for the host) open a TCP connection to `dst`'s
    listener on port 9?"""
    code = (f"import socket\ntry:\n socket.create_connection(({net.addr(dst)!r}, 9), 1)\n"
            "except OSError:\n raise SystemExit(1)")
    prefix = [] if src is None else net.exec_prefix(src)
    return subprocess.run([*prefix, sys.executable, "-c", code]).returncode == 0


def test_each_link_cuts_alone_and_cleanup_removes_everything() -> None:
    net = Net()
    listeners: list[subprocess.Popen[bytes]] = []
    try:
        net.setup()
        for n in ("A", "B", "W"):
            code = (f"import socket,time\ns=socket.create_server(({net.addr(n)!r}, 9))\n"
                    "while True:\n c,_=s.accept(); c.close()")
            listeners.append(subprocess.Popen([*net.exec_prefix(n), sys.executable, "-c",
                                               code]))
        time.sleep(0.5)
        paths = {"hA": (None, "A"), "hB": (None, "B"), "AB": ("A", "B"),
                 "AW": ("A", "W"), "BW": ("B", "W")}
        assert all(_reaches(net, s, d) for s, d in paths.values())
        for link, (src, dst) in paths.items():
            net.cut(link)
            reach = {other: _reaches(net, s, d) for other, (s, d) in paths.items()}
            assert reach == {other: other != link for other in paths}, (link, reach)
            net.heal(link)
            assert _reaches(net, src, dst), f"{link} did not come back"
    finally:
        for p in listeners:
            p.kill()
            p.wait()
        net.close()
    assert not [ns for ns in ip("netns", "list").stdout.split() if ns in net.ns.values()]
    assert f"tv{net.tag}" not in ip("link").stdout
    assert net.subnet.split("/")[0] not in ip("route").stdout


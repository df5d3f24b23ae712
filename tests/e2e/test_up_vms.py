"""`twinvol up` reaches VM migration: its hypervisor hosts H1 (site A, node A) and H2
(site B, node B) run the README's demo guest (examples/guest.toml) with the three
commands the README gives, and the dashboard shows where the VM runs."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from typing import Any

import pytest

pytestmark = pytest.mark.e2e

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _counters(path: str) -> list[int]:
    try:
        with open(path, errors="replace") as f:
            return [int(n) for n in re.findall(r"guest: counter (\d+)", f.read())]
    except FileNotFoundError:
        return []


def _wait_counter(path: str, above: int, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = _counters(path)
        if got and got[-1] > above:
            return got[-1]
        time.sleep(0.1)
    raise AssertionError(f"the guest ({path}) did not count past {above}")


def test_up_starts_vm_hosts_and_the_readme_guest_migrates_in_three_commands(
        tmp_path: Any) -> None:
    subprocess.run([os.path.join(ROOT, "scripts", "build-test-guest")], check=True,
                   timeout=300)  # cached in .cache/: scripts/setup built it already
    directory = os.path.join(str(tmp_path), "up")
    proc = subprocess.Popen([sys.executable, "-m", "twinvol", "up", "--dir", directory,
                             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    qemu_pid = None
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, proc.communicate(timeout=30)[1]  # up exited without its ready line
        ready = json.loads(line)
        hosts = ready["vmhosts"]
        assert {h: v["site"] for h, v in hosts.items()} == {"H1": "A", "H2": "B"}
        assert all(_alive(v["pid"]) and v["api"].startswith("http://127.0.0.1:")
                   for v in hosts.values()), hosts
        env = {**os.environ, "TWINVOL_CLUSTER": ready["cluster"]}

        def twinvol(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "twinvol", *args], env=env,
                                  cwd=ROOT, capture_output=True, text=True, timeout=120)

        # The README's three commands, run from the repository root.
        p = twinvol("vm", "define", "examples/guest.toml", "--host", "H1")
        assert (p.returncode, p.stdout, p.stderr) == (0, "VM guest defined on host H1\n", "")
        p = twinvol("vm", "start", "guest")
        assert p.returncode == 0, p.stderr
        m = re.fullmatch(r"VM guest running on host H1 \(QEMU pid (\d+)\)\n", p.stdout)
        assert m, p.stdout
        qemu_pid = int(m.group(1))
        h1_console = os.path.join(directory, "vm-H1", "run", "guest.console.log")
        before = _wait_counter(h1_console, 3)
        p = twinvol("vm", "migrate", "guest", "--to", "H2")
        assert p.returncode == 0, p.stderr
        assert "VM guest migrated H1 -> H2 in " in p.stdout, p.stdout
        # It runs at H2 through node B now and keeps counting on from where it was.
        p = twinvol("vm", "show", "guest", "--json")
        assert p.returncode == 0, p.stderr
        show = json.loads(p.stdout)
        assert (show["host"], show["site"], show["state"]) == ("H2", "B", "running")
        assert show["resources"]["volume:demo"].startswith(ready["nodes"]["B"]["nbd"])
        qemu_pid = show["qemu_pid"]
        h2_console = os.path.join(directory, "vm-H2", "run", "guest.console.log")
        _wait_counter(h2_console, before + 2)
        assert _counters(h2_console)[0] >= before
        # The dashboard shows the hypervisor hosts and where the VM runs.
        with urllib.request.urlopen(ready["dashboard"] + "api/v1/status", timeout=30) as r:
            snap = json.loads(r.read())["vmhosts"]
        assert {h: [(v["name"], v["state"]) for v in x["vms"]] for h, x in snap.items()} == {
            "H1": [], "H2": [("guest", "running")]}
        # Stopping `up` stops the VM hosts and their QEMU too.
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        deadline = time.monotonic() + 10
        pids = [qemu_pid, *(v["pid"] for v in hosts.values())]
        while any(map(_alive, pids)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [pid for pid in pids if _alive(pid)] == []
    finally:
        if proc.poll() is None:  # never leave a cluster running behind a failed test
            proc.kill()
            proc.wait()
        if qemu_pid is not None and _alive(qemu_pid):
            os.kill(qemu_pid, signal.SIGKILL)

"""The host agent (multipath NBD proxy) between real clients and two real node processes.

Two nodes serve volumes with the SAME virtual identity (the pair replication is not
in play here, so the two copies only hold the same bytes when a test puts them there:
data tests write through the agent, then copy the writer's bytes to the other node, or
pre-fill both directly). Faults are kill -9 of node processes. One section runs a real
replicated pair with its witness behind the agent, where a side fences itself mid-write.

The last section drives an in-process agent against fake nodes (in-memory NBD servers
and a fake event source) to pin down event-driven behaviour deterministically.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec
import pytest
import tomli_w

from twinvol.host import HostConfig, HostSetup
from twinvol.host.agent import Agent, AgentStartError
from twinvol.host.nodes import NodeUnreachable
from twinvol.nbd.aio import NbdServerProtocol
from twinvol.nbd.aio_client import NbdClient, NbdError, NegotiationError
from twinvol.nbd.aio_group import close_all
from twinvol.nbd.constants import Cmd, Err, Opt, Rep
from twinvol.nbd.server_events import ExportInfo
from twinvol.supervisor import Supervisor, free_ports, twinvol_argv

pytestmark = pytest.mark.e2e

MiB = 1 << 20
HOLD = 3.0  # the agent's hold_timeout in these tests
NODES = ("A", "B")


def run(*argv: str, timeout: float = 60, check: bool = True,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                       env=None if env is None else {**os.environ, **env})
    if check and p.returncode != 0:
        raise AssertionError(f"{list(argv)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def wait_for(pred: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def agent_argv(cluster: str) -> list[str]:
    """`twinvol host run`; until the main command registers the sub-app, register it the
    same way here (so errors still go through `twinvol`'s one-line handling)."""
    from twinvol.cli import main

    if any(g.name == "host" for g in main.app.registered_groups):
        return twinvol_argv("host", "run", "--cluster", cluster)
    return [sys.executable, "-c",
            "from twinvol.cli import main, host; "
            "main.app.add_typer(host.app, name='host'); main.main()",
            "host", "run", "--cluster", cluster]


class Pair:
    """Two node processes (A, B) in one cluster file, and a host agent using both."""

    def __init__(self, directory: str) -> None:
        self.dir = directory
        ports = free_ports(6)
        self.nodes = {n: {"site": n, "nbd": f"127.0.0.1:{ports[2 * i]}",
                          "api": f"127.0.0.1:{ports[2 * i + 1]}", "data_dir": f"data-{n}"}
                      for i, n in enumerate(NODES)}
        self.host = {"nbd": f"127.0.0.1:{ports[4]}", "api": f"127.0.0.1:{ports[5]}",
                     "hold_timeout": HOLD, "io_timeout": 5.0, "nodes": list(NODES),
                     "socket": "host.sock"}
        self.cluster = os.path.join(directory, "cluster.toml")
        with open(self.cluster, "wb") as f:
            tomli_w.dump({"cluster": {"name": "hostagent"}, "nodes": self.nodes,
                          "host": self.host}, f)
        self.sup = Supervisor()

    # ---- processes -------------------------------------------------------

    def log_path(self, name: str) -> str:
        return os.path.join(self.dir, f"{name}.log")

    def start_node(self, n: str) -> None:
        self.sup.start(n, twinvol_argv("node", "run", "--cluster", self.cluster, "--node", n),
                       self.log_path(n))
        self.sup.wait_http(n, f"http://{self.nodes[n]['api']}/api/v1/health")

    def start_nodes(self, *names: str) -> None:
        """Start several nodes in parallel (each takes a Python start-up)."""
        for n in names:
            self.sup.start(n, twinvol_argv("node", "run", "--cluster", self.cluster,
                                           "--node", n), self.log_path(n))
        for n in names:
            self.sup.wait_http(n, f"http://{self.nodes[n]['api']}/api/v1/health")

    def start_agent(self) -> None:
        self.sup.start("host", agent_argv(self.cluster), self.log_path("host"))
        self.sup.wait_http("host", f"http://{self.host['api']}/api/v1/health")

    def alive(self, n: str) -> bool:
        comp = self.sup.components.get(n)
        return comp is not None and comp.alive()

    def kill9(self, n: str) -> None:
        self.sup.kill(n)

    def log(self, name: str) -> str:
        with open(self.log_path(name)) as f:
            return f.read()

    # ---- APIs ------------------------------------------------------------

    def api(self, n: str, method: str, path: str, body: dict[str, Any] | None = None
            ) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://{self.nodes[n]['api']}{path}", data=data,
                                     method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def create(self, name: str, size: int = 32 * MiB, *, serial: str = "VSP-1",
               volume_id: int = 4242, description: str = "pair volume",
               b: dict[str, Any] | None = None) -> None:
        """The same virtual identity on both nodes (`b` overrides fields on B)."""
        for n in NODES:
            body = {"name": name, "size": size, "export_name": name,
                    "description": description, "serial": serial, "volume_id": volume_id}
            if n == "B" and b:
                body.update(b)
            status, out = self.api(n, "POST", "/api/v1/volumes", body)
            assert status == 201, out

    def status(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://{self.host['api']}/api/v1/status",
                                    timeout=10) as r:
            return json.loads(r.read())  # type: ignore[no-any-return]

    def uri(self, export: str) -> str:
        return f"nbd://{self.host['nbd']}/{export}"

    def unix_uri(self, export: str) -> str:
        return f"nbd+unix:///{export}?socket={os.path.join(self.dir, 'host.sock')}"

    def node_uri(self, n: str, export: str) -> str:
        return f"nbd://{self.nodes[n]['nbd']}/{export}"


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    p = Pair(str(tmp_path_factory.mktemp("hostagent")))
    try:
        p.start_nodes(*NODES)
        p.start_agent()
        yield p
    finally:
        p.sup.stop_all()


@pytest.fixture
def both(pair: Pair) -> Pair:
    """Both nodes running and the agent's event streams to them up."""
    down = [n for n in NODES if not pair.alive(n)]
    if down:
        pair.start_nodes(*down)
    wait_for(lambda: all(pair.status()["nodes"][n]["events"]["state"] == "up" for n in NODES),
             "the agent's event streams to both nodes")
    return pair


LIBNBD_STRICT = r"""
import sys, nbd
h = nbd.NBD()
h.set_strict_mode(nbd.STRICT_COMMANDS | nbd.STRICT_FLAGS | nbd.STRICT_BOUNDS
                  | nbd.STRICT_ZERO_SIZE | nbd.STRICT_ALIGN)
h.add_meta_context("base:allocation")
h.connect_uri(sys.argv[1])
assert h.get_structured_replies_negotiated() and h.can_meta_context("base:allocation")
assert h.can_fua() and h.can_flush() and h.can_trim() and h.can_zero() and h.can_df()
data = bytes(range(256)) * 256
h.pwrite(data, 1 << 20, nbd.CMD_FLAG_FUA)
assert h.pread(len(data), 1 << 20) == data
chunks = []
def chunk(subbuf, offset, status, err):
    chunks.append((offset, status))
    return 0
assert h.pread_structured(len(data), 1 << 20, chunk, nbd.CMD_FLAG_DF) == data
assert chunks == [(1 << 20, nbd.READ_DATA)], chunks
seen = {}
def extent(ctx, offset, entries, err):
    seen[ctx] = list(entries)
    return 0
h.block_status(4 << 20, 0, extent)
assert seen["base:allocation"], seen
h.block_status(4 << 20, 0, extent, nbd.CMD_FLAG_REQ_ONE)
assert len(seen["base:allocation"]) == 2 and seen["base:allocation"][0] <= 4 << 20
h.zero(65536, 1 << 20, nbd.CMD_FLAG_NO_HOLE)
h.trim(65536, 2 << 20)
h.cache(4096, 0)
h.flush()
cookies = [h.aio_pwrite(bytes([i]) * 4096, (8 << 20) + i * 4096) for i in range(64)]
while h.aio_in_flight() > 0:
    h.poll(-1)
assert all(h.aio_command_completed(c) for c in cookies)
h.set_strict_mode(0)
try:
    h.pread(4096, (32 << 20) - 1024)
    raise SystemExit("read past the end succeeded")
except nbd.Error as e:
    assert e.errno == "EINVAL", e
h.shutdown()
print("OK")
"""


def test_data_through_the_agent_goes_to_one_node(both: Pair) -> None:
    p = both
    p.create("data", 32 * MiB, description="multipath data")
    info = json.loads(run("nbdinfo", "--json", p.uri("data")).stdout)["exports"][0]
    assert info["export-size"] == 32 * MiB and info["description"] == "multipath data"
    assert info["contexts"] == ["base:allocation"]
    assert not info["is_read_only"]
    run("qemu-io", "-f", "raw",
        "-c", "write -P 0x11 0 4k",
        "-c", "write -P 0x22 4k 1M",
        "-c", "write -f -P 0x44 20M 64k",  # FUA
        "-c", "write -P 0x33 10M 3M",
        "-c", "write -z 10M 1M",
        "-c", "discard 4k 512k",
        "-c", "aio_write -P 0x55 30M 64k", "-c", "aio_write -P 0x66 31M 64k", "-c", "aio_flush",
        "-c", "flush", p.uri("data"))
    # Writes went to exactly one node (the pair, not the agent, replicates).
    checks = ["-c", "read -P 0x11 0 4k", "-c", "read -P 0x22 516k 508k",
              "-c", "read -P 0 10M 1M", "-c", "read -P 0x33 11M 2M", "-c", "read -P 0x44 20M 64k",
              "-c", "read -P 0x55 30M 64k", "-c", "read -P 0x66 31M 64k",
              "-c", "read -P 0 24M 1M"]
    verdict = {n: "verification failed" not in run("qemu-io", "-f", "raw", *checks,
                                                   p.node_uri(n, "data"), check=False).stdout
               for n in NODES}
    assert sorted(verdict.values()) == [False, True], verdict
    writer = next(n for n, ok in verdict.items() if ok)
    other = next(n for n in NODES if n != writer)
    assert writer == "A"  # the first configured node, while nobody says who is primary
    # Stand in for the pair's replication, then read through the agent from both copies.
    run("nbdcopy", p.node_uri(writer, "data"), p.node_uri(other, "data"))
    before = p.status()["exports"]["data"]["paths"]
    parallel = [a for i in range(8) for a in ("-c", f"aio_read -P 0x33 {11 * 1024 + 256 * i}k 4k")]
    out = run("qemu-io", "-f", "raw", *checks, *parallel, "-c", "aio_flush",
              p.uri("data")).stdout
    assert "verification failed" not in out
    after = p.status()["exports"]["data"]["paths"]
    for n in NODES:
        assert after[n]["requests"] > before[n]["requests"], (n, before, after)
    # The map (block status) comes through, and libnbd's strict checks pass.
    extents = json.loads(run("nbdinfo", "--map", "--json", p.uri("data")).stdout)
    assert extents and extents[0]["offset"] == 0
    assert sum(e["length"] for e in extents) == 32 * MiB
    # A volume only A has: one path (B's is "absent"), so reads see the writes, and
    # libnbd's strict checks run against the agent's whole data path.
    status, body = p.api("A", "POST", "/api/v1/volumes", {"name": "strict", "size": 32 * MiB})
    assert status == 201, body
    out = run("/usr/bin/python3", "-c", LIBNBD_STRICT, p.uri("strict")).stdout
    assert out.strip() == "OK"
    paths = p.status()["exports"]["strict"]["paths"]
    assert paths["B"]["state"] == "idle" and paths["B"]["requests"] == 0


def test_reads_are_balanced_over_identical_copies(both: Pair, tmp_path: Any) -> None:
    p = both
    p.create("bal", 16 * MiB, volume_id=4244)
    src = os.path.join(str(tmp_path), "src")
    back = os.path.join(str(tmp_path), "back")
    payload = os.urandom(16 * MiB)
    with open(src, "wb") as f:
        f.write(payload)
    for n in NODES:  # pre-fill both copies directly
        run("nbdcopy", src, p.node_uri(n, "bal"))
    run("nbdcopy", "--connections=1", "--requests=16", "--request-size=65536", p.uri("bal"),
        back)
    with open(back, "rb") as f:
        assert f.read() == payload
    paths = p.status()["exports"]["bal"]["paths"]
    total = paths["A"]["requests"] + paths["B"]["requests"]
    assert total >= 256
    assert min(paths["A"]["requests"], paths["B"]["requests"]) > total // 5, paths
    # LIST through the agent shows exports the nodes agree on.
    listed = json.loads(run("nbdinfo", "--list", "--json", p.uri("")).stdout)
    assert {"bal", "data"} <= {e["export-name"] for e in listed["exports"]}


def test_identity_mismatch_is_refused_and_nothing_forwarded(both: Pair) -> None:
    p = both
    p.create("mm", 8 * MiB, volume_id=4300, b={"serial": "OTHER-9"})
    p.create("mmsize", 8 * MiB, volume_id=4301, b={"size": 16 * MiB})
    # libnbd shows the server's message only in its debug output; qemu always shows it.
    r = run("nbdinfo", p.uri("mm"), check=False, env={"LIBNBD_DEBUG": "1"})
    assert r.returncode != 0
    assert "not the same volume on node A and node B" in r.stderr, r.stderr
    assert "serial 'VSP-1' != 'OTHER-9'" in r.stderr, r.stderr
    r = run("qemu-io", "-f", "raw", "-c", "read 0 4k", p.uri("mmsize"), check=False)
    assert r.returncode != 0
    assert "Denied by server" in r.stderr, r.stderr
    assert "size 8388608 != 16777216" in r.stderr, r.stderr
    # The same-named volume from a single node is fine; neither mismatched one was opened.
    for n in NODES:
        for line in p.log(n).splitlines():
            if "nbd client connected" in line:
                assert json.loads(line).get("export") not in ("mm", "mmsize"), line
    st = p.status()
    assert any(r["export"] == "mm" and "serial" in r["message"] for r in st["refused"])
    assert st["exports"]["mm"]["refused"] >= 1
    assert "virtual identity mismatch" in p.log("host")


FIO_PREFILL = ["--name=pre", "--ioengine=nbd", "--rw=write", "--bs=64k", "--iodepth=16",
               "--size=32m", "--verify=crc32c", "--verify_state_save=0"]


def fio_json(out: str) -> dict[str, Any]:
    return json.loads(out[out.index("{"):])["jobs"][0]  # type: ignore[no-any-return]


def test_kill9_a_node_during_fio_verify_reads(both: Pair) -> None:
    p = both
    p.create("fioread", 32 * MiB, volume_id=4400)
    run("fio", *FIO_PREFILL, f"--uri={p.node_uri('A', 'fioread')}", "--do_verify=0")
    run("nbdcopy", p.node_uri("A", "fioread"), p.node_uri("B", "fioread"))
    failovers = p.status()["failovers"]
    fio = subprocess.Popen(["fio", *FIO_PREFILL, f"--uri={p.uri('fioread')}", "--verify_only",
                            "--verify_fatal=1", "--loops=40", "--output-format=json"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: p.status()["exports"].get("fioread", {}).get("sessions"),
                 "fio's connection through the agent")
        time.sleep(0.3)
        p.kill9("A")
        out, err = fio.communicate(timeout=60)
    finally:
        if fio.poll() is None:
            fio.kill()
    assert fio.returncode == 0, err
    job = fio_json(out)
    assert job["error"] == 0
    assert job["read"]["io_bytes"] >= 40 * 32 * MiB
    st = p.status()
    assert st["failovers"] > failovers
    assert st["exports"]["fioread"]["retries"] >= 0
    assert "path failed over" in p.log("host")


def test_kill9_the_writer_during_fio_writes(both: Pair) -> None:
    p = both
    p.create("fiowrite", 32 * MiB, volume_id=4401)
    failovers = p.status()["failovers"]
    fio = subprocess.Popen(["fio", "--name=w", "--ioengine=nbd", f"--uri={p.uri('fiowrite')}",
                            "--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=32m",
                            "--time_based", "--runtime=2", "--output-format=json"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: p.status()["exports"].get("fiowrite", {}).get("sessions"),
                 "fio's connection through the agent")
        time.sleep(0.5)
        writes_a = p.status()["exports"]["fiowrite"]["paths"]["A"]["requests"]
        p.kill9("A")  # A is the writer (first in order)
        out, err = fio.communicate(timeout=60)
    finally:
        if fio.poll() is None:
            fio.kill()
    assert fio.returncode == 0, err
    assert fio_json(out)["error"] == 0
    st = p.status()
    assert writes_a > 0
    assert st["failovers"] > failovers
    # Only now did writes reach B, and B alone.
    assert st["exports"]["fiowrite"]["paths"]["B"]["requests"] > 0


HOLDER = r"""
import sys, time, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.pwrite(b"held" * 1024, 0)
h.flush()
print("ready", flush=True)
sys.stdin.readline()
t = time.monotonic()
try:
    ok = h.pread(4096, 0) == b"held" * 1024
    print("OK" if ok else "BAD", round(time.monotonic() - t, 2), flush=True)
except nbd.Error as e:
    print("ERR", e.errno, round(time.monotonic() - t, 2), flush=True)
try:
    h.pread(4096, 0)
    print("OK2", flush=True)
except nbd.Error as e:
    print("ERR2", e.errno, flush=True)
"""


def _holder(p: Pair, export: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(["/usr/bin/python3", "-c", HOLDER, p.uri(export)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_both_nodes_down_briefly_requests_are_held_then_complete(both: Pair) -> None:
    p = both
    p.create("hold", 8 * MiB, volume_id=4500)
    proc = _holder(p, "hold")
    try:
        p.kill9("A")
        p.kill9("B")
        wait_for(lambda: all(v["state"] == "down"
                             for v in p.status()["exports"]["hold"]["paths"].values()),
                 "both paths down")
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
        wait_for(lambda: p.status()["held"] >= 1, "the read to be held")
        time.sleep(0.3)
        p.start_node("A")  # A was the writer: it has the flushed block
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = out.split()
    assert lines[0] == "OK", (out, err)
    assert float(lines[1]) < HOLD
    assert "OK2" in out
    st = p.status()
    assert st["held"] == 0 and st["held_total"] >= 1
    assert st["exports"]["hold"]["held"] == 0 and st["exports"]["hold"]["held_total"] >= 1
    assert "releasing held requests" in p.log("host")


def test_both_nodes_down_longer_than_hold_timeout_is_eio(both: Pair) -> None:
    p = both
    p.create("holdeio", 8 * MiB, volume_id=4501)
    proc = _holder(p, "holdeio")
    try:
        p.kill9("A")
        p.kill9("B")
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = out.split()
    assert lines[:2] == ["ERR", "EIO"], (out, err)
    assert HOLD - 0.3 <= float(lines[2]) < HOLD + 3
    # After the hold timed out, new requests fail at once until a path returns.
    assert "ERR2 EIO" in out
    assert p.status()["hold_failed"] >= 1


def test_sigterm_ends_the_agent_promptly_after_its_nodes_stopped(tmp_path: Any) -> None:
    """Nodes stopped first (the agent's paths keep reconnecting, a request is held):
    SIGTERM still ends the agent at once, the held request fails with ESHUTDOWN."""
    p = Pair(str(tmp_path))
    proc: subprocess.Popen[str] | None = None
    try:
        p.start_nodes(*NODES)
        p.start_agent()
        p.create("bye", 8 * MiB, volume_id=4700)
        run("qemu-io", "-f", "raw", "-c", "write -P 7 0 1M", p.uri("bye"))
        proc = _holder(p, "bye")
        for n in NODES:
            p.sup.stop(n)  # SIGTERM, as an operator stopping the nodes would
        wait_for(lambda: all(v["state"] == "down"
                             for v in p.status()["exports"]["bye"]["paths"].values()),
                 "both paths down")
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
        wait_for(lambda: p.status()["held"] >= 1, "the read to be held")
        host = p.sup.components["host"].proc
        assert host is not None
        t = time.monotonic()
        host.send_signal(signal.SIGTERM)
        rc = host.wait(timeout=15)
        took = time.monotonic() - t
        out, err = proc.communicate(timeout=10)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        p.sup.stop_all()
    assert rc == 0, p.log("host")[-2000:]
    assert took < 2.5, (took, p.log("host")[-2000:])
    lines = out.split()
    assert lines[:2] == ["ERR", "ESHUTDOWN"], (out, err)
    assert float(lines[2]) < HOLD
    assert "host agent stopped" in p.log("host")
    assert not os.path.exists(os.path.join(p.dir, "host.sock"))  # removed on the way out


def test_node_death_is_noticed_without_io(both: Pair) -> None:
    """No request needed: the path's socket and the node's event stream report it."""
    p = both
    p.create("idle", 8 * MiB, volume_id=4600)
    proc = _holder(p, "idle")
    run("nbdcopy", p.node_uri("A", "idle"), p.node_uri("B", "idle"))  # both copies equal
    try:
        wait_for(lambda: p.status()["exports"]["idle"]["paths"]["B"]["state"] == "up",
                 "path B up")
        t = time.monotonic()
        p.kill9("B")
        wait_for(lambda: p.status()["exports"]["idle"]["paths"]["B"]["state"] == "down",
                 "path B down", timeout=3)
        wait_for(lambda: p.status()["nodes"]["B"]["events"]["state"] == "down",
                 "B's event stream down", timeout=3)
        assert time.monotonic() - t < 3
        p.start_node("B")
        # The path comes back on its own (reconnect with backoff <= 1 s).
        wait_for(lambda: p.status()["exports"]["idle"]["paths"]["B"]["state"] == "up",
                 "path B back up", timeout=5)
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
        out, _ = proc.communicate(timeout=20)
        assert out.startswith("OK")
    finally:
        if proc.poll() is None:
            proc.kill()


def test_host_status_names_the_native_data_path(both: Pair) -> None:
    assert both.status()["data_path"] == "native"
    r = run(*twinvol_argv("host", "status", "--cluster", both.cluster))
    assert "data path native" in r.stdout
    assert f"unix socket {os.path.join(both.dir, 'host.sock')}" in r.stdout


def test_unix_socket_serves_the_same_volumes(both: Pair) -> None:
    """Local clients reach the same multipath volume through the agent's Unix socket."""
    p = both
    assert p.status()["socket"] == os.path.join(p.dir, "host.sock")
    p.create("local", 32 * MiB, description="via unix")
    info = json.loads(run("nbdinfo", "--json", p.unix_uri("local")).stdout)["exports"][0]
    assert info["export-size"] == 32 * MiB and info["description"] == "via unix"
    run("qemu-io", "-f", "raw", "-c", "write -P 0x7e 0 1M", "-c", "write -P 0x3c 5M 64k",
        "-c", "flush", p.unix_uri("local"))
    # The writes went to one node (A, the first path); TCP clients of the agent see them.
    out = run("qemu-io", "-f", "raw", "-c", "read -P 0x7e 0 1M", "-c", "read -P 0x3c 5M 64k",
              "-c", "read -P 0 6M 1M", p.node_uri("A", "local")).stdout
    assert "verification failed" not in out
    status, body = p.api("A", "POST", "/api/v1/volumes", {"name": "ustrict", "size": 32 * MiB})
    assert status == 201, body
    out = run("/usr/bin/python3", "-c", LIBNBD_STRICT, p.unix_uri("ustrict")).stdout
    assert out.strip() == "OK"


LARGE_IO = r"""
import random, sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[2])
cases = [(1 << 20, 12345), (4 << 20, (5 << 20) + 7), (32 << 20, (24 << 20) + 511)]
data = [random.Random(n).randbytes(n) for n, _ in cases]
if sys.argv[1] == "write":
    # Several large writes in flight at once, at unaligned offsets, read back; then the
    # cases above, over them.
    more = [(random.Random(i).randbytes(4 << 20), (8 << 20) * i + 4093) for i in range(7)]
    cookies = [h.aio_pwrite(d, off) for d, off in more]
    while h.aio_in_flight() > 0:
        h.poll(-1)
    assert all(h.aio_command_completed(c) for c in cookies)
    for d, off in more:
        assert h.pread(len(d), off) == d
    for (n, off), d in zip(cases, data):
        h.pwrite(d, off)
    h.flush()
for (n, off), d in zip(cases, data):
    got = h.pread(n, off)
    assert got == d, (n, off, next(i for i in range(n) if got[i] != d[i]))
h.shutdown()
print("OK")
"""


def test_large_writes_and_reads_through_the_agent_byte_for_byte(both: Pair) -> None:
    """1, 4 and 32 MiB requests at unaligned offsets (payloads go straight into place in
    the agent) read back intact through the agent and from the node itself."""
    p = both
    status, body = p.api("A", "POST", "/api/v1/volumes", {"name": "large", "size": 64 * MiB})
    assert status == 201, body
    out = run("/usr/bin/python3", "-c", LARGE_IO, "write", p.uri("large"), timeout=120).stdout
    assert out.strip() == "OK"
    out = run("/usr/bin/python3", "-c", LARGE_IO, "read", p.node_uri("A", "large")).stdout
    assert out.strip() == "OK"


KILLED_MID_WRITE = r"""
import random, sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[2])
data = random.Random(32).randbytes(32 << 20)
if sys.argv[1] == "write":
    h.pwrite(b"k" * 4096, 0)  # the writer's path is up
    print("ready", flush=True)
    sys.stdin.readline()
    h.pwrite(data, 12345)
else:
    assert h.pread(len(data), 12345) == data
print("OK", flush=True)
"""


def test_a_node_killed_mid_way_through_a_32m_write_gets_it_resent(both: Pair) -> None:
    """A (the writer) is stopped, a 32 MiB write goes out to it (a part fits its socket),
    then A is killed: the agent sends the whole write again to B, which holds every byte."""
    p = both
    p.create("midkill", 64 * MiB, volume_id=4460)
    retries = p.status()["retries"]
    w = subprocess.Popen(["/usr/bin/python3", "-c", KILLED_MID_WRITE, "write", p.uri("midkill")],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    a = p.sup.components["A"].proc
    try:
        assert w.stdout is not None and w.stdin is not None
        assert w.stdout.readline().strip() == "ready"
        assert p.status()["exports"]["midkill"]["paths"]["A"]["requests"] == 1
        a.send_signal(signal.SIGSTOP)
        w.stdin.write("go\n")
        w.stdin.flush()
        wait_for(lambda: p.status()["exports"]["midkill"]["paths"]["A"]["inflight"] == 1,
                 "the large write in flight to A")
        time.sleep(0.3)
        assert w.poll() is None  # A cannot have answered
        p.kill9("A")
        out, err = w.communicate(timeout=60)
    finally:
        if w.poll() is None:
            w.kill()
    assert w.returncode == 0 and out.strip() == "OK", err
    assert p.status()["retries"] > retries
    out = run("/usr/bin/python3", "-c", KILLED_MID_WRITE, "read", p.node_uri("B", "midkill")).stdout
    assert out.strip() == "OK"


def test_host_cli_errors_are_one_line(tmp_path: Any) -> None:
    bad = os.path.join(str(tmp_path), "c.toml")
    with open(bad, "wb") as f:
        tomli_w.dump({"nodes": {"A": {"site": "A", "nbd": "127.0.0.1:1", "api": "127.0.0.1:2",
                                      "data_dir": "a"}}}, f)
    r = run(*agent_argv(bad), check=False)
    assert r.returncode == 1
    assert r.stderr.startswith("twinvol: error: cluster file ") and r.stderr.count("\n") == 1
    assert "has no [host] table" in r.stderr


# ---- a replicated pair behind the agent: a side fences itself mid-write -----------

WRITER = r"""
import json, sys, time, nbd
uri, seconds, depth, nblocks = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
h = nbd.NBD()
h.connect_uri(uri)
inflight, busy, acked, errors = {}, set(), {}, []
seq = 0
start = time.monotonic()
end = start + seconds
print("ready", flush=True)
while True:
    now = time.monotonic()
    # One write per block at a time, so a block's last acknowledged write is its value.
    while now < end and len(inflight) < depth and seq % nblocks not in busy:
        block = seq % nblocks
        cookie = h.aio_pwrite(seq.to_bytes(8, "little") * 512, block * 4096)
        inflight[cookie] = (seq, block, now)
        busy.add(block)
        seq += 1
        time.sleep(0.002)
        now = time.monotonic()
    if not inflight:
        break
    try:
        h.poll(50)
    except nbd.Error as e:
        errors.append({"poll": str(e)})
        break
    for cookie in list(inflight):
        try:
            done = h.aio_command_completed(cookie)
        except nbd.Error as e:
            done = e
        if done:
            s, block, t = inflight.pop(cookie)
            busy.discard(block)
            if done is True:
                acked[block] = s
            else:
                errors.append({"seq": s, "sent": round(t - start, 3),
                               "after": round(time.monotonic() - t, 3), "error": str(done)})
print(json.dumps({"sent": seq, "acked": acked, "errors": errors}), flush=True)
"""

READ_BLOCKS = r"""
import json, sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
n = int(sys.argv[2])
data = h.pread(n * 4096, 0)
out = []
for b in range(n):
    blk = data[b * 4096:(b + 1) * 4096]
    v = int.from_bytes(blk[:8], "little")
    out.append(v if blk == blk[:8] * 512 else -1)
print(json.dumps(out))
"""


class EioOnCloseProxy:
    """An NBD proxy in front of a node: when the node drops a connection with requests
    in flight, each of them is first answered with EIO, then the connection closes.

    That is what the agent saw in finding 4 of issue 13 (a node losing its partner or
    its lease answered the writes it held with EIO, then closed), made deterministic: a
    real node now drops its replies when it fences itself, but may still answer EIO
    when its pair side blocks, and the agent must handle both alike."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.addr = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.eio_sent = 0
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.listener.close()
        with self._lock:
            for s in self._socks:
                with contextlib.suppress(OSError):
                    s.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                if self.listener.fileno() < 0:
                    return
                continue
            upstream.settimeout(None)
            with self._lock:
                self._socks += [client, upstream]
            conn = {"inflight": set(), "agent_closed": False}
            threading.Thread(target=self._requests, args=(client, upstream, conn),
                             daemon=True).start()
            threading.Thread(target=self._replies, args=(client, upstream, conn),
                             daemon=True).start()

    def _requests(self, client: socket.socket, upstream: socket.socket,
                  conn: dict[str, Any]) -> None:
        """Agent -> node, forwarded as it comes; the handle of every request is noted."""
        buf, phase, skip = bytearray(), "flags", 0
        try:
            while data := client.recv(65536):
                buf += data
                while True:
                    if phase == "flags" and len(buf) >= 4:
                        del buf[:4]
                        phase = "options"
                    elif phase == "options" and len(buf) >= 16 \
                            and len(buf) >= 16 + struct.unpack_from(">I", buf, 12)[0]:
                        _, opt, n = struct.unpack_from(">QII", buf)
                        del buf[:16 + n]
                        phase = "requests" if opt == Opt.GO else phase
                    elif phase == "requests" and skip:
                        k = min(skip, len(buf))
                        del buf[:k]
                        skip -= k
                        if not buf:
                            break
                    elif phase == "requests" and len(buf) >= 28:
                        magic, _, cmd, handle, _, n = struct.unpack_from(">IHHQQI", buf)
                        del buf[:28]
                        if magic != 0x25609513:  # GO refused: no transmission
                            phase = "raw"
                        skip = n if cmd == Cmd.WRITE else 0
                        if cmd != Cmd.DISC:
                            with self._lock:
                                conn["inflight"].add(handle)
                    else:
                        if phase == "raw":
                            buf.clear()
                        break
                upstream.sendall(data)
        except OSError:
            pass
        conn["agent_closed"] = True
        with contextlib.suppress(OSError):
            upstream.shutdown(socket.SHUT_RDWR)

    def _replies(self, client: socket.socket, upstream: socket.socket,
                 conn: dict[str, Any]) -> None:
        """Node -> agent, forwarded whole replies at a time; on the node's close, EIO for
        every request still in flight."""
        buf, phase = bytearray(), "greeting"
        try:
            while data := upstream.recv(65536):
                buf += data
                out = bytearray()
                while True:
                    unit = 0
                    if phase == "greeting" and len(buf) >= 18:
                        unit, phase = 18, "options"
                    elif phase == "options" and len(buf) >= 20:
                        _, opt, rep, n = struct.unpack_from(">QIII", buf)
                        unit = 20 + n if len(buf) >= 20 + n else 0
                        if unit and opt == Opt.GO and rep == Rep.ACK:
                            phase = "replies"
                    elif phase == "replies" and len(buf) >= 16:
                        magic, = struct.unpack_from(">I", buf)
                        done, handle = True, struct.unpack_from(">Q", buf, 8)[0]
                        if magic == 0x67446698:
                            unit = 16
                        elif len(buf) >= 20:
                            flags, _, _, n = struct.unpack_from(">HHQI", buf, 4)
                            unit = 20 + n if len(buf) >= 20 + n else 0
                            done = bool(flags & 1)
                        if unit and done:
                            with self._lock:
                                conn["inflight"].discard(handle)
                    if not unit:
                        break
                    out += buf[:unit]
                    del buf[:unit]
                client.sendall(out)
        except OSError:
            pass
        with self._lock:
            handles = sorted(conn["inflight"])
            conn["inflight"].clear()
        if phase == "replies" and handles and not conn["agent_closed"]:
            with contextlib.suppress(OSError):
                client.sendall(b"".join(struct.pack(">IIQ", 0x67446698, Err.EIO, h)
                                        for h in handles))
                self.eio_sent += len(handles)
        for s in (client, upstream):
            with contextlib.suppress(OSError):
                s.close()


@pytest.mark.parametrize("data_path", ["native", "python"])
def test_writes_in_flight_survive_a_side_fencing_itself(tmp_path: Any, data_path: str) -> None:
    """Finding 4 of issue 13 with real processes: a pair with its witness, a libnbd
    writer through the agent, the secondary paused (SIGSTOP) past the lease. The primary
    A fences itself with the agent's writes in flight and they come back EIO (the proxy
    in front of A); the agent re-sends them to B, which resumes and fences itself in
    turn, then back to A once A writes alone. Every write completes without an error,
    and each block reads back its last acknowledged value from both nodes."""
    from clusterproc import ClusterProc
    from twinvol import cluster as cluster_mod

    c = ClusterProc(str(tmp_path), witness=True, host=True)
    assert c.cfg.host is not None
    c.cfg.host["data_path"] = data_path
    node_a = c.cfg.node("A").nbd
    host, port = node_a.rsplit(":", 1)
    proxy = EioOnCloseProxy((host, int(port)))
    for n in ("A", "B"):  # the nodes keep the real addresses; the agent reaches A via proxy
        c.node_files[n] = os.path.join(c.dir, f"cluster-{n}.toml")
        cluster_mod.dump(c.cfg, c.node_files[n])
    c.cfg.nodes["A"].nbd = proxy.addr
    c.rewrite()
    writer: subprocess.Popen[str] | None = None
    try:
        c.start()
        c.wait_peer("A", "B")
        status, body = c.api("A", "POST", "/api/v1/volumes", {"name": "vol", "size": 8 * MiB})
        assert status == 201, body
        status, body = c.api("A", "POST", "/api/v1/pairs", {"name": "vol", "secondary": "B"})
        assert status == 201, body
        c.wait_pair("A", "vol", "mirrored", "mirror")
        c.wait_pair("B", "vol", "mirrored", "mirror")
        nblocks = 256
        writer = subprocess.Popen(["/usr/bin/python3", "-c", WRITER, c.host_uri("vol"), "7",
                                   "8", str(nblocks)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == "ready"
        time.sleep(1.5)
        b = c.sup.components["B"].proc
        assert b is not None
        b.send_signal(signal.SIGSTOP)
        try:
            wait_for(lambda: proxy.eio_sent, "A to fence itself with writes in flight",
                     timeout=10)
            time.sleep(2.0)
        finally:
            b.send_signal(signal.SIGCONT)
        out, err = writer.communicate(timeout=60)
        assert writer.returncode == 0, err
        result = json.loads(out.strip().splitlines()[-1])
        assert result["errors"] == [], result["errors"][:10]
        c.wait_pair("A", "vol", "mirrored", "mirror", timeout=60)
        c.wait_pair("B", "vol", "mirrored", "mirror", timeout=60)
        want = dict.fromkeys(range(nblocks), -2)  # never acknowledged: not checked
        want.update({int(k): v for k, v in result["acked"].items()})
        for n, uri in (("A", f"nbd://{node_a}/vol"), ("B", c.uri("B", "vol"))):
            got = json.loads(run("/usr/bin/python3", "-c", READ_BLOCKS, uri,
                                 str(nblocks)).stdout)
            bad = [(k, v, got[k]) for k, v in want.items() if v != -2 and got[k] != v]
            assert not bad, (n, bad[:10])
    finally:
        if writer is not None and writer.poll() is None:
            writer.kill()
            writer.communicate()
        c.stop()
        proxy.close()


# ---- in-process agent against fake nodes ---------------------------------------------


class MemBackend:
    def __init__(self, size: int, fill: int) -> None:
        self.buf = bytearray([fill]) * size
        self.reads = 0
        self.writes = 0
        self.fail_read: int | None = None
        self.fail_write: int | None = None
        self.delay = 0.0  # seconds each read takes

    def pread(self, offset: int, length: int) -> bytes:
        if self.fail_read:
            raise OSError(self.fail_read, os.strerror(self.fail_read))
        if self.delay:
            time.sleep(self.delay)
        self.reads += 1
        return bytes(self.buf[offset:offset + length])

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if self.fail_write:
            raise OSError(self.fail_write, os.strerror(self.fail_write))
        self.writes += 1
        self.buf[offset:offset + len(data)] = data

    def trim(self, offset: int, length: int) -> None:
        self.buf[offset:offset + length] = bytes(length)

    def write_zeroes(self, offset: int, length: int, *, no_hole: bool, fast: bool) -> None:
        self.buf[offset:offset + length] = bytes(length)

    def flush(self) -> None:
        pass

    def cache(self, offset: int, length: int) -> None:
        pass

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        return [(length, 0)]


class MemNode:
    """An in-process NBD server with one export "v" (an `ExportRegistry`)."""

    def __init__(self, name: str, fill: int = 0x5A, size: int = 4 * MiB) -> None:
        self.name = name
        self.export = ExportInfo("v", size, "mem")
        self.backend = MemBackend(size, fill)
        self.connections: dict[NbdServerProtocol, None] = {}
        self.executor = ThreadPoolExecutor(2)
        self.server: asyncio.base_events.Server | None = None
        self.port = 0

    def lookup(self, name: str) -> ExportInfo | None:
        return self.export if name == "v" else None

    def list_exports(self) -> list[ExportInfo]:
        return [self.export]

    def attach(self, export: ExportInfo) -> MemBackend:
        return self.backend

    def detach(self, export: ExportInfo) -> None:
        pass

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: NbdServerProtocol(self, self.executor, self.connections), "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        close_all(self.connections)
        self.executor.shutdown(wait=False)


class FakeLines:
    def __init__(self, link: FakeLink) -> None:
        self.link = link
        self.q: asyncio.Queue[bytes] = asyncio.Queue()

    async def readline(self) -> bytes:
        return await self.q.get()

    def close(self) -> None:
        self.link.streams.discard(self)


class FakeLink:
    """A fake node API: identity and mode answers, and an event stream the test feeds."""

    def __init__(self, node: MemNode, identity: dict[str, Any]) -> None:
        self.name = node.name
        self.nbd = ("127.0.0.1", node.port)
        self.identity = identity
        self.mode = "mirror"
        self.reachable = True
        self.seq = 0
        self.streams: set[FakeLines] = set()
        self.opened = 0

    async def export(self, export: str) -> dict[str, Any] | None:
        if not self.reachable:
            raise NodeUnreachable(f"node {self.name} is unreachable (test)")
        if export != "v":
            return None
        return {"node": self.name, "io_mode": self.mode, "virtual_identity": dict(self.identity)}

    async def volumes(self) -> list[dict[str, Any]]:
        return [{"export_name": "v", "virtual_identity": dict(self.identity)}]

    async def event_seq(self) -> int:
        if not self.reachable:
            raise NodeUnreachable("unreachable")
        return self.seq

    async def open_events(self, since: int) -> FakeLines:
        if not self.reachable:
            raise NodeUnreachable("unreachable")
        self.opened += 1
        lines = FakeLines(self)
        self.streams.add(lines)
        return lines

    def push(self, **ev: Any) -> None:
        self.seq += 1
        line = msgspec.json.encode({"seq": self.seq, "node": self.name, **ev}) + b"\n"
        for s in list(self.streams):
            s.q.put_nowait(line)


IDENTITY = {"serial": "MEM-1", "volume_id": 1, "export_name": "v", "size": 4 * MiB,
            "description": "mem"}


# The in-process agent tests run on both data paths: the native relay and the Python one.
DATA_PATHS = pytest.mark.parametrize("data_path", ["native", "python"])


def in_process(test: Callable[[Agent, dict[str, MemNode], dict[str, FakeLink]], Any], *,
               silence: float = 6.0, identity_b: dict[str, Any] | None = None,
               io_timeout: float = 3.0, data_path: str = "native") -> None:
    async def main() -> None:
        nodes = {n: MemNode(n) for n in NODES}
        for m in nodes.values():
            await m.start()
        links = {n: FakeLink(m, dict(IDENTITY)) for n, m in nodes.items()}
        if identity_b:
            links["B"].identity.update(identity_b)
        nbd, api = free_ports(2)
        setup = HostSetup(HostConfig(nbd=f"127.0.0.1:{nbd}", api=f"127.0.0.1:{api}",
                                     hold_timeout=2.0, io_timeout=io_timeout,
                                     data_path=data_path), {}, None, "")
        agent = Agent(setup, links=dict(links), silence=silence)  # type: ignore[arg-type]
        await agent.start()
        try:
            await asyncio.wait_for(test(agent, nodes, links), 30)
        finally:
            await agent.stop()
            for m in nodes.values():
                m.stop()

    asyncio.run(main())


async def until(pred: Callable[[], Any], what: str, timeout: float = 3.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def path_state(agent: Agent, node: str) -> str:
    return str(agent.status()["exports"]["v"]["paths"][node]["state"])


@DATA_PATHS
def test_pushed_block_event_stops_a_path_at_once_and_mirror_brings_it_back(data_path: str) -> None:
    async def test(agent: Agent, nodes: dict[str, MemNode], links: dict[str, FakeLink]) -> None:
        await until(lambda: all(agent.events_up(n) for n in NODES), "event streams up")
        c = await NbdClient.connect("127.0.0.1", agent.nbd_port, "v")
        for i in range(40):
            assert await c.pread(i * 4096, 4096) == b"\x5a" * 4096
        a, b = nodes["A"].backend, nodes["B"].backend
        assert a.reads and b.reads
        # The node's API keeps saying "mirror": only the pushed event can block the path.
        links["A"].push(type="io_mode", export="v", mode="block", previous="mirror",
                        reason="stale copy")
        await until(lambda: path_state(agent, "A") == "blocked", "path A blocked")
        await until(lambda: not nodes["A"].connections, "the agent's connection to A closed")
        ra = a.reads
        for i in range(40):
            await c.pread(i * 4096, 4096)
        assert a.reads == ra
        await asyncio.sleep(1.2)  # no polling brings it back while the stream is up
        assert path_state(agent, "A") == "blocked"
        links["A"].push(type="io_mode", export="v", mode="mirror", previous="block")
        await until(lambda: path_state(agent, "A") == "up", "path A back up", timeout=1.0)
        for i in range(40):
            await c.pread(i * 4096, 4096)
        assert a.reads > ra
        assert agent.status()["failovers"] == 1
        await c.aclose()

    in_process(test, data_path=data_path)


@DATA_PATHS
def test_silent_event_stream_is_reconnected_and_missed_modes_are_read(data_path: str) -> None:
    async def test(agent: Agent, nodes: dict[str, MemNode], links: dict[str, FakeLink]) -> None:
        c = await NbdClient.connect("127.0.0.1", agent.nbd_port, "v")
        await until(lambda: path_state(agent, "A") == "up" and path_state(agent, "B") == "up",
                    "both paths up")

        async def heartbeats() -> None:
            while True:
                links["B"].push(type="heartbeat")
                await asyncio.sleep(0.05)

        beat = asyncio.get_running_loop().create_task(heartbeats())
        try:
            # A sends nothing: after `silence` its stream is declared dead and reopened.
            links["A"].mode = "block"  # ...and a block the event for which got lost
            await until(lambda: links["A"].opened >= 2, "A's stream reopened", timeout=2)
            await until(lambda: path_state(agent, "A") == "blocked",
                        "the missed block applied on reconnect")
            assert links["B"].opened == 1  # heartbeats keep B's stream alive
            assert path_state(agent, "B") == "up"
        finally:
            beat.cancel()
        await c.aclose()

    in_process(test, data_path=data_path, silence=0.3)


@DATA_PATHS
def test_request_latency_per_export_and_op_in_metrics(data_path: str) -> None:
    async def scrape(agent: Agent) -> dict[str, float]:
        def get() -> bytes:
            with urllib.request.urlopen(f"http://127.0.0.1:{agent.api_port}/metrics",
                                        timeout=10) as r:
                return r.read()  # type: ignore[no-any-return]

        text = (await asyncio.get_running_loop().run_in_executor(None, get)).decode()
        return {k: float(v) for line in text.splitlines() if line.startswith("twinvol_host_req")
                for k, _, v in [line.rpartition(" ")]}

    def key(part: str, op: str, le: str = "") -> str:
        return (f'twinvol_host_request_seconds_{part}{{export="v",'
                + (f'le="{le}",' if le else "") + f'op="{op}"}}')

    async def test(agent: Agent, nodes: dict[str, MemNode], links: dict[str, FakeLink]) -> None:
        c = await NbdClient.connect("127.0.0.1", agent.nbd_port, "v")
        await until(lambda: path_state(agent, "B") == "up", "path B up")
        for n in nodes.values():
            n.backend.delay = 0.03
        for i in range(40):  # requests 1-40: the 1st, 17th and 33rd are timed
            await c.pread(i * 4096, 4096)
        for n in nodes.values():
            n.backend.delay = 0.0
        for i in range(8):   # 41-48: none timed
            await c.pwrite(i * 4096, b"w" * 4096)
        await c.flush_cmd()  # 49: timed
        m = await scrape(agent)
        assert [m[key("count", op)] for op in ("read", "write", "other")] == [3, 0, 1]
        assert 0.09 <= m[key("sum", "read")] < 3.0
        # Each timed read took 30 ms at its node: none in the buckets up to 16.8 ms.
        assert m[key("bucket", "read", "0.016777216")] == 0
        assert m[key("bucket", "read", "+Inf")] == 3
        assert 0 < m[key("sum", "other")] < 1.0
        await c.aclose()
        # The closed session's samples stay in the export's totals.
        await until(lambda: agent.status()["exports"]["v"]["sessions"] == 0, "session closed")
        assert await scrape(agent) == m
        assert agent.status()["exports"]["v"]["latency"]["read"]["count"] == 3

    in_process(test, data_path=data_path)


@DATA_PATHS
def test_path_errors_retry_but_data_errors_reach_the_client(data_path: str) -> None:
    async def test(agent: Agent, nodes: dict[str, MemNode], links: dict[str, FakeLink]) -> None:
        c = await NbdClient.connect("127.0.0.1", agent.nbd_port, "v")
        await until(lambda: path_state(agent, "B") == "up", "path B up")
        nodes["A"].backend.fail_read = errno.EIO
        for i in range(20):  # EIO from one copy: the other copy answers
            assert await c.pread(i * 4096, 4096) == b"\x5a" * 4096
        assert agent.status()["retries"] >= 1
        # EIO from every copy: re-sent (paths reconnect) until hold_timeout, then EIO.
        nodes["B"].backend.fail_read = errno.EIO
        loop = asyncio.get_running_loop()
        t = loop.time()
        with pytest.raises(NbdError) as e:
            await c.pread(0, 4096)
        assert e.value.errno == Err.EIO
        assert loop.time() - t >= 1.5  # hold_timeout (2 s) on the agent's coarse clock
        nodes["A"].backend.fail_read = nodes["B"].backend.fail_read = None
        await until(lambda: path_state(agent, "A") == "up" and path_state(agent, "B") == "up",
                    "both paths back")
        writes_b = nodes["B"].backend.writes
        # ENOSPC and EPERM from a healthy path are the client's answer, not retried.
        for err, want in ((errno.ENOSPC, Err.ENOSPC), (errno.EPERM, Err.EPERM)):
            nodes["A"].backend.fail_write = err
            with pytest.raises(NbdError) as e:
                await c.pwrite(0, b"x" * 512)
            assert e.value.errno == want
        assert nodes["B"].backend.writes == writes_b  # writes never went to the second path
        nodes["A"].backend.fail_write = None
        await c.pwrite(0, b"y" * 512)
        assert nodes["A"].backend.buf[:512] == b"y" * 512
        assert nodes["B"].backend.writes == writes_b
        assert path_state(agent, "A") == "up" and path_state(agent, "B") == "up"
        await c.aclose()

    in_process(test, data_path=data_path)


@DATA_PATHS
def test_writes_failed_by_a_fenced_node_are_held_then_go_to_the_other_path(
        data_path: str) -> None:
    """Finding 4 of issue 13, in process: the writer's node answers EIO (its pair side
    lost its partner) while the other path is blocked. No write reaches the client as
    an error: they wait (hold_timeout) and go to the other path once it is usable."""
    async def test(agent: Agent, nodes: dict[str, MemNode], links: dict[str, FakeLink]) -> None:
        c = await NbdClient.connect("127.0.0.1", agent.nbd_port, "v")
        await until(lambda: path_state(agent, "A") == "up" and path_state(agent, "B") == "up",
                    "both paths up")
        links["B"].mode = "block"
        links["B"].push(type="io_mode", export="v", mode="block", previous="mirror")
        await until(lambda: path_state(agent, "B") == "blocked", "path B blocked")
        nodes["A"].backend.fail_write = errno.EIO
        links["A"].mode = "block"  # and A's view says block: the path stays out
        writes = asyncio.gather(*(c.pwrite(k * 4096, bytes([k]) * 4096) for k in range(32)),
                                return_exceptions=True)
        await until(lambda: writes.done() or agent.status()["held"] == 32, "the writes held")
        assert not writes.done(), [str(e) for e in writes.result() if e is not None][:3]
        # A was closed once drained; reconnecting, it finds A's view says block.
        await until(lambda: path_state(agent, "A") == "blocked", "path A blocked")
        links["B"].mode = "mirror"
        links["B"].push(type="io_mode", export="v", mode="mirror", previous="block")
        assert await writes == [None] * 32
        b = nodes["B"].backend
        assert all(b.buf[k * 4096:(k + 1) * 4096] == bytes([k]) * 4096 for k in range(32))
        st = agent.status()
        assert st["retries"] >= 32 and st["hold_failed"] == 0
        await c.aclose()

    in_process(test, data_path=data_path)


@DATA_PATHS
def test_mismatched_identity_refused_in_negotiation(data_path: str) -> None:
    async def test(agent: Agent, nodes: dict[str, MemNode], links: dict[str, FakeLink]) -> None:
        with pytest.raises(NegotiationError) as e:
            await NbdClient.connect("127.0.0.1", agent.nbd_port, "v")
        assert e.value.rep == Rep.ERR_POLICY
        assert "node A and node B" in e.value.message
        assert "volume_id 1 != 2" in e.value.message
        assert not nodes["A"].connections and not nodes["B"].connections

    in_process(test, data_path=data_path, identity_b={"volume_id": 2})


@DATA_PATHS
def test_many_requests_in_flight_survive_a_path_cut(data_path: str) -> None:
    async def test(agent: Agent, nodes: dict[str, MemNode], links: dict[str, FakeLink]) -> None:
        c = await NbdClient.connect("127.0.0.1", agent.nbd_port, "v")
        await until(lambda: path_state(agent, "B") == "up", "path B up")
        done = 0

        async def reader(i: int) -> None:
            nonlocal done
            for j in range(50):
                assert await c.pread(((i * 50 + j) % 1024) * 4096, 4096) == b"\x5a" * 4096
                done += 1

        tasks = [asyncio.get_running_loop().create_task(reader(i)) for i in range(32)]
        await until(lambda: done > 200, "reads flowing")
        close_all(nodes["A"].connections)  # cut A's side of every connection
        links["A"].reachable = False
        await asyncio.gather(*tasks)
        assert done == 32 * 50
        assert agent.status()["failovers"] >= 1
        await c.aclose()

    in_process(test, data_path=data_path)



@DATA_PATHS
def test_eshutdown_from_a_path_is_retried_and_never_seen(monkeypatch: pytest.MonkeyPatch,
                                                         data_path: str) -> None:
    import twinvol.nbd.aio as server_aio

    real = server_aio.nbd_errno
    monkeypatch.setattr(server_aio, "nbd_errno",
                        lambda e: Err.ESHUTDOWN if e.errno == errno.ESHUTDOWN else real(e))

    async def test(agent: Agent, nodes: dict[str, MemNode], links: dict[str, FakeLink]) -> None:
        c = await NbdClient.connect("127.0.0.1", agent.nbd_port, "v")
        await until(lambda: path_state(agent, "B") == "up", "path B up")
        nodes["A"].backend.fail_read = errno.ESHUTDOWN  # A is shutting down
        for i in range(40):
            assert await c.pread(i * 4096, 4096) == b"\x5a" * 4096
        st = agent.status()
        assert st["failovers"] >= 1 and st["retries"] >= 1
        assert "ESHUTDOWN" in st["exports"]["v"]["paths"]["A"]["reason"] \
            or st["exports"]["v"]["paths"]["A"]["state"] == "up"
        await c.aclose()

    in_process(test, data_path=data_path)


@DATA_PATHS
def test_a_path_that_stops_answering_is_failed_after_io_timeout(
        caplog: pytest.LogCaptureFixture, data_path: str) -> None:
    async def test(agent: Agent, nodes: dict[str, MemNode], links: dict[str, FakeLink]) -> None:
        c = await NbdClient.connect("127.0.0.1", agent.nbd_port, "v")
        await until(lambda: path_state(agent, "A") == "up" and path_state(agent, "B") == "up",
                    "both paths up")
        for conn in nodes["A"].connections:  # A hangs: it stops reading requests
            assert conn.transport is not None
            conn.transport.pause_reading()
        loop = asyncio.get_running_loop()
        t = loop.time()
        # More reads than a batch keeps on one path (the relay's slack is 16): some go to A.
        got = await asyncio.gather(*(c.pread(i * 4096, 4096) for i in range(40)))
        assert all(g == b"\x5a" * 4096 for g in got)
        assert 0.9 <= loop.time() - t < 3.0  # held up by the stall until io_timeout
        st = agent.status()
        assert st["failovers"] == 1
        assert any(str(getattr(r, "reason", "")).startswith("no reply from node A for 1 s")
                   for r in caplog.records)
        await c.aclose()

    in_process(test, data_path=data_path, io_timeout=1.0)


@DATA_PATHS
def test_pipelined_and_malformed_negotiation_from_a_raw_client(data_path: str) -> None:
    """Options and a first request in one write; oversized and bogus options; garbage."""
    import struct

    from twinvol.nbd.constants import IHAVEOPT, MAX_OPTION_DATA, Cmd, Info, Opt

    def opt(o: int, data: bytes = b"", length: int | None = None) -> bytes:
        return struct.pack(">QII", IHAVEOPT, o, len(data) if length is None else length) + data

    name = struct.pack(">I", 1) + b"v"

    async def test(agent: Agent, nodes: dict[str, MemNode], links: dict[str, FakeLink]) -> None:
        r, w = await asyncio.open_connection("127.0.0.1", agent.nbd_port)
        await r.readexactly(18)
        w.write(struct.pack(">I", 3)
                + opt(Opt.INFO, b"x" * 10, length=MAX_OPTION_DATA + 10)[:16]
                + b"x" * (MAX_OPTION_DATA + 10)  # oversized: answered ERR_TOO_BIG
                + opt(Opt.STRUCTURED_REPLY)
                + opt(Opt.GO, name + struct.pack(">HH", 1, Info.NAME))
                + struct.pack(">IHHQQI", 0x25609513, 0, Cmd.READ, 77, 0, 16))
        await w.drain()
        replies = []
        while True:
            _, o, rep, n = struct.unpack(">QIII", await r.readexactly(20))
            replies.append((o, rep, await r.readexactly(n)))
            if o == Opt.GO and rep == 1:  # ACK
                break
        assert replies[0][1] == 0x80000009  # NBD_REP_ERR_TOO_BIG
        hdr = await r.readexactly(20 + 8)
        assert struct.unpack(">IHHQI", hdr[:20])[3] == 77
        assert await r.readexactly(16) == b"\x5a" * 16
        w.close()
        # Garbage instead of options: a hard disconnect, and the agent serves on.
        r, w = await asyncio.open_connection("127.0.0.1", agent.nbd_port)
        await r.readexactly(18)
        w.write(struct.pack(">I", 1) + b"\xde\xad" * 20)
        assert await r.read() == b""
        w.close()
        c = await NbdClient.connect("127.0.0.1", agent.nbd_port, "v")
        assert await c.pread(0, 4) == b"\x5a" * 4
        await c.aclose()

    in_process(test, data_path=data_path)

def test_asyncio_client_against_an_in_process_server() -> None:
    from twinvol.nbd.aio_client import ConnectionLost

    async def main() -> None:
        node = MemNode("A")
        await node.start()
        try:
            c = await NbdClient.connect("127.0.0.1", node.port, "v", meta_context=True)
            assert c.size == 4 * MiB and c.meta_context and not c.read_only
            await c.pwrite(8192, b"abc" * 1000, flags=1)  # FUA
            assert await c.pread(8192, 3000) == b"abc" * 1000
            big = await asyncio.gather(*(c.pread(i * 65536, 65536) for i in range(32)))
            assert all(len(b) == 65536 for b in big) and c.inflight == 0
            await c.flush_cmd()
            await c.zero(0, 4096)
            await c.trim(4096, 4096)
            await c.cache(0, 4096)
            assert await c.block_status(0, 65536) == [(65536, 0)]
            assert await c.pread(0, 4096) == bytes(4096)
            with pytest.raises(NbdError) as e:
                await c.pread(4 * MiB, 1)
            assert e.value.errno == Err.EINVAL and "past the end" in str(e.value)
            plain = await NbdClient.connect("127.0.0.1", node.port, "v")
            with pytest.raises(NbdError):  # no metadata context on this one
                await plain.block_status(0, 4096)
            await plain.aclose()
            with pytest.raises(NegotiationError) as ne:
                await NbdClient.connect("127.0.0.1", node.port, "nope")
            assert ne.value.rep == Rep.ERR_UNKNOWN
            node.export.blocked = "blocked for the test"
            with pytest.raises(NegotiationError) as ne:
                await NbdClient.connect("127.0.0.1", node.port, "v")
            assert ne.value.policy and "blocked for the test" in str(ne.value)
            node.export.blocked = None
            pending = [asyncio.ensure_future(c.pread(0, 4096)) for _ in range(8)]
            close_all(node.connections)
            for f in pending:  # answered before the close, or lost with it
                with contextlib.suppress(ConnectionLost):
                    await f
            with pytest.raises(ConnectionLost):
                await c.pread(0, 1)
            assert c.lost_reason
        finally:
            node.stop()

    asyncio.run(main())

# ---- configuration and the node API client ------------------------------------------------


def test_host_config_from_the_cluster_file(tmp_path: Any) -> None:
    from twinvol import host
    from twinvol.cluster import ClusterError

    path = os.path.join(str(tmp_path), "cluster.toml")
    nodes = {n: {"site": n, "nbd": f"127.0.0.1:{10 + i}", "api": f"127.0.0.1:{20 + i}",
                 "data_dir": n, "some_future_key": 1} for i, n in enumerate("ABC")}

    def write(**tables: Any) -> None:
        with open(path, "wb") as f:
            tomli_w.dump({"cluster": {"name": "x", "secret": "s3cret"}, "nodes": nodes,
                          "witness": {"addr": "127.0.0.1:9"}, **tables}, f)

    write(host={"nbd": "127.0.0.1:1", "api": "127.0.0.1:2", "nodes": ["B", "A"]})
    setup = host.load(path)
    assert setup.config == HostConfig(nbd="127.0.0.1:1", api="127.0.0.1:2", hold_timeout=30.0,
                                      nodes=["B", "A"])
    assert list(setup.nodes) == ["B", "A"] and setup.secret == "s3cret"
    assert setup.nodes["A"].api_url == "http://127.0.0.1:20"
    assert setup.socket is None
    write(host={"nbd": "127.0.0.1:1", "api": "127.0.0.1:2", "hold_timeout": 5,
                "socket": "run/h.sock"})
    assert list(host.load(path).nodes) == ["A", "B", "C"]
    assert host.load(path).socket == os.path.join(str(tmp_path), "run", "h.sock")
    for bad, words in (({"nbd": "127.0.0.1:1", "api": "127.0.0.1:2", "nodes": ["Z"]},
                        "[nodes.Z]"),
                       ({"nbd": "nowhere", "api": "127.0.0.1:2"}, "[host] nbd"),
                       ({"nbd": "127.0.0.1:1"}, "api"),
                       ({"nbd": "127.0.0.1:1", "api": "127.0.0.1:2", "typo": 1}, "typo"),
                       ({"nbd": "127.0.0.1:1", "api": "127.0.0.1:2", "socket": " "},
                        "[host] socket must be a path, not empty")):
        write(host=bad)
        with pytest.raises(ClusterError, match=words.replace("[", r"\[").replace("]", r"\]")):
            host.load(path)


def test_node_api_calls_carry_the_cluster_secret() -> None:
    from aiohttp import ClientSession, web

    from twinvol.host import NodeAddr
    from twinvol.host.nodes import HttpNodeLink

    seen: list[str | None] = []

    async def main() -> None:
        async def export(request: web.Request) -> web.Response:
            seen.append(request.headers.get("Authorization"))
            if request.match_info["name"] != "v":
                return web.json_response({"error": {"code": "not_found", "message": "no"}},
                                         status=404)
            return web.json_response({"io_mode": "mirror", "virtual_identity": IDENTITY})

        app = web.Application()
        app.router.add_get("/api/v1/exports/{name}", export)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_ports(1)[0]
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            async with ClientSession() as http:
                addr = NodeAddr(site="A", nbd="127.0.0.1:1", api=f"127.0.0.1:{port}")
                link = HttpNodeLink("A", addr, http, "s3cret")
                view = await link.export("v")
                assert view is not None and view["virtual_identity"] == IDENTITY
                assert await link.export("other") is None
                dead = HttpNodeLink("B", NodeAddr(site="B", nbd="127.0.0.1:1",
                                                  api=f"127.0.0.1:{free_ports(1)[0]}"), http)
                with pytest.raises(NodeUnreachable, match="node B API"):
                    await dead.export("v")
        finally:
            await runner.cleanup()

    asyncio.run(main())
    assert seen == ["Bearer s3cret", "Bearer s3cret"]


def test_unix_socket_is_claimed_only_when_stale(tmp_path: Any) -> None:
    """A socket left by a dead agent is replaced; a live one, a file that is not a socket
    and a path too long for a Unix socket are refused with the reason, nothing removed."""
    async def main() -> None:
        nodes = {n: MemNode(n) for n in NODES}
        for m in nodes.values():
            await m.start()
        links = {n: FakeLink(m, dict(IDENTITY)) for n, m in nodes.items()}

        def agent(sock: str) -> Agent:
            nbd, api = free_ports(2)
            setup = HostSetup(HostConfig(nbd=f"127.0.0.1:{nbd}", api=f"127.0.0.1:{api}",
                                         socket=sock), {}, None, str(tmp_path / "c.toml"))
            return Agent(setup, links=dict(links))  # type: ignore[arg-type]

        async def refused(sock: str) -> str:
            with pytest.raises(AgentStartError) as e:
                await agent(sock).start()
            return str(e.value)

        try:
            plain = tmp_path / "plain"
            plain.write_text("keep me")
            assert await refused("plain") == (f"cannot listen for NBD on {plain}: it exists "
                                              "and is not a socket")
            assert plain.read_text() == "keep me"
            long = "x" * 120
            assert await refused(long) == (f"cannot listen for NBD on {tmp_path / long}: the "
                                           "path is longer than a Unix socket allows (107 bytes)")
            sock = tmp_path / "run" / "host.sock"  # the directory is created
            os.makedirs(sock.parent)
            dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            dead.bind(str(sock))
            dead.close()  # bound, never listening: what a killed agent leaves
            a = agent("run/host.sock")
            await a.start()
            try:
                assert a.status()["socket"] == str(sock)
                reader, writer = await asyncio.open_unix_connection(str(sock))
                assert (await reader.readexactly(8)) == b"NBDMAGIC"
                writer.close()
                assert await refused("run/host.sock") == (
                    f"cannot listen for NBD on {sock}: another process is listening on it")
                reader, writer = await asyncio.open_unix_connection(str(sock))
                assert (await reader.readexactly(8)) == b"NBDMAGIC"  # still the first agent
                writer.close()
            finally:
                await a.stop()
            assert not sock.exists()
        finally:
            for m in nodes.values():
                m.stop()

    asyncio.run(main())

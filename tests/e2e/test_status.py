"""`twinvol status` as an operator and a monitor meet it: one verdict with its exit code
(0 healthy, 1 degraded, 2 down) on a real cluster (two nodes, witness, host agent) as it
loses a copy, a node and then everything; and the commands around it that must not lie
(`node status`, `host status`, `pair resync`, Ctrl-C on `pair create --wait`)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from test_cli import one_error_line

from clusterproc import ClusterProc
from rawnbd import RawClient
from twinvol import __version__

pytestmark = pytest.mark.e2e

MiB = 1 << 20


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterProc]:
    c = ClusterProc(str(tmp_path_factory.mktemp("status")), witness=True, host=True)
    c.start()
    status, body = c.api("A", "POST", "/api/v1/volumes", {"name": "p1", "size": 16 * MiB})
    assert status == 201, body
    p = c.cli("pair", "create", "p1", "--primary", "A", "--secondary", "B", "--wait")
    assert p.returncode == 0, p.stderr
    subprocess.run(["nbdinfo", "--size", c.host_uri("p1")], check=True, capture_output=True)
    yield c
    c.stop()


def status(c: ClusterProc) -> tuple[int, dict[str, Any]]:
    p = c.cli("status", "--json")
    return p.returncode, json.loads(p.stdout)


def flat(text: str) -> str:
    return " ".join(text.split())


def test_healthy(cluster: ClusterProc) -> None:
    rc, st = status(cluster)
    assert (rc, st["verdict"], st["exit_code"], st["reasons"]) == (0, "healthy", 0, [])
    assert st["time"].endswith("Z")
    assert {n: "error" in s for n, s in st["nodes"].items()} == {"A": False, "B": False}
    p1 = st["pairs"]["p1"]
    assert (p1["state"], p1["serving"], p1["nodes"]) == ("mirrored", ["A", "B"], ["A", "B"])
    assert st["witness"] == {"status": "ok"}
    assert set(st["host"]["exports"]["p1"]["paths"]) == {"A", "B"}
    p = cluster.cli("status")
    assert p.returncode == 0
    assert p.stdout.startswith("twinvol test: HEALTHY")
    assert "p1 │ active-active │ A B │ mirrored" in flat(p.stdout)


def metrics(url: str, secret: str | None = None) -> dict[str, float]:
    """A Prometheus text page as {'name{labels}': value}."""
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    with urllib.request.urlopen(urllib.request.Request(url + "/metrics", headers=headers),
                                timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def test_metrics_of_host_agent_and_nodes(cluster: ClusterProc) -> None:
    assert cluster.cfg.host is not None
    host = metrics(f"http://{cluster.cfg.host['api']}", cluster.cfg.cluster.secret)
    assert host[f'twinvol_build_info{{component="host",version="{__version__}"}}'] == 1.0
    states = {k: v for k, v in host.items()
              if k.startswith('twinvol_host_path_state{export="p1",node="A"')}
    assert len(states) == 6 and sum(states.values()) == 1.0  # one state at a time
    for name in ("twinvol_host_failovers_total", "twinvol_host_holds_total",
                 "twinvol_host_hold_failures_total", "twinvol_host_path_requests_total"):
        assert any(k.startswith(name + '{export="p1"') for k in host), name
    assert host['twinvol_host_held_requests{export="p1"}'] == 0.0
    assert host['twinvol_host_node_events_up{node="B"}'] == 1.0
    node = metrics(cluster.cfg.node("A").api_url, cluster.cfg.cluster.secret)
    assert node[f'twinvol_build_info{{component="node",node="A",site="A",'
                f'version="{__version__}"}}'] == 1.0
    assert node['twinvol_pair_copy_remaining_chunks{node="A",pair="p1",site="A"}'] == 0.0
    # Per-volume I/O: 32 writes of 2 KiB (the mirrored path) and 32 reads through node A;
    # one request in 16 is timed.
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 5 0 64k", "-c", "read -P 5 0 64k",
                    cluster.uri("A", "p1"), *[a for i in range(32) for a in (
                        "-c", f"write -P 6 {i * 2}k 2k", "-c", f"read -P 6 {i * 2}k 2k")]],
                   check=True, capture_output=True)
    after = metrics(cluster.cfg.node("A").api_url, cluster.cfg.cluster.secret)

    def delta(name: str, op: str) -> float:
        key = f'{name}{{node="A",op="{op}",site="A",volume="p1"}}'
        return after[key] - node.get(key, 0.0)

    for op in ("read", "write"):
        assert delta("twinvol_volume_requests_total", op) == 33.0, op
        assert delta("twinvol_volume_bytes_total", op) == 65536.0 + 32 * 2048, op
    # The timed requests are those whose node-wide number is a multiple of 16.
    total = 'twinvol_nbd_requests_total{node="A",site="A"}'
    timed = int(after[total]) // 16 - int(node[total]) // 16
    ops = ("read", "write", "other")
    assert sum(delta("twinvol_volume_request_seconds_count", op) for op in ops) == timed >= 4
    for op in ops:
        label = f'node="A",op="{op}",site="A",volume="p1"'
        count = after[f"twinvol_volume_request_seconds_count{{{label}}}"]
        assert after[f'twinvol_volume_request_seconds_bucket{{le="+Inf",{label}}}'] == count
        if delta("twinvol_volume_request_seconds_count", op):
            assert 0 < delta("twinvol_volume_request_seconds_sum", op) < 5.0, op


def test_protocol_errors_on_peer_and_nbd_ports_are_counted_and_logged(
        cluster: ClusterProc) -> None:
    node = cluster.cfg.node("A")
    key = 'twinvol_protocol_errors_total{{node="A",port="{}",site="A"}}'
    before = metrics(node.api_url, cluster.cfg.cluster.secret)
    # The peer port: a frame whose header is msgpack {"t": <the byte 0xff as a string>}.
    header = b"\x81\xa1t\xa1\xff"
    assert node.peer is not None
    host, port = node.peer.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        peer_addr = "{}:{}".format(*s.getsockname())
        s.sendall(struct.pack(">II", len(header), 0) + header)
        with contextlib.suppress(ConnectionResetError):
            while s.recv(65536):  # A's hello, then A drops the link
                pass
    # The NBD port: client flags with an unknown bit.
    c = RawClient(int(node.nbd.rsplit(":", 1)[1]))
    nbd_addr = "{}:{}".format(*c.sock.getsockname())
    c.client_flags(0x80)
    assert c.is_closed()
    after = metrics(node.api_url, cluster.cfg.cluster.secret)
    assert after[key.format("peer")] - before[key.format("peer")] == 1.0
    assert after[key.format("nbd")] - before[key.format("nbd")] == 1.0
    # Each logged once, with the address it came from; the link to B is untouched.
    with open(os.path.join(cluster.dir, "A.log")) as f:
        lines = [json.loads(line) for line in f]
    peer_lines = [r for r in lines if r["msg"] == "peer protocol error, link dropped"
                  and r.get("addr") == peer_addr]
    assert len(peer_lines) == 1
    assert "undecodable frame header" in peer_lines[0]["reason"]
    assert len([r for r in lines if r["msg"] == "nbd protocol error, hard disconnect"
                and r.get("peer") == nbd_addr]) == 1
    rc, st = status(cluster)
    assert (rc, st["verdict"]) == (0, "healthy"), st["reasons"]


def test_watch_json_streams_until_ctrl_c(cluster: ClusterProc) -> None:
    env = {**os.environ, "TWINVOL_CLUSTER": cluster.path}
    proc = subprocess.Popen([sys.executable, "-m", "twinvol", "status", "--watch", "--json",
                             "--interval", "0.3"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        seen = []
        buf = ""
        while len(seen) < 2:
            line = proc.stdout.readline()
            assert line, proc.stderr.read() if proc.stderr else ""
            buf += line
            if line == "}\n":
                seen.append(json.loads(buf))
                buf = ""
        assert [s["verdict"] for s in seen] == ["healthy", "healthy"]
        assert seen[0]["time"] <= seen[1]["time"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_watch_in_a_terminal(cluster: ClusterProc) -> None:
    """`status --watch` in a real terminal (tmux): the screen follows a split without a
    new command, and Ctrl-C ends it with the verdict's exit code."""
    assert shutil.which("tmux"), "scripts/setup installs tmux"
    session = f"twinvol-watch-{os.getpid()}"
    exe = shutil.which("twinvol", path=os.path.dirname(sys.executable))
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "100", "-y", "50",
                    f"env TWINVOL_CLUSTER={cluster.path} {exe} status --watch --interval 0.3;"
                    " echo EXIT=$?; sleep 60"], check=True)

    def screen() -> str:
        return subprocess.run(["tmux", "capture-pane", "-p", "-t", session],
                              capture_output=True, text=True, check=True).stdout

    def wait_screen(needle: str) -> str:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            text = screen()
            if needle in text:
                return text
            time.sleep(0.2)
        raise AssertionError(f"{needle!r} not on the screen:\n{screen()}")

    try:
        wait_screen("twinvol test: HEALTHY")
        assert cluster.cli("pair", "split", "p1").returncode == 0
        text = wait_screen("twinvol test: DEGRADED")
        assert "- pair p1 is split" in text and "│ p1   │ active-active │ A B   │ split" in text
        subprocess.run(["tmux", "send-keys", "-t", session, "C-c"], check=True)
        assert "EXIT=1" in wait_screen("EXIT=")
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    assert cluster.cli("pair", "resync", "p1").returncode == 0
    cluster.wait_pair("A", "p1")


def test_ctrl_c_on_pair_create_wait_says_the_copy_goes_on(cluster: ClusterProc) -> None:
    status_, body = cluster.api("A", "POST", "/api/v1/volumes", {"name": "p2", "size": 16 * MiB})
    assert status_ == 201, body
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 9 0 16M", cluster.uri("A", "p2")],
                   check=True, capture_output=True)  # data to copy: 256 s at 64K/s
    env = {**os.environ, "TWINVOL_CLUSTER": cluster.path}
    proc = subprocess.Popen([sys.executable, "-m", "twinvol", "pair", "create", "p2",
                             "--primary", "A", "--secondary", "B", "--copy-rate", "64K",
                             "--wait"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # interrupt once the copy runs
        s, view = cluster.api("A", "GET", "/api/v1/pairs/p2")
        if s == 200 and view["copy"]["running"]:
            break
        time.sleep(0.1)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=20)
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert proc.returncode == 130
    assert one_error_line(done) == (
        "twinvol: error: stopped waiting (Ctrl-C); the copy of pair 'p2' goes on in node A: "
        "follow it with `twinvol pair show p2` or `twinvol status`; `twinvol pair delete p2` "
        "stops it")
    view = cluster.pair("A", "p2")
    assert view["copy"]["running"] and view["state"] != "mirrored"
    left = metrics(cluster.cfg.node("A").api_url, cluster.cfg.cluster.secret)[
        'twinvol_pair_copy_remaining_chunks{node="A",pair="p2",site="A"}']
    assert 0 < left <= view["copy"]["total_chunks"]
    # ... and `twinvol status` shows it: degraded, with the copy's progress.
    rc, st = status(cluster)
    assert rc == 1 and st["verdict"] == "degraded"
    assert st["pairs"]["p2"]["progress"] is not None
    assert any(r.startswith(f"pair p2 is {view['state']}, copy ") for r in st["reasons"])
    cluster.cli("pair", "set", "p2", "--copy-rate", "0")
    cluster.wait_pair("A", "p2", timeout=60)
    assert status(cluster)[0] == 0


def test_resync_without_wait_says_what_it_started(cluster: ClusterProc) -> None:
    assert cluster.cli("pair", "split", "p1").returncode == 0
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 3 0 4M", cluster.uri("A", "p1")],
                   check=True, capture_output=True)
    p = cluster.cli("pair", "resync", "p1")
    assert p.returncode == 0, p.stderr
    said = flat(p.stdout)
    assert said.startswith("pair p1 on A: resync started from A, ") and said.endswith(
        "chunks to copy; the pair reads " + said.split("the pair reads ")[1])
    todo, total = said.split("started from A, ")[1].split(" chunks")[0].split(" of ")
    assert int(total) > 0 and 0 <= int(todo) <= int(total)
    cluster.wait_pair("A", "p1")
    assert cluster.cli("pair", "resync", "p1").stdout.strip() == (
        "pair p1 on A: already mirrored, nothing to copy")


def test_a_node_down_is_degraded_everywhere(cluster: ClusterProc) -> None:
    cluster.kill9("B")
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        rc, st = status(cluster)
        if "host path p1 via B is down" in st["reasons"]:
            break
        time.sleep(0.2)
    assert rc == 1 and st["verdict"] == "degraded"
    assert st["reasons"][:2] == ["node B is down", "pair p1 is suspended"]
    assert "pair p1 has lost its side on B" in st["reasons"]
    assert st["pairs"]["p1"]["serving"] == ["A"]
    host = json.loads(cluster.cli("host", "status", "--json").stdout)
    path = host["exports"]["p1"]["paths"]["B"]
    assert (path["state"], path["io_mode"]) == ("down", None)  # not idle / mirror
    assert path["reason"].startswith("node B not reachable")
    table = flat(cluster.cli("host", "status").stdout)
    assert "│ B │ down │ - │" in table
    assert cluster.cli("node", "status").returncode == 1
    p = cluster.cli("status")
    assert p.returncode == 1 and p.stdout.startswith("twinvol test: DEGRADED")
    assert "- node B is down" in p.stdout


def test_all_nodes_down_is_down(cluster: ClusterProc) -> None:
    cluster.kill9("A")
    rc, st = status(cluster)
    assert (rc, st["verdict"], st["exit_code"]) == (2, "down", 2)
    assert st["reasons"][0] == "no node answers"
    p = cluster.cli("status")
    assert p.returncode == 2 and p.stdout.startswith("twinvol test: DOWN")

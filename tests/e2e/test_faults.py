"""Fault relay end to end: nodes A, B, C as real processes, a host agent whose paths are
only A and B, reports of the far node C reaching it through A or B."""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from clusterproc import ClusterProc
from linkproxy import LinkProxy

pytestmark = pytest.mark.e2e

C_FAULTS = {"capacity_quota": "64M", "capacity_warn": 0.5, "capacity_critical": 0.95,
            "check_interval": 0.2, "rate_burst": 5, "rate_window": 1.0}


def host_get(c: ClusterProc, path: str) -> Any:
    assert c.cfg.host is not None
    req = urllib.request.Request(f"http://{c.cfg.host['api']}{path}",
                                 headers={"Authorization": f"Bearer {c.cfg.cluster.secret}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def host_faults(c: ClusterProc) -> list[dict[str, Any]]:
    return [e["report"] for e in host_get(c, "/api/v1/faults")["faults"]]


def wait_for(what: str, check: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def route_of(c: ClusterProc, node: str) -> str | None:
    _, body = c.api(node, "GET", "/api/v1/faults/status")
    return body["route"]  # type: ignore[no-any-return]


def wait_routed(c: ClusterProc) -> str:
    """Until C sends to a path node that the host agent follows; returns that node."""
    return wait_for("C's fault route to a node hosts follow",
                    lambda: (r := route_of(c, "C")) in ("A", "B") and all(
                        s["state"] == "up" for s in
                        host_get(c, "/api/v1/status")["faults"]["streams"].values()) and r)


def raise_on(c: ClusterProc, node: str, description: str, **kw: Any) -> dict[str, Any]:
    status, body = c.api(node, "POST", "/api/v1/faults/test",
                         {"description": description, **kw})
    assert status == 200, body
    return body  # type: ignore[no-any-return]


def cluster(tmp: str, sinks: list[dict[str, Any]] | None = None) -> ClusterProc:
    c = ClusterProc(tmp, ("A", "B", "C"), host=True)
    assert c.cfg.host is not None
    c.cfg.host["nodes"] = ["A", "B"]  # the host has no path to the far site C
    if sinks:
        c.cfg.host["sinks"] = sinks
    c.cfg.nodes["C"].faults = dict(C_FAULTS)
    c.rewrite()
    return c


class Hooks(BaseHTTPRequestHandler):
    received: list[dict[str, Any]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Hooks.received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def sinks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A working webhook, a webhook that accepts and never answers, a UDP syslog
    receiver and a command hook writing to a file."""
    tmp = tmp_path_factory.mktemp("sinks")
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hooks)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    hang = socket.create_server(("127.0.0.1", 0))  # listens, never accepts or answers
    syslog = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    syslog.bind(("127.0.0.1", 0))
    syslog.settimeout(5)
    out = tmp / "hook.out"
    script = tmp / "hook.py"
    script.write_text("import os, sys\nwith open(sys.argv[1], 'a') as f:\n"
                      "    f.write(os.environ['TWINVOL_FAULT_ID'] + ' ' + sys.stdin.read()"
                      " + '\\n')\n")
    yield {"config": [
        {"type": "webhook", "url": f"http://127.0.0.1:{hang.getsockname()[1]}/", "timeout": 30},
        {"type": "webhook", "url": f"http://127.0.0.1:{server.server_address[1]}/hook"},
        {"type": "syslog", "address": f"127.0.0.1:{syslog.getsockname()[1]}"},
        {"type": "command", "command": [sys.executable, str(script), str(out)]}],
        "syslog": syslog, "out": out}
    server.shutdown()
    hang.close()
    syslog.close()


@pytest.fixture(scope="module")
def abc(tmp_path_factory: pytest.TempPathFactory, sinks: dict[str, Any]
        ) -> Iterator[ClusterProc]:
    c = cluster(str(tmp_path_factory.mktemp("faults")), sinks["config"])
    try:
        c.start()
        wait_routed(c)
        yield c
    finally:
        c.stop()


def test_full_data_directory_on_far_node_reaches_host_through_a_path_node(
        abc: ClusterProc) -> None:
    c = abc
    filler = os.path.join(c.dir, "data-C", "filler")
    with open(filler, "wb") as f:  # 40 of the 64 MiB quota: past the 50 % threshold
        for _ in range(40):
            f.write(os.urandom(1 << 20))
        f.flush()
        os.fsync(f.fileno())
    try:
        got = wait_for("C's capacity report at the host", lambda: [
            r for r in host_faults(c) if r["origin"] == "C" and r["kind"] == "capacity_low"
            and r["state"] == "raised"])
        r = got[0]
        hops = [h["node"] for h in r["path"]]
        assert hops[0] == "C" and hops[1] in ("A", "B") and hops[2] == "host", hops
        assert r["component"] == "capacity" and r["severity"] == "warning"
        assert "quota" in r["description"] and r["action"]
        # From C raising it to the host having it: under a second (relay, not detection).
        relay = r["path"][2]["time"] - r["path"][0]["time"]
        assert relay < 1.0, relay
        # The operator sees it with the path it took.
        res = c.cli("events", "--json")
        assert res.returncode == 0, res.stderr
        ids = [e["report"]["id"] for e in json.loads(res.stdout)["faults"]]
        assert r["id"] in ids
        res = c.cli("events")
        assert res.returncode == 0, res.stderr
        assert "capacity/capacity_low" in res.stdout and f"C -> {hops[1]} -> host" in res.stdout
    finally:
        os.unlink(filler)
    wait_for("the capacity report cleared", lambda: [
        r for r in host_faults(c) if r["origin"] == "C" and r["kind"] == "capacity_low"
        and r["state"] == "cleared"])


def test_sinks_receive_json_and_a_hanging_webhook_blocks_no_other(
        abc: ClusterProc, sinks: dict[str, Any]) -> None:
    c = abc
    ident = raise_on(c, "C", "sink check", component="disk", severity="error")
    fid = f"{ident['stream']}/{ident['last_seq']}"
    hooks = wait_for("the webhook POST", lambda: [
        h for h in Hooks.received if h["fault"]["id"] == fid], timeout=5)
    assert hooks[0]["cluster"] == "test"
    assert hooks[0]["fault"]["description"] == "sink check"
    assert [h["node"] for h in hooks[0]["fault"]["path"]][-1] == "host"
    line = wait_for("the command hook", lambda: [
        ln for ln in (sinks["out"].read_text().splitlines() if sinks["out"].exists() else [])
        if ln.startswith(fid + " ")], timeout=5)
    assert json.loads(line[0].split(" ", 1)[1])["fault"]["id"] == fid
    while True:
        msg = sinks["syslog"].recv(65536).decode()
        if fid in msg:
            break
    assert msg.startswith("<27>1 ") and "error raised disk/test on C: sink check" in msg
    status = host_get(c, "/api/v1/status")["faults"]["sinks"]
    assert status[0]["sent"] == 0 and status[1]["sent"] >= 1  # the hanging one is stuck


def test_malformed_relay_batches_are_refused_and_counted(abc: ClusterProc) -> None:
    c = abc
    _, good = c.api("C", "GET", "/api/v1/faults/status")
    stream = good["stream"]
    report = {"id": f"{stream}/99", "origin": "C", "site": "C",
              "incarnation": stream.split("/")[1], "seq": 99, "component": "disk",
              "kind": "io_error", "severity": "error", "time": 1.0, "description": "x",
              "path": [{"node": "C", "time": 1.0}]}
    bad = [
        {"origin": "C", "stream": stream, "reports": [{**report, "id": "C/0/1"}]},
        {"origin": "C", "stream": stream, "reports": [{**report, "severity": "apocalyptic"}]},
        {"origin": "C", "stream": stream, "reports": [{**report, "extra": 1}]},
        {"origin": "Z", "stream": "Z/00000000", "reports": []},
        {"origin": "C", "stream": stream, "reports": [{**report, "path": []}]},
        {"origin": "B", "stream": stream, "reports": [report]},
    ]
    for body in bad:
        status, answer = c.api("A", "POST", "/api/v1/faults/relay", body)
        assert status == 400 and "fault report refused" in answer["error"]["message"], answer
    req = urllib.request.Request(c.cfg.node("A").api_url + "/api/v1/faults/relay",
                                 data=b"\xff{not json", method="POST",
                                 headers={"Authorization": "Bearer test-secret"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=5)
    assert e.value.code == 400
    req = urllib.request.Request(c.cfg.node("A").api_url + "/metrics",
                                 headers={"Authorization": "Bearer test-secret"})
    metrics = urllib.request.urlopen(req, timeout=5).read().decode()
    assert 'twinvol_faults_refused_total{node="A",site="A"} 7.0' in metrics
    assert "twinvol_nbd_requests_total" in metrics
    assert not [r for r in host_faults(c) if r["seq"] == 99 and r["origin"] == "C"]


def test_event_storm_is_summarised_keeping_first_and_last(abc: ClusterProc) -> None:
    c = abc
    ans = raise_on(c, "C", "storm", kind="storm", count=5000)
    assert ans["reported"] == C_FAULTS["rate_burst"]
    storm = wait_for("the storm summary", lambda: (got := [
        r for r in host_faults(c) if r["origin"] == "C" and r["kind"] == "storm"])
        and got[-1]["count"] > 1 and got, timeout=10)
    assert storm[0]["description"] == "storm #1"
    assert len(storm) == C_FAULTS["rate_burst"] + 1
    summary = storm[-1]
    assert summary["count"] == 5000 - C_FAULTS["rate_burst"]
    assert summary["description"].startswith("storm #5000 [summary: 4995 such reports")
    assert summary["first_time"] <= summary["time"]


def test_report_made_while_the_link_is_cut_arrives_once_when_it_returns(
        tmp_path: Any) -> None:
    c = cluster(str(tmp_path))
    proxies = {n: LinkProxy(c.cfg.node(n).api_hostport) for n in ("A", "B")}
    for n, p in proxies.items():
        c.route_api("C", n, p.addr)
    try:
        c.start()
        wait_routed(c)
        for p in proxies.values():
            p.cut()
        ident = raise_on(c, "C", "raised while cut off")
        fid = f"{ident['stream']}/{ident['last_seq']}"
        time.sleep(3)
        assert fid not in [r["id"] for r in host_faults(c)]
        _, body = c.api("C", "GET", "/api/v1/faults/status")
        assert body["pending"] >= 1
        for p in proxies.values():
            p.restore()
        wait_for("the report after the link returned",
                 lambda: fid in [r["id"] for r in host_faults(c)], timeout=15)
        time.sleep(2.5)  # any resend would have arrived by now
        assert [r["id"] for r in host_faults(c)].count(fid) == 1
        with open(os.path.join(c.dir, "host-faults.jsonl")) as f:
            assert sum(1 for ln in f if json.loads(ln)["id"] == fid) == 1
    finally:
        c.stop()
        for p in proxies.values():
            p.close()


def test_reports_route_through_the_other_path_node_when_the_relay_dies(
        tmp_path: Any) -> None:
    c = cluster(str(tmp_path))
    try:
        c.start()
        relay = wait_routed(c)
        other = "B" if relay == "A" else "A"
        first = raise_on(c, "C", "before the relay died")
        fid = f"{first['stream']}/{first['last_seq']}"
        got = wait_for("first report", lambda: [r for r in host_faults(c) if r["id"] == fid])
        assert got[0]["path"][1]["node"] == relay
        c.kill9(relay)
        second = raise_on(c, "C", "after the relay died")
        sid = f"{second['stream']}/{second['last_seq']}"
        got = wait_for("second report through the other node",
                       lambda: [r for r in host_faults(c) if r["id"] == sid], timeout=15)
        assert [h["node"] for h in got[0]["path"]] == ["C", other, "host"]
        ids = [r["id"] for r in host_faults(c)]
        assert ids.count(fid) == 1 and ids.count(sid) == 1
    finally:
        c.stop()


def test_backing_write_error_is_reported_and_the_node_keeps_serving(tmp_path: object) -> None:
    """A write the backing file refuses (here: a file-size limit put on the running node,
    so writes past 8 MiB fail with EFBIG) gets an NBD error, raises a disk fault that
    reaches the host agent, and every other request is still served."""
    import resource
    import subprocess

    c = ClusterProc(str(tmp_path), names=("A",), host=True)
    c.start()
    try:
        status, body = c.api("A", "POST", "/api/v1/volumes", {"name": "vol", "size": "16M"})
        assert status == 201, body
        pid = c.sup.components["A"].pid
        assert pid is not None
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (8 << 20, 8 << 20))
        uri = c.uri("A", "vol")
        bad = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x11 12M 64k", uri],
                             capture_output=True, text=True, timeout=60)
        assert "write failed" in bad.stdout + bad.stderr, bad.stdout + bad.stderr
        good = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x22 1M 64k",
                               "-c", "read -P 0x22 1M 64k", uri],
                              capture_output=True, text=True, timeout=60)
        assert good.returncode == 0 and "verification failed" not in good.stdout, good.stdout
        report = wait_for("the io_error report at the host agent", lambda: next(
            (r for r in host_faults(c) if r["kind"] == "io_error"), None))
        assert report["component"] == "disk" and report["origin"] == "A"
        assert report["subject"] == "vol" and "offset 12582912" in report["description"]
    finally:
        c.stop()

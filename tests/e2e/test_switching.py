"""Host-transparent volume switching with real node processes and real clients: one libnbd
connection stays open across switch and switch back, fio verifies through the host agent
while its volume is switched, the table survives restarts, and refusals leave it as it was."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from clusterproc import ClusterProc
from twinvol.supervisor import twinvol_argv

pytestmark = pytest.mark.e2e

MiB = 1 << 20

# One libnbd connection driven from stdin: `w OFF LEN BYTE`, `r OFF LEN`, `f`. A read
# answers the distinct byte values it found, so a test sees which copy served it.
CLIENT = r"""
import sys, nbd
h = nbd.NBD()
h.set_strict_mode(nbd.STRICT_COMMANDS | nbd.STRICT_BOUNDS | nbd.STRICT_ZERO_SIZE)
h.connect_uri(sys.argv[1])
print("ready", flush=True)
for line in sys.stdin:
    op, *a = line.split()
    try:
        if op == "w":
            h.pwrite(bytes([int(a[2], 0)]) * int(a[1]), int(a[0]))
            print("ok", flush=True)
        elif op == "r":
            data = h.pread(int(a[1]), int(a[0]))
            print(" ".join(hex(b) for b in sorted(set(data))), flush=True)
        elif op == "f":
            h.flush()
            print("ok", flush=True)
    except nbd.Error as e:
        print("error", e, flush=True)
h.shutdown()
"""


class Client:
    """A libnbd client process that keeps one NBD connection open."""

    def __init__(self, uri: str) -> None:
        self.p = subprocess.Popen(["/usr/bin/python3", "-c", CLIENT, uri], text=True,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.ask_raw(None) == "ready"

    def ask_raw(self, line: str | None) -> str:
        assert self.p.stdin is not None and self.p.stdout is not None
        if line is not None:
            self.p.stdin.write(line + "\n")
            self.p.stdin.flush()
        return self.p.stdout.readline().strip()

    def write(self, off: int, length: int, byte: int) -> None:
        assert self.ask_raw(f"w {off} {length} {byte}") == "ok"

    def read(self, off: int, length: int) -> str:
        return self.ask_raw(f"r {off} {length}")

    def close(self) -> None:
        assert self.p.stdin is not None
        self.p.stdin.close()
        assert self.p.wait(timeout=10) == 0


def qemu_read(uri: str, *checks: str) -> None:
    argv = ["qemu-io", "-f", "raw", "-r"]
    for c in checks:
        argv += ["-c", c]
    p = subprocess.run([*argv, uri], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "fail" not in p.stdout, p.stdout + p.stderr


def local_pair(c: ClusterProc, vol: str, pair: str, *extra: str, wait: bool = True) -> None:
    status, body = c.api("A", "POST", "/api/v1/volumes", {"name": vol, "size": 8 * MiB})
    assert status == 201, body
    p = c.cli("pair", "create", pair, "--mode", "local", "--primary", f"A:{vol}",
              "--secondary", f"A:{vol}2", *extra, *(["--wait"] if wait else []), "--json")
    assert p.returncode == 0, p.stderr


def switch(c: ClusterProc, *args: str) -> subprocess.CompletedProcess[str]:
    return c.cli("switch", *args, "--json")


@pytest.fixture
def one(tmp_path: object) -> Iterator[ClusterProc]:
    c = ClusterProc(str(tmp_path), names=("A",))
    c.start()
    yield c
    c.stop()


def test_open_connection_follows_switch_to_split_copy_and_back(one: ClusterProc) -> None:
    c = one
    local_pair(c, "vol", "snap")
    client = Client(c.uri("A", "vol"))
    try:
        client.write(0, MiB, 0x59)            # Y: in the copy taken by the split
        client.write(MiB, MiB, 0x11)
        p = c.cli("pair", "split", "snap", "--json")
        assert p.returncode == 0, p.stderr
        client.write(0, MiB, 0x58)            # X: only on the source
        assert client.read(0, MiB) == "0x58"

        p = switch(c, "vol", "--to", "A:vol2")
        assert p.returncode == 0, p.stderr
        entry = json.loads(p.stdout)
        assert (entry["source"], entry["target"], entry["mode"], entry["pair"]) == \
            ("A:vol", "A:vol2", "local", "snap")
        # The same connection now reads the point-in-time copy and writes to it.
        assert client.read(0, MiB) == "0x59"
        assert client.read(MiB, MiB) == "0x11"
        client.write(2 * MiB, MiB, 0x5A)      # Z
        client.ask_raw("f")
        qemu_read(c.uri("A", "vol2"), "read -P 0x59 0 1M", "read -P 0x5a 2M 1M")
        # The pair and the table show it.
        show = c.pair("A", "snap")
        assert [(s["host_id"], s["target"]) for s in show["switching"]] == [("vol", "A:vol2")]
        assert show["secondary_dirty_chunks"] == 16  # Z marked for a resync
        p = c.cli("pair", "show", "snap")
        assert "vol: A:vol -> A:vol2" in p.stdout, p.stdout
        p = switch(c, "list")
        assert [e["target"] for e in json.loads(p.stdout)["entries"]] == ["A:vol2"]

        p = switch(c, "vol", "--back")
        assert p.returncode == 0, p.stderr
        # Back on the source, which never saw Z.
        assert client.read(0, MiB) == "0x58"
        assert client.read(2 * MiB, MiB) == "0x0"
        client.write(3 * MiB, 4096, 0x77)
    finally:
        client.close()
    qemu_read(c.uri("A", "vol2"), "read -P 0 3M 4k")
    assert json.loads(switch(c, "list").stdout)["entries"] == []


def test_switching_survives_node_restart(one: ClusterProc) -> None:
    c = one
    local_pair(c, "vol", "snap")
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x59 0 1M", c.uri("A", "vol")],
                   check=True, capture_output=True)
    assert c.cli("pair", "split", "snap").returncode == 0
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x58 0 1M", c.uri("A", "vol")],
                   check=True, capture_output=True)
    p = switch(c, "vol", "--to", "vol2")      # a partner's volume name is enough
    assert p.returncode == 0, p.stderr
    c.kill9("A")
    c.start("A")
    qemu_read(c.uri("A", "vol"), "read -P 0x59 0 1M")
    assert [e["target"] for e in c.api("A", "GET", "/api/v1/switching")[1]["entries"]] \
        == ["A:vol2"]
    # Refused while switched: resyncing would overwrite the copy the host is using.
    p = c.cli("pair", "resync", "snap")
    assert p.returncode == 1
    assert "export 'vol' is switched from A:vol to A:vol2; run `twinvol switch vol --back` " \
           "before you resync local pair 'snap'" in p.stderr
    assert switch(c, "vol", "--back").returncode == 0
    qemu_read(c.uri("A", "vol"), "read -P 0x58 0 1M")


def test_refusals_leave_the_table_unchanged(one: ClusterProc) -> None:
    c = one
    local_pair(c, "vol", "snap", "--copy-rate", "1M", wait=False)   # stays copying ~8 s
    local_pair(c, "w", "wsnap")
    status, _ = c.api("A", "POST", "/api/v1/volumes", {"name": "other", "size": 8 * MiB})
    assert status == 201
    cases = [
        (("vol", "--to", "A:other"), "A:other is not a pair partner of A:vol (its partners: "
                                     "A:vol2 (local pair snap))"),
        (("vol", "--to", "A:vol2"), "local pair 'snap' is copying: A:vol2 is not a "
                                    "consistent copy until the pair is mirrored or split"),
        (("nosuch", "--to", "A:vol2"), "export 'nosuch' does not exist on node A"),
        (("vol", "--to", "B:vol2"), "B:vol2 is not a pair partner of A:vol"),
        (("vol", "--back"), "export 'vol' is not switched on node A"),
        (("vol", "--to", "A:vol"), "A:vol is the source volume itself"),
    ]
    for args, message in cases:
        p = c.cli("switch", *args)
        assert p.returncode == 1, (args, p.stdout)
        assert p.stderr.startswith("twinvol: error: node A: ") and message in p.stderr, \
            (args, p.stderr)
    assert c.pair("A", "snap")["state"] == "copying"
    assert c.api("A", "GET", "/api/v1/switching")[1]["entries"] == []

    # Concurrent switch commands for one export: one wins, the other is refused clearly.
    results: list[tuple[int, Any]] = []

    def go() -> None:
        results.append(c.api("A", "POST", "/api/v1/switching",
                             {"host_id": "w", "to": "A:w2"}))

    assert c.cli("pair", "split", "wsnap").returncode == 0
    client = Client(c.uri("A", "w"))  # an open connection to drain makes the switch take a step
    try:
        threads = [threading.Thread(target=go) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        codes = sorted(s for s, _ in results)
        assert codes == [201, 409, 409], results
        for s, body in results:
            if s == 409:
                msg = body["error"]["message"]
                assert "a switch of export 'w' is already in progress on node A" in msg \
                    or "export 'w' is already switched to A:w2" in msg, msg
        entries = c.api("A", "GET", "/api/v1/switching")[1]["entries"]
        assert [(e["host_id"], e["target"]) for e in entries] == [("w", "A:w2")]
        # Deleting what the table uses is refused too.
        p = c.cli("pair", "delete", "wsnap")
        assert p.returncode == 1 and "run `twinvol switch w --back`" in p.stderr
        assert switch(c, "w", "--back").returncode == 0
    finally:
        client.close()


def _agent_status(c: ClusterProc) -> dict[str, Any]:
    assert c.cfg.host is not None
    req = urllib.request.Request(f"http://{c.cfg.host['api']}/api/v1/status",
                                 headers={"Authorization": f"Bearer {c.cfg.cluster.secret}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())  # type: ignore[no-any-return]


def test_fio_verify_through_host_agent_across_switch_to_in_sync_copy(tmp_path: Any) -> None:
    c = ClusterProc(str(tmp_path), names=("A",), host=True)
    c.start()
    try:
        local_pair(c, "vol", "snap")        # mirrored: the copy is in sync
        fio = subprocess.Popen(
            ["fio", "--name=sw", "--ioengine=nbd", f"--uri={c.host_uri('vol')}",
             "--rw=randwrite", "--bs=4k", "--size=8M", "--iodepth=8", "--rate_iops=1200",
             "--verify=crc32c", "--verify_backlog=256", "--verify_state_save=0",
             "--output-format=json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(0.4)
        p = switch(c, "vol", "--to", "A:vol2")   # carried by the host agent
        assert p.returncode == 0, p.stderr
        assert fio.poll() is None, "fio ended before the switch: the test proves nothing"
        assert json.loads(p.stdout)["nodes"] == ["A"]
        assert _agent_status(c)["switching"]["vol"]["target"] == "A:vol2"
        out, err = fio.communicate(timeout=60)
        assert fio.returncode == 0, err
        job = json.loads(out[out.index("{"):])["jobs"][0]
        assert job["error"] == 0 and job["write"]["total_ios"] == 2048
        # Writes through the in-sync copy kept the pair mirrored: source == target.
        assert c.pair("A", "snap")["state"] == "mirrored"
        qemu_read(c.host_uri("vol"), "read 0 8M")
        # The host agent restarts and learns the table from the node.
        c.kill9("host")
        assert c.cfg.host is not None
        c.sup.start("host", twinvol_argv("host", "run", "--cluster", c.path),
                    str(tmp_path / "host2.log"))
        c.sup.wait_http("host", f"http://{c.cfg.host['api']}/api/v1/health")
        deadline = time.monotonic() + 10
        while "vol" not in _agent_status(c)["switching"]:
            assert time.monotonic() < deadline, _agent_status(c)
            time.sleep(0.1)
        p = switch(c, "vol", "--back")
        assert p.returncode == 0, p.stderr
        assert _agent_status(c)["switching"] == {}
    finally:
        c.stop()


def test_agent_refuses_switch_without_secret(tmp_path: Any) -> None:
    c = ClusterProc(str(tmp_path), names=("A",), host=True)
    c.start()
    try:
        assert c.cfg.host is not None
        req = urllib.request.Request(f"http://{c.cfg.host['api']}/api/v1/switch",
                                     data=b'{"export": "x", "to": "A:y"}', method="POST")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        assert e.value.code == 401
    finally:
        c.stop()


def test_table_reaches_every_node_that_serves_the_host(tmp_path: Any) -> None:
    """Active-active volume on A and B, local copy on A: the table goes to both nodes, B
    refuses the export so the host agent uses A only, and a switch that cannot reach B is
    refused with the table unchanged."""
    c = ClusterProc(str(tmp_path), names=("A", "B"), host=True)
    c.start()
    try:
        c.wait_peer("A", "B")
        assert c.api("A", "POST", "/api/v1/volumes", {"name": "vol", "size": 8 * MiB})[0] == 201
        p = c.cli("pair", "create", "vol", "--mode", "active-active", "--primary", "A",
                  "--secondary", "B", "--wait")
        assert p.returncode == 0, p.stderr
        p = c.cli("pair", "create", "snap", "--mode", "local", "--primary", "A:vol",
                  "--secondary", "A:vol2", "--wait")
        assert p.returncode == 0, p.stderr
        host = c.host_uri("vol")
        subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x59 0 1M", host], check=True,
                       capture_output=True)
        assert c.cli("pair", "split", "snap").returncode == 0
        subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x58 0 1M", host], check=True,
                       capture_output=True)
        p = switch(c, "vol", "--to", "A:vol2")
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout)["nodes"] == ["A", "B"]
        _, eb = c.api("B", "GET", "/api/v1/exports/vol")
        assert eb["io_mode"] == "block" and eb["switched"]["target"] == "A:vol2"
        assert eb["switched"]["here"] == "refuses the export to hosts"
        qemu_read(host, "read -P 0x59 0 1M")
        # B is down: switching back must not leave B serving the old copy later.
        c.kill9("B")
        p = switch(c, "vol", "--back")
        assert p.returncode == 1
        assert "switch refused, the table is unchanged: node B, which serves this host, is " \
               "not reachable" in p.stderr, p.stderr
        assert [e["target"] for e in c.api("A", "GET", "/api/v1/switching")[1]["entries"]] \
            == ["A:vol2"]
        qemu_read(host, "read -P 0x59 0 1M")
        c.start("B")
        _, eb = c.api("B", "GET", "/api/v1/exports/vol")
        assert eb["io_mode"] == "block" and eb["switched"]["target"] == "A:vol2"
        p = switch(c, "vol", "--back")
        assert p.returncode == 0, p.stderr
        assert c.api("B", "GET", "/api/v1/switching")[1]["entries"] == []
        qemu_read(host, "read -P 0x58 0 1M")
    finally:
        c.stop()


def test_switch_to_a_far_copy_after_its_takeover(tmp_path: Any) -> None:
    """A remote (async) partner is a switching target only once its site took over."""
    c = ClusterProc(str(tmp_path), names=("A", "C"), host=True)
    c.start()
    try:
        c.wait_peer("A", "C")
        status, body = c.api("A", "POST", "/api/v1/volumes", {"name": "vol", "size": 8 * MiB})
        assert status == 201, body
        p = c.cli("pair", "create", "vol-dr", "--mode", "async", "--primary", "A:vol",
                  "--secondary", "C:vol", "--wait", "--json")
        assert p.returncode == 0, p.stderr
        w = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x5e 0 1M",
                            c.host_uri("vol")], capture_output=True, text=True, timeout=60)
        assert w.returncode == 0, w.stderr
        p = switch(c, "vol", "--to", "C:vol")
        assert p.returncode == 1 and "serves no host before `twinvol dr takeover" in p.stderr
        deadline = time.monotonic() + 20
        while True:
            rc = c.pair("C", "vol-dr")["remote_copy"]["sequence"]
            if rc["applied"] >= 1 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        p = c.cli("dr", "takeover", "--site", "C", "--force", "--json")
        assert p.returncode == 0, p.stderr
        deadline = time.monotonic() + 20     # A learns of the takeover and refuses hosts
        while c.api("A", "GET", "/api/v1/volumes/vol")[1]["io_mode"] != "block":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        p = switch(c, "vol", "--to", "C:vol")
        assert p.returncode == 0, p.stderr
        entry = json.loads(p.stdout)
        assert (entry["target"], entry["mode"]) == ("C:vol", "async")
        # Through the host agent, the far copy's data, and writes land there.
        qemu_read(c.host_uri("vol"), "read -P 0x5e 0 1M")
        w = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x5f 2M 64k",
                            c.host_uri("vol")], capture_output=True, text=True, timeout=60)
        assert w.returncode == 0, w.stderr
        qemu_read(c.uri("C", "vol"), "read -P 0x5f 2M 64k")
        assert c.pair("C", "vol-dr")["dirty_chunks"] == 1       # kept for failback
    finally:
        c.stop()

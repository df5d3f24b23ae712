"""Active-active pairs with real node processes: identity, initial copy, mirrored writes
through either node, overlapping writers, partner loss and resync of only the dirty chunks."""

from __future__ import annotations

import hashlib
import json
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator

import pytest

from clusterproc import ClusterProc, qemu_io
from linkproxy import LinkProxy

pytestmark = pytest.mark.e2e

MiB = 1 << 20


def digest(uri: str, size: int) -> str:
    out = subprocess.run(["nbdcopy", uri, "-"], capture_output=True, timeout=120, check=True)
    assert len(out.stdout) == size
    return hashlib.sha256(out.stdout).hexdigest()


def make_pair(c: ClusterProc, name: str = "vol", size: int = 16 * MiB) -> None:
    status, body = c.api("A", "POST", "/api/v1/volumes", {"name": name, "size": size,
                                                          "description": "paired"})
    assert status == 201, body
    qemu_io(c.uri("A", name), "write -P 0x5a 0 4M", f"write -P 0x33 {size // 2} 1M")
    p = c.cli("pair", "create", name, "--mode", "active-active", "--primary", "A",
              "--secondary", "B", "--wait", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["state"] == "mirrored"
    c.wait_pair("B", name, "mirrored", "mirror")


def test_pair_identity_initial_copy_and_mirrored_writes(two: ClusterProc) -> None:
    make_pair(two)
    # Both nodes export the same device under the same identity.
    _, ea = two.api("A", "GET", "/api/v1/exports/vol")
    _, eb = two.api("B", "GET", "/api/v1/exports/vol")
    assert ea["virtual_identity"] == eb["virtual_identity"]
    assert (ea["io_mode"], eb["io_mode"]) == ("mirror", "mirror")
    # /metrics: one series per pair state, 1 for the current one.
    req = urllib.request.Request(two.cfg.node("B").api_url + "/metrics",
                                 headers={"Authorization": "Bearer " + two.cfg.cluster.secret})
    metrics = urllib.request.urlopen(req, timeout=5).read().decode()
    assert 'twinvol_pair_state{node="B",pair="vol",site="B",state="mirrored"} 1.0' in metrics
    for other in ("simplex", "copying", "split", "suspended", "takeover"):
        assert f'pair="vol",site="B",state="{other}"}} 0.0' in metrics
    # The initial copy brought A's data to B.
    qemu_io(two.uri("B", "vol"), "read -P 0x5a 0 4M", "read -P 0x33 8M 1M", "read -P 0 4M 4M")
    # A write through A is read through B, and the other way round.
    qemu_io(two.uri("A", "vol"), "write -P 0x11 1M 64k", "flush")
    # Forwarded writes, small and large (the primary refers to the data B holds).
    qemu_io(two.uri("B", "vol"), "read -P 0x11 1M 64k", "write -P 0x22 2M 64k",
            "write -f -P 0x23 3M 4k", "write -z 9M 64k", "discard 10M 64k",
            "write -P 0x24 12M 3M", "write -P 0x25 13M 4k")
    qemu_io(two.uri("A", "vol"), "read -P 0x22 2M 64k", "read -P 0x23 3M 4k",
            "read -P 0 9M 64k", "read -P 0 10M 64k", "read -P 0x24 12M 1M",
            "read -P 0x25 13M 4k", "read -P 0x24 13316k 2044k")
    assert digest(two.uri("A", "vol"), 16 * MiB) == digest(two.uri("B", "vol"), 16 * MiB)
    # Both sides report the pair.
    a, b = two.pair("A", "vol"), two.pair("B", "vol")
    assert (a["role"], b["role"]) == ("primary", "secondary")
    assert a["generation"]["current"] == b["generation"]["current"]


def test_overlapping_writers_through_both_nodes(two: ClusterProc) -> None:
    make_pair(two, size=8 * MiB)
    errors: list[str] = []

    def writer(node: str, pattern: int) -> None:
        p = subprocess.run(["fio", "--name=ov", "--ioengine=nbd", f"--uri={two.uri(node, 'vol')}",
                            "--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=8m",
                            "--io_size=16m", f"--buffer_pattern=0x{pattern:02x}",
                            "--randseed=" + str(pattern)],
                           capture_output=True, text=True, timeout=300)
        if p.returncode:
            errors.append(p.stderr)

    ts = [threading.Thread(target=writer, args=("A", 0xA1)),
          threading.Thread(target=writer, args=("B", 0xB2))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors
    assert digest(two.uri("A", "vol"), 8 * MiB) == digest(two.uri("B", "vol"), 8 * MiB)


def test_secondary_killed_then_resync_moves_only_dirty_chunks(two: ClusterProc) -> None:
    make_pair(two, size=32 * MiB)
    two.kill9("B")
    # A continues alone (no witness configured: the primary continues).
    two.wait_pair("A", "vol", "suspended", "local")
    qemu_io(two.uri("A", "vol"), "write -P 0x77 0 64k", "write -P 0x78 20M 128k", "flush")
    a = two.pair("A", "vol")
    assert a["dirty_chunks"] == 3  # one 64 KiB chunk + two
    two.start("B")
    a = two.wait_pair("A", "vol", "mirrored", "mirror")
    two.wait_pair("B", "vol", "mirrored", "mirror")
    assert a["copy"]["bytes_sent"] == 3 * 64 * 1024
    assert a["dirty_chunks"] == 0
    qemu_io(two.uri("B", "vol"), "read -P 0x77 0 64k", "read -P 0x78 20M 128k")
    assert digest(two.uri("A", "vol"), 32 * MiB) == digest(two.uri("B", "vol"), 32 * MiB)


def test_pair_bad_input(two: ClusterProc) -> None:
    def err(*args: str) -> str:
        p = two.cli(*args)
        assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1, p.stderr
        return lines[0]

    assert "does not exist" in err("pair", "create", "nope", "--primary", "A",
                                   "--secondary", "B")
    two.api("A", "POST", "/api/v1/volumes", {"name": "sz", "size": 4 * MiB})
    two.api("B", "POST", "/api/v1/volumes", {"name": "sz", "size": 8 * MiB})
    assert "sizes must match" in err("pair", "create", "sz", "--primary", "A",
                                     "--secondary", "B")
    assert "different nodes" in err("pair", "create", "sz", "--primary", "A",
                                    "--secondary", "A")
    assert "not in cluster file" in err("pair", "create", "sz", "--primary", "A",
                                        "--secondary", "Q")
    # Nothing changed: both volumes still simplex with their own sizes.
    _, a = two.api("A", "GET", "/api/v1/volumes/sz")
    _, b = two.api("B", "GET", "/api/v1/volumes/sz")
    assert (a["size"], b["size"], a["io_mode"], b["io_mode"]) == (4 * MiB, 8 * MiB,
                                                                  "local", "local")
    _, pairs = two.api("A", "GET", "/api/v1/pairs")
    assert pairs["pairs"] == []
    assert "does not exist" in err("pair", "show", "ghost")


def proxied(directory: str, witness: bool = False) -> tuple[ClusterProc, LinkProxy]:
    """Nodes A and B whose peer link runs through a proxy the test can cut."""
    c = ClusterProc(directory, witness=witness)
    real_b = c.cfg.node("B").peer
    assert real_b is not None
    host, port = real_b.rsplit(":", 1)
    proxy = LinkProxy((host, int(port)))
    c.route_peer("A", "B", proxy.addr)  # A dials B, so the whole link crosses the proxy
    c.start()
    return c, proxy


def test_link_cut_exactly_one_side_writes(tmp_path: object) -> None:
    c, proxy = proxied(str(tmp_path))
    try:
        c.wait_peer("A", "B")
        make_pair(c, size=8 * MiB)
        proxy.cut()
        c.wait_pair("A", "vol", "suspended", "local")
        c.wait_pair("B", "vol", "suspended", "block")
        qemu_io(c.uri("A", "vol"), "write -P 0x44 0 64k", "flush")
        p = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x45 0 64k",
                            c.uri("B", "vol")], capture_output=True, text=True, timeout=60)
        assert p.returncode != 0  # the stale side refuses hosts
        _, eb = c.api("B", "GET", "/api/v1/exports/vol")
        assert eb["io_mode"] == "block"
        proxy.restore()
        c.wait_pair("A", "vol", "mirrored", "mirror")
        c.wait_pair("B", "vol", "mirrored", "mirror")
        qemu_io(c.uri("B", "vol"), "read -P 0x44 0 64k")
        assert digest(c.uri("A", "vol"), 8 * MiB) == digest(c.uri("B", "vol"), 8 * MiB)
    finally:
        c.stop()
        proxy.close()


def test_peer_with_wrong_secret_is_refused(tmp_path: object) -> None:
    c = ClusterProc(str(tmp_path), names=("A", "B"))
    from twinvol import cluster as cluster_mod

    bad = cluster_mod.load(c.path)
    bad.cluster.secret = "not-the-secret"
    path = str(tmp_path) + "/cluster-B.toml"
    cluster_mod.dump(bad, path)
    c.node_files["B"] = path
    c.start()
    try:
        deadline = time.monotonic() + 10
        reasons: list[str] = []
        while not reasons and time.monotonic() < deadline:
            for n, secret in (("A", None), ("B", "not-the-secret")):
                _, body = c.api(n, "GET", "/api/v1/events", secret=secret)
                reasons += [str(e["reason"]) for e in body["events"]
                            if e["type"] == "peer_refused"]
            time.sleep(0.1)
        # Whichever side checks first refuses; the other just sees the link close.
        assert any("wrong cluster secret" in r for r in reasons), reasons
        c.api("A", "POST", "/api/v1/volumes", {"name": "s", "size": MiB})
        p = c.cli("pair", "create", "s", "--primary", "A", "--secondary", "B")
        assert p.returncode == 1 and "not connected" in p.stderr
        _, body = c.api("A", "GET", "/api/v1/events")
        assert not [e for e in body["events"] if e["type"] == "peer_up"]
        # The management API wants the secret too (the health probe excepted).
        status, err = c.api("A", "GET", "/api/v1/volumes", secret="wrong")
        assert status == 401 and err["error"]["code"] == "unauthorized"
    finally:
        c.stop()


def test_verify_finds_blocks_and_repairs_a_planted_mismatch(two: ClusterProc) -> None:
    make_pair(two, size=16 * MiB)
    qemu_io(two.uri("A", "vol"), "write -P 0x61 5M 256k", "flush")
    clean = two.cli("pair", "verify", "vol", "--json")
    assert clean.returncode == 0, clean.stderr
    assert json.loads(clean.stdout)["mismatched_chunks"] == 0
    _, vb = two.api("B", "GET", "/api/v1/volumes/vol")
    with open(vb["path"], "r+b") as f:  # corrupt B's copy behind the node's back
        f.seek(5 * MiB + 1000)
        f.write(b"\xff" * 10)
        f.seek(12 * MiB)
        f.write(b"garbage" * 100)
    _, before = two.api("B", "GET", "/api/v1/events")
    p = two.cli("pair", "verify", "vol", "--json")
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)
    assert report["mismatched_chunks"] == 2
    assert report["mismatched_offsets"] == [5 * MiB, 12 * MiB]
    assert (report["latest"], report["stale"]) == ("A", "B")
    assert report["repaired_chunks"] == 2 and report["repaired_bytes"] == 2 * 64 * 1024
    _, after = two.api("B", "GET", f"/api/v1/events?since={before['seq']}")
    modes = [e["mode"] for e in after["events"] if e["type"] == "io_mode"]
    assert modes == ["block", "mirror"]
    qemu_io(two.uri("B", "vol"), "read -P 0x61 5M 256k", "read -P 0 12M 64k")
    assert digest(two.uri("A", "vol"), 16 * MiB) == digest(two.uri("B", "vol"), 16 * MiB)
    two.wait_pair("B", "vol", "mirrored", "mirror")


WRITER = r"""
import sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
i = 0
try:
    while True:
        h.pwrite(i.to_bytes(8, "little") * 512, (i % 2048) * 4096, nbd.CMD_FLAG_FUA)
        print("acked", i, flush=True)
        i += 1
except nbd.Error:
    pass
"""


def test_primary_killed_mid_write_returns_and_resyncs(two: ClusterProc) -> None:
    """kill -9 the primary during FUA writes: without a witness the secondary blocks; the
    primary comes back, sends what its activity log covers, and every acked write is on
    both copies."""
    make_pair(two, size=8 * MiB)
    w = subprocess.Popen(["/usr/bin/python3", "-c", WRITER, two.uri("A", "vol")],
                         stdout=subprocess.PIPE, text=True)
    assert w.stdout is not None
    last = -1
    while last < 300:
        last = int(w.stdout.readline().split()[1])
    two.kill9("A")
    for line in w.stdout:
        last = int(line.split()[1])
    w.wait(30)
    two.wait_pair("B", "vol", "suspended", "block")
    two.start("A")
    two.wait_pair("A", "vol", "mirrored", "mirror")
    two.wait_pair("B", "vol", "mirrored", "mirror")
    check = r"""
import sys, nbd
for uri in sys.argv[2:]:
    h = nbd.NBD(); h.connect_uri(uri)
    for i in range(max(0, int(sys.argv[1]) - 2047), int(sys.argv[1]) + 1):
        assert h.pread(4096, (i % 2048) * 4096) == i.to_bytes(8, "little") * 512, (uri, i)
print("OK")
"""
    out = subprocess.run(["/usr/bin/python3", "-c", check, str(last), two.uri("A", "vol"),
                          two.uri("B", "vol")], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "OK", out.stderr
    assert digest(two.uri("A", "vol"), 8 * MiB) == digest(two.uri("B", "vol"), 8 * MiB)


@pytest.fixture
def witnessed(tmp_path: object) -> Iterator[ClusterProc]:
    c = ClusterProc(str(tmp_path), witness=True)
    c.start()
    c.wait_peer("A", "B")
    yield c
    c.stop()


def test_primary_killed_witness_lets_secondary_take_over(witnessed: ClusterProc) -> None:
    c = witnessed
    make_pair(c, size=8 * MiB)
    c.kill9("A")
    b = c.wait_pair("B", "vol", "suspended", "local", timeout=20)
    assert b["role"] == "primary"  # it orders writes now
    qemu_io(c.uri("B", "vol"), "write -P 0x5b 64k 128k", "flush")
    c.start("A")
    a = c.wait_pair("A", "vol", "mirrored", "mirror", timeout=30)
    b = c.wait_pair("B", "vol", "mirrored", "mirror")
    assert (a["role"], b["role"]) == ("secondary", "primary")
    assert b["copy"]["bytes_sent"] <= 4 * 64 * 1024 + 64 * 64 * 1024  # dirty + A's AL extents
    qemu_io(c.uri("A", "vol"), "read -P 0x5b 64k 128k")
    assert digest(c.uri("A", "vol"), 8 * MiB) == digest(c.uri("B", "vol"), 8 * MiB)


def test_link_cut_with_witness_primary_keeps_writing(tmp_path: object) -> None:
    c, proxy = proxied(str(tmp_path), witness=True)
    try:
        c.wait_peer("A", "B")
        make_pair(c, size=8 * MiB)
        proxy.cut()
        # Both still reach the witness: the primary continues, the secondary blocks.
        c.wait_pair("A", "vol", "suspended", "local", timeout=20)
        c.wait_pair("B", "vol", "suspended", "block", timeout=20)
        qemu_io(c.uri("A", "vol"), "write -P 0x46 0 64k")
        proxy.restore()
        c.wait_pair("B", "vol", "mirrored", "mirror", timeout=30)
        qemu_io(c.uri("B", "vol"), "read -P 0x46 0 64k")
    finally:
        c.stop()
        proxy.close()


HELD_WRITE = r"""
import sys, time, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
c = h.aio_pwrite(b"h" * 4096, 0)
deadline = time.monotonic() + float(sys.argv[2])
state = "held"
while time.monotonic() < deadline:
    h.poll(100)
    try:
        if h.aio_command_completed(c):
            state = "completed"
            break
    except nbd.Error as e:
        state = "failed " + str(e)
        break
print(state)
"""


def test_no_witness_and_no_partner_means_no_writes(tmp_path: object) -> None:
    c, proxy = proxied(str(tmp_path), witness=True)
    try:
        c.wait_peer("A", "B")
        make_pair(c, size=8 * MiB)
        c.kill9("witness")
        proxy.cut()
        c.wait_pair("B", "vol", "suspended", "block", timeout=20)
        c.wait_pair("A", "vol", "suspended", timeout=20)
        # Without a lease the primary is fenced: it serves nothing, a write
        # is refused at negotiation, never acknowledged alone.
        out = subprocess.run(["/usr/bin/python3", "-c", HELD_WRITE, c.uri("A", "vol"), "3"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode != 0 and "prevents NBD_OPT_GO" in out.stderr, out.stdout + out.stderr
        assert c.pair("A", "vol")["io_mode"] != "local"
    finally:
        c.stop()
        proxy.close()


def test_initial_copy_resumes_from_its_cursor_after_kill9(two: ClusterProc) -> None:
    size = 256 * MiB
    status, _ = two.api("A", "POST", "/api/v1/volumes", {"name": "big", "size": size})
    assert status == 201
    subprocess.run(["fio", "--name=fill", "--ioengine=nbd", f"--uri={two.uri('A', 'big')}",
                    "--rw=write", "--bs=1m", "--iodepth=8", f"--size={size}",
                    "--refill_buffers=1"], check=True, capture_output=True, timeout=300)
    status, body = two.api("A", "POST", "/api/v1/pairs", {"name": "big", "secondary": "B"})
    assert status == 201, body
    deadline = time.monotonic() + 60
    while True:
        cur = two.pair("A", "big")["copy"]["cursor"]
        if cur >= 256 or time.monotonic() > deadline:  # 16 MiB copied and checkpointed
            break
        time.sleep(0.005)
    two.kill9("A")
    two.start("A")
    a = two.wait_pair("A", "big", "mirrored", "mirror", timeout=120)
    total = size // (64 * 1024)
    assert a["copy"]["bytes_sent"] <= (total - cur) * 64 * 1024  # nothing before the cursor
    assert a["copy"]["bytes_sent"] > 0
    assert digest(two.uri("A", "big"), size) == digest(two.uri("B", "big"), size)


def test_split_resync_and_resync_from_the_secondary(two: ClusterProc) -> None:
    make_pair(two, size=8 * MiB)
    p = two.cli("pair", "split", "vol", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["state"] == "split"
    two.wait_pair("B", "vol", "split", "block")
    qemu_io(two.uri("A", "vol"), "write -P 0x91 0 64k")
    p = two.cli("pair", "resync", "vol", "--wait", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["copy"]["bytes_sent"] == 64 * 1024
    two.wait_pair("B", "vol", "mirrored", "mirror")
    qemu_io(two.uri("B", "vol"), "read -P 0x91 0 64k")
    # Split again, change A, then choose B's data: A's change is rolled back.
    assert two.cli("pair", "split", "vol").returncode == 0
    qemu_io(two.uri("A", "vol"), "write -P 0x92 0 64k")
    p = two.cli("pair", "resync", "vol", "--from", "B", "--wait", "--json")
    assert p.returncode == 0, p.stderr
    b = two.wait_pair("B", "vol", "mirrored", "mirror")
    a = two.wait_pair("A", "vol", "mirrored", "mirror")
    assert (a["role"], b["role"]) == ("secondary", "primary")
    qemu_io(two.uri("A", "vol"), "read -P 0x91 0 64k")
    assert digest(two.uri("A", "vol"), 8 * MiB) == digest(two.uri("B", "vol"), 8 * MiB)


def test_pair_delete_restores_identities(two: ClusterProc) -> None:
    make_pair(two, size=4 * MiB)
    _, before_b = two.api("B", "GET", "/api/v1/volumes/vol")
    p = two.cli("pair", "delete", "vol", "--json")
    assert p.returncode == 0, p.stderr
    _, a = two.api("A", "GET", "/api/v1/volumes/vol")
    _, b = two.api("B", "GET", "/api/v1/volumes/vol")
    assert (a["io_mode"], b["io_mode"]) == ("local", "local")
    assert a["virtual_identity"] != b["virtual_identity"]  # never one device again
    assert b["virtual_identity"]["serial"] != before_b["virtual_identity"]["serial"]
    _, pairs = two.api("B", "GET", "/api/v1/pairs")
    assert pairs["pairs"] == []
    qemu_io(two.uri("B", "vol"), "write -P 0x31 0 64k", "read -P 0x31 0 64k")

"""Async remote copy with real node processes: write order at the far site, delta resync
from the standby after the primary is lost, takeover at the far site, journal overflow and
corruption, and refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from clusterproc import ClusterProc

pytestmark = pytest.mark.e2e

MiB = 1 << 20
BLOCK = 4096
BLOCKS = 256          # each volume: the writer stamps blocks 0..255

# Writes stamped blocks alternately to two volumes through one node, one at a time (so the
# order they are acknowledged in is the order the primary applied them), for `seconds`.
# Block content: (write number, volume index, block) repeated. Writes the log of
# acknowledged writes to a file (stops at the first error: its node was killed).
STAMP_WRITER = r"""
import json, random, struct, sys, time, nbd
uris, seconds, out = sys.argv[1:3], float(sys.argv[3]), sys.argv[4]
hs = []
for u in uris:
    h = nbd.NBD(); h.connect_uri(u); hs.append(h)
rng = random.Random(7)
log = []
i = 0
end = time.monotonic() + seconds
try:
    while time.monotonic() < end:
        i += 1
        v, b = i % 2, rng.randrange(256)
        hs[v].pwrite(struct.pack(">QQQ", i, v, b) * (4096 // 24) + bytes(4096 % 24), b * 4096)
        log.append((i, v, b))
    for h in hs:
        h.flush(); h.shutdown()
except nbd.Error as e:
    print("writer stopped:", e, file=sys.stderr)
with open(out, "w") as f:
    json.dump(log, f)
"""


def start_writer(c: ClusterProc, seconds: float) -> tuple[subprocess.Popen[bytes], str]:
    out = os.path.join(c.dir, "writes.json")
    return subprocess.Popen(["/usr/bin/python3", "-c", STAMP_WRITER, c.uri("A", "v1"),
                             c.uri("A", "v2"), str(seconds), out]), out


def writer_log(proc: subprocess.Popen[bytes], out: str) -> list[list[int]]:
    assert proc.wait(60) == 0
    with open(out) as f:
        return json.load(f)  # type: ignore[no-any-return]


def stamps(path: str) -> list[int]:
    """The write number stamped in each block of a volume file (0: never written)."""
    out = []
    with open(path, "rb") as f:
        for b in range(BLOCKS):
            f.seek(b * BLOCK)
            head = f.read(8)
            out.append(int.from_bytes(head, "big") if len(head) == 8 else 0)
    return out


def expected_at(log: list[list[int]], k: int) -> list[list[int]]:
    """Each block's stamp after the first k writes of the log."""
    state = [[0] * BLOCKS, [0] * BLOCKS]
    for i, v, b in log:
        if i > k:
            break
        state[v][b] = i
    return state


def volume_path(c: ClusterProc, node: str, vol: str) -> str:
    status, body = c.api(node, "GET", f"/api/v1/volumes/{vol}")
    assert status == 200, body
    return str(body["path"])


def remote(c: ClusterProc, node: str, pair: str) -> dict[str, Any]:
    return c.pair(node, pair)["remote_copy"]  # type: ignore[no-any-return]


def wait_applied(c: ClusterProc, feeder: str, pair: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    rc: dict[str, Any] = {}
    while time.monotonic() < deadline:
        rc = remote(c, feeder, pair)
        sq = rc["sequence"]
        if rc["group_state"] == "mirrored" and sq["applied"] == sq["written"] \
                and rc["journal_mode"] == "journal":
            return rc
        time.sleep(0.1)
    raise AssertionError(f"far copy of {pair} did not catch up: {rc}")


def wait_group_role(c: ClusterProc, node: str, pair: str, role: str) -> None:
    deadline = time.monotonic() + 20
    while remote(c, node, pair)["group_role"] != role:
        assert time.monotonic() < deadline, remote(c, node, pair)
        time.sleep(0.1)


def make_volume(c: ClusterProc, node: str, name: str, size: int) -> None:
    status, body = c.api(node, "POST", "/api/v1/volumes", {"name": name, "size": size})
    assert status == 201, body


def make_async(c: ClusterProc, name: str, volume: str, group: str, target: str = "C",
               **extra: Any) -> None:
    status, body = c.api("A", "POST", "/api/v1/pairs",
                         {"name": name, "mode": "async", "secondary": target,
                          "primary_volume": volume, "secondary_volume": volume,
                          "group": group, **extra})
    assert status == 201, body
    c.wait_pair("A", name, "mirrored", timeout=60)
    c.wait_pair(target, name, "mirrored", "block", timeout=30)


def three_sites(c: ClusterProc, size: int) -> None:
    """Volume `vol` on A, active-active with B, and its async copy `vol-dr` to C."""
    for a, b in (("A", "B"), ("A", "C"), ("B", "C")):
        c.wait_peer(a, b)
    make_volume(c, "A", "vol", size)
    status, body = c.api("A", "POST", "/api/v1/pairs", {"name": "vol", "secondary": "B"})
    assert status == 201, body
    c.wait_pair("B", "vol", "mirrored", "mirror", timeout=60)
    make_async(c, "vol-dr", "vol", "vol")


def file_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture
def ac(tmp_path: object) -> Iterator[ClusterProc]:
    c = ClusterProc(str(tmp_path), names=("A", "C"))
    c.start()
    c.wait_peer("A", "C")
    yield c
    c.stop()


def test_far_copy_is_always_a_prefix_of_the_write_sequence(ac: ClusterProc) -> None:
    c = ac
    for v in ("v1", "v2"):
        make_volume(c, "A", v, 8 * MiB)
        make_async(c, f"{v}-dr", v, "g")
    paths_c = [volume_path(c, "C", v) for v in ("v1", "v2")]
    paths_a = [volume_path(c, "A", v) for v in ("v1", "v2")]
    writer, out = start_writer(c, 2.5)
    pid_c = c.sup.components["C"].pid
    snapshots = []
    while writer.poll() is None:
        # A frozen far site is a crash at an arbitrary instant: its volumes must hold
        # exactly the first k writes of the sequence, across both volumes of the group.
        os.kill(pid_c, signal.SIGSTOP)
        try:
            snapshots.append([stamps(p) for p in paths_c])
        finally:
            os.kill(pid_c, signal.SIGCONT)
        time.sleep(0.1)
    log = writer_log(writer, out)
    assert len(log) > 200
    for snap in snapshots:
        k = max(max(s) for s in snap)
        assert snap == expected_at(log, k), f"far copy is not the prefix of {k} writes"
    assert any(0 < max(max(s) for s in snap) < len(log) for snap in snapshots)
    rc = wait_applied(c, "A", "v1-dr")
    assert rc["sequence"]["written"] == len(log)
    for pa, pc in zip(paths_a, paths_c, strict=True):
        assert file_bytes(pa) == file_bytes(pc)
    view = c.pair("C", "v2-dr")
    assert view["io_mode"] == "block"          # the far copy serves no host before DR
    assert view["remote_copy"]["sequence"]["applied"] == len(log)
    assert view["remote_copy"]["lag"] == {"sequences": 0, "seconds": 0.0, "bytes": 0}
    assert view["remote_copy"]["feeder_heard_seconds_ago"] < 5
    assert "stale" not in view["remote_copy"]
    # The lag an operator alerts on: /metrics gauges and a `pair list` column.
    req = urllib.request.Request(c.cfg.node("A").api_url + "/metrics",
                                 headers={"Authorization": "Bearer " + c.cfg.cluster.secret})
    metrics = urllib.request.urlopen(req, timeout=5).read().decode()
    labels = 'group="g",group_role="primary",node="A",pair="v1-dr",site="A"'
    for gauge in ("remote_lag_seconds", "remote_lag_writes", "remote_lag_bytes",
                  "journal_fill_ratio", "remote_status_stale"):
        assert f"twinvol_{gauge}{{{labels}}} 0.0" in metrics, gauge
    p = c.cli("pair", "list")
    assert p.returncode == 0 and "┃ lag ┃" in p.stdout, p.stdout
    # Swap exchanges active-active roles; a remote copy is refused with the reason.
    p = c.cli("pair", "swap", "v1-dr")
    assert p.returncode == 1
    assert ("pair 'v1-dr' is a remote copy (async): swap exchanges the roles of an "
            "active-active pair") in p.stderr, p.stderr
    assert c.pair("A", "v1-dr")["role"] == "primary"


def test_takeover_at_the_far_site_then_failback(ac: ClusterProc) -> None:
    c = ac
    for v in ("v1", "v2"):
        make_volume(c, "A", v, 8 * MiB)
        make_async(c, f"{v}-dr", v, "g")
    writer, out = start_writer(c, 1.5)
    pid_c = c.sup.components["C"].pid
    time.sleep(0.7)
    os.kill(pid_c, signal.SIGSTOP)       # the far site falls behind ...
    time.sleep(0.3)
    c.kill9("A")                         # ... and the primary site is lost
    log = writer_log(writer, out)
    os.kill(pid_c, signal.SIGCONT)
    p = c.cli("dr", "takeover", "--site", "B", "--json")
    assert p.returncode == 1 and "no node is at site 'B'" in p.stderr, p.stderr
    p = c.cli("dr", "takeover", "--site", "C", "--json")
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)["groups"][0]
    assert report["action"] == "serve" and report["group"] == "g"
    k = report["recovery_point"]["sequence"]
    assert 0 < k <= len(log)
    assert report["lost"]["last_written"] >= k
    # C's data is exactly the first k writes: the recovery point it reported.
    paths = [volume_path(c, "C", v) for v in ("v1", "v2")]
    assert [stamps(p) for p in paths] == expected_at(log, k)
    view = c.pair("C", "v1-dr")
    assert (view["state"], view["io_mode"]) == ("takeover", "local")
    # C serves hosts now: it reads as the primary of what it serves.
    assert view["role"] == "primary" and view["remote_copy"]["group_role"] == "primary"
    assert view["remote_copy"]["served_at"] == "C"
    p = c.cli("pair", "show", "v1-dr")
    assert "taken over at C: serves hosts, fed by nobody until `dr failback`" in \
        " ".join(p.stdout.split()), p.stdout
    # Hosts use the far copy now, under the same export name; changes are tracked.
    q = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x7e 1M 64k",
                        "-c", "read -P 0x7e 1M 64k", c.uri("C", "v1")],
                       capture_output=True, text=True, timeout=60)
    assert q.returncode == 0 and "verification failed" not in q.stdout, q.stdout + q.stderr
    assert c.pair("C", "v1-dr")["dirty_chunks"] == 1
    again = json.loads(c.cli("dr", "takeover", "--site", "C", "--json").stdout)
    assert again["groups"][0]["action"] == "none"

    # A comes back: it learns that C took over and refuses hosts until failback.
    c.start("A")
    c.wait_pair("A", "v1-dr", "suspended", timeout=20)
    _, vol = c.api("A", "GET", "/api/v1/volumes/v1")
    assert vol["io_mode"] == "block"
    p = c.cli("dr", "failback", "--json")
    assert p.returncode == 0, p.stderr
    fb = json.loads(p.stdout)["groups"][0]
    # Only what differs: C's chunk changed after the takeover, and A's writes after k.
    after_k = {(v, b * BLOCK // (64 * 1024)) for i, v, b in log if i > k}
    expected = len(after_k | {(0, 16)})
    assert fb["recovery_point"] == k
    assert expected <= fb["chunks"] <= expected + 1, (fb, expected)  # +1: a write in flight
    for v in ("v1", "v2"):
        assert file_bytes(volume_path(c, "A", v)) == file_bytes(volume_path(c, "C", v))
    _, vol = c.api("A", "GET", "/api/v1/volumes/v1")
    assert vol["io_mode"] == "local"
    assert c.pair("C", "v1-dr")["io_mode"] == "block"
    # The original direction again: a new write at A reaches C.
    q = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x5c 2M 4k", c.uri("A", "v2")],
                       capture_output=True, text=True, timeout=60)
    assert q.returncode == 0, q.stderr
    wait_applied(c, "A", "v2-dr")
    assert file_bytes(volume_path(c, "A", "v2")) == file_bytes(volume_path(c, "C", "v2"))


def test_journal_overflow_falls_back_to_bitmaps_and_catches_up(ac: ClusterProc) -> None:
    c = ac
    make_volume(c, "A", "vol", 16 * MiB)
    make_async(c, "vol-dr", "vol", "vol", journal_size="1M")
    c.kill9("C")
    # Hosts keep writing while the far site is away: 4 MiB does not fit the 1 MiB journal.
    q = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x42 0 4M",
                        "-c", "write -P 0x43 8M 256k", c.uri("A", "vol")],
                       capture_output=True, text=True, timeout=60)
    assert q.returncode == 0, q.stderr
    rc = remote(c, "A", "vol-dr")
    assert rc["journal_mode"] == "bitmap" and rc["journal"]["bytes"] == 0
    _, ev = c.api("A", "GET", "/api/v1/events")
    assert any(e["type"] == "journal_overflow" for e in ev["events"])
    dirty = c.pair("A", "vol-dr")["dirty_chunks"]
    assert dirty == (4 * MiB + 256 * 1024) // (64 * 1024)
    c.start("C")
    rc = wait_applied(c, "A", "vol-dr")
    view = c.pair("A", "vol-dr")
    assert view["copy"]["bytes_sent"] == dirty * 64 * 1024   # only the dirty chunks
    assert file_bytes(volume_path(c, "A", "vol")) == file_bytes(volume_path(c, "C", "vol"))
    # Records flow again after the catch-up.
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x44 12M 4k", c.uri("A", "vol")],
                   check=True, capture_output=True, timeout=60)
    rc = wait_applied(c, "A", "vol-dr")
    assert rc["journal_mode"] == "journal" and rc["sequence"]["written"] >= 1
    assert file_bytes(volume_path(c, "A", "vol")) == file_bytes(volume_path(c, "C", "vol"))


def test_corrupted_journal_record_suspends_and_applies_nothing_wrong(ac: ClusterProc) -> None:
    c = ac
    make_volume(c, "A", "vol", 8 * MiB)
    make_async(c, "vol-dr", "vol", "vol")
    c.kill9("C")
    for i, off in enumerate(("0", "1M", "2M")):
        subprocess.run(["qemu-io", "-f", "raw", "-c", f"write -P {0x61 + i} {off} 64k",
                        c.uri("A", "vol")], check=True, capture_output=True, timeout=60)
    time.sleep(0.3)
    lag = remote(c, "A", "vol-dr")["lag"]     # what losing A now would cost (RPO)
    assert lag["sequences"] == 3 and lag["bytes"] > 3 * 65536 and lag["seconds"] >= 0.3
    jdir = os.path.join(c.dir, "data-A", "journals", "vol")
    seg = os.path.join(jdir, sorted(os.listdir(jdir))[0])
    size = os.path.getsize(seg)
    assert size > 3 * 64 * 1024
    with open(seg, "r+b") as f:       # flip one byte inside the second record's data
        f.seek(size // 2)
        b = f.read(1)
        f.seek(size // 2)
        f.write(bytes([b[0] ^ 0x10]))
    c.start("C")
    view = c.wait_pair("A", "vol-dr", "suspended", timeout=20)
    assert "CRC" in view["reason"], view["reason"]
    _, ev = c.api("A", "GET", "/api/v1/events")
    assert any(e["type"] == "journal_corrupt" for e in ev["events"])
    # Nothing from the damaged record or after it reached the far copy.
    data = file_bytes(volume_path(c, "C", "vol"))
    assert data[1 * MiB:1 * MiB + 65536] != bytes([0x62]) * 65536
    assert data[2 * MiB:2 * MiB + 65536] == bytes(65536)
    assert remote(c, "C", "vol-dr")["sequence"]["applied"] <= 1


def test_refusals(tmp_path: object) -> None:
    c = ClusterProc(str(tmp_path), names=("A", "B", "C"))
    c.start()
    try:
        c.wait_peer("A", "B")
        c.wait_peer("A", "C")
        c.wait_peer("B", "C")
        make_volume(c, "A", "vol", 8 * MiB)
        status, body = c.api("A", "POST", "/api/v1/pairs", {"name": "vol", "secondary": "B"})
        assert status == 201, body
        c.wait_pair("B", "vol", "mirrored", "mirror")
        # The remote copy is created on the active-active primary, to a third node.
        p = c.cli("pair", "create", "vol-dr", "--mode", "async", "--primary", "B:vol",
                  "--secondary", "C:vol")
        assert p.returncode == 1
        assert "secondary of active-active pair 'vol'" in p.stderr and "(A)" in p.stderr
        p = c.cli("pair", "create", "vol-dr", "--mode", "async", "--primary", "A:vol",
                  "--secondary", "B:vol")
        assert p.returncode == 1 and "already holds the active-active copy" in p.stderr
        p = c.cli("pair", "create", "x", "--mode", "active-active", "--primary", "A",
                  "--secondary", "C", "--group", "g")
        # a usage mistake: exit 2, as the README says
        assert p.returncode == 2 and "apply to --mode async or sync only" in p.stderr
        status, body = c.api("A", "POST", "/api/v1/pairs",
                             {"name": "vol-dr", "mode": "async", "secondary": "C",
                              "primary_volume": "vol", "journal_size": "4k"})
        assert status == 400 and "at least 1M" in body["error"]["message"]
        p = c.cli("pair", "create", "vol-dr", "--mode", "async", "--primary", "A:vol",
                  "--secondary", "C:vol", "--wait", "--json")
        assert p.returncode == 0, p.stderr
        assert {n: c.pair(n, "vol-dr")["role"] for n in "ABC"} == {
            "A": "primary", "B": "standby", "C": "secondary"}
        # Takeover needs a site with a copy, and a lost feeder.
        p = c.cli("dr", "takeover", "--site", "A")
        assert p.returncode == 1 and "holds no remote copy" in p.stderr, p.stderr
        p = c.cli("dr", "takeover", "--site", "B")
        assert p.returncode == 1 and "node A still feeds group 'vol-dr'" in p.stderr
        p = c.cli("dr", "takeover", "--site", "C")
        assert p.returncode == 1 and "node A still feeds group 'vol-dr'" in p.stderr
        assert c.pair("C", "vol-dr")["io_mode"] == "block"      # nothing changed
        assert remote(c, "B", "vol-dr")["group_role"] == "standby"
    finally:
        c.stop()


def test_kill_primary_during_load_standby_feeds_only_the_delta(tmp_path: object) -> None:
    c = ClusterProc(str(tmp_path), names=("A", "B", "C"), witness=True, host=True)
    c.start()
    try:
        for a, b in (("A", "B"), ("A", "C"), ("B", "C")):
            c.wait_peer(a, b)
        size = 64 * MiB
        make_volume(c, "A", "vol", size)
        status, body = c.api("A", "POST", "/api/v1/pairs", {"name": "vol", "secondary": "B"})
        assert status == 201, body
        c.wait_pair("B", "vol", "mirrored", "mirror")
        make_async(c, "vol-dr", "vol", "vol")
        c.wait_pair("B", "vol-dr", "mirrored", timeout=10)
        # Writes through the host agent reach C: after quiesce C equals A byte for byte.
        q = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x3c 0 2M",
                            "-c", "write -P 0x3d 30M 256k", c.host_uri("vol")],
                           capture_output=True, text=True, timeout=60)
        assert q.returncode == 0, q.stderr
        wait_applied(c, "A", "vol-dr")
        assert file_bytes(volume_path(c, "A", "vol")) == file_bytes(volume_path(c, "C", "vol"))
        result: dict[str, Any] = {}

        def fio() -> None:
            p = subprocess.run(["fio", "--name=dr", "--ioengine=nbd",
                                f"--uri={c.host_uri('vol')}", "--rw=randwrite", "--bs=4k",
                                "--iodepth=8", "--size=16M", "--verify=crc32c",
                                "--verify_state_save=0", "--verify_fatal=1", "--do_verify=1",
                                "--rate_iops=2000", "--output-format=json"],
                               capture_output=True, text=True, timeout=300)
            result["rc"], result["out"], result["err"] = p.returncode, p.stdout, p.stderr

        t = threading.Thread(target=fio)
        t.start()
        pid_c = c.sup.components["C"].pid
        time.sleep(0.5)
        os.kill(pid_c, signal.SIGSTOP)     # the far copy lags behind ...
        time.sleep(0.5)
        c.kill9("A")                       # ... when the primary site is lost
        t.join()
        assert result["rc"] == 0, result["err"]
        job = json.loads(result["out"][result["out"].index("{"):])["jobs"][0]
        assert job["error"] == 0 and job["read"]["io_bytes"] == 16 * MiB
        os.kill(pid_c, signal.SIGCONT)
        c.wait_peer("B", "C", timeout=20)
        p = c.cli("dr", "takeover", "--site", "B", "--json")
        assert p.returncode == 0, p.stderr
        r = json.loads(p.stdout)["groups"][0]
        assert (r["action"], r["method"], r["full_copy"]) == ("feed", "journal", False)
        assert r["previous_feeder"] == "A" and r["records"] > 0
        assert 0 < r["bytes"] < 16 * MiB + r["records"] * 64
        rc = wait_applied(c, "B", "vol-dr")
        # What was shipped is exactly the delta the takeover announced.
        assert rc["shipped"] == {"bytes": r["bytes"], "records": r["records"]}
        assert remote(c, "C", "vol-dr")["feeder"] == "B"
        assert file_bytes(volume_path(c, "B", "vol")) == file_bytes(volume_path(c, "C", "vol"))

        # A returns: it learns that B feeds C now, becomes the standby, and is resynced
        # from B; failback then returns the feed and the write order to A.
        c.start("A")
        c.wait_pair("A", "vol", "mirrored", "mirror", timeout=60)
        wait_group_role(c, "A", "vol-dr", "standby")
        p = c.cli("dr", "failback", "--site", "A", "--json")
        assert p.returncode == 0, p.stderr
        fb = json.loads(p.stdout)["groups"][0]
        assert fb["action"] == "return" and fb["from"] == "B"
        assert c.pair("A", "vol")["role"] == "primary"
        assert remote(c, "C", "vol-dr")["feeder"] == "A"
        wait_group_role(c, "B", "vol-dr", "standby")
        q = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x6d 40M 64k",
                            c.host_uri("vol")], capture_output=True, text=True, timeout=60)
        assert q.returncode == 0, q.stderr
        wait_applied(c, "A", "vol-dr")
        assert file_bytes(volume_path(c, "A", "vol")) == file_bytes(volume_path(c, "C", "vol"))
    finally:
        c.stop()


def test_initial_copy_resumes_from_its_cursor_after_kill9(ac: ClusterProc) -> None:
    c = ac
    size = 128 * MiB
    make_volume(c, "A", "big", size)
    subprocess.run(["fio", "--name=fill", "--ioengine=nbd", f"--uri={c.uri('A', 'big')}",
                    "--rw=write", "--bs=1m", "--iodepth=8", f"--size={size}",
                    "--refill_buffers=1"], check=True, capture_output=True, timeout=300)
    status, body = c.api("A", "POST", "/api/v1/pairs",
                         {"name": "big-dr", "mode": "async", "secondary": "C",
                          "primary_volume": "big", "secondary_volume": "big"})
    assert status == 201, body
    deadline = time.monotonic() + 60
    while True:
        view = c.pair("A", "big-dr")
        cur = view["copy"]["cursor"]
        if cur >= 256 or view["state"] != "copying" or time.monotonic() > deadline:
            break
        time.sleep(0.005)
    assert view["state"] == "copying", "the copy finished before the kill: nothing to test"
    c.kill9("A")
    c.start("A")
    a = c.wait_pair("A", "big-dr", "mirrored", timeout=120)
    total = size // (64 * 1024)
    assert 0 < a["copy"]["bytes_sent"] <= (total - cur) * 64 * 1024  # nothing before the cursor
    c.wait_pair("C", "big-dr", "mirrored", "block")
    assert file_bytes(volume_path(c, "A", "big")) == file_bytes(volume_path(c, "C", "big"))


def test_sync_mode_writes_wait_for_the_far_site_and_continue_without_it(ac: ClusterProc) -> None:
    c = ac
    make_volume(c, "A", "vol", 8 * MiB)
    status, body = c.api("A", "POST", "/api/v1/pairs",
                         {"name": "vol-s", "mode": "sync", "secondary": "C",
                          "primary_volume": "vol", "secondary_volume": "vol"})
    assert status == 201, body
    c.wait_pair("A", "vol-s", "mirrored", timeout=60)
    pid_c = c.sup.components["C"].pid
    path_c = volume_path(c, "C", "vol")
    for i in range(5):
        subprocess.run(["qemu-io", "-f", "raw", "-c", f"write -P {0x30 + i} {i}M 64k",
                        c.uri("A", "vol")], check=True, capture_output=True, timeout=60)
        # Acknowledged means the far site holds it: freeze C at once and look.
        os.kill(pid_c, signal.SIGSTOP)
        try:
            data = file_bytes(path_c)
        finally:
            os.kill(pid_c, signal.SIGCONT)
        assert data[i * MiB:i * MiB + 65536] == bytes([0x30 + i]) * 65536
    assert c.pair("C", "vol-s")["mode"] == "sync"
    # The far site is lost: host writes continue (recorded), and catch up when it returns.
    c.kill9("C")
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x77 6M 64k", c.uri("A", "vol")],
                   check=True, capture_output=True, timeout=60)
    rc = remote(c, "A", "vol-s")
    assert rc["sequence"]["written"] > rc["sequence"]["applied"]
    c.start("C")
    wait_applied(c, "A", "vol-s")
    assert file_bytes(volume_path(c, "A", "vol")) == file_bytes(volume_path(c, "C", "vol"))



def test_standby_without_records_catches_up_by_chunks_and_resumes_after_kill9(
        tmp_path: object) -> None:
    c = ClusterProc(str(tmp_path), names=("A", "B", "C"), witness=True)
    c.start()
    try:
        for a, b in (("A", "B"), ("A", "C"), ("B", "C")):
            c.wait_peer(a, b)
        size = 128 * MiB
        make_volume(c, "A", "vol", size)
        status, body = c.api("A", "POST", "/api/v1/pairs", {"name": "vol", "secondary": "B"})
        assert status == 201, body
        c.wait_pair("B", "vol", "mirrored", "mirror")
        make_async(c, "vol-dr", "vol", "vol", journal_size="1M")
        c.wait_pair("B", "vol-dr", "mirrored", timeout=10)
        pid_c = c.sup.components["C"].pid
        os.kill(pid_c, signal.SIGSTOP)
        # 64 MiB while the far site is frozen: neither A's nor B's 1 MiB journal holds it.
        subprocess.run(["fio", "--name=fill", "--ioengine=nbd", f"--uri={c.uri('A', 'vol')}",
                        "--rw=write", "--bs=1m", "--iodepth=8", "--size=64M",
                        "--refill_buffers=1"], check=True, capture_output=True, timeout=300)
        assert remote(c, "B", "vol-dr")["journal_mode"] == "bitmap"
        c.kill9("A")
        c.wait_pair("B", "vol", "suspended", "local", timeout=30)
        os.kill(pid_c, signal.SIGCONT)
        # Paced, so the catch-up is surely running when B is killed (2 s for 64 MiB).
        p = c.cli("pair", "set", "vol-dr", "--copy-rate", "32M", "--node", "B", "--json")
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout)["sides"]["B"]["copy_rate"] == 32 * MiB
        p = c.cli("dr", "takeover", "--site", "B", "--json")
        assert p.returncode == 0, p.stderr
        r = json.loads(p.stdout)["groups"][0]
        assert (r["method"], r["full_copy"]) == ("bitmap", False)
        assert r["chunks"] == 1024                      # exactly the 64 MiB written
        deadline = time.monotonic() + 60
        while True:
            view = c.pair("B", "vol-dr")
            cur = view["copy"]["cursor"]
            if cur >= 128 or view["state"] != "copying" or time.monotonic() > deadline:
                break
            time.sleep(0.005)
        assert view["state"] == "copying", "the catch-up ended before the kill"
        c.kill9("B")                                    # during the delta resync
        c.start("B")
        rc = wait_applied(c, "B", "vol-dr", timeout=60)
        assert rc["group_role"] == "primary" and rc["feeder"] == "B"
        sent = c.pair("B", "vol-dr")["copy"]["bytes_sent"]
        assert 0 < sent <= (1024 - cur) * 64 * 1024     # nothing before the cursor again
        assert file_bytes(volume_path(c, "B", "vol")) == file_bytes(volume_path(c, "C", "vol"))
    finally:
        c.stop()


def test_three_sites_lose_a_and_b_take_over_at_c_and_fail_back(tmp_path: object) -> None:
    c = ClusterProc(str(tmp_path), names=("A", "B", "C"))
    c.start()
    try:
        three_sites(c, 16 * MiB)
        qemu = ["qemu-io", "-f", "raw"]
        subprocess.run([*qemu, "-c", "write -P 0x11 0 1M", c.uri("A", "vol")], check=True,
                       capture_output=True, timeout=60)
        wait_applied(c, "A", "vol-dr")
        c.kill9("C")
        subprocess.run([*qemu, "-c", "write -P 0x22 4M 128k", c.uri("A", "vol")], check=True,
                       capture_output=True, timeout=60)     # never reaches C
        c.kill9("A")
        c.kill9("B")
        c.start("C")
        p = c.cli("dr", "takeover", "--site", "C", "--json")
        assert p.returncode == 0, p.stderr
        r = json.loads(p.stdout)["groups"][0]
        assert r["action"] == "serve"
        assert r["recovery_point"]["sequence"] == remote(c, "C", "vol-dr")["sequence"]["applied"]
        subprocess.run([*qemu, "-c", "write -P 0x33 8M 64k", c.uri("C", "vol")], check=True,
                       capture_output=True, timeout=60)
        # A comes back alone, refuses hosts, then gets C's data back with a delta copy.
        c.start("A")
        c.wait_pair("A", "vol-dr", "suspended", timeout=20)
        p = c.cli("dr", "failback", "--site", "A", "--json")
        assert p.returncode == 0, p.stderr
        fb = json.loads(p.stdout)["groups"][0]
        # A's 128k written after the recovery point (rolled back) + C's 64k since takeover.
        assert fb["pairs"]["vol-dr"]["changed_here"] == 2
        assert fb["pairs"]["vol-dr"]["changed_there"] == 1
        assert fb["chunks"] == 3
        data = file_bytes(volume_path(c, "A", "vol"))
        assert data == file_bytes(volume_path(c, "C", "vol"))
        assert data[4 * MiB:4 * MiB + 131072] == bytes(131072)   # rolled back to C's point
        assert data[8 * MiB:8 * MiB + 65536] == b"\x33" * 65536
        # B returns and gets the failback chunks through its active-active resync.
        c.start("B")
        c.wait_pair("A", "vol", "mirrored", "mirror", timeout=30)
        c.wait_pair("B", "vol", "mirrored", "mirror", timeout=30)
        assert file_bytes(volume_path(c, "B", "vol")) == data
        subprocess.run([*qemu, "-c", "write -P 0x44 12M 4k", c.uri("B", "vol")], check=True,
                       capture_output=True, timeout=60)
        wait_applied(c, "A", "vol-dr")
        assert file_bytes(volume_path(c, "C", "vol")) == file_bytes(volume_path(c, "A", "vol"))
    finally:
        c.stop()


def test_far_site_killed_mid_stream_redoes_its_journal_to_a_prefix(ac: ClusterProc) -> None:
    """kill -9 of the far site while records stream in: on restart it re-applies what its
    journal holds past the last checkpoint, on its own (the primary is frozen), and its
    copy is again exactly a prefix of the write sequence; then it catches up."""
    c = ac
    for v in ("v1", "v2"):
        make_volume(c, "A", v, 8 * MiB)
        make_async(c, f"{v}-dr", v, "g")
    paths_c = [volume_path(c, "C", v) for v in ("v1", "v2")]
    writer, out = start_writer(c, 2.0)
    time.sleep(1.0)
    received = remote(c, "C", "v1-dr")["sequence"]["received"]
    c.kill9("C")
    log = writer_log(writer, out)
    pid_a = c.sup.components["A"].pid
    os.kill(pid_a, signal.SIGSTOP)          # C comes back with nobody to feed it
    try:
        c.start("C")
        view = remote(c, "C", "v1-dr")
        k = view["sequence"]["applied"]
        assert k >= received > 0             # nothing it had received was lost
        assert view["sequence"]["received"] == k
        assert [stamps(p) for p in paths_c] == expected_at(log, k)
        _, ev = c.api("C", "GET", "/api/v1/events")
        redo = [e for e in ev["events"] if e["type"] == "journal_redo"]
        assert redo and redo[0]["records"] > 0 and redo[0]["applied"] == k
    finally:
        os.kill(pid_a, signal.SIGCONT)
    wait_applied(c, "A", "v1-dr")
    for v, pc in zip(("v1", "v2"), paths_c, strict=True):
        assert file_bytes(volume_path(c, "A", v)) == file_bytes(pc)


def test_split_big_write_resync_then_more_writes_the_far_copy_catches_up(
        tmp_path: object) -> None:
    """Issue 15's reproduction, as an operator ran it: split the active-active pair, write
    64 MiB through A, resync with --wait, write 32 MiB more at 128M through A. The far
    copy stopped for good (A: written 257, sent 256) while every status said mirrored.
    Now it catches up by itself within seconds and C equals A byte for byte."""
    c = ClusterProc(str(tmp_path), names=("A", "B", "C"))
    c.start()
    try:
        three_sites(c, 192 * MiB)
        assert c.cli("pair", "split", "vol").returncode == 0
        src = os.path.join(c.dir, "src.img")
        with open(src, "wb") as f:
            f.write(os.urandom(96 * MiB))
        subprocess.run(["nbdcopy", "--synchronous", src, c.uri("A", "vol")], check=True,
                       capture_output=True, timeout=120)   # the first 96 MiB: 64 + 32 below
        p = c.cli("pair", "resync", "vol", "--wait")
        assert p.returncode == 0, p.stderr
        subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 128M 32M", "-c", "flush",
                        c.uri("A", "vol")], check=True, capture_output=True, timeout=120)
        rc = wait_applied(c, "A", "vol-dr", timeout=60)   # stalled for good before
        assert rc["lag"]["sequences"] == 0, rc
        want = file_bytes(volume_path(c, "A", "vol"))
        assert want[128 * MiB:160 * MiB] == b"\x5a" * (32 * MiB)
        assert file_bytes(volume_path(c, "C", "vol")) == want
        assert file_bytes(volume_path(c, "B", "vol")) == want
    finally:
        c.stop()


def test_a_standby_that_orders_writes_clears_its_chunks_and_a_takeover_there_is_small(
        tmp_path: object) -> None:
    """The standby B made primary of the active-active pair (A numbers B's writes for
    the far copy, B cannot): B's dirty chunks used to stand for good, so a later
    takeover at B copied everything B ever wrote. Now they are cleared once the far copy
    has applied what A reported after answering them, and a takeover at B sends only the
    chunks written since."""
    c = ClusterProc(str(tmp_path), names=("A", "B", "C"))
    c.start()
    try:
        three_sites(c, 32 * MiB)
        c.wait_pair("B", "vol-dr", "mirrored", timeout=10)
        assert c.cli("pair", "swap", "vol").returncode == 0
        assert c.pair("B", "vol")["role"] == "primary"
        qemu = ["qemu-io", "-f", "raw"]
        subprocess.run([*qemu, "-c", "write -P 0x51 0 8M", c.uri("B", "vol")], check=True,
                       capture_output=True, timeout=60)      # 128 chunks written by B
        wait_applied(c, "A", "vol-dr")
        deadline = time.monotonic() + 20
        while (dirty := remote(c, "B", "vol-dr")["dirty_chunks"]) and \
                time.monotonic() < deadline:
            time.sleep(0.2)
        assert dirty == 0, remote(c, "B", "vol-dr")
        subprocess.run([*qemu, "-c", "write -P 0x52 16M 128k", c.uri("B", "vol")],
                       check=True, capture_output=True, timeout=60)   # 2 chunks more
        c.kill9("A")
        c.wait_pair("B", "vol", "suspended", timeout=20)
        p = c.cli("dr", "takeover", "--site", "B", "--json")
        assert p.returncode == 0, p.stderr
        r = json.loads(p.stdout)["groups"][0]
        assert r["full_copy"] is False and r.get("chunks", 0) <= 2, r
        wait_applied(c, "B", "vol-dr")
        assert file_bytes(volume_path(c, "B", "vol")) == file_bytes(volume_path(c, "C", "vol"))
    finally:
        c.stop()

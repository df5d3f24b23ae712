"""Thin volumes in an active-active pair, with real node processes: the initial copy and
`pair verify` cost by what is allocated, not by the size. A 64 GiB sparse volume with a
few MiB written is copied in seconds, holes arrive as zeroes even where the secondary
held old data, and verify skips what is a hole on both sides but still finds a
difference hidden in a hole on one side."""

from __future__ import annotations

import json
import subprocess

import pytest

from clusterproc import ClusterProc, qemu_io

pytestmark = pytest.mark.e2e

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
CHUNK = 64 * KiB
SIZE = 64 * GiB

# (offset, length, pattern) written on A: scattered, partly not chunk-aligned, one in
# the last chunk, one inside the range where B holds old data.
WRITTEN = [(0, 1 * MiB, 0x11), (17 * GiB + 4 * KiB, 260 * KiB, 0x22),
           (40 * GiB, 2 * MiB, 0x33), (SIZE - CHUNK, CHUNK, 0x44),
           (5 * GiB + 512 * KiB, 4 * KiB, 0x55)]
# Old data on B where A has holes (and one chunk A writes part of).
OLD_ON_B = [(5 * GiB, 1 * MiB), (30 * GiB, CHUNK), (SIZE - 2 * CHUNK, CHUNK)]


def data_chunks() -> set[int]:
    return {c for off, n, _ in WRITTEN for c in range(off // CHUNK, (off + n - 1) // CHUNK + 1)}


def reads_of_a() -> list[str]:
    """qemu-io reads that check every written range and the zeroes around each."""
    cmds = [f"read -P {pat} {off} {n}" for off, n, pat in WRITTEN]
    cmds += ["read -P 0 1048576 1048576",                       # after the first write
             f"read -P 0 {17 * GiB} {4 * KiB}",                 # before the unaligned one
             f"read -P 0 {17 * GiB + 264 * KiB} {CHUNK}",       # after it
             f"read -P 0 {5 * GiB} {512 * KiB}",                # B's old data, A's hole
             f"read -P 0 {5 * GiB + 516 * KiB} {508 * KiB}",    # ... in the written chunk too
             f"read -P 0 {30 * GiB} {CHUNK}", f"read -P 0 {SIZE - 2 * CHUNK} {CHUNK}",
             f"read -P 0 {50 * GiB} {CHUNK}"]
    return cmds


def verify(c: ClusterProc) -> dict[str, object]:
    p = c.cli("pair", "verify", "thin", "--json")
    assert p.returncode == 0, p.stderr
    report: dict[str, object] = json.loads(p.stdout)
    return report


def test_thin_copy_and_verify_cost_by_what_is_allocated(two: ClusterProc) -> None:
    for node in ("A", "B"):
        status, body = two.api(node, "POST", "/api/v1/volumes", {"name": "thin", "size": SIZE})
        assert status == 201, body
    qemu_io(two.uri("B", "thin"), *(f"write -P 0xee {off} {n}" for off, n in OLD_ON_B))
    qemu_io(two.uri("A", "thin"), *(f"write -P {pat} {off} {n}" for off, n, pat in WRITTEN))

    p = two.cli("pair", "create", "thin", "--mode", "active-active", "--primary", "A",
                "--secondary", "B", "--wait", "--json")
    assert p.returncode == 0, p.stderr
    a = two.pair("A", "thin")
    assert a["state"] == "mirrored"
    # Only the chunks holding data travelled: 55 of 1,048,576.
    assert a["copy"]["bytes_sent"] == len(data_chunks()) * CHUNK == 55 * CHUNK
    assert a["copy"]["total_chunks"] == SIZE // CHUNK
    _, ev = two.api("A", "GET", "/api/v1/events")
    [done] = [e for e in ev["events"] if e["type"] == "copy_done"]
    # Chunk by chunk this took about 40 s of two nodes' CPU here (bench/scale.py).
    assert done["seconds"] < 10, done
    two.wait_pair("B", "thin", "mirrored", "mirror")
    # B reads back A's data over the written ranges and zeroes elsewhere, old data too.
    qemu_io(two.uri("B", "thin"), *reads_of_a())
    _, vb = two.api("B", "GET", "/api/v1/volumes/thin")
    assert vb["allocated"] <= 8 * MiB, vb   # B stays thin: its old data was punched out

    # Verify: holes on both sides are equal unread; the copies match.
    report = verify(two)
    assert report["mismatched_chunks"] == 0
    assert report["checked_chunks"] == SIZE // CHUNK
    assert report["skipped_chunks"] == SIZE // CHUNK - len(data_chunks())

    # A difference inside a hole on one side is still found: data on B where A has a
    # hole, and a hole on B where A has data.
    with open(str(vb["path"]), "r+b") as f:
        f.seek(50 * GiB + 100)
        f.write(b"stale" * 10)
    subprocess.run(["fallocate", "--punch-hole", "--keep-size", "--offset", str(40 * GiB),
                    "--length", str(CHUNK), str(vb["path"])], check=True)
    report = verify(two)
    assert report["mismatched_chunks"] == 2, report
    assert report["mismatched_offsets"] == [40 * GiB, 50 * GiB]
    assert (report["latest"], report["stale"]) == ("A", "B")
    two.wait_pair("B", "thin", "mirrored", "mirror")
    qemu_io(two.uri("B", "thin"), *reads_of_a())
    assert verify(two)["mismatched_chunks"] == 0

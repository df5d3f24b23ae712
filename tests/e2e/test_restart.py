"""kill -9 during writes, restart: every flushed or FUA-acknowledged write is there and the
catalog is intact. A damaged catalog is refused with a clear message."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from nodeproc import NodeProc

pytestmark = pytest.mark.e2e

MiB = 1 << 20

WRITER = r"""
import sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
mode = sys.argv[2]
i = 0
try:
    while True:
        block = i.to_bytes(8, "little") * 512
        if mode == "fua":
            h.pwrite(block, (i % 8192) * 4096, nbd.CMD_FLAG_FUA)
            print("acked", i, flush=True)
        else:
            h.pwrite(block, (i % 8192) * 4096)
            if i % 16 == 15:
                h.flush()
                print("acked", i, flush=True)
        i += 1
except nbd.Error:
    pass
"""

READER = r"""
import sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
last = int(sys.argv[2])
bad = []
for i in range(max(0, last - 8191), last + 1):
    want = i.to_bytes(8, "little") * 512
    if h.pread(4096, (i % 8192) * 4096) != want:
        bad.append(i)
print("BAD", bad[:10], len(bad)) if bad else print("OK")
"""


@pytest.mark.parametrize("mode", ["flush", "fua"])
def test_kill9_during_writes_keeps_acknowledged_data(fresh_node: NodeProc, mode: str) -> None:
    node = fresh_node
    for i in range(3):
        node.create_volume(f"other{i}", 8 * MiB)
    node.create_volume("r", 32 * MiB)
    status, before = node.api("GET", "/api/v1/volumes")
    assert status == 200
    writer = subprocess.Popen(["/usr/bin/python3", "-c", WRITER, node.uri("r"), mode],
                              stdout=subprocess.PIPE, text=True)
    assert writer.stdout is not None
    last = -1
    deadline = time.monotonic() + 30
    while last < 2000 and time.monotonic() < deadline:
        line = writer.stdout.readline()
        if line.startswith("acked"):
            last = int(line.split()[1])
    node.kill9()
    for line in writer.stdout:  # acknowledgements that raced with the kill still count
        if line.startswith("acked"):
            last = int(line.split()[1])
    writer.wait(30)
    assert last >= 2000

    node.start()
    status, after = node.api("GET", "/api/v1/volumes")
    assert status == 200
    strip = ("connections", "allocated")
    assert [{k: v for k, v in x.items() if k not in strip} for x in after["volumes"]] == \
        [{k: v for k, v in x.items() if k not in strip} for x in before["volumes"]]
    out = subprocess.run(["/usr/bin/python3", "-c", READER, node.uri("r"), str(last)],
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "OK", out.stdout + out.stderr


def test_catalog_survives_kill9_mid_operations(fresh_node: NodeProc) -> None:
    """Volumes created right before a kill -9 are all there, with their ids."""
    node = fresh_node
    ids = {node.create_volume(f"v{i}", 1 * MiB)["name"]: None for i in range(10)}
    node.kill9()
    node.start()
    status, body = node.api("GET", "/api/v1/volumes")
    assert status == 200
    assert {v["name"] for v in body["volumes"]} == set(ids)
    # Orphan thin files (a create interrupted before its catalog row) are cleaned up.
    vol_dir = os.path.join(node.data_dir, "volumes")
    assert len(os.listdir(vol_dir)) == 10


def test_corrupt_catalog_is_refused_clearly(fresh_node: NodeProc) -> None:
    node = fresh_node
    node.create_volume("keep", 1 * MiB)
    node.stop()
    catalog = os.path.join(node.data_dir, "catalog.sqlite")
    for suffix in ("-wal", "-shm"):
        if os.path.exists(catalog + suffix):
            os.unlink(catalog + suffix)
    with open(catalog, "r+b") as f:
        f.seek(0)
        f.write(b"this is not a database" * 10)
    p = subprocess.run([sys.executable, "-m", "twinvol", "node", "run", "--cluster",
                        node.cluster_path, "--node", node.name],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode != 0
    lines = [x for x in p.stderr.splitlines() if x.startswith("twinvol: error:")]
    assert len(lines) == 1, p.stderr
    assert "catalog" in lines[0] and "Traceback" not in p.stderr


def test_second_process_on_same_data_dir_is_refused(fresh_node: NodeProc) -> None:
    node = fresh_node
    p = subprocess.run([sys.executable, "-m", "twinvol", "node", "run", "--cluster",
                        node.cluster_path, "--node", node.name],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 1
    assert "in use by another node process" in p.stderr
    assert node.alive()

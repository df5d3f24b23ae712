"""Local copy pairs (in-node copies) with a real node process and real clients: initial copy,
mirrored writes, point-in-time split, dirty bitmaps on both sides, resync of only the changed
chunks, and a copy that resumes after kill -9."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from clusterproc import ClusterProc

pytestmark = pytest.mark.e2e

MiB = 1 << 20
CHUNK = 64 * 1024


@pytest.fixture
def one(tmp_path: object) -> Iterator[ClusterProc]:
    c = ClusterProc(str(tmp_path), names=("A",))
    c.start()
    yield c
    c.stop()


def qemu_io(uri: str, *cmds: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    argv = ["qemu-io", "-f", "raw"]
    for cmd in cmds:
        argv += ["-c", cmd]
    p = subprocess.run([*argv, uri], capture_output=True, text=True, timeout=60)
    if ok:
        assert p.returncode == 0 and "fail" not in p.stdout, p.stdout + p.stderr
    return p


def digest(uri: str) -> str:
    out = subprocess.run(["nbdcopy", uri, "-"], capture_output=True, timeout=60, check=True)
    return hashlib.sha256(out.stdout).hexdigest()


def test_split_copy_and_resync_of_changed_chunks(one: ClusterProc) -> None:
    c = one
    status, body = c.api("A", "POST", "/api/v1/volumes", {"name": "db", "size": 16 * MiB})
    assert status == 201, body
    qemu_io(c.uri("A", "db"), "write -P 0x41 0 2M", "write -P 0x42 8M 1M")
    p = c.cli("pair", "create", "db-snap", "--mode", "local", "--primary", "A:db",
              "--secondary", "A:db-copy", "--wait", "--json")
    assert p.returncode == 0, p.stderr
    view = json.loads(p.stdout)
    assert (view["mode"], view["state"], view["secondary_io_mode"]) == \
        ("local", "mirrored", "block")
    # The secondary was created with the primary's size and serves no host while paired.
    assert c.api("A", "GET", "/api/v1/volumes/db-copy")[1]["size"] == 16 * MiB
    p = qemu_io(c.uri("A", "db-copy"), "read 0 4k", ok=False)
    assert p.returncode != 0 and "secondary of local pair 'db-snap'" in p.stderr, p.stderr
    # Mirrored writes reach the copy; the split freezes it.
    qemu_io(c.uri("A", "db"), "write -P 0x43 4M 64k", "write -z 8M 64k")
    p = c.cli("pair", "split", "db-snap", "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["state"] == "split", p.stderr
    frozen = digest(c.uri("A", "db-copy"))
    assert frozen == digest(c.uri("A", "db"))
    qemu_io(c.uri("A", "db-copy"), "read -P 0x41 0 2M", "read -P 0x43 4M 64k",
            "read -P 0 8M 64k", "read -P 0x42 8256k 960k")
    # After the split each side records its own changes.
    qemu_io(c.uri("A", "db"), "write -P 0x51 0 64k", "write -P 0x52 1M 128k")   # 3 chunks
    qemu_io(c.uri("A", "db-copy"), "write -P 0x61 1M 64k", "write -P 0x62 12M 4k")  # 2
    assert digest(c.uri("A", "db-copy")) != frozen
    v = c.pair("A", "db-snap")
    assert (v["dirty_chunks"], v["secondary_dirty_chunks"]) == (3, 2)
    p = c.cli("pair", "show", "db-snap")
    assert "db-copy (I/O mode local, 2 dirty chunks)" in p.stdout, p.stdout
    # Resync: exactly the union of both bitmaps (0, 1M, 1M+64k, 12M) moves.
    p = c.cli("pair", "resync", "db-snap", "--wait", "--json")
    assert p.returncode == 0, p.stderr
    v = c.pair("A", "db-snap")
    assert v["state"] == "mirrored" and v["copy"]["total_chunks"] == 4
    assert v["copy"]["bytes_sent"] == 3 * CHUNK   # 12M is a hole on the primary: zeroed
    assert (v["dirty_chunks"], v["secondary_dirty_chunks"]) == (0, 0)
    assert c.cli("pair", "split", "db-snap").returncode == 0
    assert digest(c.uri("A", "db-copy")) == digest(c.uri("A", "db"))
    qemu_io(c.uri("A", "db-copy"), "read -P 0x51 0 64k", "read -P 0x52 1M 128k",
            "read -P 0 12M 4k")
    # Both volumes are held by the pair; deleting it frees them.
    p = c.cli("volume", "delete", "db-copy")
    assert p.returncode == 1 and "is in pair 'db-snap'" in p.stderr
    assert c.cli("pair", "delete", "db-snap").returncode == 0
    assert c.cli("volume", "delete", "db-copy").returncode == 0


def test_copy_resumes_after_kill9(one: ClusterProc) -> None:
    c = one
    status, _ = c.api("A", "POST", "/api/v1/volumes", {"name": "v", "size": 8 * MiB})
    assert status == 201
    qemu_io(c.uri("A", "v"), "write -P 0x7e 0 8M")
    p = c.cli("pair", "create", "v-snap", "--mode", "local", "--primary", "A:v",
              "--secondary", "A:v2", "--copy-rate", "4M")
    assert p.returncode == 0, p.stderr
    time.sleep(1.0)   # at 4 MiB/s: past the first checkpoint, far from the end
    c.kill9("A")
    c.start("A")
    v = c.pair("A", "v-snap")
    assert v["state"] == "copying" and 0 < v["copy"]["total_chunks"] < 128, v
    # Unpaced from here on: the rest of the copy follows at once.
    bad = c.cli("pair", "set", "v-snap", "--copy-rate", "1K")
    assert bad.returncode == 1
    assert "copy_rate must be 0 (unlimited) or at least 64K per second, not '1K'" in bad.stderr
    p = c.cli("pair", "set", "v-snap", "--copy-rate", "0", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["sides"]["A"]["copy_rate"] == 0
    view = c.wait_pair("A", "v-snap", "mirrored", timeout=3)
    assert view["dirty_chunks"] == 0
    assert c.cli("pair", "split", "v-snap").returncode == 0
    qemu_io(c.uri("A", "v2"), "read -P 0x7e 0 8M")


def test_a_damaged_pair_row_in_the_catalog_stops_the_node_with_a_clear_error(
        one: ClusterProc) -> None:
    """A row of the catalog's pair tables that does not decode is named (table, row) and
    the node refuses to start, instead of a traceback or the pair silently dropped; the
    row is left as it was for the operator to restore."""
    c = one
    assert c.api("A", "POST", "/api/v1/volumes", {"name": "db", "size": 4 * MiB})[0] == 201
    p = c.cli("pair", "create", "db-snap", "--mode", "local", "--primary", "A:db",
              "--secondary", "A:db-copy", "--wait", "--json")
    assert p.returncode == 0, p.stderr
    c.stop()
    path = os.path.join(c.dir, "data-A", "catalog.sqlite")
    db = sqlite3.connect(path)
    with db:
        db.execute("UPDATE local_pairs SET body = ? WHERE name = ?",
                   ('{"name": "db-snap", "primary": 7', "db-snap"))
    db.close()
    run = subprocess.run([sys.executable, "-m", "twinvol", "node", "run", "--cluster", c.path,
                          "--node", "A"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 1, run.stderr
    assert "node A cannot start: catalog table local_pairs, row 'db-snap': not a valid " \
        "LocalPairRecord" in run.stderr, run.stderr
    db = sqlite3.connect(path)
    assert db.execute("SELECT body FROM local_pairs").fetchall() == \
        [('{"name": "db-snap", "primary": 7',)]
    db.close()

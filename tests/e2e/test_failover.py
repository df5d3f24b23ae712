"""Failover through the host agent: fio with verification keeps running while a node of
the pair is killed with kill -9; the node comes back and only what changed is copied."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

from clusterproc import ClusterProc

pytestmark = pytest.mark.e2e

MiB = 1 << 20
SIZE = 64 * MiB
WRITTEN = 24 * MiB  # fio works in the first part: the rest must not be copied again
CHUNK = 64 * 1024


@pytest.fixture
def full(tmp_path: object) -> Iterator[ClusterProc]:
    c = ClusterProc(str(tmp_path), witness=True, host=True)
    c.start()
    c.wait_peer("A", "B")
    status, body = c.api("A", "POST", "/api/v1/volumes", {"name": "vol", "size": SIZE})
    assert status == 201, body
    status, body = c.api("A", "POST", "/api/v1/pairs", {"name": "vol", "secondary": "B"})
    assert status == 201, body
    c.wait_pair("A", "vol", "mirrored", "mirror")
    c.wait_pair("B", "vol", "mirrored", "mirror")
    yield c
    c.stop()


def fio_verify(uri: str, result: dict[str, object], bs: str = "4k") -> None:
    # A write phase of ~2 s whatever the block size: the kill lands in it.
    rate = WRITTEN // 2 // (int(bs.rstrip("k")) * 1024)
    p = subprocess.run(["fio", "--name=failover", "--ioengine=nbd", f"--uri={uri}",
                        "--rw=randwrite", f"--bs={bs}", "--iodepth=8", f"--size={WRITTEN}",
                        "--verify=crc32c", "--verify_state_save=0", "--verify_fatal=1",
                        "--do_verify=1", f"--rate_iops={rate}",
                        "--output-format=json"], capture_output=True, text=True, timeout=600)
    result["rc"] = p.returncode
    result["stderr"] = p.stderr
    if p.returncode == 0:
        job = json.loads(p.stdout[p.stdout.index("{"):])["jobs"][0]
        result["error"] = job["error"]
        result["written"] = job["write"]["io_bytes"]
        result["verified"] = job["read"]["io_bytes"]


def digests(c: ClusterProc) -> tuple[str, str]:
    import hashlib

    out = []
    for n in ("A", "B"):
        data = subprocess.run(["nbdcopy", c.uri(n, "vol"), "-"], capture_output=True,
                              check=True, timeout=120).stdout
        out.append(hashlib.sha256(data).hexdigest())
    return out[0], out[1]


# 256k writes take the host agent's large-payload path (received in place, kept for a
# retry on the other path, buffers reused).
@pytest.mark.parametrize(("victim", "survivor", "bs"),
                         [("A", "B", "4k"), ("B", "A", "4k"), ("A", "B", "256k")])
def test_fio_verify_survives_kill9_and_resync_copies_only_changes(
        full: ClusterProc, victim: str, survivor: str, bs: str) -> None:
    c = full
    result: dict[str, object] = {}
    t = threading.Thread(target=fio_verify, args=(c.host_uri("vol"), result, bs))
    t.start()
    time.sleep(0.7)  # in the write phase
    c.kill9(victim)
    s = c.wait_pair(survivor, "vol", "suspended", "local", timeout=30)
    assert s["role"] == "primary"
    t.join()
    assert result.get("rc") == 0, result.get("stderr")
    assert result["error"] == 0
    assert result["written"] == WRITTEN and result["verified"] == WRITTEN  # all verified
    dirty = c.pair(survivor, "vol")["dirty_chunks"]
    assert 0 < dirty <= WRITTEN // CHUNK
    c.start(victim)
    s = c.wait_pair(survivor, "vol", "mirrored", "mirror", timeout=60)
    c.wait_pair(victim, "vol", "mirrored", "mirror", timeout=30)
    sent = s["copy"]["bytes_sent"]
    # Only what changed while the victim was away (plus its activity-log extents).
    assert sent <= WRITTEN + 4 * MiB  # the victim's activity log adds at most its extents
    assert sent >= dirty * CHUNK // 2
    a, b = digests(c)
    assert a == b

"""Real NBD clients against a real node process: nbdinfo, qemu-io, qemu-img, nbdcopy,
libnbd (python3-libnbd, strict mode) and fio."""

from __future__ import annotations

import json
import os
import subprocess
import threading

import pytest

from nodeproc import NodeProc

pytestmark = pytest.mark.e2e

MiB = 1 << 20


def run(*argv: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        shown = [a if len(a) < 200 else a[:60] + "..." for a in argv]
        raise AssertionError(f"{shown} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def libnbd(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a python3-libnbd script with the system interpreter (where `nbd` lives)."""
    return run("/usr/bin/python3", "-c", script, *args)


def test_nbdinfo_list_map_can(node: NodeProc) -> None:
    node.create_volume("info1", 32 * MiB, description="first volume")
    node.create_volume("info2", 16 * MiB, read_only=True)
    info = json.loads(run("nbdinfo", "--json", node.uri("info1")).stdout)
    exp = info["exports"][0]
    assert exp["export-name"] == "info1"
    assert exp["export-size"] == 32 * MiB
    assert exp["description"] == "first volume"
    assert exp["block_size_minimum"] == 1
    assert exp["block_size_preferred"] == 4096
    assert exp["block_size_maximum"] == 32 * MiB
    assert exp["contexts"] == ["base:allocation"]
    for feature in ("flush", "fua", "trim", "zero", "fast-zero", "cache", "df", "multi-conn"):
        assert run("nbdinfo", "--can", feature, node.uri("info1"), check=False).returncode == 0, \
            feature
    assert run("nbdinfo", "--is", "read-only", node.uri("info2"), check=False).returncode == 0
    assert run("nbdinfo", "--is", "read-only", node.uri("info1"), check=False).returncode == 2
    assert run("nbdinfo", "--can", "trim", node.uri("info2"), check=False).returncode == 2

    listed = json.loads(run("nbdinfo", "--list", "--json", node.uri("")).stdout)
    names = {e["export-name"] for e in listed["exports"]}
    assert {"info1", "info2"} <= names

    # The map reflects real holes of the sparse file.
    run("qemu-io", "-f", "raw", "-c", "write -P 0xab 1M 2M", node.uri("info1"))
    extents = json.loads(run("nbdinfo", "--map", "--json", node.uri("info1")).stdout)
    data = [(e["offset"], e["length"]) for e in extents if e["type"] == 0]
    holes = [e for e in extents if e["type"] == 3]
    assert sum(n for _, n in data) >= 2 * MiB
    assert all((o <= 1 * MiB and o + n >= 1 * MiB) or o >= 1 * MiB for o, n in data)
    assert holes and holes[0]["offset"] == 0


def test_qemu_io_patterns(node: NodeProc) -> None:
    node.create_volume("qio", 64 * MiB)
    uri = node.uri("qio")
    run("qemu-io", "-f", "raw",
        "-c", "write -P 0x11 0 4k",
        "-c", "write -P 0x22 4k 1M",
        "-c", "write -P 0x33 10M 3M",
        "-c", "write -f -P 0x44 20M 64k",  # FUA
        "-c", "flush",
        "-c", "write -z 10M 1M",  # zero (NO_HOLE)
        "-c", "write -z -u 11M 1M",  # zero, may punch a hole
        "-c", "discard 4k 512k",
        "-c", "aio_write -P 0x55 30M 64k", "-c", "aio_write -P 0x66 31M 64k", "-c", "aio_flush",
        uri)
    out = run("qemu-io", "-f", "raw",
              "-c", "read -P 0x11 0 4k",
              "-c", "read -P 0x22 516k 508k",  # after the discarded range
              "-c", "read -P 0 10M 2M",
              "-c", "read -P 0x33 12M 1M",
              "-c", "read -P 0x44 20M 64k",
              "-c", "read -P 0x55 30M 64k", "-c", "read -P 0x66 31M 64k",
              "-c", "read -P 0 40M 1M",
              uri).stdout
    assert "Pattern verification failed" not in out
    # A discarded range is a hole in the map; the zeroed-with-hole range reads as zero.
    extents = json.loads(run("nbdinfo", "--map", "--json", uri).stdout)
    assert any(e["type"] & 1 and e["offset"] <= 11 * MiB < e["offset"] + e["length"]
               for e in extents)


def test_qemu_img_convert_compare_round_trip(node: NodeProc, tmp_path: object) -> None:
    src = os.path.join(str(tmp_path), "src.raw")
    back = os.path.join(str(tmp_path), "back.raw")
    with open(src, "wb") as f:
        f.truncate(48 * MiB)
        for i in range(0, 48, 5):  # data with holes between
            f.seek(i * MiB)
            f.write(os.urandom(MiB // 2))
    node.create_volume("conv", 48 * MiB)
    uri = node.uri("conv")
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, uri)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", src, uri)
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri, back)
    with open(src, "rb") as a, open(back, "rb") as b:
        assert a.read() == b.read()


def test_nbdcopy_random_data(node: NodeProc, tmp_path: object) -> None:
    src = os.path.join(str(tmp_path), "rand.raw")
    back = os.path.join(str(tmp_path), "rand.back")
    payload = os.urandom(40 * MiB)
    with open(src, "wb") as f:
        f.write(payload)
    node.create_volume("copy", 40 * MiB)
    run("nbdcopy", "--flush", src, node.uri("copy"))
    run("nbdcopy", node.uri("copy"), back)
    with open(back, "rb") as f:
        assert f.read() == payload


STRICT_SCRIPT = r"""
import sys, nbd
uri = sys.argv[1]
h = nbd.NBD()
h.set_strict_mode(nbd.STRICT_COMMANDS | nbd.STRICT_FLAGS | nbd.STRICT_BOUNDS
                  | nbd.STRICT_ZERO_SIZE | nbd.STRICT_ALIGN)
h.set_opt_mode(True)
h.set_request_structured_replies(True)
h.set_full_info(True)
h.add_meta_context("base:allocation")
h.connect_uri(uri)
assert h.get_structured_replies_negotiated()

# OPT_INFO before GO
h.opt_info()
assert h.get_size() == 16 << 20, h.get_size()
assert h.get_canonical_export_name() == "strict"
assert h.get_export_description() == "strict one"
assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 << 20

# LIST_META_CONTEXT
seen = []
n = h.opt_list_meta_context(lambda name: seen.append(name) or 0)
assert n == 1 and seen == ["base:allocation"], seen

h.opt_go()
assert h.can_meta_context("base:allocation")
assert h.can_multi_conn() and h.can_df() and h.can_fast_zero()

data = bytes(range(256)) * 256  # 64 KiB
h.pwrite(data, 1 << 20, nbd.CMD_FLAG_FUA)
h.flush()
assert h.pread(len(data), 1 << 20) == data

# pread_structured with DF: one chunk holding the data
chunks = []
def chunk(subbuf, offset, status, err):
    chunks.append((offset, status, bytes(subbuf)))
    return 0
buf = h.pread_structured(len(data), 1 << 20, chunk, nbd.CMD_FLAG_DF)
assert buf == data
assert len(chunks) == 1 and chunks[0][0] == 1 << 20 and chunks[0][1] == nbd.READ_DATA

# block_status: data where written, hole elsewhere
ext = {}
def extent(metacontext, offset, entries, err):
    ext[metacontext] = (offset, list(entries))
    return 0
h.block_status(4 << 20, 0, extent)
off, entries = ext["base:allocation"]
assert off == 0
pos, flags_at = 0, []
for i in range(0, len(entries), 2):
    flags_at.append((pos, entries[i], entries[i + 1]))
    pos += entries[i]
assert any(p <= (1 << 20) < p + n and f == 0 for p, n, f in flags_at), flags_at
assert flags_at[0][2] == 3, flags_at  # leading hole reads as zero
h.block_status(4 << 20, 0, extent, nbd.CMD_FLAG_REQ_ONE)
assert len(ext["base:allocation"][1]) == 2

# zero with FAST_ZERO and NO_HOLE, trim, cache
h.zero(64 << 10, 1 << 20, nbd.CMD_FLAG_NO_HOLE)
assert h.pread(64 << 10, 1 << 20) == bytes(64 << 10)
h.zero(1 << 20, 2 << 20, nbd.CMD_FLAG_FAST_ZERO)
h.trim(1 << 20, 3 << 20)
h.cache(1 << 20, 0)
assert h.pread(4096, 3 << 20) == bytes(4096)

# many requests in flight on one connection
cookies = [h.aio_pwrite(bytes([i]) * 4096, i * 4096) for i in range(64)]
assert h.aio_in_flight() > 1
while h.aio_in_flight() > 0:
    h.poll(-1)
for c in cookies:
    assert h.aio_command_completed(c)
for i in range(64):
    assert h.pread(4096, i * 4096) == bytes([i]) * 4096

# errors the server must report (strict checks off for these two)
h.set_strict_mode(0)
try:
    h.pread(4096, (16 << 20) - 1024)
    raise SystemExit("read past the end succeeded")
except nbd.Error as e:
    assert e.errno == "EINVAL", e
try:
    h.pwrite(b"x" * 4096, (16 << 20) - 1024)
    raise SystemExit("write past the end succeeded")
except nbd.Error as e:
    assert e.errno == "ENOSPC", e
h.shutdown()
print("OK")
"""


def test_libnbd_strict(node: NodeProc) -> None:
    node.create_volume("strict", 16 * MiB, description="strict one")
    assert libnbd(STRICT_SCRIPT, node.uri("strict")).stdout.strip() == "OK"


READ_ONLY_SCRIPT = r"""
import sys, nbd
h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(sys.argv[1])
assert h.is_read_only()
for op in (lambda: h.pwrite(b"a" * 512, 0), lambda: h.trim(512, 0), lambda: h.zero(512, 0)):
    try:
        op()
        raise SystemExit("write to a read-only export succeeded")
    except nbd.Error as e:
        assert e.errno == "EPERM", e
assert h.pread(512, 0) == bytes(512)
h.shutdown()
print("OK")
"""


def test_read_only_export_refuses_writes(node: NodeProc) -> None:
    node.create_volume("ro", 1 * MiB, read_only=True)
    assert libnbd(READ_ONLY_SCRIPT, node.uri("ro")).stdout.strip() == "OK"


def test_fio_verify_crc32c(node: NodeProc) -> None:
    node.create_volume("fio", 64 * MiB)
    out = run("fio", "--name=verify", "--ioengine=nbd", f"--uri={node.uri('fio')}",
              "--rw=randwrite", "--bs=4k", "--bssplit=4k/60:64k/30:1m/10", "--iodepth=16",
              "--size=64m", "--verify=crc32c", "--verify_state_save=0", "--verify_fatal=1",
              "--do_verify=1",
              "--output-format=json", timeout=300).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] >= 64 * MiB


MULTI_CONN_SCRIPT = r"""
import sys, threading, nbd
uri = sys.argv[1]
N = 256
def writer(idx):
    h = nbd.NBD()
    h.connect_uri(uri)
    assert h.can_multi_conn()
    for i in range(N):
        h.pwrite(bytes([idx + 1]) * 4096, (idx * N + i) * 4096)
    h.shutdown()
ts = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
for t in ts: t.start()
flusher = nbd.NBD()
flusher.connect_uri(uri)
flushes = 0
while any(t.is_alive() for t in ts):
    flusher.flush()
    flushes += 1
for t in ts: t.join()
flusher.flush()  # covers every write the two writers had acknowledged
for idx in range(2):
    for i in range(N):
        assert flusher.pread(4096, (idx * N + i) * 4096) == bytes([idx + 1]) * 4096
flusher.shutdown()
print("OK", flushes)
"""


def test_multi_conn_flush_covers_other_connections(node: NodeProc) -> None:
    node.create_volume("mc", 8 * MiB)
    out = libnbd(MULTI_CONN_SCRIPT, node.uri("mc")).stdout.split()
    assert out[0] == "OK" and int(out[1]) >= 1


def test_concurrent_clients(node: NodeProc) -> None:
    """Several clients on different volumes at once each read back their own bytes."""
    errors: list[str] = []

    def one(i: int) -> None:
        name = f"cc{i}"
        node.create_volume(name, 8 * MiB)
        p = subprocess.run(["qemu-io", "-f", "raw", "-c", f"write -P {i + 1} 0 8M",
                            "-c", f"read -P {i + 1} 0 8M", node.uri(name)],
                           capture_output=True, text=True, timeout=120)
        if p.returncode or "verification failed" in p.stdout:
            errors.append(p.stdout + p.stderr)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors

"""Malformed NBD traffic against a real node: each gets the spec's answer, the node stays
up, and another client's transfer continues unharmed."""

from __future__ import annotations

import contextlib
import json
import os
import struct
import subprocess
import threading
from collections.abc import Callable

import pytest

from nodeproc import NodeProc
from rawnbd import RawClient
from twinvol.nbd.constants import IHAVEOPT, Cmd, CmdFlag, Err, Opt, Rep, Reply

pytestmark = pytest.mark.e2e

MiB = 1 << 20
SIZE = 4 * MiB


@pytest.fixture(scope="module")
def vols(node: NodeProc) -> NodeProc:
    node.create_volume("bad", SIZE)
    node.create_volume("badro", SIZE, read_only=True)
    return node


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def connected(node: NodeProc, export: str = "bad", structured: bool = False) -> RawClient:
    c = RawClient(node.nbd_port)
    size, _flags = c.go(export, structured=structured)
    assert size == SIZE
    return c


# ---- handshake ----------------------------------------------------------

def test_unknown_client_flags_hang_up(vols: NodeProc) -> None:
    c = RawClient(vols.nbd_port)
    c.client_flags(0x80)
    assert c.is_closed()


def test_wrong_option_magic_hangs_up(vols: NodeProc) -> None:
    c = RawClient(vols.nbd_port)
    c.client_flags(3)
    c.send(struct.pack(">QII", 0x1234, Opt.GO, 0))
    assert c.is_closed()


def test_unknown_option_then_go(vols: NodeProc) -> None:
    c = RawClient(vols.nbd_port)
    c.client_flags(3)
    c.option(999, b"whatever")
    opt, rep, msg = c.option_reply()
    assert (opt, rep) == (999, Rep.ERR_UNSUP) and msg
    c.option(Opt.LIST, b"x")
    assert c.option_reply()[1] == Rep.ERR_INVALID
    c.option(Opt.STARTTLS)
    assert c.option_reply()[1] == Rep.ERR_UNSUP
    c.option(Opt.GO, struct.pack(">I", 4) + b"nope" + struct.pack(">H", 0))
    assert c.option_reply()[1] == Rep.ERR_UNKNOWN
    c.option(Opt.GO, struct.pack(">I", 99) + b"bad")  # name length past the data
    assert c.option_reply()[1] == Rep.ERR_INVALID
    c.option(Opt.GO, struct.pack(">I", 3) + b"bad" + struct.pack(">H", 0))
    replies = c.replies_until_final()
    assert replies[-1][1] == Rep.ACK
    c.request(Cmd.READ, 0, 512)
    assert c.simple_reply() == (0, 1)
    assert c.recv_exact(512) == bytes(512)


def test_oversized_option_is_skipped_not_buffered(vols: NodeProc) -> None:
    before = rss_kib(vols.pid)
    c = RawClient(vols.nbd_port)
    c.client_flags(3)
    length = 48 * MiB
    c.send(struct.pack(">QII", IHAVEOPT, Opt.INFO, length))
    chunk = os.urandom(MiB)
    for _ in range(length // MiB):
        c.send(chunk)
    opt, rep, _ = c.option_reply()
    assert (opt, rep) == (Opt.INFO, Rep.ERR_TOO_BIG)
    assert rss_kib(vols.pid) - before < 24 * 1024  # not buffered
    c.option(Opt.ABORT)
    assert c.option_reply()[1] == Rep.ACK


def test_unknown_export_name_hangs_up(vols: NodeProc) -> None:
    c = RawClient(vols.nbd_port)
    c.client_flags(3)
    c.option(Opt.EXPORT_NAME, b"no-such-volume")
    assert c.is_closed()


def test_truncated_handshake_and_request(vols: NodeProc) -> None:
    c = RawClient(vols.nbd_port)
    c.send(b"\x00\x00")  # half of the client flags
    c.close()
    c = connected(vols)
    c.send(struct.pack(">IHH", 0x25609513, 0, Cmd.READ))  # half a request header
    c.close()


# ---- transmission ---------------------------------------------------------

def test_bad_request_magic_hangs_up(vols: NodeProc) -> None:
    c = connected(vols)
    c.request(Cmd.READ, 0, 512, magic=0xDEADBEEF)
    assert c.is_closed()


@pytest.mark.parametrize(("cmd", "offset", "length", "data", "err"), [
    (Cmd.READ, SIZE - 512, 1024, b"", Err.EINVAL),
    (Cmd.WRITE, SIZE - 512, 1024, b"w" * 1024, Err.ENOSPC),
    (Cmd.TRIM, SIZE, 512, b"", Err.EINVAL),
    (Cmd.WRITE_ZEROES, SIZE - 4096, 8192, b"", Err.ENOSPC),
    (Cmd.CACHE, 2**63, 512, b"", Err.EINVAL),
    (Cmd.READ, 0, 64 * MiB, b"", Err.EINVAL),
    (55, 0, 0, b"", Err.EINVAL),
])
def test_errors_then_connection_still_works(vols: NodeProc, cmd: int, offset: int, length: int,
                                            data: bytes, err: int) -> None:
    c = connected(vols)
    c.request(cmd, offset, length, data=data, cookie=7)
    assert c.simple_reply() == (err, 7)
    # The stream is still in sync: the next request parses and succeeds.
    c.request(Cmd.WRITE, 0, 4, data=b"sync", cookie=8)
    assert c.simple_reply() == (0, 8)


def test_unknown_flags_are_einval_and_payload_consumed(vols: NodeProc) -> None:
    c = connected(vols)
    c.request(Cmd.WRITE, 0, 512, flags=0x40, data=b"z" * 512, cookie=3)
    assert c.simple_reply() == (Err.EINVAL, 3)
    c.request(Cmd.READ, 0, 512, flags=CmdFlag.DF, cookie=4)  # DF needs structured replies
    assert c.simple_reply() == (Err.EINVAL, 4)
    c.request(Cmd.BLOCK_STATUS, 0, 512, cookie=5)  # no meta context negotiated
    assert c.simple_reply() == (Err.EINVAL, 5)
    c.request(Cmd.FLUSH, cookie=6)
    assert c.simple_reply() == (0, 6)


def test_structured_error_chunk_has_message(vols: NodeProc) -> None:
    c = connected(vols, structured=True)
    c.request(Cmd.READ, SIZE, 512, cookie=9)
    flags, typ, cookie, payload = c.structured_chunk()
    assert (flags, typ, cookie) == (1, Reply.ERROR, 9)
    err, msglen = struct.unpack(">IH", payload[:6])
    assert err == Err.EINVAL and b"past the end" in payload[6:6 + msglen]


def test_read_only_export_gets_eperm(vols: NodeProc) -> None:
    c = connected(vols, "badro")
    c.request(Cmd.WRITE, 0, 512, data=b"r" * 512, cookie=1)
    assert c.simple_reply() == (Err.EPERM, 1)
    c.request(Cmd.TRIM, 0, 512, cookie=2)
    assert c.simple_reply() == (Err.EPERM, 2)
    c.request(Cmd.WRITE_ZEROES, 0, 512, cookie=3)
    assert c.simple_reply() == (Err.EPERM, 3)
    c.request(Cmd.READ, 0, 512, cookie=4)
    assert c.simple_reply() == (0, 4)
    assert c.recv_exact(512) == bytes(512)


def test_oversized_write_hangs_up_without_buffering(vols: NodeProc) -> None:
    before = rss_kib(vols.pid)
    c = connected(vols)
    c.request(Cmd.WRITE, 0, 1 << 31)
    assert c.is_closed()
    assert rss_kib(vols.pid) - before < 16 * 1024


def test_disconnect_mid_write_applies_nothing(vols: NodeProc) -> None:
    c = connected(vols)
    c.request(Cmd.WRITE, MiB, 65536, data=b"p" * 32768)  # only half the payload
    c.close()
    c = connected(vols)
    c.request(Cmd.READ, MiB, 65536, cookie=2)
    assert c.simple_reply() == (0, 2)
    assert c.recv_exact(65536) == bytes(65536)


def test_garbage_after_handshake_hangs_up(vols: NodeProc) -> None:
    c = connected(vols)
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        c.send(os.urandom(MiB))
    assert c.is_closed()


def test_disc_closes_after_inflight(vols: NodeProc) -> None:
    c = connected(vols)
    c.request(Cmd.WRITE, 0, 512, data=b"d" * 512, flags=CmdFlag.FUA, cookie=1)
    c.request(Cmd.DISC, cookie=2)
    assert c.simple_reply() == (0, 1)
    assert c.is_closed()


# ---- the node keeps serving others ---------------------------------------------

BAD_CLIENTS: list[Callable[[NodeProc], None]] = [
    test_unknown_client_flags_hang_up,
    test_wrong_option_magic_hangs_up,
    test_unknown_export_name_hangs_up,
    test_truncated_handshake_and_request,
    test_bad_request_magic_hangs_up,
    test_garbage_after_handshake_hangs_up,
    test_disconnect_mid_write_applies_nothing,
    test_oversized_write_hangs_up_without_buffering,
]


def test_other_clients_unharmed(vols: NodeProc) -> None:
    """fio with verification runs while bad clients keep hitting the same node."""
    vols.create_volume("good", 32 * MiB)
    stop = threading.Event()
    failures: list[BaseException] = []

    def attack() -> None:
        while not stop.is_set():
            for bad in BAD_CLIENTS:
                try:
                    bad(vols)
                except BaseException as e:
                    failures.append(e)
                    return

    t = threading.Thread(target=attack)
    t.start()
    try:
        out = subprocess.run(
            ["fio", "--name=good", "--ioengine=nbd", f"--uri={vols.uri('good')}",
             "--rw=randwrite", "--bs=64k", "--iodepth=8", "--size=32m", "--verify=crc32c",
             "--verify_fatal=1", "--verify_state_save=0", "--output-format=json"],
            capture_output=True, text=True, timeout=300)
    finally:
        stop.set()
        t.join()
    assert out.returncode == 0, out.stderr
    job = json.loads(out.stdout[out.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0
    assert not failures, failures
    assert vols.alive()

"""The host agent's NBD listener has the node's limits ([limits], the same code,
nbd/guard.py): hundreds of half-open connections are dropped at the negotiation
deadline, a client address over its cap and a listener over its total are refused at
accept with one log line each, option haggling is bounded, and a normal client is
served meanwhile. Real agent process, real sockets, real nbdinfo."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from clusterproc import ClusterProc
from rawnbd import RawClient
from twinvol.cluster import LimitsConfig

pytestmark = pytest.mark.e2e

MiB = 1 << 20
PER_CLIENT = 200
TOTAL = 203
TIMEOUT = 3.0


@pytest.fixture
def agent(tmp_path: Any) -> Iterator[ClusterProc]:
    c = ClusterProc(str(tmp_path), names=("A",), host=True)
    c.cfg.limits = LimitsConfig(nbd_negotiation_timeout=TIMEOUT, nbd_max_per_client=PER_CLIENT,
                                nbd_max_connections=TOTAL, nbd_max_options=50)
    c.rewrite()
    try:
        c.start()
        status, body = c.api("A", "POST", "/api/v1/volumes", {"name": "vol", "size": 8 * MiB})
        assert status == 201, body
        yield c
    finally:
        c.stop()


def port(c: ClusterProc) -> int:
    assert c.cfg.host is not None
    return int(str(c.cfg.host["nbd"]).rsplit(":", 1)[1])


def half_open(p: int, source: str) -> socket.socket:
    """A client that reads the greeting and then says nothing."""
    s = socket.socket()
    s.bind((source, 0))
    s.settimeout(10)
    s.connect(("127.0.0.1", p))
    assert len(s.recv(18)) == 18
    return s


def refused(p: int, source: str) -> bool:
    s = socket.socket()
    s.bind((source, 0))
    s.settimeout(5)
    try:
        s.connect(("127.0.0.1", p))
        return s.recv(100) == b""  # closed before the greeting
    except ConnectionResetError:
        return True
    finally:
        s.close()


def lines(c: ClusterProc, text: str) -> int:
    with open(f"{c.dir}/host.log") as f:
        return sum(text in line for line in f)


def nbdinfo_size(c: ClusterProc) -> int:
    return int(subprocess.run(["nbdinfo", "--size", c.host_uri("vol")], capture_output=True,
                              text=True, check=True, timeout=30).stdout)


def test_agent_listener_limits(agent: ClusterProc) -> None:
    c, p = agent, port(agent)
    haggler = RawClient(p)
    haggler.client_flags(3)
    for _ in range(50):
        haggler.option(999)
        haggler.option_reply()
    haggler.option(999)
    assert haggler.is_closed()
    haggler.close()
    time.sleep(0.2)
    assert lines(c, "more than 50 options in one negotiation") == 1

    t0 = time.monotonic()
    flood = [half_open(p, "127.0.0.2") for _ in range(PER_CLIENT)]
    assert refused(p, "127.0.0.2")  # the address's cap
    assert nbdinfo_size(c) == 8 * MiB  # another address is served meanwhile
    assert nbdinfo_size(c) == 8 * MiB  # ... and its connections are given back
    others = [half_open(p, "127.0.0.3") for _ in range(TOTAL - PER_CLIENT)]
    assert refused(p, "127.0.0.4")  # the listener's total
    time.sleep(0.3)
    assert lines(c, f"127.0.0.2 already has {PER_CLIENT} NBD connections (limit "
                    f"{PER_CLIENT} per client address)") == 1
    assert lines(c, f"the host agent already has {TOTAL} NBD connections (limit "
                    f"{TOTAL})") == 1
    for s in flood + others:  # every half-open client is dropped at the deadline
        with contextlib.suppress(ConnectionResetError):
            assert s.recv(100) == b""
        s.close()
    assert TIMEOUT - 0.5 < time.monotonic() - t0 < TIMEOUT + 8
    time.sleep(0.3)
    assert lines(c, "nbd negotiation timed out, connection dropped") == TOTAL
    assert nbdinfo_size(c) == 8 * MiB
    again = half_open(p, "127.0.0.2")  # the cap counted open connections only
    again.close()

"""NBD listener limits on a real node: a client that never finishes negotiating is
dropped at the deadline, a client address over its connection cap is refused, and each
refusal is one log line."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator

import pytest

from nodeproc import NodeProc
from rawnbd import RawClient
from twinvol.cluster import LimitsConfig
from twinvol.nbd.guard import Admission

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProc]:
    n = NodeProc(str(tmp_path_factory.mktemp("limits")),
                 limits=LimitsConfig(nbd_negotiation_timeout=1.0, nbd_max_per_client=3,
                                     nbd_max_options=50))
    n.start()
    n.create_volume("lim", 1 << 20)
    yield n
    n.stop()


def count(node: NodeProc, text: str) -> int:
    return sum(text in line for line in node.log().splitlines())


def test_negotiation_deadline(limited: NodeProc) -> None:
    s = socket.create_connection(("127.0.0.1", limited.nbd_port))
    s.settimeout(5)
    t0 = time.monotonic()
    greeting = s.recv(18)
    assert len(greeting) == 18
    assert s.recv(100) == b""  # nothing sent: the node hangs up after 1 s
    assert 0.8 < time.monotonic() - t0 < 4
    s.close()
    assert count(limited, '"msg": "nbd negotiation timed out, connection dropped"') == 1


def test_connections_per_client_address(limited: NodeProc) -> None:
    held = [RawClient(limited.nbd_port) for _ in range(3)]
    for c in held:
        assert c.go("lim")[0] == 1 << 20
    extra = socket.create_connection(("127.0.0.1", limited.nbd_port))
    extra.settimeout(5)
    with contextlib.suppress(ConnectionResetError):  # refused before the greeting
        assert extra.recv(100) == b""
    extra.close()
    time.sleep(0.2)
    assert count(limited, "127.0.0.1 already has 3 NBD connections (limit 3 per client "
                          "address)") == 1
    for c in held:
        c.close()
    time.sleep(0.3)
    again = RawClient(limited.nbd_port)  # the cap counts open connections only
    assert again.go("lim")[0] == 1 << 20
    again.close()


def test_option_haggling_is_bounded(limited: NodeProc) -> None:
    c = RawClient(limited.nbd_port)
    c.client_flags(3)
    for _ in range(50):
        c.option(999)
        c.option_reply()
    c.option(999)
    assert c.is_closed()
    c.close()
    assert count(limited, "more than 50 options in one negotiation") == 1


def test_admission_counts() -> None:
    a = Admission(max_connections=3, max_per_client=2)
    assert a.admit("h1") is None and a.admit("h1") is None
    assert a.admit("h1") == "h1 already has 2 NBD connections (limit 2 per client address)"
    assert a.admit("h2") is None
    assert a.admit("h3") == "the node already has 3 NBD connections (limit 3)"
    a.release("h1")
    assert a.admit("h3") is None
    assert dict(a.by_host) == {"h1": 1, "h2": 1, "h3": 1}

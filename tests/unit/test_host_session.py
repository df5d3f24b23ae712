"""The Python data path's retry rules (host/paths.py Session with host/retry.py), with
fake path connections the test answers request by request: the same cases as the
native relay's tests in test_relay.py."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from twinvol.host.paths import Clock, Op, PathState
from twinvol.host.session import Session
from twinvol.nbd.aio_client import ConnectionLost
from twinvol.nbd.client_events import Completed
from twinvol.nbd.constants import Cmd, Err


class FakeConn:
    def __init__(self) -> None:
        self.pending: dict[int, Op] = {}

    def take_inflight(self) -> list[Op]:
        tags = list(self.pending.values())
        self.pending.clear()
        return tags


class FakeClient:
    """A path's NBD connection: records requests; the test answers or loses them."""

    read_only = False

    def __init__(self) -> None:
        self.conn = FakeConn()
        self.sent: list[Op] = []
        self.on_lost: Callable[[str], None] | None = None
        self.closed = False

    def submit(self, cmd: int, offset: int, length: int, flags: int, data: Any,
               tag: Op) -> None:
        self.sent.append(tag)
        self.conn.pending[id(tag)] = tag

    def answer(self, op: Op, error: int = 0, message: str = "") -> None:
        del self.conn.pending[id(op)]
        op(Completed(op, op.cookie, op.cmd, error, message))

    def lose(self, reason: str) -> None:
        """The node closed the connection."""
        for tag in self.conn.take_inflight():
            tag(ConnectionLost(reason))
        if self.on_lost is not None:
            self.on_lost(reason)

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


class Link:
    def __init__(self, name: str) -> None:
        self.name = name
        self.nbd = ("127.0.0.1", 1)


class Hooks:
    def __init__(self) -> None:
        self.clock = Clock()

    def events_up(self, node: str) -> bool:
        return True

    def count(self, export: str, what: str, n: int = 1) -> None:
        pass


class Client:
    """The session's responder: what the agent's client was answered."""

    def __init__(self) -> None:
        self.answers: list[tuple[int, int, str]] = []

    def reply(self, op: Op, res: Completed) -> None:
        self.answers.append((op.cookie, res.error, res.message))

    def reply_error(self, op: Op, err: int, message: str) -> None:
        self.answers.append((op.cookie, err, message))


def session(hold_timeout: float = 30.0) -> tuple[Session, Client, dict[str, FakeClient]]:
    s = Session(Hooks(), "v", {"size": 1 << 20}, [Link("A"), Link("B")],  # type: ignore[list-item]
                hold_timeout=hold_timeout, io_timeout=15.0)
    client = Client()
    s.responder = client
    conns = {}
    for p in s.paths:
        conns[p.node] = FakeClient()
        p._connected(conns[p.node])  # type: ignore[arg-type]
    return s, client, conns


def write(s: Session, cookie: int) -> None:
    s.submit(int(Cmd.WRITE), 0, cookie, cookie * 512, 512, bytes([cookie]) * 512)


def run(test: Callable[[], None]) -> None:
    async def main() -> None:
        test()

    asyncio.run(main())


def test_a_faulted_write_waits_until_older_ones_on_its_path_are_answered() -> None:
    def test() -> None:
        s, client, conns = session()
        a, b = conns["A"], conns["B"]
        for k in (1, 2, 3):
            write(s, k)
        w1, w2, w3 = a.sent
        a.answer(w3, Err.EIO, "partner lost")
        assert s.by_node["A"].state is PathState.DOWN and s.by_node["A"].draining
        a.answer(w1)
        assert b.sent == [] and client.answers == [(1, 0, "")]
        a.answer(w2)
        assert [op.cookie for op in b.sent] == [3] and a.closed
        assert s.by_node["A"].reason == "node A answered EIO: partner lost"
        b.answer(b.sent[0])
        assert client.answers == [(1, 0, ""), (2, 0, ""), (3, 0, "")]
        write(s, 4)  # new writes go to B while A is out
        assert [op.cookie for op in b.sent] == [3, 4]

    run(test)


def test_requests_of_a_closed_path_are_resent_in_client_order() -> None:
    def test() -> None:
        s, client, conns = session()
        a, b = conns["A"], conns["B"]
        for k in (1, 2, 3):
            write(s, k)
        w1, _w2, w3 = a.sent
        a.answer(w3, Err.EIO)
        a.answer(w1, Err.ESHUTDOWN)
        assert b.sent == []
        a.lose("node A closed the connection")
        assert [op.cookie for op in b.sent] == [1, 2, 3]
        assert client.answers == []

    run(test)


def test_a_read_goes_to_the_other_path_at_once() -> None:
    def test() -> None:
        s, _, conns = session()
        s.submit(int(Cmd.READ), 0, 7, 0, 512, None)
        s.submit(int(Cmd.READ), 0, 8, 0, 512, None)
        (ra,), (rb,) = conns["A"].sent, conns["B"].sent
        conns["A"].answer(ra, Err.EIO)
        assert conns["B"].sent == [rb, ra]  # re-sent at once, while B still has rb
        assert conns["A"].closed

    run(test)


def test_errors_of_the_request_are_answered_and_the_path_stays() -> None:
    def test() -> None:
        s, client, conns = session()
        for k, err in enumerate((Err.EPERM, Err.ENOSPC, Err.EINVAL, Err.ENOTSUP)):
            write(s, k)
            conns["A"].answer(conns["A"].sent[-1], err, "no")
            assert client.answers[-1] == (k, err, "no")
        assert s.by_node["A"].state is PathState.UP and conns["B"].sent == []
        assert s.retries == 0

    run(test)


def test_a_request_failed_by_every_path_gets_the_error_after_hold_timeout() -> None:
    def test() -> None:
        s, client, conns = session(hold_timeout=30.0)
        clock = s.hooks.clock
        write(s, 1)
        conns["A"].answer(conns["A"].sent[0], Err.EIO, "fenced")
        conns["B"].answer(conns["B"].sent[0], Err.EIO, "fenced")
        assert s.held_count() == 1 and client.answers == []  # no path: held
        clock.now = 29.0
        again = FakeClient()
        s.by_node["A"]._connected(again)  # type: ignore[arg-type]
        again.answer(again.sent[0], Err.EIO, "fenced")
        assert s.held_count() == 1 and client.answers == []  # still within hold_timeout
        clock.now = 30.0
        last = FakeClient()
        s.by_node["B"]._connected(last)  # type: ignore[arg-type]
        last.answer(last.sent[0], Err.EIO, "still fenced")
        assert client.answers == [(1, Err.EIO, "still fenced")]
        assert s.held_count() == 0 and s.outstanding == 0

    run(test)

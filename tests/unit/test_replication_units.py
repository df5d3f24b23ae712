"""Peer-link framing, generation rules and persistent bitmaps, without processes."""

from __future__ import annotations

import asyncio
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twinvol.replication.bitmap import CHUNK, PersistentBits, chunks_of, nchunks
from twinvol.replication.pairs import resync_direction
from twinvol.replication.wire import MAX_HEADER, FrameDecoder, WireError, encode
from twinvol.storage.buffers import POOL

frames = st.lists(st.tuples(
    st.dictionaries(st.sampled_from(["pair", "off", "len", "x"]),
                    st.integers(0, 2**40) | st.text(max_size=20), max_size=4),
    st.binary(max_size=3000)), max_size=20)


@settings(max_examples=150, deadline=None)
@given(frames, st.data())
def test_frames_survive_any_split(msgs: list[tuple[dict[str, object], bytes]],
                                  data: st.DataObject) -> None:
    stream = b"".join(b"".join(encode({"t": "w", **h}, p)) for h, p in msgs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    dec = FrameDecoder()
    got = []
    prev = 0
    for cut in [*cuts, len(stream)]:
        got += dec.feed(stream[prev:cut])
        prev = cut
    assert [(h, p) for h, p in got] == [({"t": "w", **h}, p) for h, p in msgs]


def test_large_payload_is_received_in_place_and_its_buffer_reused() -> None:
    """A large payload goes straight into its pooled buffer; the buffer is lent again
    only once nothing refers to the payload any more."""
    payload = os.urandom(300_000)
    stream = b"".join(encode({"t": "w", "off": 7}, payload))
    dec = FrameDecoder()
    assert dec.feed(stream[:100]) == []
    view = dec.payload_buffer()
    assert view is not None and len(view) == len(payload) - (100 - len(stream) + len(payload))
    view[:len(view)] = stream[100:]
    [(h, got)] = dec.payload_received(len(view))
    assert h == {"t": "w", "off": 7} and got == payload and dec.payload_buffer() is None
    held = id(got.obj)  # type: ignore[union-attr]
    assert id(POOL.get(len(payload))) != held, "a payload still referenced is not lent"
    del got, view
    assert id(POOL.get(len(payload))) == held


def test_oversized_or_garbage_frames_are_errors() -> None:
    with pytest.raises(WireError, match="exceed"):
        FrameDecoder().feed(struct.pack(">II", MAX_HEADER + 1, 0))
    with pytest.raises(WireError, match="undecodable"):
        FrameDecoder().feed(struct.pack(">II", 3, 0) + b"\xc1\xc1\xc1")
    not_utf8 = b"\x81\xa1t\xa1\xff"   # {"t": <the byte 0xff as a string>}
    with pytest.raises(WireError, match=r"undecodable.*utf-8"):
        FrameDecoder().feed(struct.pack(">II", len(not_utf8), 0) + not_utf8)
    with pytest.raises(WireError, match="no type"):
        FrameDecoder().feed(b"".join(encode({"x": 1})))


def test_resync_direction() -> None:
    assert resync_direction("g1", [], "g1", []) == "none"
    assert resync_direction("g2", ["g1"], "g1", []) == "to_peer"
    assert resync_direction("g1", [], "g2", ["g1"]) == "from_peer"
    assert resync_direction("g2", ["g1"], "g3", ["g1"]) == "split_brain"


def test_bits_persist_and_share_one_sync(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "bits")
    b = PersistentBits(path, 1000)
    assert b.set(3) and not b.set(3)
    assert b.set_many([999, 500])
    ex = ThreadPoolExecutor(2)

    async def both() -> None:
        await asyncio.gather(b.sync(ex), b.sync(ex))

    asyncio.run(both())
    b.close()
    again = PersistentBits(path, 1000)
    assert list(again.iter_set()) == [3, 500, 999]
    again.clear(500)
    again.sync_now()
    assert PersistentBits(path, 1000).count() == 2


def test_chunk_math() -> None:
    assert list(chunks_of(0, CHUNK)) == [0]
    assert list(chunks_of(CHUNK - 1, 2)) == [0, 1]
    assert list(chunks_of(5, 0)) == []
    assert nchunks(CHUNK + 1) == 2


def test_bitmap_merge_ors_a_partner_bitmap_and_ignores_bits_past_the_end(tmp_path: str) -> None:
    bits = PersistentBits(os.path.join(tmp_path, "b"), 12)
    bits.set(1)
    bits.sync_now()
    bits.merge(bytes([0b1000_0100, 0xFF, 0xFF]))   # bits 2, 7, 8..15 and a third byte
    assert list(bits.iter_set()) == [1, 2, 7, 8, 9, 10, 11]
    assert not bits.durable
    bits.sync_now()
    bits.merge(bytes([0b0000_0010]))               # nothing new: stays durable
    assert bits.durable
    bits.close()


class _Pipe:
    """An in-memory transport: what one PeerLink writes, the other receives, in small
    pieces (so frames are cut anywhere)."""

    def __init__(self) -> None:
        self.peer: Any = None
        self.writes = 0
        self.closing = False

    def get_extra_info(self, name: str) -> None:
        return None

    def is_closing(self) -> bool:
        return self.closing

    def abort(self) -> None:
        self.closing = True

    def write(self, data: bytes) -> None:
        self.writelines([data])

    def writelines(self, parts: list[bytes | bytearray | memoryview]) -> None:
        self.writes += 1
        data = b"".join(bytes(p) for p in parts)
        pos = 0
        while pos < len(data):
            buf = self.peer.get_buffer(-1)
            n = min(len(buf), len(data) - pos, 1500)
            buf[:n] = data[pos:pos + n]
            self.peer.buffer_updated(n)
            pos += n


def _linked(handler: Any) -> tuple[Any, Any]:
    """Two authenticated PeerLinks of nodes A and B connected by in-memory pipes."""
    from twinvol.cluster import ClusterConfig, ClusterSection, NodeConfig
    from twinvol.replication.peer import PeerLink
    from twinvol.replication.peer_service import PeerService

    cfg = ClusterConfig(nodes={n: NodeConfig(site=n, nbd="127.0.0.1:1", api="127.0.0.1:2",
                                             data_dir=n, peer="127.0.0.1:3") for n in "AB"},
                        cluster=ClusterSection(name="t", secret="s3cret"))
    svc = {n: PeerService(cfg, n, handler, lambda _p: None, lambda _p, _r: None)
           for n in "AB"}
    a, b = PeerLink(svc["A"], "B"), PeerLink(svc["B"], None)
    ta, tb = _Pipe(), _Pipe()
    ta.peer, tb.peer = b, a
    b.connection_made(tb)  # type: ignore[arg-type]
    a.connection_made(ta)  # type: ignore[arg-type]
    return a, b


def test_batched_requests_keep_order_with_replies_and_answer_each_row() -> None:
    """Rows queued in one step leave as one frame and are answered one by one (errors
    included); a reply queued before a request reaches the peer before it."""
    from twinvol.replication.peer import Later, RemoteError

    seen: list[tuple[str, list[int], bytes]] = []
    order: list[str] = []
    later = Later()

    def handler(peer: str, h: dict[str, Any], payload: Any) -> Any:
        if h["t"] == "wb":
            seen.append(("wb", [r[1] for r in h["rows"]], bytes(payload)))
            return [None, RemoteError("disk on fire", "5"), later]
        order.append(f"request {h['t']}")
        return {}, b""

    async def settle() -> None:
        for _ in range(5):
            await asyncio.sleep(0)

    async def main() -> None:
        a, b = _linked(handler)
        await settle()
        assert a.authed and b.authed
        got: dict[int, BaseException | None] = {}

        def answer(k: int) -> Any:
            def done(exc: BaseException | None) -> None:
                got[k] = exc
                order.append(f"answer {k}")
            return done

        for k in (1, 2, 3):
            a.request_row("wb", "p", [k], bytes([k]) * 3, answer(k))
        await settle()
        assert seen == [("wb", [1, 2, 3], b"\x01\x01\x01\x02\x02\x02\x03\x03\x03")]
        assert got[1] is None and isinstance(got[2], RemoteError) and 3 not in got
        assert str(got[2]) == "disk on fire" and got[2].code == "5"
        # B answers the third row later, then sends a request: it must not overtake.
        order.clear()
        later.done(({}, b""))
        fut = b.request({"t": "x"})
        await settle()
        assert order == ["answer 3", "request x"] and got[3] is None
        await fut
        assert a.waiting == {} and b.waiting == {}

    asyncio.run(main())

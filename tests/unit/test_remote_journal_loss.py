"""A damaged journal never drops writes silently: when unshipped records are turned into
dirty chunks (overflow, demotion, DR takeover) and the journal cannot be read, every
chunk of the group is marked dirty and a `journal_damaged` event (a fault) is raised.

Before, `_unapplied` returned no records on a JournalError and the journal was reset:
the writes in the unreadable records never reached the far copy."""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

from twinvol.faults.detectors import from_event
from twinvol.replication.bitmap import CHUNK
from twinvol.replication.remote import RemoteCopy
from twinvol.storage.journal import Journal, Record, encode_record

SIZE = 64 * CHUNK


class Bits:
    def __init__(self) -> None:
        self.set: set[int] = set()

    def set_many(self, chunks: Any) -> bool:
        before = len(self.set)
        self.set.update(chunks)
        return len(self.set) != before

    async def sync(self, executor: Any) -> None:
        return None


def setup(tmp: str) -> tuple[RemoteCopy, Any, Any, list[tuple[str, dict[str, Any]]]]:
    j = Journal(tmp, limit=1 << 20)
    for s in range(1, 11):
        j.append(Record(seq=s, pair="p", cmd=1, flags=0, offset=s * CHUNK, length=4096,
                        time=1000.0 + s, data=b"x" * 4096))
    events: list[tuple[str, dict[str, Any]]] = []
    pr = SimpleNamespace(copy_task=None, recopy=set(), dirty=Bits(),
                         vol=SimpleNamespace(record=SimpleNamespace(size=SIZE)))
    g = SimpleNamespace(journal=j, pairs={"p": pr}, rec=SimpleNamespace(name="g1", applied=2))
    rc = RemoteCopy.__new__(RemoteCopy)
    rc.mgr = SimpleNamespace(spawn=lambda coro: coro.close())  # type: ignore[assignment]
    rc.node = SimpleNamespace(executor=None,  # type: ignore[assignment]
                              events=SimpleNamespace(
                                  publish=lambda kind, **kw: events.append((kind, kw))))
    return rc, g, pr, events


def test_readable_records_mark_their_own_chunks(tmp_path: Any) -> None:
    rc, g, pr, events = setup(str(tmp_path))
    rc.mark_unapplied(g)
    assert pr.dirty.set == set(range(3, 11))  # records 3..10: not applied at the target
    assert events == []


def test_a_damaged_journal_marks_every_chunk_and_raises_a_fault(tmp_path: Any) -> None:
    rc, g, pr, events = setup(str(tmp_path))
    seg = os.path.join(str(tmp_path), sorted(os.listdir(str(tmp_path)))[0])
    size = len(encode_record(Record(seq=1, pair="p", cmd=1, flags=0, offset=CHUNK,
                                    length=4096, time=1001.0, data=b"x" * 4096)))
    with open(seg, "r+b") as f:  # flip a byte inside record 6
        f.seek(size * 5 + 100)
        b = f.read(1)
        f.seek(size * 5 + 100)
        f.write(bytes([b[0] ^ 0x40]))
    rc.mark_unapplied(g)
    assert pr.dirty.set == set(range(SIZE // CHUNK))
    assert [k for k, _ in events] == ["journal_damaged"]
    draft = from_event({"type": "journal_damaged", "node": "A", "time": 1.0,
                        **events[0][1]})
    assert draft is not None and draft.severity == "error" and draft.subject == "g1"

"""The journal of a consistency group: an ordered, bounded, checksummed log of writes.

Async remote copy records every write acknowledged at the primary site here, in
sequence-number order per consistency group, and ships the records to the far
site, which applies them in the same order (so its copy is always a
crash-consistent point in time). The standby node of an active-active pair keeps
a journal with the same sequence numbers, so it can feed the far site when the
primary is lost (delta resync); the far site keeps one for what it received.

On disk: segment files named by their first sequence number, each a run of
records `header | pair name | data`. The CRC covers all three, so a flipped
byte anywhere is found before a record is shipped or applied. A record cut
short at the very end (a crash during the append) is discarded on open; a bad
record anywhere else is corruption: reading stops before it (`corrupt_at`) and
nothing past it is ever shipped or applied.

Record encoding is pure (`encode_record`, `decode_records`); `Journal` only adds
files.
"""

from __future__ import annotations

import contextlib
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

MAGIC = b"TVJ1"
# magic, cmd, flags, name length, seq, time, offset, length, data length, crc
HEADER = struct.Struct(">4sBBHQdQIII")
SEGMENT_BYTES = 8 * 1024 * 1024
MAX_NAME = 255
MAX_DATA = 64 * 1024 * 1024


class JournalError(Exception):
    """A journal cannot be used (bad directory, unreadable files)."""


class JournalFull(JournalError):
    """Appending would pass the journal's size limit: the caller falls back to bitmaps."""


class JournalCorrupt(JournalError):
    """A record failed its CRC or framing check; `seq` is the last good sequence number."""

    def __init__(self, message: str, seq: int) -> None:
        super().__init__(message)
        self.seq = seq


@dataclass(frozen=True, slots=True)
class Record:
    """One journaled write (WRITE carries data; TRIM / WRITE_ZEROES only a range)."""

    seq: int
    pair: str
    cmd: int
    flags: int
    offset: int
    length: int
    time: float
    data: bytes = b""


Data = bytes | bytearray | memoryview


def encode_parts(seq: int, pair: str, cmd: int, flags: int, offset: int, length: int,
                 t: float, data: Data) -> tuple[bytes, bytes, Data]:
    """A record as (header, pair name, data): written with one writev, never joined."""
    name = pair.encode()
    if len(name) > MAX_NAME:
        raise ValueError("pair name too long for a journal record")
    head = HEADER.pack(MAGIC, cmd, flags, len(name), seq, t, offset, length, len(data), 0)
    crc = zlib.crc32(data, zlib.crc32(name, zlib.crc32(head)))
    return head[:-4] + crc.to_bytes(4, "big"), name, data


def encode_record(rec: Record) -> bytes:
    head, name, data = encode_parts(rec.seq, rec.pair, rec.cmd, rec.flags, rec.offset,
                                    rec.length, rec.time, rec.data)
    return head + name + bytes(data)


def decode_one(mv: memoryview, pos: int, after: int) -> tuple[Record, int] | None:
    """The record at `pos` and where it ends; None if it is cut short."""
    if len(mv) - pos < HEADER.size:
        return None
    magic, cmd, flags, nlen, seq, t, off, length, dlen, crc = HEADER.unpack_from(mv, pos)
    if magic != MAGIC or nlen > MAX_NAME or dlen > MAX_DATA:
        raise JournalCorrupt(f"bad journal record header after sequence {after}", after)
    end = pos + HEADER.size + nlen + dlen
    if end > len(mv):
        return None
    head = HEADER.pack(magic, cmd, flags, nlen, seq, t, off, length, dlen, 0)
    name = bytes(mv[pos + HEADER.size:pos + HEADER.size + nlen])
    data = bytes(mv[pos + HEADER.size + nlen:end])
    if zlib.crc32(data, zlib.crc32(name, zlib.crc32(head))) != crc:
        raise JournalCorrupt(f"journal record {seq} failed its CRC check", after)
    if after and seq != after + 1:
        raise JournalCorrupt(f"journal record {seq} does not follow {after}", after)
    return Record(seq, name.decode(errors="replace"), cmd, flags, off, length, t, data), end


def decode_records(buf: bytes | bytearray | memoryview, after: int = 0
                   ) -> tuple[list[Record], int]:
    """Decode whole records from `buf`. Returns the records and the bytes consumed.

    Stops at an incomplete record at the end (the caller decides whether that is a
    torn tail). Raises JournalCorrupt for a record that is complete but wrong, or whose
    sequence number does not follow `after` (when `after` is non-zero)."""
    mv = memoryview(buf)
    out: list[Record] = []
    pos = 0
    while True:
        got = decode_one(mv, pos, after)
        if got is None:
            return out, pos
        rec, pos = got
        out.append(rec)
        after = rec.seq


@dataclass(slots=True)
class _Segment:
    first: int
    path: str
    size: int = 0
    last: int = 0      # 0 while empty


class Journal:
    """Segment files in `directory`, holding sequence numbers `first..last` contiguously."""

    def __init__(self, directory: str, limit: int) -> None:
        self.dir = directory
        self.limit = limit
        # Several segments fit in the limit, so trimming frees space before it fills.
        self.segment_bytes = max(64 * 1024, min(SEGMENT_BYTES, limit // 4))
        self.segments: list[_Segment] = []
        self.index: dict[int, tuple[_Segment, int, int]] = {}  # seq -> segment, pos, size
        self.corrupt_at: int | None = None   # first sequence number that could not be read
        self.cut_tail = False   # opening dropped a record cut short at the very end
        self.size = 0
        self._fd = -1
        self._dirty = False
        # Segments closed with data not yet fdatasync'ed: `sync` (on a worker thread) makes
        # them durable, so rolling over to a new segment never blocks the event loop.
        self._unsynced: list[int] = []
        self._lock = threading.Lock()
        os.makedirs(directory, exist_ok=True)
        self._open()

    # ---- opening ------------------------------------------------------------

    def _open(self) -> None:
        names = sorted(n for n in os.listdir(self.dir)
                       if n.endswith(".jnl") and n[:-4].isdigit())
        last = 0
        for i, name in enumerate(names):
            seg = _Segment(int(name[:-4]), os.path.join(self.dir, name))
            with open(seg.path, "rb") as f:
                data = f.read()
            mv = memoryview(data)
            pos = 0
            while self.corrupt_at is None:
                try:
                    got = decode_one(mv, pos, last)
                except JournalCorrupt:
                    self.corrupt_at = last + 1
                    break
                if got is None:
                    break
                rec, end = got
                self.index[rec.seq] = (seg, pos, end - pos)
                seg.last = last = rec.seq
                pos = end
            seg.size = len(data)
            if pos < len(data) and self.corrupt_at is None:
                if i == len(names) - 1:
                    # A record cut short by a crash during its append: never acknowledged.
                    os.truncate(seg.path, pos)
                    seg.size = pos
                    self.cut_tail = True
                else:
                    self.corrupt_at = last + 1
            if seg.size == 0:
                os.unlink(seg.path)
                continue
            self.segments.append(seg)
            self.size += seg.size
            if self.corrupt_at is not None:
                break

    # ---- state --------------------------------------------------------------

    @property
    def first(self) -> int:
        """Lowest sequence number held (0 when empty)."""
        for seg in self.segments:
            if seg.last:
                return seg.first
        return 0

    @property
    def last(self) -> int:
        for seg in reversed(self.segments):
            if seg.last:
                return seg.last
        return 0

    def holds(self, seq_from: int, seq_to: int) -> bool:
        """True if every record seq_from..seq_to (inclusive) is here and readable."""
        if seq_from > seq_to:
            return True
        return seq_from in self.index and seq_to in self.index

    # ---- writing ------------------------------------------------------------

    def append(self, rec: Record) -> int:
        """Append one record (its seq must follow `last`); returns its encoded size."""
        return self.append_write(rec.seq, rec.pair, rec.cmd, rec.flags, rec.offset,
                                 rec.length, rec.time, rec.data)

    def append_write(self, seq: int, pair: str, cmd: int, flags: int, offset: int,
                     length: int, t: float, data: Data) -> int:
        """Append one write without building a Record or copying its data."""
        return self.append_encoded(seq, *encode_parts(seq, pair, cmd, flags, offset, length,
                                                      t, data))

    def append_encoded(self, seq: int, *parts: Data) -> int:
        """Append a record already encoded (and checked) elsewhere."""
        return self.append_run([(seq, sum(len(p) for p in parts))], *parts)

    def append_run(self, records: list[tuple[int, int]], *parts: Data) -> int:
        """Append consecutive encoded records (their sequence numbers and sizes) with one
        write: how the far site journals a received batch."""
        if not records:
            return 0
        seq = records[0][0]
        if self.corrupt_at is not None:
            raise JournalCorrupt(f"journal is damaged at sequence {self.corrupt_at}",
                                 self.corrupt_at - 1)
        last = self.last
        if last and seq != last + 1:
            raise JournalError(f"journal sequence {seq} does not follow {last}")
        n = sum(len(p) for p in parts)
        if self.size + n > self.limit:
            raise JournalFull(f"journal {self.dir} is full ({self.size} of {self.limit} bytes)")
        seg = self.segments[-1] if self.segments else None
        if seg is None or (seg.size and seg.size + n > self.segment_bytes):
            seg = self._new_segment(seq)
        if self._fd < 0:
            self._fd = os.open(seg.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                               0o600)
        if os.writev(self._fd, parts) != n:
            os.ftruncate(self._fd, seg.size)   # never leave half a record behind
            raise JournalError(f"short write to journal segment {seg.path}")
        pos = seg.size
        for i, (s, size) in enumerate(records):
            if s != seq + i:
                raise JournalError(f"journal run is not consecutive at sequence {s}")
            self.index[s] = (seg, pos, size)
            pos += size
        seg.size += n
        seg.last = records[-1][0]
        self.size += n
        self._dirty = True
        return n

    def _retire_fd(self) -> None:
        """Stop appending to the open segment; its unsynced data is left to `sync`."""
        with self._lock:
            if self._fd >= 0:
                if self._dirty:
                    self._unsynced.append(self._fd)
                else:
                    os.close(self._fd)
            self._fd = -1
            self._dirty = False

    def _new_segment(self, first: int) -> _Segment:
        self._retire_fd()
        seg = _Segment(first, os.path.join(self.dir, f"{first:020d}.jnl"))
        self.segments.append(seg)
        return seg

    def sync(self) -> None:
        """Make every appended record durable. Safe on a worker thread while the event
        loop appends: it syncs a duplicate of the open segment's descriptor."""
        with self._lock:
            fds, self._unsynced = self._unsynced, []
            cur = os.dup(self._fd) if self._dirty and self._fd >= 0 else -1
            self._dirty = False
        try:
            for fd in [*fds, cur]:
                if fd >= 0:
                    os.fdatasync(fd)
        finally:
            for fd in [*fds, cur]:
                if fd >= 0:
                    os.close(fd)

    def trim(self, upto: int) -> int:
        """Drop whole segments whose records are all <= upto; returns bytes freed."""
        freed = 0
        while self.segments and self.segments[0].last and self.segments[0].last <= upto:
            seg = self.segments.pop(0)
            if not self.segments:
                self._retire_fd()
            for s in range(seg.first, seg.last + 1):
                self.index.pop(s, None)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(seg.path)
            self.size -= seg.size
            freed += seg.size
        return freed

    def drop_damaged(self) -> int | None:
        """Cut the journal before its first damaged record and drop every later segment,
        for a journal whose records can be fetched again (the far site's receive journal:
        its feeder keeps whatever was not durably applied here). Returns the first
        sequence number dropped, or None when nothing is damaged."""
        at = self.corrupt_at
        if at is None:
            return None
        self._retire_fd()
        tail = self.segments[-1] if self.segments else None
        if tail is not None:
            end = 0
            if tail.last:
                _, pos, size = self.index[tail.last]
                end = pos + size
            os.truncate(tail.path, end)
            self.size -= tail.size - end
            tail.size = end
            if end == 0:
                os.unlink(tail.path)
                self.segments.pop()
        keep = {seg.path for seg in self.segments}
        for name in os.listdir(self.dir):
            path = os.path.join(self.dir, name)
            if name.endswith(".jnl") and path not in keep:
                os.unlink(path)
        self.corrupt_at = None
        return at

    def reset(self) -> None:
        """Discard every record (overflow to bitmaps, or a journal restarted elsewhere)."""
        self._retire_fd()
        for seg in self.segments:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(seg.path)
        self.segments.clear()
        self.index.clear()
        self.size = 0
        self.corrupt_at = None
        self._dirty = False

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sync()
        self._retire_fd()
        with self._lock:
            fds, self._unsynced = self._unsynced, []
        for fd in fds:
            os.close(fd)

    # ---- reading ------------------------------------------------------------

    def read(self, seq_from: int, max_bytes: int = 4 * 1024 * 1024,
             seq_to: int | None = None) -> list[Record]:
        """Records seq_from..seq_to (at least one if any), read in one go from one segment
        and verified by CRC. Raises JournalCorrupt at a damaged record, JournalError when
        seq_from is no longer held."""
        stop = self.last if seq_to is None else min(seq_to, self.last)
        if seq_from > stop:
            return []
        last, blob = self.read_encoded(seq_from, max_bytes, seq_to)
        recs, used = decode_records(blob, after=seq_from - 1)
        if used != len(blob) or len(recs) != last - seq_from + 1:
            raise JournalCorrupt(f"journal record {seq_from + len(recs)} is damaged",
                                 seq_from - 1 + len(recs))
        return recs

    def read_encoded(self, seq_from: int, max_bytes: int = 4 * 1024 * 1024,
                     seq_to: int | None = None) -> tuple[int, bytes]:
        """The encoded records seq_from..(returned last) as one run of bytes, unparsed:
        what is shipped (the receiver checks every CRC). Returns (last seq, bytes)."""
        stop = self.last if seq_to is None else min(seq_to, self.last)
        where = self.index.get(seq_from)
        if where is None or seq_from > stop:
            raise JournalError(f"journal no longer holds sequence {seq_from}")
        seg, pos, _n = where
        end, seq = pos, seq_from
        while seq <= stop and end - pos < max_bytes:
            w = self.index.get(seq)
            if w is None or w[0] is not seg:
                break
            end = w[1] + w[2]
            seq += 1
        fd = os.open(seg.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            blob = os.pread(fd, end - pos, pos)
        finally:
            os.close(fd)
        if len(blob) != end - pos:
            raise JournalCorrupt(f"journal segment {seg.path} is shorter than its index",
                                 seq_from - 1)
        return seq - 1, blob

    def record_time(self, seq: int) -> float | None:
        """When record `seq` was written (its header only), or None if not held."""
        where = self.index.get(seq)
        if where is None:
            return None
        seg, pos, _n = where
        fd = os.open(seg.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            head = os.pread(fd, HEADER.size, pos)
        finally:
            os.close(fd)
        if len(head) != HEADER.size:
            return None
        return float(HEADER.unpack(head)[5])

    def iter_from(self, seq_from: int) -> Iterator[Record]:
        seq = seq_from
        while seq <= self.last:
            batch = self.read(seq)
            yield from batch
            seq = batch[-1].seq + 1

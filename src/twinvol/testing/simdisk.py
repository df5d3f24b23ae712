"""The page cache of simulated machines, so a power loss can lose what was not synced.

The node writes its block stores, bitmaps and journals with `os.pwrite` / `os.writev`
and makes them durable with `os.fsync` / `os.fdatasync`. While installed, `Disks`
wraps those calls: a write to a file under a machine's directory is remembered as
unsynced (with the bytes it replaced) until that file is synced. `power_loss(machine)`
then puts every such file back to its last synced content and lets each unsynced write
survive whole, not at all, or torn after a random number of 512-byte sectors, as a disk
may (drawn from the world's seed). `failing` machines get EIO for every read of their
volumes' data (a disk with bad sectors), as `os.pread` reports it.

Not covered (taken as durable): the SQLite catalog (its own file I/O, in C), files
written with `open()` (markers, the witness's state file), preallocation and hole
punching, and directory entries.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass

SECTOR = 512


@dataclass(slots=True)
class _Write:
    offset: int
    data: bytes
    old: bytes        # what the range held before (shorter when the file grew)
    size_before: int  # the file's size before


class Disks:
    def __init__(self, rng: random.Random, roots: dict[str, str]) -> None:
        self.rng = rng
        self.roots = {m: os.path.realpath(r) + os.sep for m, r in roots.items()}
        self.unsynced: dict[str, list[_Write]] = {}   # path -> writes since its last sync
        self._paths: dict[int, str | None] = {}
        self.lost = 0   # writes dropped or torn by power losses (for the trace)
        self.failing: set[str] = set()   # machines whose volume reads fail with EIO
        self._real = (os.pwrite, os.writev, os.fsync, os.fdatasync, os.close, os.pread)

    # -- the wrapped calls --
    def _path(self, fd: int) -> str | None:
        if fd not in self._paths:
            try:
                path = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                path = ""
            owned = any(path.startswith(r) for r in self.roots.values())
            self._paths[fd] = path if owned else None
        return self._paths[fd]

    def _remember(self, fd: int, offset: int, n: int) -> None:
        path = self._path(fd)
        if path is None or n == 0:
            return
        size = os.fstat(fd).st_size
        old = self._real[5](fd, n, offset) if offset < size else b""
        self.unsynced.setdefault(path, []).append(_Write(offset, b"", old, size))

    def pread(self, fd: int, n: int, offset: int) -> bytes:
        if self.failing:
            path = self._path(fd)
            if path is not None and any(path.startswith(self.roots[m] + "volumes" + os.sep)
                                        for m in self.failing):
                raise OSError(errno.EIO, "Input/output error (simulated bad sector)")
        return self._real[5](fd, n, offset)

    def pwrite(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> int:
        self._remember(fd, offset, len(data))
        n = self._real[0](fd, data, offset)
        self._fill(fd, bytes(memoryview(data)[:n]))
        return n

    def writev(self, fd: int, buffers: list[bytes | bytearray | memoryview]) -> int:
        append = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND
        offset = os.fstat(fd).st_size if append else os.lseek(fd, 0, os.SEEK_CUR)
        data = b"".join(bytes(b) for b in buffers)
        self._remember(fd, offset, len(data))
        n = self._real[1](fd, buffers)
        self._fill(fd, data[:n])
        return n

    def _fill(self, fd: int, data: bytes) -> None:
        path = self._paths.get(fd)
        if path is not None and self.unsynced.get(path):
            self.unsynced[path][-1].data = data

    def fsync(self, fd: int) -> None:
        self._real[2](fd)
        self._synced(fd)

    def fdatasync(self, fd: int) -> None:
        self._real[3](fd)
        self._synced(fd)

    def _synced(self, fd: int) -> None:
        path = self._path(fd)
        if path is not None:
            self.unsynced.pop(path, None)

    def close(self, fd: int) -> None:
        self._paths.pop(fd, None)
        self._real[4](fd)

    @contextlib.contextmanager
    def installed(self) -> Iterator[Disks]:
        names = ("pwrite", "writev", "fsync", "fdatasync", "close", "pread")
        for name in names:
            setattr(os, name, getattr(self, name))
        try:
            yield self
        finally:
            for name, real in zip(names, self._real, strict=False):
                setattr(os, name, real)

    # -- the fault --
    def power_loss(self, machine: str) -> None:
        """`machine` loses power: its files keep their synced content plus, of each
        unsynced write, all, nothing or a first part (sector by sector)."""
        root = self.roots[machine]
        pwrite = self._real[0]
        for path in sorted(p for p in self.unsynced if p.startswith(root)):
            writes = self.unsynced.pop(path)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                for w in reversed(writes):   # back to the synced content
                    if w.old:
                        pwrite(fd, w.old, w.offset)
                    if w.offset + len(w.data) > w.size_before:
                        os.ftruncate(fd, w.size_before)
                for w in writes:
                    keep = self._survives(len(w.data))
                    if keep:
                        pwrite(fd, w.data[:keep], w.offset)
                    if keep < len(w.data):
                        self.lost += 1
            finally:
                self._real[4](fd)

    def _survives(self, n: int) -> int:
        """How many bytes of an unsynced write of `n` bytes reach the platter."""
        r = self.rng.random()
        if r < 0.4:
            return 0
        if r < 0.7:
            return n
        return min(n, self.rng.randrange(0, n // SECTOR + 1) * SECTOR)

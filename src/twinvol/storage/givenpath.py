"""Safety checks for `volume create --path`: what twinvol may do with a path it was given.

A path that does not exist yet is created (a sparse file). Anything that exists holds
someone's data, so it is used only when the operator says `adopt`, never when another
process has it open or another volume or node data directory owns it, and never when it
is neither a regular file nor a block device. `facts` reads the system; `decide` is the
pure rule, so every refusal is testable without touching a file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from dataclasses import dataclass, field
from enum import StrEnum

SECTOR = 512


class PathKind(StrEnum):
    MISSING = "missing"
    FILE = "file"
    DEVICE = "device"
    OTHER = "other"


class PathAction(StrEnum):
    """What volume creation does with a given path."""

    CREATE = "create"        # make a new sparse file of the given size
    ADOPT = "adopt"          # use an existing file or device as it is
    ADOPT_GROW = "adopt-grow"  # use an existing file, growing it to the given size


class PathRefused(Exception):
    """The path must not be used; the message says why and what to do instead."""

    def __init__(self, message: str, code: str = "invalid") -> None:
        super().__init__(message)
        self.code = code  # invalid | conflict | busy


@dataclass(frozen=True, slots=True)
class PathFacts:
    """What the system says about a path (gathered by `facts`)."""

    path: str
    kind: PathKind
    size: int = 0
    parent_exists: bool = True
    users: list[str] = field(default_factory=list)  # "pid 12 (qemu-system-x86)"
    data_dir: str | None = None  # the twinvol node data directory that holds it
    device_busy: bool = False    # the kernel refused an exclusive open (mounted, held)


@dataclass(frozen=True, slots=True)
class PathPlan:
    action: PathAction
    kind: str   # the volume kind: "file" or "device"
    size: int
    says: str   # one sentence for the operator: what will be (or would be) done


def decide(f: PathFacts, size: int | None, adopt: bool) -> PathPlan:
    """The rule for a given path (pure): a plan, or PathRefused with the reason."""
    p = f.path
    if f.data_dir is not None:
        raise PathRefused(f"{p} is inside the twinvol node data directory {f.data_dir}: it "
                          "belongs to that node's volumes or catalog", "conflict")
    if f.kind is PathKind.MISSING:
        if size is None:
            raise PathRefused(f"{p} does not exist; give --size to create it")
        if not f.parent_exists:
            raise PathRefused(f"directory {os.path.dirname(p)} does not exist")
        return PathPlan(PathAction.CREATE, "file", size,
                        f"create a new sparse file {p} of {size} bytes")
    if f.kind is PathKind.OTHER:
        raise PathRefused(f"{p} is neither a regular file nor a block device")
    if f.users:
        raise PathRefused(f"{p} is in use by {', '.join(f.users[:3])}; a volume needs it for "
                          "itself", "busy")
    if f.device_busy:
        raise PathRefused(f"device {p} is in use (mounted, or held by another driver)", "busy")
    what = "device" if f.kind is PathKind.DEVICE else "file"
    if not adopt:
        raise PathRefused(f"{p} already exists ({what} of {f.size} bytes) and twinvol did not "
                          "create it; refusing to write into it. Pass --adopt to use its "
                          "contents as the volume, or give a path that does not exist yet",
                          "conflict")
    if f.kind is PathKind.DEVICE:
        if size is not None and size > f.size:
            raise PathRefused(f"device {p} holds only {f.size} bytes")
        return PathPlan(PathAction.ADOPT, "device", size or f.size,
                        f"use the existing block device {p} ({size or f.size} bytes)")
    if f.size % SECTOR:
        raise PathRefused(f"{p} is {f.size} bytes, not a multiple of {SECTOR}: it is no disk "
                          "image; refusing it even with --adopt")
    if size is None:
        if f.size == 0:
            raise PathRefused(f"{p} is empty; give --size")
        return PathPlan(PathAction.ADOPT, "file", f.size,
                        f"use the existing file {p} as it is ({f.size} bytes)")
    if size < f.size:
        raise PathRefused(f"{p} is already {f.size} bytes, larger than --size {size}")
    if size == f.size:
        return PathPlan(PathAction.ADOPT, "file", size,
                        f"use the existing file {p} as it is ({size} bytes)")
    return PathPlan(PathAction.ADOPT_GROW, "file", size,
                    f"use the existing file {p} and grow it from {f.size} to {size} bytes")


def facts(path: str) -> PathFacts:
    """Look at `path`: its kind and size, the processes holding it open, and whether a
    twinvol node data directory (a directory with catalog.sqlite) contains it."""
    path = os.path.abspath(path)
    real = os.path.realpath(path)
    owner = _data_dir_of(real)
    try:
        st = os.stat(real)
    except FileNotFoundError:
        return PathFacts(path, PathKind.MISSING, parent_exists=os.path.isdir(
            os.path.dirname(path)), data_dir=owner)
    if stat.S_ISBLK(st.st_mode):
        size, busy = _device(real)
        return PathFacts(path, PathKind.DEVICE, size, users=_users(real, st), data_dir=owner,
                         device_busy=busy)
    if stat.S_ISREG(st.st_mode):
        return PathFacts(path, PathKind.FILE, st.st_size, users=_users(real, st),
                         data_dir=owner)
    return PathFacts(path, PathKind.OTHER, data_dir=owner)


def _data_dir_of(real: str) -> str | None:
    d = os.path.dirname(real)
    while True:
        if os.path.exists(os.path.join(d, "catalog.sqlite")):
            return d
        up = os.path.dirname(d)
        if up == d:
            return None
        d = up


def _device(real: str) -> tuple[int, bool]:
    """(size, busy): O_EXCL on a block device fails with EBUSY while it is mounted or held."""
    try:
        fd = os.open(real, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as e:
        if e.errno != errno.EBUSY:
            raise
        fd = os.open(real, os.O_RDONLY | os.O_CLOEXEC)
        busy = True
    else:
        busy = False
    try:
        return os.lseek(fd, 0, os.SEEK_END), busy
    finally:
        os.close(fd)


def _users(real: str, st: os.stat_result) -> list[str]:
    """Processes (other than this one) with the file open, from /proc/PID/fd."""
    me = os.getpid()
    found: list[str] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        fd_dir = f"/proc/{entry}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            with contextlib.suppress(OSError):
                fst = os.stat(os.path.join(fd_dir, fd))
                if (fst.st_dev, fst.st_ino) == (st.st_dev, st.st_ino) or (
                        stat.S_ISBLK(st.st_mode) and fst.st_rdev == st.st_rdev
                        and stat.S_ISBLK(fst.st_mode)):
                    found.append(f"pid {entry} ({_comm(entry)})")
                    break
    return found


def _comm(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"

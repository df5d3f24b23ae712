"""The rule for `volume create --path` (pure: facts in, plan or refusal out)."""

from __future__ import annotations

import re

import pytest

from twinvol.storage.givenpath import PathAction, PathFacts, PathKind, PathRefused, decide

MiB = 1 << 20


def test_missing_path_is_created_with_a_size() -> None:
    plan = decide(PathFacts("/x/new.img", PathKind.MISSING), 4 * MiB, adopt=False)
    assert (plan.action, plan.kind, plan.size) == (PathAction.CREATE, "file", 4 * MiB)
    assert plan.says == f"create a new sparse file /x/new.img of {4 * MiB} bytes"
    with pytest.raises(PathRefused, match="give --size to create it"):
        decide(PathFacts("/x/new.img", PathKind.MISSING), None, adopt=False)
    with pytest.raises(PathRefused, match="directory /x does not exist"):
        decide(PathFacts("/x/new.img", PathKind.MISSING, parent_exists=False), MiB, False)


def test_existing_file_needs_adopt() -> None:
    f = PathFacts("/etc/passwd", PathKind.FILE, 1234)
    with pytest.raises(PathRefused) as e:
        decide(f, MiB, adopt=False)
    assert e.value.code == "conflict"
    assert str(e.value).startswith("/etc/passwd already exists (file of 1234 bytes) and "
                                   "twinvol did not create it; refusing to write into it. "
                                   "Pass --adopt")
    with pytest.raises(PathRefused, match="not a multiple of 512: it is no disk image"):
        decide(f, MiB, adopt=True)


def test_adopt_keeps_or_grows_only() -> None:
    f = PathFacts("/d/img", PathKind.FILE, 4 * MiB)
    assert decide(f, None, True).action == PathAction.ADOPT
    assert decide(f, 4 * MiB, True).action == PathAction.ADOPT
    grow = decide(f, 8 * MiB, True)
    assert (grow.action, grow.size) == (PathAction.ADOPT_GROW, 8 * MiB)
    with pytest.raises(PathRefused, match="larger than --size"):
        decide(f, MiB, True)


@pytest.mark.parametrize(("facts", "needle", "code"), [
    (PathFacts("/d/img", PathKind.FILE, MiB, users=["pid 7 (qemu)"]),
     "/d/img is in use by pid 7 (qemu)", "busy"),
    (PathFacts("/d/fifo", PathKind.OTHER), "neither a regular file nor a block device",
     "invalid"),
    (PathFacts("/n/data-B/volumes/x.img", PathKind.FILE, MiB, data_dir="/n/data-B"),
     "inside the twinvol node data directory /n/data-B", "conflict"),
    (PathFacts("/dev/sdz", PathKind.DEVICE, MiB, device_busy=True), "device /dev/sdz is in use",
     "busy"),
])
def test_refused_even_with_adopt(facts: PathFacts, needle: str, code: str) -> None:
    with pytest.raises(PathRefused, match=re.escape(needle)) as e:
        decide(facts, None, adopt=True)
    assert e.value.code == code


def test_device_is_adopted_not_grown() -> None:
    dev = PathFacts("/dev/sdz", PathKind.DEVICE, 8 * MiB)
    with pytest.raises(PathRefused, match="--adopt"):
        decide(dev, None, adopt=False)
    assert decide(dev, None, True).size == 8 * MiB
    with pytest.raises(PathRefused, match="holds only"):
        decide(dev, 16 * MiB, True)

"""VM definitions in logical names and the QEMU command line built from them."""

from __future__ import annotations

import os

import pytest

from twinvol.vm.qemu import DiskPath, argv, choose_accel
from twinvol.vm.spec import SpecError, from_dict, load_file, logical


def test_logical_names() -> None:
    assert logical("volume:db01", "volume") == "db01"
    for bad in ("db01", "network:db01", "volume:", "volume:a/b"):
        with pytest.raises(SpecError, match="is not a logical volume name"):
            logical(bad, "volume")


@pytest.mark.parametrize(("raw", "message"), [
    ({"name": "a", "disks": ["db01"]}, "not a logical volume name"),
    ({"name": "a", "disks": ["volume:x"], "nics": ["lan"]}, "not a logical network name"),
    ({"name": "a"}, "nothing to boot"),
    ({"name": "a", "disks": ["volume:x"], "memory": "1K"}, "at least 16M"),
    ({"name": "a", "disks": ["volume:x"], "cpus": 0}, "cpus 0"),
    ({"name": "a", "disks": ["volume:x", "volume:x"]}, "attached twice"),
    ({"name": "a", "disks": ["volume:x"], "initrd": "i"}, "initrd without kernel"),
    ({"name": "a b", "disks": ["volume:x"]}, "VM name"),
    ({"name": "a", "disks": ["volume:x"], "typo": 1}, "unknown field"),
])
def test_bad_definitions(raw: dict[str, object], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        from_dict(raw)


def test_file_paths_are_relative_to_the_file(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "vm.toml")
    with open(path, "w") as f:
        f.write('name = "web"\nkernel = "k"\ninitrd = "i"\ndisks = ["volume:d"]\n')
    spec = load_file(path)
    assert spec.kernel == os.path.join(str(tmp_path), "k")
    assert spec.memory_bytes == 128 << 20


def test_both_ends_build_the_same_machine() -> None:
    """Origin and destination differ only in where the disks are and in -incoming."""
    spec = from_dict({"name": "web", "kernel": "/k", "initrd": "/i",
                      "disks": ["volume:d"], "nics": ["network:lan"]})
    a = argv(spec, [DiskPath(1000, "d")], ["user"], accel="tcg", qmp="/q", console="/c",
             incoming=False)
    b = argv(spec, [DiskPath(2000, "d")], ["user"], accel="tcg", qmp="/q", console="/c",
             incoming=True)
    assert b[-3:] == ["-S", "-incoming", "defer"]
    diff = [(x, y) for x, y in zip(a, b[:-3], strict=True) if x != y]
    assert len(diff) == 1 and '"port": "1000"' in diff[0][0]
    assert any("virtio-blk-pci,id=vd0,drive=disk0,addr=0x4" in x for x in a)
    assert spec.mac(0) == from_dict({"name": "web", "disks": ["volume:d"]}).mac(0)


def test_accel_setting() -> None:
    assert choose_accel("tcg") == "tcg"
    assert choose_accel("auto") in ("kvm", "tcg")

"""Volumes, catalog, backing store and sizes, without any process or socket."""

from __future__ import annotations

import os
import sqlite3

import pytest

from twinvol.nbd.constants import STATE_HOLE, STATE_ZERO
from twinvol.sizes import SizeError, format_size, parse_size
from twinvol.storage.backing import BackingStore, NotFast
from twinvol.storage.catalog import CatalogError
from twinvol.storage.volumes import VolumeError, VolumeManager

MiB = 1 << 20


@pytest.fixture
def vm(tmp_path: object) -> VolumeManager:
    return VolumeManager(str(tmp_path))


def test_create_show_resize_delete(vm: VolumeManager) -> None:
    vol = vm.create("v1", 4 * MiB, description="d")
    rec = vol.record
    assert (rec.name, rec.export_name, rec.size, rec.kind) == ("v1", "v1", 4 * MiB, "thin")
    assert os.path.getsize(rec.path) == 4 * MiB
    assert os.stat(rec.path).st_blocks == 0  # thin
    assert vm.lookup("v1") is vol.export
    assert vm.create("v2", MiB).record.vvol_id == rec.vvol_id + 1
    vm.resize("v1", 8 * MiB)
    assert vol.export.size == 8 * MiB and os.path.getsize(rec.path) == 8 * MiB
    vm.delete("v1")
    assert not os.path.exists(rec.path)
    assert vm.lookup("v1") is None


@pytest.mark.parametrize(("args", "kw", "msg"), [
    (("bad/name", MiB), {}, "invalid volume name"),
    (("v", 1000), {}, "multiple of 512"),
    (("v", 0), {}, "multiple of 512"),
    (("v", None), {}, "needs a size"),
    (("v", MiB), {"export_name": ""}, None),  # empty export name falls back to the name
])
def test_create_validation(vm: VolumeManager, args: tuple[str, int | None],
                           kw: dict[str, str], msg: str | None) -> None:
    if msg is None:
        assert vm.create(*args, **kw).record.export_name == args[0]
        return
    with pytest.raises(VolumeError, match=msg):
        vm.create(*args, **kw)


def test_conflicts_and_shrink(vm: VolumeManager) -> None:
    vm.create("a", MiB)
    with pytest.raises(VolumeError, match="already exists") as e:
        vm.create("a", MiB)
    assert e.value.code == "conflict"
    with pytest.raises(VolumeError, match="already used"):
        vm.create("b", MiB, export_name="a")
    with pytest.raises(VolumeError, match="shrinking"):
        vm.resize("a", 512)
    vm.get("a").connections = 1
    with pytest.raises(VolumeError, match="open NBD connection") as e:
        vm.delete("a")
    assert e.value.code == "busy"
    vm.delete("a", force=True)


def test_given_file_kept_on_delete(tmp_path: object) -> None:
    vm = VolumeManager(os.path.join(str(tmp_path), "node"))  # given files live outside it
    path = os.path.join(str(tmp_path), "given.img")
    with open(path, "wb") as f:
        f.truncate(2 * MiB)
    with pytest.raises(VolumeError, match="Pass --adopt"):
        vm.create("g", None, path=path)
    vol = vm.create("g", None, path=path, adopt=True)
    assert vol.record.kind == "file" and vol.record.size == 2 * MiB
    with pytest.raises(VolumeError, match="already backs"):
        vm.create("g2", None, path=path, adopt=True)
    vm.delete("g")
    assert os.path.exists(path)
    with pytest.raises(VolumeError, match="larger than --size"):
        vm.create("g3", MiB, path=path, adopt=True)
    odd = os.path.join(str(tmp_path), "odd.img")
    with open(odd, "wb") as f:
        f.write(b"x" * 1000)
    with pytest.raises(VolumeError, match="not a multiple of 512"):
        vm.create("odd", None, path=odd, adopt=True)
    inside = os.path.join(vm.data_dir, "mine.img")
    with pytest.raises(VolumeError, match="inside the twinvol node data directory"):
        vm.create("mine", MiB, path=inside)
    vm.close()


def test_reopen_keeps_volumes_and_removes_orphans(tmp_path: object) -> None:
    d = str(tmp_path)
    vm = VolumeManager(d)
    rec = vm.create("keep", MiB).record
    serial = vm.serial
    vm.close()
    orphan = os.path.join(d, "volumes", "deadbeef.img")
    with open(orphan, "wb") as f:
        f.truncate(MiB)
    vm = VolumeManager(d)
    assert vm.serial == serial
    assert vm.get("keep").record == rec
    assert not os.path.exists(orphan)


def test_file_shorter_than_catalog_is_extended(tmp_path: object) -> None:
    d = str(tmp_path)
    vm = VolumeManager(d)
    path = vm.create("short", 4 * MiB).record.path
    vm.close()
    os.truncate(path, MiB)  # e.g. a resize that reached the catalog but not the file
    vm = VolumeManager(d)
    assert os.path.getsize(path) == 4 * MiB
    assert vm.get("short").store.pread(3 * MiB, 4096) == bytes(4096)


def test_corrupt_catalog_refused(tmp_path: object) -> None:
    d = str(tmp_path)
    VolumeManager(d).close()
    with open(os.path.join(d, "catalog.sqlite"), "wb") as f:
        f.write(b"garbage" * 100)
    with pytest.raises(CatalogError, match=r"unreadable|integrity"):
        VolumeManager(d)


def test_newer_schema_refused(tmp_path: object) -> None:
    d = str(tmp_path)
    VolumeManager(d).close()
    db = sqlite3.connect(os.path.join(d, "catalog.sqlite"))
    db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    with pytest.raises(CatalogError, match="newer"):
        VolumeManager(d)


def test_backing_extents_and_zeroes(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "b.img")
    BackingStore.create_thin(path, 8 * MiB)
    st = BackingStore(path)
    assert st.extents(0, 8 * MiB) == [(8 * MiB, STATE_HOLE | STATE_ZERO)]
    st.pwrite(MiB, b"a" * MiB)
    ext = st.extents(0, 8 * MiB)
    assert ext == [(MiB, 3), (MiB, 0), (6 * MiB, 3)]
    assert sum(n for n, _ in st.extents(100, 8 * MiB)) == 8 * MiB - 100
    st.write_zeroes(MiB, 4096, no_hole=False, fast=True)
    assert st.pread(MiB, 4096) == bytes(4096)
    assert st.extents(MiB, 4096) == [(4096, 3)]
    st.write_zeroes(MiB + 4096, 4096, no_hole=True, fast=False)
    assert st.pread(MiB + 4096, 4096) == bytes(4096)
    assert st.extents(MiB + 4096, 4096) == [(4096, 0)]  # allocated, not a hole
    st.trim(MiB, MiB)
    assert st.pread(MiB, MiB) == bytes(MiB)
    st._can_zero_range = False
    with pytest.raises(NotFast):
        st.write_zeroes(0, 4096, no_hole=True, fast=True)
    st.write_zeroes(0, 4096, no_hole=True, fast=False)
    assert st.pread(0, 4096) == bytes(4096)
    st.close()


@pytest.mark.parametrize(("text", "value"), [
    ("512", 512), ("4k", 4096), ("1M", MiB), ("1MiB", MiB), ("1G", 1 << 30),
    ("2TiB", 2 << 40), ("1.5K", 1536), (" 8 MB ", 8 * MiB),
])
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "abc", "1X", "-1", "1.1", "K"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(SizeError):
        parse_size(text)


def test_format_size() -> None:
    assert format_size(1 << 30) == "1GiB"
    assert format_size(1536) == "1.5KiB"
    assert format_size(100) == "100B"

"""Volumes of one node: create, list, show, resize (grow), delete, and export lookup.

The catalog is the source of truth; backing files follow it. Creation writes
the file before the catalog row and deletion removes the row before the file,
so a crash between the two leaves only an orphan thin file, which `open`
removes on the next start.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from twinvol.nbd.server_events import ExportInfo
from twinvol.sizes import format_size
from twinvol.storage import givenpath
from twinvol.storage.backing import BackingStore, fsync_dir
from twinvol.storage.catalog import Catalog, VolumeRecord, now
from twinvol.storage.givenpath import PathAction, PathPlan

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SECTOR = 512
MAX_VOLUME_SIZE = 1 << 62


class VolumeError(Exception):
    """A volume operation was refused; `code` maps to an HTTP status."""

    def __init__(self, message: str, code: str = "invalid") -> None:
        super().__init__(message)
        self.code = code  # invalid | not_found | conflict | busy | io


@dataclass(frozen=True, slots=True)
class CreatePlan:
    """What creating a volume will do (the answer to a dry run)."""

    name: str
    export_name: str
    kind: str          # thin | file | device
    size: int
    path: str | None   # None: a new thin file in the data directory
    step: PathPlan


@dataclass(slots=True)
class Volume:
    """An open volume: its record, its backing store and what NBD clients see."""

    record: VolumeRecord
    store: BackingStore
    export: ExportInfo
    connections: int = 0
    # I/O mode as the design defines it: "mirror" (pair in sync), "local" (this side
    # only; every simplex volume), "block" (stale copy: no host I/O).
    io_mode: str = "local"


class VolumeManager:
    """Owns the catalog and the open backing stores of one node's data directory."""

    def __init__(self, data_dir: str) -> None:
        self.data_dir = data_dir
        self.volume_dir = os.path.join(data_dir, "volumes")
        os.makedirs(self.volume_dir, exist_ok=True)
        self.catalog = Catalog(os.path.join(data_dir, "catalog.sqlite"))
        self.serial = self.catalog.node_serial()
        self.volumes: dict[str, Volume] = {}
        self._by_export: dict[str, Volume] = {}
        for rec in self.catalog.volumes():
            self._open(rec)
        self._remove_orphans()

    def close(self) -> None:
        for vol in self.volumes.values():
            with contextlib.suppress(OSError):
                vol.store.flush()
            vol.store.close()
        self.volumes.clear()
        self._by_export.clear()
        self.catalog.close()

    # ---- ExportProvider -------------------------------------------------

    def lookup(self, name: str) -> ExportInfo | None:
        vol = self._by_export.get(name)
        return None if vol is None else vol.export

    def list_exports(self) -> Sequence[ExportInfo]:
        return [v.export for v in self.volumes.values()]

    def by_export(self, name: str) -> Volume | None:
        return self._by_export.get(name)

    # ---- operations -----------------------------------------------------

    def get(self, name: str) -> Volume:
        vol = self.volumes.get(name)
        if vol is None:
            raise VolumeError(f"volume {name!r} does not exist", "not_found")
        return vol

    def plan(self, name: str, size: int | None, *, path: str | None = None,
             export_name: str | None = None, serial: str | None = None,
             vvol_id: int | None = None, adopt: bool = False) -> CreatePlan:
        """Check a creation without doing it: what `create` would do, or VolumeError."""
        if not NAME_RE.match(name):
            raise VolumeError(f"invalid volume name {name!r}: use 1-64 letters, digits, '.', "
                              "'_' or '-', starting with a letter or digit")
        export_name = export_name or name
        if not export_name or len(export_name.encode()) > 4096:
            raise VolumeError("export name must be 1 to 4096 bytes")
        if name in self.volumes:
            raise VolumeError(f"volume {name!r} already exists", "conflict")
        if export_name in self._by_export:
            raise VolumeError(f"export name {export_name!r} is already used by volume "
                              f"{self._by_export[export_name].record.name!r}", "conflict")
        if size is not None:
            _check_size(size)
        if serial is not None and not re.match(r"^[A-Za-z0-9-]{1,32}$", serial):
            raise VolumeError(f"invalid serial {serial!r}: 1-32 letters, digits or '-'")
        if vvol_id is not None and not 0 <= vvol_id < 2**32:
            raise VolumeError(f"invalid volume id {vvol_id}: 0 to 2^32-1")
        if path is None:
            if size is None:
                raise VolumeError("a thin volume needs a size (e.g. --size 1G)")
            return CreatePlan(name, export_name, "thin", size, None,
                              PathPlan(PathAction.CREATE, "thin", size,
                                       f"create a thin volume of {size} bytes in "
                                       f"{self.volume_dir}"))
        path = os.path.abspath(path)
        real = os.path.realpath(path)
        for v in self.volumes.values():
            if os.path.realpath(v.record.path) == real:
                raise VolumeError(f"{path} already backs volume {v.record.name!r}", "conflict")
        try:
            pp = givenpath.decide(givenpath.facts(path), size, adopt)
        except givenpath.PathRefused as e:
            raise VolumeError(str(e), e.code) from None
        except OSError as e:
            raise VolumeError(f"cannot inspect {path}: {e.strerror}", "io") from None
        return CreatePlan(name, export_name, pp.kind, pp.size, path, pp)

    def create(self, name: str, size: int | None, *, path: str | None = None,
               export_name: str | None = None, description: str = "",
               read_only: bool = False, serial: str | None = None,
               vvol_id: int | None = None, adopt: bool = False) -> Volume:
        plan = self.plan(name, size, path=path, export_name=export_name, serial=serial,
                         vvol_id=vvol_id, adopt=adopt)
        vol_id = uuid.uuid4().hex
        size = plan.size
        made = plan.step.action is PathAction.CREATE
        path = plan.path or os.path.join(self.volume_dir, f"{vol_id}.img")
        try:
            if made:
                BackingStore.create_thin(path, size)
            elif plan.step.action is PathAction.ADOPT_GROW:
                with open(path, "r+b") as f:
                    f.truncate(size)
                    os.fsync(f.fileno())
        except OSError as e:
            raise _create_error(path, size, e) from None
        rec = VolumeRecord(vol_id, name, plan.export_name, size, plan.kind, path, description,
                           serial or self.serial,
                           self.catalog.next_vvol_id() if vvol_id is None else vvol_id,
                           read_only, now())
        try:
            vol = self._open(rec)
        except OSError as e:
            if made:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            raise VolumeError(f"cannot open {path}: {e.strerror}", "io") from e
        self.catalog.insert(rec)
        return vol

    def resize(self, name: str, size: int) -> Volume:
        vol = self.get(name)
        _check_size(size)
        if size < vol.record.size:
            raise VolumeError(f"volume {name!r} is {vol.record.size} bytes; shrinking is not "
                              "supported because it would destroy data")
        if size == vol.record.size:
            return vol
        try:
            vol.store.resize(size)
        except OSError as e:
            raise VolumeError(f"cannot grow {vol.record.path}: {e.strerror}", "io") from e
        self.catalog.update_size(vol.record.id, size)
        vol.record = msgspec_replace(vol.record, size=size)
        vol.export.size = size
        return vol

    def set_identity(self, name: str, *, serial: str, vvol_id: int, export_name: str,
                     description: str) -> Volume:
        """Take another volume's virtual identity (the secondary of a pair does)."""
        vol = self.get(name)
        other = self._by_export.get(export_name)
        if other is not None and other is not vol:
            raise VolumeError(f"export name {export_name!r} is already used by volume "
                              f"{other.record.name!r}", "conflict")
        self.catalog.update_identity(vol.record.id, serial, vvol_id, export_name, description)
        del self._by_export[vol.record.export_name]
        vol.record = msgspec_replace(vol.record, serial=serial, vvol_id=vvol_id,
                                     export_name=export_name, description=description)
        vol.export.name = export_name
        vol.export.description = description
        self._by_export[export_name] = vol
        return vol

    def delete(self, name: str, *, force: bool = False) -> VolumeRecord:
        vol = self.get(name)
        if vol.connections and not force:
            raise VolumeError(f"volume {name!r} has {vol.connections} open NBD connection(s); "
                              "disconnect the clients or use --force", "busy")
        self.catalog.delete(vol.record.id)
        del self.volumes[name]
        del self._by_export[vol.record.export_name]
        vol.store.close()
        if vol.record.kind == "thin":
            with contextlib.suppress(FileNotFoundError):
                os.unlink(vol.record.path)
            fsync_dir(self.volume_dir)
        return vol.record

    # ---- internals ------------------------------------------------------

    def _open(self, rec: VolumeRecord) -> Volume:
        store = BackingStore(rec.path)
        if not store.is_device and store.size < rec.size:
            # A resize that reached the catalog but not the file (or a file shrunk
            # behind our back): the volume keeps its size, missing bytes read as zero.
            os.ftruncate(store.fd, rec.size)
        store.size = rec.size
        export = ExportInfo(rec.export_name, rec.size, rec.description, rec.read_only)
        vol = Volume(rec, store, export)
        self.volumes[rec.name] = vol
        self._by_export[rec.export_name] = vol
        return vol

    def _remove_orphans(self) -> None:
        known = {os.path.basename(v.record.path) for v in self.volumes.values()
                 if v.record.kind == "thin"}
        for entry in os.listdir(self.volume_dir):
            if entry.endswith(".img") and entry not in known:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.volume_dir, entry))


def _check_size(size: int) -> None:
    if size <= 0 or size % SECTOR:
        raise VolumeError(f"size {size} must be a positive multiple of {SECTOR} bytes")
    if size > MAX_VOLUME_SIZE:
        raise VolumeError(f"size {size} is larger than the maximum {MAX_VOLUME_SIZE}")


def _create_error(path: str, size: int, e: OSError) -> VolumeError:
    """A clear refusal for a backing file the file system would not make."""
    where = os.path.dirname(path)
    if e.errno == errno.EFBIG:
        return VolumeError(f"the file system of {where} cannot hold a file of {size} bytes "
                           f"({format_size(size)}): {e.strerror}; choose a smaller size")
    if e.errno == errno.ENOSPC:
        return VolumeError(f"no space left in {where} for {path}", "io")
    return VolumeError(f"cannot create {path}: {e.strerror}", "io")


def msgspec_replace(rec: VolumeRecord, **changes: object) -> VolumeRecord:
    import msgspec

    return msgspec.structs.replace(rec, **changes)

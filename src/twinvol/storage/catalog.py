"""The node's catalog: volumes and node identity in SQLite (WAL, synchronous=FULL).

Every change is one transaction, so a kill -9 leaves either the old or the new
row, never half of one.
"""

from __future__ import annotations

import secrets
import sqlite3
from typing import Any

import msgspec

from twinvol import clock

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS volumes (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    export_name TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL CHECK (size >= 0),
    kind TEXT NOT NULL CHECK (kind IN ('thin', 'file', 'device')),
    path TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    serial TEXT NOT NULL,
    vvol_id INTEGER NOT NULL,
    read_only INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL
);
"""


class CatalogError(Exception):
    """The catalog cannot be opened or is damaged."""


class VolumeRecord(msgspec.Struct, frozen=True):
    """A volume as stored in the catalog and shown by the API."""

    id: str
    name: str
    export_name: str
    size: int
    kind: str
    path: str
    description: str
    serial: str
    vvol_id: int
    read_only: bool
    created: float


_COLUMNS = ("id, name, export_name, size, kind, path, description, serial, vvol_id, "
            "read_only, created")


class Catalog:
    """SQLite-backed record of this node's volumes."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            check = self.db.execute("PRAGMA quick_check").fetchone()
            if check is None or check[0] != "ok":
                raise CatalogError(f"catalog {path} failed its integrity check: {check}")
            self.db.executescript(_SCHEMA)
            version = self.get_meta("schema_version")
            if version is None:
                self.set_meta("schema_version", str(SCHEMA_VERSION))
            elif int(version) > SCHEMA_VERSION:
                raise CatalogError(f"catalog {path} has schema {version}, newer than this "
                                   f"twinvol understands ({SCHEMA_VERSION}); upgrade twinvol")
        except sqlite3.DatabaseError as e:
            raise CatalogError(f"catalog {path} is unreadable ({e}); move it away and restore "
                               "it from a backup") from e

    def close(self) -> None:
        self.db.close()

    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def node_serial(self) -> str:
        """This node's storage serial, made once and kept for the life of the data."""
        serial = self.get_meta("serial")
        if serial is None:
            serial = "TV" + secrets.token_hex(3).upper()
            self.set_meta("serial", serial)
        return serial

    def volumes(self) -> list[VolumeRecord]:
        rows = self.db.execute(f"SELECT {_COLUMNS} FROM volumes ORDER BY name").fetchall()
        return [_record(r) for r in rows]

    def next_vvol_id(self) -> int:
        row = self.db.execute("SELECT COALESCE(MAX(vvol_id), -1) + 1 FROM volumes").fetchone()
        return int(row[0])

    def insert(self, rec: VolumeRecord) -> None:
        self.db.execute(
            f"INSERT INTO volumes ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (rec.id, rec.name, rec.export_name, rec.size, rec.kind, rec.path, rec.description,
             rec.serial, rec.vvol_id, int(rec.read_only), rec.created),
        )

    def update_size(self, vol_id: str, size: int) -> None:
        self.db.execute("UPDATE volumes SET size = ? WHERE id = ?", (size, vol_id))

    def update_identity(self, vol_id: str, serial: str, vvol_id: int, export_name: str,
                        description: str) -> None:
        self.db.execute("UPDATE volumes SET serial = ?, vvol_id = ?, export_name = ?, "
                        "description = ? WHERE id = ?",
                        (serial, vvol_id, export_name, description, vol_id))

    def delete(self, vol_id: str) -> None:
        self.db.execute("DELETE FROM volumes WHERE id = ?", (vol_id,))


def _record(row: tuple[Any, ...]) -> VolumeRecord:
    (vid, name, export_name, size, kind, path, description, serial, vvol_id, ro, created) = row
    return VolumeRecord(str(vid), str(name), str(export_name), int(size), str(kind), str(path),
                        str(description), str(serial), int(vvol_id), bool(ro), float(created))


def now() -> float:
    return clock.wall()

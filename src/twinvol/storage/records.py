"""Typed records kept as JSON rows in the node's catalog database (pairs, remote-copy
groups, local pairs, the switching table): one implementation, the same transactional
guarantees as the catalog, and a damaged row is a clear error naming the table and the
row, never a traceback at start-up or a record silently dropped.
"""

from __future__ import annotations

import sqlite3
from typing import Generic, TypeVar

import msgspec

from twinvol.storage.catalog import CatalogError

T = TypeVar("T", bound=msgspec.Struct)


class DamagedRecord(CatalogError):
    """A row that does not decode as its record type."""


class RecordTable(Generic[T]):
    """Table `table` of `db`: one `kind` record per key, as JSON."""

    def __init__(self, db: sqlite3.Connection, table: str, kind: type[T],
                 key: str = "name") -> None:
        if not (table.isidentifier() and key.isidentifier()):
            raise ValueError(f"bad table or key name: {table!r}, {key!r}")
        self.db, self.table, self.kind, self.key = db, table, kind, key
        self._decoder = msgspec.json.Decoder(kind)
        db.executescript(f"CREATE TABLE IF NOT EXISTS {table} "
                         f"({key} TEXT PRIMARY KEY, body TEXT NOT NULL);")

    def all(self) -> list[T]:
        """Every record, in key order; a damaged row raises `DamagedRecord`."""
        out = []
        for key, body in self.db.execute(
                f"SELECT {self.key}, body FROM {self.table} ORDER BY {self.key}"):
            try:
                out.append(self._decoder.decode(body))
            except (msgspec.DecodeError, UnicodeDecodeError) as e:
                raise DamagedRecord(
                    f"catalog table {self.table}, row {key!r}: not a valid "
                    f"{self.kind.__name__} ({e}); restore the catalog from a backup or "
                    "remove the row") from None
        return out

    def save(self, key: str, rec: T) -> None:
        """Insert or replace the record of `key`."""
        self.db.execute(f"INSERT OR REPLACE INTO {self.table} ({self.key}, body) "
                        "VALUES (?, ?)", (key, msgspec.json.encode(rec).decode()))

    def insert(self, key: str, rec: T) -> None:
        """Insert a new record (sqlite3.IntegrityError if `key` exists)."""
        self.db.execute(f"INSERT INTO {self.table} ({self.key}, body) VALUES (?, ?)",
                        (key, msgspec.json.encode(rec).decode()))

    def delete(self, key: str) -> None:
        self.db.execute(f"DELETE FROM {self.table} WHERE {self.key} = ?", (key,))

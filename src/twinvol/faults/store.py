"""The node's persistent fault state (SQLite in the data directory, `faults.db`).

- `outbox`: this node's own reports by seq, kept so a relay can be brought up to date;
- `log`: the reports this node holds for its hosts (its own and relayed ones), numbered
  by `lseq`, which a host's stream resumes from;
- `marks`: per origin stream the highest seq in the log (dedup across restarts);
- `meta`: the incarnation (random, names this data directory's streams).

A report is written before anyone is told about it, so a kill -9 loses nothing that
was acknowledged. WAL with synchronous=NORMAL survives a process crash.
"""

from __future__ import annotations

import os
import secrets
import sqlite3

import msgspec

from twinvol.faults.model import FaultReport

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY, report BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS log (lseq INTEGER PRIMARY KEY, report BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS marks (stream TEXT PRIMARY KEY, seq INTEGER NOT NULL);
"""

_dec = msgspec.json.Decoder(FaultReport)
_enc = msgspec.json.Encoder()


class FaultStoreError(Exception):
    """faults.db is damaged (the node refuses to start rather than renumber reports)."""


class FaultStore:
    def __init__(self, data_dir: str, retention: int = 10000) -> None:
        self.path = os.path.join(data_dir, "faults.db")
        self.retention = retention
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(_SCHEMA)
            row = self.db.execute("SELECT value FROM meta WHERE key='incarnation'").fetchone()
        except sqlite3.DatabaseError as e:
            raise FaultStoreError(f"fault store {self.path} is damaged: {e}; move it aside "
                                  "to start with an empty fault history") from None
        if row is None:
            self.incarnation = secrets.token_hex(4)
            self.db.execute("INSERT INTO meta VALUES ('incarnation', ?)", (self.incarnation,))
        else:
            self.incarnation = str(row[0])

    def close(self) -> None:
        self.db.close()

    # ---- reading at start --------------------------------------------------------

    def outbox(self) -> list[FaultReport]:
        rows = self.db.execute("SELECT report FROM outbox ORDER BY seq").fetchall()
        return [_dec.decode(r[0]) for r in rows]

    def log(self) -> list[tuple[int, FaultReport]]:
        rows = self.db.execute("SELECT lseq, report FROM log ORDER BY lseq").fetchall()
        return [(int(r[0]), _dec.decode(r[1])) for r in rows]

    def last_lseq(self) -> int:
        row = self.db.execute("SELECT MAX(lseq) FROM log").fetchone()
        return int(row[0] or 0)

    def marks(self) -> dict[str, int]:
        return {str(s): int(q) for s, q in self.db.execute("SELECT stream, seq FROM marks")}

    # ---- writing -----------------------------------------------------------------

    def add_own(self, reports: list[FaultReport]) -> None:
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany("INSERT INTO outbox VALUES (?, ?)",
                                [(r.seq, _enc.encode(r)) for r in reports])
            last = reports[-1].seq
            self.db.execute("DELETE FROM outbox WHERE seq <= ?", (last - self.retention,))

    def add_log(self, entries: list[tuple[int, FaultReport]], marks: dict[str, int]) -> None:
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany("INSERT INTO log VALUES (?, ?)",
                                [(lseq, _enc.encode(r)) for lseq, r in entries])
            self.db.executemany("INSERT OR REPLACE INTO marks VALUES (?, ?)",
                                list(marks.items()))
            last = entries[-1][0]
            self.db.execute("DELETE FROM log WHERE lseq <= ?", (last - self.retention,))

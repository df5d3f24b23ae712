"""The audit log: every mutating API call a component executed, one JSON line each
(time, token name, source address, method, object, result), appended to `audit.log` in
its data directory. Refused attempts are recorded too: they are what an audit is for."""

from __future__ import annotations

import datetime
import os
import threading

import msgspec


class AuditRecord(msgspec.Struct):
    time: str
    token: str
    source: str
    method: str
    object: str
    result: int
    outcome: str  # ok, denied (401/403) or failed


class AuditLog:
    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()

    def record(self, token: str, source: str, method: str, obj: str, status: int) -> None:
        outcome = "ok" if status < 400 else "denied" if status in (401, 403) else "failed"
        now = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
        line = msgspec.json.encode(AuditRecord(now.replace("+00:00", "Z"), token, source,
                                               method, obj, status, outcome)) + b"\n"
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)

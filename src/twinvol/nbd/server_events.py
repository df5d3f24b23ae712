"""What the sans-IO NBD server and its I/O layer exchange: the exports it may serve
(asked of an `ExportProvider`) and the events it emits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from twinvol.nbd.constants import Cmd


class TlsMode(StrEnum):
    """A server's TLS policy (the spec's NOTLS, SELECTIVETLS with no TLS-only export,
    FORCEDTLS)."""

    OFF = "off"
    ALLOW = "allow"
    REQUIRE = "require"


@dataclass(slots=True)
class ExportInfo:
    """What the server knows about one export while negotiating."""

    name: str
    size: int
    description: str = ""
    read_only: bool = False
    # Set while this copy must not serve hosts (a stale side of a pair): negotiation
    # is refused with NBD_REP_ERR_POLICY and this text.
    blocked: str | None = None
    # The I/O gate: replies leave only while the monotonic clock is below this (a
    # mirrored copy serves under a lease; see replication/core/lease.py). Checked when
    # replies are sent, so a request queued before a pause is never answered late.
    serve_until: float = math.inf


class ExportProvider(Protocol):
    """Answers export questions during the handshake (pure lookups, no I/O)."""

    def lookup(self, name: str) -> ExportInfo | None: ...

    def list_exports(self) -> Sequence[ExportInfo]: ...


@dataclass(slots=True)
class Ready:
    """Negotiation finished: transmission starts on `export`."""

    export: ExportInfo
    structured: bool
    meta_context: bool
    flags: int


@dataclass(slots=True)
class Request:
    """A valid transmission request the I/O layer must perform and answer.

    `data` is the write payload: a view valid until the next `next_event` call
    (copy it to keep it longer).
    """

    command: Cmd
    flags: int
    cookie: int
    offset: int
    length: int
    data: bytes | bytearray | memoryview | None = None


@dataclass(slots=True)
class Disconnect:
    """The connection ends. `error` is set for a hard disconnect on a protocol violation."""

    reason: str
    error: bool = False


@dataclass(slots=True)
class StartTls:
    """NBD_OPT_STARTTLS was acknowledged: the I/O layer upgrades the connection to TLS
    and then calls `ServerConnection.tls_started()` (or drops it if the handshake fails)."""


Event = Ready | Request | Disconnect | StartTls

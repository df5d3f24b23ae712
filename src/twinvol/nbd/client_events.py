"""What the sans-IO NBD client connection tells its I/O layer: the events it emits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twinvol.nbd.constants import MAX_PAYLOAD, Rep


@dataclass(slots=True)
class Negotiated:
    """Transmission starts: what the server said about the export."""

    export: str
    size: int
    flags: int
    structured: bool
    meta_context: bool
    name: str | None = None
    description: str = ""
    min_block: int = 1
    preferred_block: int = 4096
    max_block: int = MAX_PAYLOAD


@dataclass(slots=True)
class TlsReady:
    """The server acknowledged NBD_OPT_STARTTLS: the I/O layer does the TLS handshake,
    then calls `ClientConnection.tls_started()` and negotiation goes on over TLS."""


@dataclass(slots=True)
class Refused:
    """The server refused the export (NBD_REP_ERR_*); `message` is its text."""

    rep: int
    message: str

    @property
    def rep_name(self) -> str:
        try:
            return Rep(self.rep).name
        except ValueError:
            return f"error {self.rep:#x}"


@dataclass(slots=True)
class Completed:
    """A request's final reply.

    `error` is the NBD error value (0 on success) and `message` the server's
    text, if any. For a successful read `data` is the request's own buffer of
    exactly `length` bytes, or None when the whole range was reported as a hole
    (all zeroes, nothing sent). For block status `extents` is the list of
    (length, flags) of the negotiated base:allocation context.
    """

    tag: Any
    cookie: int
    command: int
    error: int
    message: str = ""
    data: bytearray | None = None
    extents: list[tuple[int, int]] | None = None


@dataclass(slots=True)
class ProtocolError:
    """The server broke the protocol; the connection is dead (hard disconnect it)."""

    reason: str


@dataclass(slots=True)
class Closed:
    """The server closed the connection (EOF)."""

    reason: str


Event = Negotiated | Refused | Completed | ProtocolError | Closed | TlsReady

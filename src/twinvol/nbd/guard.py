"""What an NBD listener enforces before and around negotiation: TLS policy, a negotiation
deadline, and caps on connections per listener and per client address.

`Admission` is pure bookkeeping (no sockets), so its decisions are unit-tested; the
asyncio protocol (nbd/aio.py) asks it on accept and tells it on close.
"""

from __future__ import annotations

import ssl
from collections import Counter
from dataclasses import dataclass, field

from twinvol.nbd.constants import MAX_OPTIONS
from twinvol.nbd.server_events import TlsMode


@dataclass(slots=True)
class Admission:
    """Open connections per listener and per client address, against their caps."""

    max_connections: int = 1024
    max_per_client: int = 128
    total: int = 0
    by_host: Counter[str] = field(default_factory=Counter)

    def admit(self, host: str) -> str | None:
        """Count a new connection from `host`, or say why it is refused."""
        if self.total >= self.max_connections:
            return f"the node already has {self.total} NBD connections (limit " \
                   f"{self.max_connections})"
        if self.by_host[host] >= self.max_per_client:
            return f"{host} already has {self.by_host[host]} NBD connections (limit " \
                   f"{self.max_per_client} per client address)"
        self.total += 1
        self.by_host[host] += 1
        return None

    def release(self, host: str) -> None:
        self.total -= 1
        self.by_host[host] -= 1
        if self.by_host[host] <= 0:
            del self.by_host[host]


@dataclass(slots=True)
class Guard:
    """One listener's policy: TLS mode and context, deadline, caps."""

    tls: TlsMode = TlsMode.OFF
    ssl: ssl.SSLContext | None = None
    negotiation_timeout: float = 30.0  # seconds from accept to transmission (TLS included)
    max_options: int = MAX_OPTIONS
    admission: Admission = field(default_factory=Admission)


def describe_tls_error(e: BaseException, other: str = "the client") -> str:
    """One clear line for a failed handshake, naming the side that did not trust whom
    (`other` is the far side: the client, the peer)."""
    verify = getattr(e, "verify_message", None)
    if verify:
        return f"{other}'s certificate was refused: {verify}"
    reason = str(getattr(e, "reason", "") or "")
    hints = {
        "TLSV1_ALERT_UNKNOWN_CA": "the client does not trust the CA of this server's "
                                  "certificate",
        "SSLV3_ALERT_BAD_CERTIFICATE": "the client refused this server's certificate",
        "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the client says this server's certificate "
                                           "has expired",
        "PEER_DID_NOT_RETURN_A_CERTIFICATE": "the client sent no certificate and this "
                                             "server requires one",
        "WRONG_VERSION_NUMBER": "the client did not speak TLS",
        "HTTP_REQUEST": "the client did not speak TLS",
    }
    if reason in hints:
        return f"{hints[reason]} ({reason})"
    if isinstance(e, TimeoutError):
        return "the TLS handshake did not finish in time"
    if isinstance(e, ConnectionError | EOFError) or "EOF" in reason:
        return "the client hung up during the TLS handshake (does it trust the CA of " \
               f"this server's certificate?): {type(e).__name__}"
    return f"{type(e).__name__}: {reason or e}"

"""What an NBD listener enforces before and around negotiation: TLS policy, a negotiation
deadline, and caps on connections per listener and per client address.

`Admission` is pure bookkeeping (no sockets), so its decisions are unit-tested;
`Standing` applies a guard to one connection, and both NBD listeners (the node's
nbd/aio.py, the host agent's host/connection.py) use it from accept to close.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twinvol.nbd.constants import MAX_OPTIONS
from twinvol.nbd.server import ServerConnection
from twinvol.nbd.server_events import TlsMode
from twinvol.tls.psk import PskContext, PskError


@dataclass(slots=True)
class Admission:
    """Open connections per listener and per client address, against their caps."""

    max_connections: int = 1024
    max_per_client: int = 128
    total: int = 0
    by_host: Counter[str] = field(default_factory=Counter)
    who: str = "the node"  # named in a refusal

    def admit(self, host: str) -> str | None:
        """Count a new connection from `host`, or say why it is refused."""
        if self.total >= self.max_connections:
            return f"{self.who} already has {self.total} NBD connections (limit " \
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
    psk: PskContext | None = None  # TLS with pre-shared keys instead of `ssl`

    async def upgrade(self, raw: asyncio.Transport, protocol: asyncio.BaseProtocol
                      ) -> asyncio.Transport | None:
        """STARTTLS on `raw` (reading paused) for `protocol`: X.509 with the loop's own
        TLS, or PSK through a memory BIO (twinvol.tls.psk)."""
        if self.psk is not None:
            return await self.psk.start(raw, protocol, self.negotiation_timeout)
        assert self.ssl is not None
        return await asyncio.get_running_loop().start_tls(
            raw, protocol, self.ssl, server_side=True,
            ssl_handshake_timeout=self.negotiation_timeout)

    def connection(self, registry: Any) -> ServerConnection:
        """The sans-IO server side of a new connection under this guard."""
        return ServerConnection(registry, tls=self.tls, max_options=self.max_options)


class Standing:
    """One connection under a guard: counted from `admit` to `release`, and handed to
    `expired` (after one log line) if it has not called `negotiated` by the deadline."""

    __slots__ = ("_host", "_timer", "guard", "log", "peer")

    def __init__(self, guard: Guard, log: logging.Logger) -> None:
        self.guard = guard
        self.log = log
        self.peer = "?"
        self._host: str | None = None
        self._timer: asyncio.TimerHandle | None = None

    def admit(self, transport: asyncio.BaseTransport,
              expired: Callable[[], None] | None = None) -> bool:
        """Count the new connection, or log why not and abort it (False). At the
        deadline `expired` is called (by default the transport is aborted)."""
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "unix")
        host = str(peer[0]) if isinstance(peer, tuple) else "unix"
        refused = self.guard.admission.admit(host)
        if refused is not None:
            self.log.warning("nbd connection refused", extra={"peer": self.peer,
                                                               "reason": refused})
            transport.abort()  # type: ignore[attr-defined]
            return False
        self._host = host
        self._timer = asyncio.get_running_loop().call_later(
            self.guard.negotiation_timeout, self._expire,
            expired or transport.abort)  # type: ignore[attr-defined]
        return True

    def _expire(self, expired: Callable[[], None]) -> None:
        self._timer = None
        self.log.warning("nbd negotiation timed out, connection dropped",
                         extra={"peer": self.peer, "timeout": self.guard.negotiation_timeout})
        expired()

    def negotiated(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def release(self) -> None:
        self.negotiated()
        if self._host is not None:
            self.guard.admission.release(self._host)
            self._host = None


def describe_tls_error(e: BaseException, other: str = "the client") -> str:
    """One clear line for a failed handshake, naming the side that did not trust whom
    (`other` is the far side: the client, the peer)."""
    if isinstance(e, PskError):
        return str(e)
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

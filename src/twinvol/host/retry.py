"""The retry rules: the host agent never fails a request that another path can serve.

A node's error answer is one of two kinds:

- the request's own (EPERM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP): every copy would
  answer the same, so it is the client's answer at once;
- a path fault (EIO, NBD_ESHUTDOWN, ENOMEM, anything else): the node is fenced,
  blocked, shutting down or lost its partner mid-write. Another path, or this one
  once it is back, may serve the request. A lost connection is a path fault too.

A path fault takes the path out of use at once (no new requests go to it), but its
connection stays until every request still on it is answered or lost: the path
*drains*. Only then is it closed (and reconnected, which re-checks the node's view),
and the requests that faulted on it are re-sent, in the order the client sent them.
So a re-sent write never overtakes an older write to the same blocks that the faulted
node might still apply. Reads, cache and block status carry no such risk and are
re-sent at once. Re-sending a write, a trim or a flush is safe: each is idempotent.

A request is re-sent (or held while no path is usable) until `hold_timeout` after its
first fault; a fault after that is answered to the client with the node's error.

The native relay (_relay.c) implements the same rules; this module is the Python data
path's and the reference the tests pin down.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, Protocol, TypeVar

from twinvol.nbd.constants import Cmd, Err

CLIENT_ERRORS = frozenset(int(e) for e in (Err.EPERM, Err.EINVAL, Err.ENOSPC, Err.EOVERFLOW,
                                           Err.ENOTSUP))
_READ_LIKE = frozenset(int(c) for c in (Cmd.READ, Cmd.CACHE, Cmd.BLOCK_STATUS))
_NAMES = {int(Err.EIO): "EIO", int(Err.ESHUTDOWN): "NBD_ESHUTDOWN", int(Err.ENOMEM): "ENOMEM"}


def path_fault(err: int) -> bool:
    """Is this error answer the path's (re-send elsewhere) rather than the request's?"""
    return err not in CLIENT_ERRORS


def resend_at_once(cmd: int) -> bool:
    """Reads and hints go to another path at once; writes wait for the faulted path to
    drain, so they cannot overtake an older write still on it."""
    return cmd in _READ_LIKE


def give_up(first_fault: float | None, now: float, hold_timeout: float) -> bool:
    """After a new fault: answer the client with the error rather than re-send? Only
    once the request's first fault is `hold_timeout` old (the first is always re-sent)."""
    return first_fault is not None and now - first_fault >= hold_timeout


def fault_reason(node: str, err: int, message: str = "") -> str:
    """Why a path is taken out of use, for logs and status."""
    what = _NAMES.get(err, f"error {err}")
    return f"node {node} answered {what}" + (f": {message[:300]}" if message else "")


class Sequenced(Protocol):
    seq: int


T = TypeVar("T", bound=Sequenced)


class Parking(Generic[T]):
    """Requests that faulted on a path, waiting for that path to drain."""

    __slots__ = ("_parked",)

    def __init__(self) -> None:
        self._parked: dict[Hashable, list[T]] = {}

    def park(self, path: Hashable, op: T) -> None:
        self._parked.setdefault(path, []).append(op)

    def release(self, path: Hashable) -> list[T]:
        """The path drained: its parked requests, oldest (client order) first."""
        ops = self._parked.pop(path, [])
        ops.sort(key=lambda op: op.seq)
        return ops

    def count(self) -> int:
        return sum(len(v) for v in self._parked.values())

    def take_all(self) -> list[T]:
        """Everything parked (the session is closing), oldest first."""
        ops = [op for v in self._parked.values() for op in v]
        self._parked.clear()
        ops.sort(key=lambda op: op.seq)
        return ops


__all__ = ["CLIENT_ERRORS", "Parking", "fault_reason", "give_up", "path_fault",
           "resend_at_once"]

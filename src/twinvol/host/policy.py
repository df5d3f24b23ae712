"""Path selection: which usable path a request goes to.

Reads (and cache/block-status hints) go to the path with the fewest requests
outstanding, ties broken round-robin, so a slow or distant node gets less.
Writes, trims, zeroes and flushes go to ONE path (the storage pair replicates
between itself; sending a write to both nodes would apply it twice and race):
the node that says it is primary when that is known, otherwise the first usable
path in configured order, so every host writes through the same node and a
burst of writes and its flush meet there.
"""

from __future__ import annotations

from collections.abc import Container, Sequence
from typing import Protocol, TypeVar


class Candidate(Protocol):
    inflight: int
    order: int
    primary: bool


P = TypeVar("P", bound=Candidate)


class PathPolicy:
    __slots__ = ("_rr",)

    def __init__(self) -> None:
        self._rr = 0

    def read_path(self, up: Sequence[P], exclude: Container[object] | None = None) -> P | None:
        """Least outstanding requests, round-robin among equals; skips paths in `exclude`."""
        n = len(up)
        if n == 1:
            p = up[0]
            return None if exclude is not None and p in exclude else p
        if n == 0:
            return None
        start = self._rr = (self._rr + 1) % n
        best: P | None = None
        for i in range(n):
            p = up[(start + i) % n]
            if exclude is not None and p in exclude:
                continue
            if best is None or p.inflight < best.inflight:
                best = p
        return best

    @staticmethod
    def write_path(up: Sequence[P], exclude: Container[object] | None = None) -> P | None:
        """The single path writes go to."""
        usable = [p for p in up if exclude is None or p not in exclude]
        if not usable:
            return None
        for p in usable:
            if p.primary:
                return p
        return min(usable, key=lambda p: p.order)

"""The host agent's request latency per export and kind of request (read, write, other):
from the whole request read from the client to its reply queued, so it includes the
node's service time, the paths' round trips and any retry on another path.

As on the nodes (twinvol.nbd.iostats, whose buckets it shares) one request in `SAMPLE`
is timed, by arrival number: the Python data path marks the request's `Op`, the native
relay its slot, and each keeps its samples until the agent folds them into the export's
totals (at scrape time, and when the session closes). Requests answered with a path fault
after hold_timeout, or failed while held, are not timed: they never reached a node.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twinvol.nbd.constants import Cmd
from twinvol.nbd.iostats import BOUNDS, SAMPLE, SAMPLE_MASK, OpStats, VolumeIo

__all__ = ["BOUNDS", "SAMPLE", "SAMPLE_MASK", "VolumeIo", "add", "as_json", "fold",
           "op_stats"]

_READ = int(Cmd.READ)
_WRITE = int(Cmd.WRITE)


def op_stats(vio: VolumeIo, cmd: int) -> OpStats:
    """The counters a request of `cmd` is timed into."""
    return vio.read if cmd == _READ else vio.write if cmd == _WRITE else vio.other


def _kinds(vio: VolumeIo) -> tuple[OpStats, OpStats, OpStats]:
    return vio.read, vio.write, vio.other


def fold(into: VolumeIo, taken: Sequence[tuple[int, int, Sequence[int]]]) -> None:
    """Add what the native relay's take_latency() returned (read, write, other)."""
    for ops, (samples, ns, buckets) in zip(_kinds(into), taken, strict=True):
        ops.samples += samples
        ops.ns += ns
        for i, n in enumerate(buckets):
            ops.buckets[i] += n


def add(into: VolumeIo, other: VolumeIo) -> None:
    """Add `other`'s timed requests to `into`."""
    fold(into, [(o.samples, o.ns, o.buckets) for o in _kinds(other)])


def as_json(vio: VolumeIo) -> dict[str, Any]:
    """For the status document: per kind the timed requests, their total seconds and the
    count per bucket (upper bounds `BOUNDS`, then everything above)."""
    return {name: {"count": o.samples, "sum": o.ns / 1e9, "buckets": list(o.buckets)}
            for name, o in zip(("read", "write", "other"), _kinds(vio), strict=True)}

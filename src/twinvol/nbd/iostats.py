"""Request counters of a node's NBD server: totals, and per volume the requests, bytes
and service times (request parsed to reply queued) as histograms.

Counting happens on every request, so it is kept to a few integer operations: timing a
request costs about 330 ns (5% of a 4k write to a plain volume, 6.3 us), so requests and
bytes are counted on every request but the service time is taken on one in `SAMPLE`
(the histogram's count is the number of samples): about 100 ns a request on average.
Times are taken with perf_counter_ns and binned by bit length (power-of-two buckets from
16 us to about 1 s) instead of a search over bucket bounds; the metrics collector reads
the counters at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable

from twinvol.nbd.server_events import ExportInfo

_SHIFT = 14                   # bucket 0: below 2**14 ns (16.4 us)
BUCKETS = 18                  # the last bucket is everything from 2**30 ns (1.07 s) up
BOUNDS = tuple((1 << (_SHIFT + i)) / 1e9 for i in range(BUCKETS - 1))  # upper bounds, s
SAMPLE = 16                   # one request in SAMPLE is timed (a power of two)
SAMPLE_MASK = SAMPLE - 1


class OpStats:
    """One kind of request (read, write, other) of one volume."""

    __slots__ = ("buckets", "bytes", "count", "ns", "samples")

    def __init__(self) -> None:
        self.count = 0     # every request
        self.bytes = 0
        self.samples = 0   # timed requests, and their times
        self.ns = 0
        self.buckets = [0] * BUCKETS

    def time(self, ns: int) -> None:
        self.samples += 1
        self.ns += ns
        b = (ns >> _SHIFT).bit_length()
        self.buckets[b if b < BUCKETS else BUCKETS - 1] += 1


class VolumeIo:
    __slots__ = ("other", "read", "write")

    def __init__(self) -> None:
        self.read = OpStats()
        self.write = OpStats()
        self.other = OpStats()   # flush, trim, write zeroes, block status, cache


class IoStats:
    """Per-node request counters and fault hooks. Counting is one int increment per
    request plus the volume's counters (exported by the node's metrics collector); the
    hooks run only on errors and on flushes."""

    __slots__ = ("errors", "on_error", "on_slow", "protocol_errors", "requests", "volumes")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.protocol_errors = 0  # clients hung up on for breaking the protocol
        self.volumes: dict[str, VolumeIo] = {}  # by export name
        self.on_error: Callable[[str, str, int, BaseException], None] | None = None
        self.on_slow: Callable[[str, str, float], None] | None = None

    def volume(self, export: str) -> VolumeIo:
        vio = self.volumes.get(export)
        if vio is None:
            vio = self.volumes[export] = VolumeIo()
        return vio

    def error(self, op: str, export: ExportInfo | None, offset: int,
              exc: BaseException) -> None:
        self.errors += 1
        if self.on_error is not None:
            self.on_error(op, export.name if export else "?", offset, exc)

"""The pure replication core: decisions and bookkeeping with no I/O.

Nothing in this package imports asyncio, socket, time or os (a unit test checks
it): time comes in as `now`, a monotonic reading in seconds, and what must happen
comes out as return values. The asyncio runtime (replication/manager.py) and the
seeded simulator (twinvol.testing) drive the same code.
"""

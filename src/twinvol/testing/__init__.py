"""A seeded, deterministic simulator of an active-active pair (the trio.testing and
FoundationDB-simulation model): simulated clocks with drift, a network that delays and
cuts, processes that pause and crash, the real witness arbiter and the real pair core
(leases, partner loss, resync direction), checked by a history checker.

    python -m twinvol.testing --seeds 1000
"""

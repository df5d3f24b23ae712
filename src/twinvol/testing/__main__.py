"""Run simulator seeds: `python -m twinvol.testing --seeds 1000 [--first 0] [--trace]`.

One line per seed; a failing seed prints its fault schedule, findings and (with
`--trace`) its trace, and replays exactly with `--first SEED --seeds 1`.
`--real` runs the node's own code (replication, peer links, NBD server, catalog) under
the deterministic runtime instead of the model (`realrun.py`).
"""

from __future__ import annotations

import argparse
import sys
import time

from twinvol.testing.node import SimOptions
from twinvol.testing.realrun import RealResult, run_real
from twinvol.testing.run import Result, run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m twinvol.testing", description=__doc__)
    p.add_argument("--seeds", type=int, default=100, help="how many seeds (default 100)")
    p.add_argument("--first", type=int, default=0, help="first seed (default 0)")
    p.add_argument("--duration", type=float, default=20.0, help="simulated seconds of faults")
    p.add_argument("--trace", action="store_true", help="print the trace of failing seeds")
    p.add_argument("--quiet", action="store_true", help="print failing seeds only")
    p.add_argument("--no-leases", action="store_true",
                   help="serve mirrored copies without leases (the old behaviour)")
    p.add_argument("--no-fence-alone", action="store_true",
                   help="acknowledge writes alone without waiting out the partner's lease")
    p.add_argument("--no-meeting-inflight", action="store_true",
                   help="meetings send dirty bits only, not mirrored writes in flight")
    p.add_argument("--decide-when-up", action="store_true",
                   help="a write that failed on an old link starts a decision anyway")
    p.add_argument("--no-far", action="store_true", help="no remote copy to a far site C")
    p.add_argument("--far-ship-while-blocked", action="store_true",
                   help="a feeder whose copy is blocked ships (and its failed writes ship)")
    p.add_argument("--far-unmarked-catch-up", action="store_true",
                   help="C keeps saying it is consistent during a catch-up by blocks")
    p.add_argument("--far-ignore-chunks", action="store_true",
                   help="a takeover at the standby ignores the blocks a catch-up brought C")
    p.add_argument("--far-stale-numbers", action="store_true",
                   help="a standby numbers its writes from its last count, however old")
    p.add_argument("--one-way", action="store_true",
                   help="the nemesis also cuts links in one direction only")
    p.add_argument("--real", action="store_true",
                   help="run the node's real code under the deterministic runtime (A-B-W; "
                        "--no-leases is the only switch it takes)")
    a = p.parse_args(argv)
    if a.seeds < 1 or a.duration <= 2:
        p.error("--seeds must be at least 1 and --duration above 2")
    options = SimOptions(leases=not a.no_leases, fence_alone=not a.no_fence_alone,
                         meeting_inflight=not a.no_meeting_inflight,
                         skip_when_up=not a.decide_when_up, far=not a.no_far,
                         far_serving=not a.far_ship_while_blocked,
                         far_settle=not a.far_ship_while_blocked,
                         far_inconsistent=not a.far_unmarked_catch_up,
                         far_chunked=not a.far_ignore_chunks,
                         far_numbering=not a.far_stale_numbers, one_way=a.one_way)
    failed = 0
    started = time.monotonic()
    r: Result | RealResult
    for seed in range(a.first, a.first + a.seeds):
        r = (run_real(seed, a.duration, leases=not a.no_leases) if a.real
             else run(seed, a.duration, options))
        if not r.ok:
            failed += 1
        if not a.quiet or not r.ok:
            print(r.line(), flush=True)
        if not r.ok:
            for f in r.faults:
                print(f"    fault {f}")
            for kind in r.findings.counts():
                for item in getattr(r.findings, kind)[:5]:
                    print(f"    {kind}: {item}")
            if a.trace:
                for line in r.trace:
                    print(f"    {line}")
    took = time.monotonic() - started
    print(f"{a.seeds} seeds, {failed} failed, {took:.1f}s", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m sweep` (from tests/) or `bench/sweep.py`: run seeds, one line per seed.

Exit status 0 when every seed passed, 1 when one failed (its line says which and where
its logs are; `--seed N` reruns the same schedule), 2 when the sweep cannot run here.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
from types import FrameType

from .harness import client_python_ok
from .nemesis import DEFAULT_KINDS, KINDS, schedule
from .run import run_seed


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds through every cleanup (finally) on SIGTERM too


def cannot_run() -> str | None:
    """Why the sweep cannot run on this machine, or None."""
    if os.geteuid() != 0:
        return "the sweep needs root (ip netns)"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"ip netns does not work: {probe.stderr.strip()}"
    return client_python_ok()


def parse_kinds(value: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in value.split(",") if k.strip())
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise argparse.ArgumentTypeError(f"unknown fault kind(s) {bad}; known: "
                                         f"{', '.join(KINDS)}")
    return kinds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=1, help="how many seeds (default 1)")
    p.add_argument("--first", type=int, default=1, help="first seed of --seeds (default 1)")
    p.add_argument("--seed", type=int, action="append",
                   help="run exactly this seed (repeatable); overrides --seeds")
    p.add_argument("--duration", type=float, default=45.0,
                   help="seconds of workload per seed (default 45)")
    p.add_argument("--faults", type=parse_kinds, default=DEFAULT_KINDS,
                   help=f"comma-separated fault kinds (default all: {','.join(KINDS)})")
    p.add_argument("--overlap", action="store_true",
                   help="let faults on different processes and links overlap in time")
    p.add_argument("--witness", choices=("builtin", "etcd"), default="builtin",
                   help="the witness backend: the builtin process (default) or a "
                   "three-member etcd cluster in W's namespace")
    p.add_argument("--dir", default=None, help="where run directories go (default $TMPDIR)")
    p.add_argument("--keep", action="store_true", help="keep run directories of passing seeds")
    p.add_argument("--plan", action="store_true",
                   help="print each seed's fault schedule and exit (nothing runs)")
    p.add_argument("--details", type=int, default=5,
                   help="findings shown per kind under a failing seed (default 5)")
    args = p.parse_args(argv)
    if args.duration < 10:
        p.error("--duration must be at least 10 seconds")
    seeds = args.seed or list(range(args.first, args.first + args.seeds))
    if args.plan:
        for seed in seeds:
            faults = schedule(seed, args.duration, args.faults, args.overlap)
            print(f"seed={seed}: " + " ".join(f"+{f.at:.1f}s {f.label}" for f in faults))
        return 0
    why = cannot_run()
    if why:
        print(f"sweep: cannot run: {why}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    failed: list[int] = []
    try:
        for seed in seeds:
            res = run_seed(seed, args.duration, args.faults, args.dir, args.keep,
                           args.overlap, args.witness)
            print(res.line(), flush=True)
            if res.verdict != "PASS":
                failed.append(seed)
                for line in res.details(args.details):
                    print(line, flush=True)
                again = " --overlap" if args.overlap else ""
                if args.witness != "builtin":
                    again += f" --witness {args.witness}"
                if args.faults != DEFAULT_KINDS:
                    again += f" --faults {','.join(args.faults)}"
                print(f"  logs: {res.directory}; rerun: --seed {seed} "
                      f"--duration {args.duration:g}{again}", flush=True)
    except KeyboardInterrupt:
        print("sweep: interrupted", file=sys.stderr)
        return 130
    print(f"{len(seeds) - len(failed)}/{len(seeds)} seeds passed"
          + (f"; failed: {' '.join(map(str, failed))}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

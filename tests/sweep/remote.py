"""The three-site fault sweep: async remote copy from an active-active pair to a far site.

A and B hold the active-active pair `sweep`; A (its primary) feeds an async remote copy
`sweep-dr` (consistency group `sweep`) to C, and B is the group's standby. A, B, C and
the witness W each run in their own namespace, with a link between every two of them; the
host agent and a writer (with flushes) and a reader run in the root namespace.

While the nemesis kills (-9) and pauses A, B and C, cuts links between sites and splits
and resyncs the active-active pair, a monitor polls every side's view of the remote copy
twice a second and, once a second, stops C, reads its volume file from disk and lets it
go again. After healing it waits for the lag to reach 0, then compares C with A and B
byte for byte. `remote_checker` judges the samples and polls, `checker` the pair.

    .venv/bin/python bench/sweep_remote.py --seeds 10 --duration 30
    .venv/bin/python bench/sweep_remote.py --seed 4 --duration 30     # replay one seed
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .blocks import BLOCK, decode
from .checker import Report, check
from .dr_checker import DrReport
from .harness import PAIR, Harness
from .nemesis import Fault, Nemesis, schedule
from .netns import Net, full_mesh
from .remote_checker import Poll, RemoteReport, Sample, check_final, check_remote
from .remote_dr import VARIANTS, DrPhase, DrPlan, describe, dr_plan
from .run import load_history, revision

DR_PAIR = "sweep-dr"
GROUP = "sweep"
SITES = ("A", "B", "C")
NODES = ("A", "B", "C", "W")
BLOCKS = 2048            # an 8 MiB volume: 128 chunks of 64 KiB
HOLD_TIMEOUT = 30.0
AGENT_TIMEOUT = HOLD_TIMEOUT + 10.0
WRITERS, READERS, FLUSH_EVERY, THINK = 2, 1, 8, 0.002
POLL_EVERY = 0.5         # seconds between polls of every side's view
SAMPLE_EVERY = 2         # polls between samples of C's disk
STALL = 10.0             # seconds C may apply nothing, silently, while writes are pending
LAG_BOUND = 30.0         # seconds after healing within which the lag must reach 0
# kind -> (targets, shortest, longest length in seconds); see nemesis.KINDS
KINDS: dict[str, tuple[tuple[str, ...], float, float]] = {
    "kill": (SITES, 0.5, 4.0),                           # kill -9, restart after `length`
    "pause": (SITES, 1.0, 6.0),                          # SIGSTOP, SIGCONT after `length`
    "link-cut": (("AB", "AC", "BC", "AW", "BW"), 1.0, 6.0),  # both ends of one link down
    "split": (("AB",), 1.0, 6.0),                        # pair split, pair resync after it
}
DEFAULT_KINDS = tuple(KINDS)


class RemoteHarness(Harness):
    """The three-site cluster. Stopping, killing and restarting C takes `c_lock`, which
    the monitor holds while it reads C's disk, so a sample never resumes a paused C."""

    def __init__(self, directory: str, net: Net, blocks: int, hold_timeout: float) -> None:
        super().__init__(directory, net, blocks, hold_timeout=hold_timeout, nodes=SITES)
        self.c_lock = threading.Lock()
        self.paths: dict[str, str] = {}
        self.actions: list[dict[str, Any]] = []   # what split/resync answered
        self.dr_created = False

    # ---- C's processes under the lock ------------------------------------------------

    def _locked(self, name: str) -> contextlib.AbstractContextManager[Any]:
        return self.c_lock if name == "C" else contextlib.nullcontext()

    def start_one(self, name: str, wait: bool = True) -> None:
        with self._locked(name):
            super().start_one(name, wait)

    def kill9(self, name: str) -> None:
        with self._locked(name):
            super().kill9(name)

    def pause(self, name: str) -> None:
        with self._locked(name):
            super().pause(name)

    def resume(self, name: str) -> None:
        with self._locked(name):
            super().resume(name)

    # ---- setup -------------------------------------------------------------------------

    def start(self) -> None:
        super().start()
        deadline = time.monotonic() + 30
        while True:  # C's peer links may still be connecting
            status, body = self.api("A", "POST", "/api/v1/pairs", {
                "name": DR_PAIR, "mode": "async", "secondary": "C", "primary_volume": PAIR,
                "secondary_volume": PAIR, "group": GROUP})
            if status == 201:
                self.dr_created = True
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"remote copy create: {status} {body}")
            time.sleep(0.3)
        deadline = time.monotonic() + 60
        while not self.dr_mirrored():
            if time.monotonic() > deadline:
                raise RuntimeError(f"remote copy never mirrored: {self.dr_views()}")
            time.sleep(0.2)
        for n in SITES:
            status, body = self.api(n, "GET", f"/api/v1/volumes/{PAIR}")
            if status != 200:
                raise RuntimeError(f"volume on {n}: {status} {body}")
            path = str(body["path"])
            self.paths[n] = path if os.path.isabs(path) else os.path.join(self.dir, path)
            if not os.path.exists(self.paths[n]):
                raise RuntimeError(f"volume file of {n} not found at {self.paths[n]}")

    # ---- views -------------------------------------------------------------------------

    def dr_views(self, timeout: float = 1.5) -> dict[str, dict[str, Any] | None]:
        """Each site's view of the remote copy (its `remote_copy` plus the pair's own
        `state`); None for a site that is paused or does not answer."""
        out: dict[str, dict[str, Any] | None] = {}
        for n in SITES:
            out[n] = None
            if n in self.paused:
                continue
            status, body = self.api(n, "GET", f"/api/v1/pairs/{DR_PAIR}", timeout=timeout)
            if status == 200 and isinstance(body, dict) and body.get("remote_copy"):
                out[n] = {**body["remote_copy"], "state": body.get("state"),
                          "io_mode": body.get("io_mode"), "reason": body.get("reason")}
        return out

    def dr_mirrored(self, views: dict[str, dict[str, Any] | None] | None = None,
                    caught_up: bool = True) -> bool:
        """The feeder and C both say mirrored (streaming records); with `caught_up` also
        nothing is left to apply."""
        views = views or self.dr_views()
        c = views.get("C")
        if c is None or c.get("feeder") not in views:
            return False
        f = views[str(c["feeder"])]
        return (f is not None and c["group_state"] == f["group_state"] == "mirrored"
                and c["state"] == "mirrored" and f["journal_mode"] == "journal"
                and (not caught_up or f["sequence"]["written"] == f["sequence"]["applied"]
                     == c["sequence"]["applied"]))

    def mirrored(self) -> bool:
        """The nemesis waits for this before each fault (without --overlap)."""
        return super().mirrored() and (not self.dr_created
                                       or self.dr_mirrored(caught_up=False))

    # ---- the active-active pair --------------------------------------------------------

    def aa_primary(self) -> str | None:
        for n, v in self.views().items():
            if v is not None and v.get("role") == "primary":
                return n
        return None

    def split(self) -> None:
        node = self.aa_primary() or "A"
        status, body = self.api(node, "POST", f"/api/v1/pairs/{PAIR}/split", timeout=15)
        self.actions.append({"at": time.monotonic(), "action": "split", "node": node,
                             "status": status, "body": body if status != 200 else "ok"})

    def resync(self, timeout: float = 20.0) -> bool:
        """`pair resync` on the primary until it is accepted (or `timeout`)."""
        deadline = time.monotonic() + timeout
        while True:
            views = self.views()
            split = [n for n, v in views.items() if v is not None and v["state"] == "split"]
            if not split and None not in views.values():
                return True  # nothing split (any more)
            if split:
                node = self.aa_primary() or split[0]
                status, body = self.api(node, "POST", f"/api/v1/pairs/{PAIR}/resync",
                                        timeout=15)
                self.actions.append({"at": time.monotonic(), "action": "resync",
                                     "node": node, "status": status,
                                     "body": body if status != 200 else "ok"})
                if status == 200:
                    return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.5)

    # ---- C's disk ----------------------------------------------------------------------

    def read_volume(self, name: str) -> bytes | None:
        try:
            with open(self.paths[name], "rb") as f:
                return f.read(self.blocks * BLOCK)
        except OSError:
            return None

    def sample_c(self) -> tuple[float, bytes] | None:
        """C's volume file read while C is stopped (None: C is down or paused already)."""
        with self.c_lock:
            if self.closed or "C" in self.paused or not self.alive("C"):
                return None
            pid = self.pid("C")
            os.kill(pid, signal.SIGSTOP)
            try:
                _wait_stopped(pid)
                at = time.monotonic()
                data = self.read_volume("C")
            finally:
                os.kill(pid, signal.SIGCONT)
        return None if data is None else (at, data)


def _wait_stopped(pid: int, timeout: float = 2.0) -> None:
    """Until every thread of `pid` is stopped (SIGSTOP is delivered asynchronously)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            states = []
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/stat") as f:
                    states.append(f.read().rsplit(")", 1)[1].split()[0])
        except OSError:
            return  # gone: its file no longer changes either
        if all(s in "Tt" for s in states):
            return
        time.sleep(0.001)
    raise RuntimeError(f"process {pid} did not stop")


def claimed(before: dict[str, Any] | None, after: dict[str, Any] | None) -> str:
    """What C said around a sample: "mirrored" only when it said so before and after."""
    if before is None or after is None:
        return "unknown"
    says = {f"{v['group_state']}/{v['state']}" for v in (before, after)}
    return "mirrored" if says == {"mirrored/mirrored"} else "+".join(sorted(says))


class Monitor:
    """Polls every side's view and samples C's disk, in a thread, until stopped."""

    def __init__(self, harness: RemoteHarness, directory: str) -> None:
        self.h = harness
        self.polls: list[Poll] = []
        self.samples: list[Sample] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._log = open(os.path.join(directory, "monitor.jsonl"), "w")  # noqa: SIM115
        self.thread = threading.Thread(target=self.run, name="monitor", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(30)
        self._log.close()

    def run(self) -> None:
        i = 0
        try:
            while not self._stop.is_set():
                began = time.monotonic()
                views = self.h.dr_views()
                at = time.monotonic()
                self.polls.append(Poll(at, views))
                self._log.write(json.dumps({"poll": at, "views": views}) + "\n")
                if i % SAMPLE_EVERY == 0:
                    self._sample(views.get("C"))
                i += 1
                self._stop.wait(max(0.0, began + POLL_EVERY - time.monotonic()))
        except BaseException as e:  # reported by the runner
            self.error = e

    def _sample(self, before: dict[str, Any] | None) -> None:
        got = self.h.sample_c()
        if got is None:
            return
        at, data = got
        after = self.h.dr_views().get("C")
        values = [decode(b, data[b * BLOCK:(b + 1) * BLOCK]) for b in range(self.h.blocks)]
        s = Sample(at, values, claimed(before, after),
                   None if before is None else int(before["sequence"]["applied"]),
                   None if before is None or after is None else
                   (int(before["sequence"]["received"]), int(after["sequence"]["received"])))
        self.samples.append(s)
        self._log.write(json.dumps({"sample": at, "claimed": s.claimed, "applied": s.applied,
                                    "received": s.received,
                                    "values": values}) + "\n")
        self._log.flush()


class RemoteNemesis(Nemesis):
    """The nemesis with `split` (pair split, and pair resync when it ends)."""

    h: RemoteHarness

    def __init__(self, harness: RemoteHarness, net: Net, faults: list[Fault], t0: float,
                 end: float, overlap: bool = False) -> None:
        super().__init__(harness, net, faults, t0, end, overlap)
        self.h = harness

    def _apply(self, fault: Fault) -> None:
        if fault.kind == "split":
            self.h.split()
        else:
            super()._apply(fault)

    def _heal(self, fault: Fault) -> None:
        if fault.kind == "split":
            self.h.resync()
        else:
            super()._heal(fault)


@dataclass
class RemoteResult:
    seed: int
    duration: float
    overlap: bool = False
    faults: list[dict[str, Any]] = field(default_factory=list)
    pair: Report | None = None          # the active-active pair (checker.check)
    remote: RemoteReport | None = None  # the far copy (remote_checker)
    plan: DrPlan | None = None          # the DR phase (remote_dr), if this seed runs it
    dr: DrReport | None = None          # its findings (dr_checker)
    error: str = ""
    revision: str = ""
    src_changed: bool = False
    seconds: float = 0.0
    directory: str = ""

    @property
    def verdict(self) -> str:
        if self.error:
            return "ERROR"
        ok = self.pair is not None and self.pair.ok and self.remote is not None \
            and self.remote.ok and (self.plan is None or (self.dr is not None
                                                          and self.dr.ok))
        return "PASS" if ok else "FAIL"

    def line(self) -> str:
        done = [f for f in self.faults if "start" in f]
        kinds = ",".join(f"{f['kind']}:{f['target']}" for f in done) or "-"
        head = (f"seed={self.seed} duration={self.duration:g}s"
                f"{' overlap' if self.overlap else ''} faults={len(done)} [{kinds}]")
        pair = self.pair.summary() if self.pair else "ops=0"
        far = self.remote.summary() if self.remote else "-"
        if self.plan is not None:
            far += f" dr: {self.dr.summary() if self.dr else self.plan.variant + ' -'}"
        tail = f"{self.verdict} {self.seconds:.0f}s"
        if self.src_changed:
            tail += " (WARNING: src/twinvol changed during the run: rerun it)"
        notes = (self.pair.notes if self.pair else []) + \
            (self.remote.notes if self.remote else []) + (self.dr.notes if self.dr else [])
        if self.error:
            tail += f" ({self.error})"
        elif notes:
            tail += f" ({'; '.join(notes)})"
        return f"{head} pair: {pair} far: {far} {tail} rev={self.revision}"

    def details(self, limit: int = 5) -> list[str]:
        out: list[str] = []
        for rep in (self.pair, self.remote, self.dr):
            if rep is None:
                continue
            for kind, items in rep.findings.items():
                for f in items[:limit]:
                    out.append(f"  {kind}: block {f.block}: {f.message}{self._during(f.at)}")
                if len(items) > limit:
                    out.append(f"  {kind}: ... {len(items) - limit} more")
        return out

    def _during(self, at: float) -> str:
        if not at:
            return ""
        began = [x for x in self.faults if "start" in x and x["start"] - 0.5 <= at]
        if not began:
            return " [before any fault]"
        x = began[-1]
        return (f" [last fault {x['kind']}:{x['target']} began {at - x['start']:.2f}s "
                f"before, healed after {x.get('end', at) - x['start']:.2f}s]")


def _restore(h: RemoteHarness, net: Net) -> list[str]:
    notes: list[str] = []
    net.heal_all()
    for name in ("W", *SITES, "host"):
        h.resume(name)
        if not h.alive(name):
            notes.append(f"{name} exited by itself: {h.sup.components[name].tail(3)!r}")
            h.start_one(name, wait=False)
    if not h.resync(30):
        notes.append("the split pair could not be resynced")
    return notes


def run_seed(seed: int, duration: float, kinds: tuple[str, ...] = DEFAULT_KINDS,
             base_dir: str | None = None, keep: bool = False, overlap: bool = False,
             dr: bool | None = None, dr_variant: str | None = None) -> RemoteResult:
    """One seed; its directory is kept when it does not pass (or with `keep`). `dr`:
    run the DR phase after the faults (True), never (False), or as the seed's plan says
    (None: a third of the seeds); `dr_variant` overrides the plan's variant. No `kinds`:
    no faults."""
    began = time.monotonic()
    directory = tempfile.mkdtemp(prefix=f"sweep3-{seed}-", dir=base_dir)
    res = RemoteResult(seed, duration, overlap=overlap, directory=directory,
                       revision=revision(), plan=dr_plan(seed, dr, dr_variant))
    net = Net(nodes=NODES, links=full_mesh(NODES))
    h: RemoteHarness | None = None
    nemesis: RemoteNemesis | None = None
    monitor: Monitor | None = None
    try:
        net.setup()
        h = RemoteHarness(directory, net, BLOCKS, HOLD_TIMEOUT)
        h.start()
        faults = schedule(seed, duration, kinds, overlap, table=KINDS) if kinds else []
        t0 = time.monotonic() + 0.5
        until = t0 + duration
        out = os.path.join(directory, "ops-agent.jsonl")
        client = h.start_client("agent", out, until, seed, 1, WRITERS, READERS, AGENT_TIMEOUT,
                                THINK, flush_every=FLUSH_EVERY)
        monitor = Monitor(h, directory)
        monitor.start()
        nemesis = RemoteNemesis(h, net, faults, t0, until - 2.0, overlap)
        nemesis.start()
        nemesis.wait_done(duration + 180)
        res.faults = nemesis.log
        if nemesis.error is not None:
            raise RuntimeError(f"nemesis: {nemesis.error!r}")
        notes = _restore(h, net)
        try:
            client.wait(max(0.0, until - time.monotonic()) + AGENT_TIMEOUT + 5)
        except Exception:
            client.terminate()
            client.wait(10)
            notes.append("the client had to be stopped")
        healed = time.monotonic()
        catch_up: float | None = None
        while time.monotonic() - healed < LAG_BOUND * 2:
            if h.dr_mirrored():
                catch_up = time.monotonic() - healed
                break
            time.sleep(0.2)
        if not h.wait_mirrored(30):
            notes.append("the active-active pair or the remote copy is not mirrored "
                         f"after healing: {h.views()} {h.dr_views()}")
        monitor.stop()
        if monitor.error is not None:
            raise RuntimeError(f"monitor: {monitor.error!r}")
        final: dict[str, Any] = {}
        for n in ("A", "B"):
            final[n], why = h.dump(n)
            if final[n] is None:
                notes.append(f"dump of {n}: {why}")
        mismatches, verify_out = h.verify()
        if mismatches is None:
            notes.append(f"pair verify: {verify_out}")
        history = load_history([out])
        pair = check(history, final, mismatches if mismatches is not None else 0)
        pair.notes = notes + [n for n in pair.notes if n not in notes]
        remote = check_remote(history, monitor.samples, monitor.polls, res.faults, STALL)
        remote.catch_up = catch_up
        disk = {n: h.read_volume(n) for n in SITES}
        for n in ("A", "B"):
            for found in check_final(disk["C"], disk[n], n, catch_up, LAG_BOUND):
                if found.kind == "diverged" or n == "A":
                    remote.add(found)
        if not remote.checked:
            remote.notes.append("no sample of C was taken while it claimed mirrored")
        res.pair, res.remote = pair, remote
        if res.plan is not None:
            if catch_up is None:
                remote.notes.append("the DR phase did not run: the far copy never caught up")
            else:
                res.dr = DrPhase(h, res.plan, seed, directory, history, LAG_BOUND).run()
        res.src_changed = revision() != res.revision
        with open(os.path.join(directory, "result.json"), "w") as f:
            json.dump({"seed": seed, "duration": duration, "overlap": overlap,
                       "revision": res.revision, "src_changed": res.src_changed,
                       "faults": res.faults, "actions": h.actions, "verify": verify_out,
                       "pair": pair.summary(), "far": remote.summary(),
                       "notes": pair.notes + remote.notes + (res.dr.notes if res.dr else []),
                       "dr": None if res.dr is None else {
                           "plan": res.dr.plan, "commands": res.dr.commands,
                           "events": res.dr.events, "clock_offset": res.dr.offset,
                           "seconds": res.dr.seconds, "summary": res.dr.summary()},
                       "findings": {f"{'dr-' if rep is res.dr else ''}{k}":
                                    [x.as_dict() for x in v]
                                    for rep in (pair, remote, res.dr) if rep is not None
                                    for k, v in rep.findings.items()}}, f, indent=1)
    except Exception as e:
        res.error = f"{type(e).__name__}: {e}"
    finally:
        if monitor is not None and monitor.thread.is_alive():
            monitor.stop()
        if h is not None:
            h.close()
        if nemesis is not None:
            nemesis.stop()
        net.close()
        res.seconds = time.monotonic() - began
        if res.verdict == "PASS" and not keep:
            shutil.rmtree(directory, ignore_errors=True)
            res.directory = ""
    return res


def _kinds(value: str) -> tuple[str, ...]:
    if value == "none":
        return ()
    kinds = tuple(k.strip() for k in value.split(",") if k.strip())
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise argparse.ArgumentTypeError(f"unknown fault kind(s) {bad}; known: "
                                         f"{', '.join(KINDS)}")
    return kinds


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    from .__main__ import cannot_run
    p = argparse.ArgumentParser(prog="sweep_remote", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=1, help="how many seeds (default 1)")
    p.add_argument("--first", type=int, default=1, help="first seed of --seeds (default 1)")
    p.add_argument("--seed", type=int, action="append",
                   help="run exactly this seed (repeatable); overrides --seeds")
    p.add_argument("--duration", type=float, default=30.0,
                   help="seconds of workload per seed (default 30)")
    p.add_argument("--faults", type=_kinds, default=DEFAULT_KINDS,
                   help=f"comma-separated fault kinds (default all: {','.join(KINDS)}; "
                        "`none`: no faults)")
    p.add_argument("--overlap", action="store_true",
                   help="let faults on different processes and links overlap in time")
    p.add_argument("--dr", action="store_true", default=None,
                   help="run the disaster-recovery phase after the faults on every seed "
                        "(default: on the third of the seeds their plan picks)")
    p.add_argument("--no-dr", dest="dr", action="store_false",
                   help="never run the disaster-recovery phase")
    p.add_argument("--dr-variant", choices=VARIANTS, default=None,
                   help="far (lose A and B, take over at C) or standby (lose A, take over "
                        "at B); default: the seed's plan")
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
            faults = schedule(seed, args.duration, args.faults, args.overlap, table=KINDS) \
                if args.faults else []
            plan = dr_plan(seed, args.dr, args.dr_variant)
            steps = [f"+{f.at:.1f}s {f.label}" for f in faults] or ["no faults"]
            print(f"seed={seed}: " + " ".join(steps)
                  + (f"; then {describe(plan)}" if plan else ""))
        return 0
    why = cannot_run()
    if why:
        print(f"sweep_remote: cannot run: {why}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    failed: list[int] = []
    try:
        for seed in seeds:
            res = run_seed(seed, args.duration, args.faults, args.dir, args.keep, args.overlap,
                           args.dr, args.dr_variant)
            print(res.line(), flush=True)
            if res.verdict != "PASS":
                failed.append(seed)
                for line in res.details(args.details):
                    print(line, flush=True)
                again = " --overlap" if args.overlap else ""
                if args.faults != DEFAULT_KINDS:
                    again += f" --faults {','.join(args.faults) or 'none'}"
                if args.dr is not None:
                    again += " --dr" if args.dr else " --no-dr"
                if args.dr_variant:
                    again += f" --dr-variant {args.dr_variant}"
                print(f"  logs: {res.directory}; rerun: --seed {seed} "
                      f"--duration {args.duration:g}{again}", flush=True)
    except KeyboardInterrupt:
        print("sweep_remote: interrupted", file=sys.stderr)
        return 130
    print(f"{len(seeds) - len(failed)}/{len(seeds)} seeds passed"
          + (f"; failed: {' '.join(map(str, failed))}" if failed else ""), flush=True)
    return 1 if failed else 0

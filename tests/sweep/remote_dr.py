"""The three-site sweep's disaster-recovery phase: after the fault phase has healed and
been checked, a disaster, `twinvol dr takeover`, hosts on the surviving copy, and
`twinvol dr failback`. `dr_checker` judges it.

Two variants (the seed's `DrPlan`):

* far: writers through the host agent, C optionally paused so it lags, the writers
  stopped, A and B killed (-9) together; `dr takeover --site C`; C is read at once
  (its file and over NBD) and must be the state after a prefix of the write order
  that keeps every write acknowledged before its reported recovery point and holds
  none sent after it; then a writer and a reader go straight to C; A and B return
  (A first and B after the failback, as the README describes, or both before it);
  `dr failback`; A, B and C must end equal, with C's writes on them.
* standby: writers through the host agent, C optionally paused, A killed while they
  keep writing (the agent moves to B); `dr takeover --site B` must feed C only what it
  lacks (never a full copy); C must catch up to B and hold every acknowledged write;
  A returns, is resynced from B, and `dr failback --site A` gives it the feed back.

Both end with a short burst of writes through the agent that must reach C, and A, B and
C compared byte for byte.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from twinvol.supervisor import twinvol_argv

from .blocks import BLOCK, decode
from .checker import Finding, Op
from .dr_checker import (
    DrReport,
    check_equal,
    check_failback_report,
    check_feed,
    check_lost_report,
    check_present,
    check_served,
    check_takeover,
    check_takeover_report,
    chunks_of,
    extent_chunks,
)
from .run import load_history

DR_SHARE = 1 / 3         # seeds that run the DR phase without --dr
VARIANTS = ("far", "standby")
DR_LAG_BOUND = 10.0      # seconds: a write flushed this long before the disaster is at C
MARGIN = 0.02            # seconds of clock conversion error allowed (plus measured drift)
AGENT_TIMEOUT = 40.0
THINK = 0.002


@dataclass(frozen=True)
class DrPlan:
    variant: str        # "far" (A and B lost, takeover at C) or "standby" (A lost, at B)
    writes: float       # seconds of writes before the disaster
    lag: float          # seconds C is paused just before the disaster (0: not paused)
    restart: str        # far: "a-first" (failback, then B returns) or "both" (before it)
    served: float       # far: seconds of writes and reads straight to C after takeover
    hosts: bool = False  # far: a writer through the agent keeps trying while A and B
                         # return and fail back (none of its acknowledged writes may be lost)


def dr_plan(seed: int, force: bool | None = None, variant: str | None = None
            ) -> DrPlan | None:
    """The seed's DR phase: run for DR_SHARE of the seeds, always with `force`, never
    with `force=False`. The plan itself depends on the seed only."""
    rng = random.Random(f"dr-{seed}")
    enabled = rng.random() < DR_SHARE
    plan = DrPlan(variant=rng.choice(("far", "far", "standby")),
                  writes=round(rng.uniform(1.0, 3.0), 3),
                  lag=round(rng.uniform(0.5, 2.5), 3) if rng.random() < 0.6 else 0.0,
                  restart=rng.choice(("a-first", "both")),
                  served=round(rng.uniform(1.0, 2.5), 3), hosts=rng.random() < 0.5)
    if force is False or not (enabled or force):
        return None
    if variant is not None:
        plan = DrPlan(variant, plan.writes, plan.lag, plan.restart, plan.served, plan.hosts)
    return plan


def describe(plan: DrPlan) -> str:
    lag = f" C paused {plan.lag:g}s," if plan.lag else ""
    if plan.variant == "far":
        return (f"dr=far: writes {plan.writes:g}s,{lag} stop writers, kill A+B, takeover "
                f"at C, {plan.served:g}s of I/O on C, restart {plan.restart}, failback"
                + (" (agent writing throughout)" if plan.hosts else ""))
    return (f"dr=standby: writes {plan.writes:g}s,{lag} kill A under load, takeover at B, "
            "restart A, failback --site A")


def clock_offset() -> float:
    """time.time() - time.monotonic(), measured tightly."""
    best = (INF_GAP, 0.0)
    for _ in range(5):
        m0 = time.monotonic()
        t = time.time()
        m1 = time.monotonic()
        best = min(best, (m1 - m0, t - (m0 + m1) / 2))
    return best[1]


INF_GAP = float("inf")


class DrPhase:
    """Runs one plan against a healed `RemoteHarness` (any: typed loosely to avoid an
    import cycle); `history` is the fault phase's ops."""

    def __init__(self, h: Any, plan: DrPlan, seed: int, directory: str,
                 history: list[Op], lag_bound: float) -> None:
        self.h = h
        self.plan = plan
        self.seed = seed
        self.dir = directory
        self.history = history
        self.lag_bound = lag_bound
        self.rep = DrReport(variant=plan.variant, plan=asdict(plan))
        self.logs: list[str] = []
        self.offset = clock_offset()
        self.rep.offset = self.offset
        self.events = self.rep.events
        self.t0 = time.monotonic()

    # ---- helpers -------------------------------------------------------------------

    def event(self, what: str, **kw: Any) -> None:
        self.events.append({"at": time.monotonic(), "what": what, **kw})

    def cli(self, *args: str, timeout: float = 120.0) -> tuple[int, Any, str]:
        p = subprocess.run([*twinvol_argv(*args, "--json", "--cluster", self.h.path)],
                           capture_output=True, text=True, timeout=timeout)
        try:
            body = json.loads(p.stdout) if p.stdout.strip() else None
        except ValueError:
            body = p.stdout
        return p.returncode, body, p.stderr.strip()

    def command(self, label: str, args: list[str], retry: Callable[[str], bool],
                within: float = 20.0, timeout: float = 120.0) -> tuple[int, Any]:
        """A DR command through the CLI, again while `retry(stderr)` (a site that has not
        noticed its peer's death yet); its report is recorded."""
        deadline = time.monotonic() + within
        attempts = 0
        while True:
            asked = time.monotonic()
            rc, body, err = self.cli(*args, timeout=timeout)
            attempts += 1
            if rc == 0 or not retry(err) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        self.rep.commands.append({"command": label, "argv": args, "rc": rc, "report": body,
                                  "stderr": err, "attempts": attempts, "asked": asked,
                                  "answered": time.monotonic()})
        self.event(label, rc=rc)
        return rc, body

    def client(self, target: str, label: str, until: float, uid_base: int, writers: int,
               readers: int, timeout: float = AGENT_TIMEOUT) -> subprocess.Popen[bytes]:
        out = os.path.join(self.dir, f"ops-{label}.jsonl")
        self.logs.append(out)
        return self.h.start_client(target, out, until, self.seed, uid_base, writers,  # type: ignore[no-any-return]
                                   readers, timeout, THINK, flush_every=8)

    def stop_client(self, p: subprocess.Popen[bytes], grace: float = 15.0) -> None:
        if p.poll() is None:
            p.terminate()
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            self.rep.notes.append("a DR client had to be killed")

    def ops(self) -> list[Op]:
        return self.history + load_history(self.logs)

    def values(self, node: str) -> tuple[bytes | None, list[int | str] | None]:
        data = self.h.read_volume(node)
        if data is None:
            return None, None
        return data, [decode(b, data[b * BLOCK:(b + 1) * BLOCK]) for b in range(self.h.blocks)]

    def wait(self, what: str, cond: Callable[[], bool], timeout: float) -> float | None:
        """Seconds until `cond`, or None (noted) when it never held."""
        began = time.monotonic()
        while time.monotonic() - began < timeout:
            if cond():
                return time.monotonic() - began
            time.sleep(0.2)
        self.rep.notes.append(f"{what} not within {timeout:g}s: aa {self.h.views()} "
                              f"dr {self.h.dr_views()}")
        return None

    def dr_view(self, node: str) -> dict[str, Any] | None:
        v: dict[str, Any] | None = self.h.dr_views().get(node)
        return v

    def margin(self) -> float:
        return MARGIN + abs(clock_offset() - self.offset)

    # ---- the phase -----------------------------------------------------------------

    def run(self) -> DrReport:
        began = time.monotonic()
        try:
            if self.plan.variant == "far":
                self.far()
            else:
                self.standby()
        finally:
            self.rep.seconds = time.monotonic() - began
        return self.rep

    def _pause_c(self) -> None:
        if self.plan.lag:
            self.h.pause("C")
            self.event("pause C")
            time.sleep(self.plan.lag)

    def far(self) -> None:
        h, p, rep = self.h, self.plan, self.rep
        writers = self.client("agent", "dr-agent", time.monotonic() + 120, 11, 2, 0)
        time.sleep(p.writes)
        self._pause_c()
        self.stop_client(writers)       # writers stopped first: nothing is held
        time.sleep(0.3)
        disaster = time.monotonic()
        h.kill9("A")
        h.kill9("B")
        self.event("kill A+B")
        h.resume("C")
        rc, body = self.command("takeover C", ["dr", "takeover", "--site", "C"],
                                lambda err: "still feeds" in err or "not connected" in err)
        if rc != 0 or not isinstance(body, dict) or not body.get("groups"):
            rep.notes.append(f"dr takeover --site C failed: {rep.commands[-1]['stderr']}")
            return
        asked = rep.commands[-1]["asked"]
        report = body["groups"][0]
        view = self.dr_view("C")
        at = time.monotonic()
        disk_c, values = self.values("C")
        if disk_c is not None:  # evidence, kept with the run's directory
            with open(os.path.join(self.dir, "C-at-takeover.img"), "wb") as f:
                f.write(disk_c)
        rep.add(check_takeover_report(report, view, asked, self.margin(), self.offset))
        dumped, why = h.dump("C", timeout=15)
        if values is None:
            rep.notes.append("C's volume file could not be read after the takeover")
            return
        if dumped != values:
            rep.add([_finding("served", f"C over NBD differs from its file after the "
                                        f"takeover ({why or 'different values'})")])
        rp = report.get("recovery_point") or {}
        rp_seq, rp_time = int(rp.get("sequence", 0)), float(rp.get("time", 0.0)) - self.offset
        pre = self.ops()
        rep.add(check_takeover(pre, values, rp_seq, rp_time, disaster, DR_LAG_BOUND,
                               self.margin(), at))
        rep.add(check_lost_report(pre, report, rp_time, self.margin(), self.offset))
        self.event("checked takeover", rp_sequence=rp_seq, rp_time=rp_time)

        # C serves hosts: a writer and a reader straight to C.
        took = time.monotonic()
        c = self.client("C", "dr-C", took + p.served, 21, 1, 1, timeout=10.0)
        try:
            c.wait(p.served + 30)
        except subprocess.TimeoutExpired:
            self.stop_client(c)
            rep.notes.append("the client of C had to be stopped")
        c_ops = [o for o in load_history(self.logs[-1:]) if o.client == "C"]
        rep.add(check_served(c_ops, values))

        # Failback: the original primary returns, C's changes go back to it (hosts may
        # keep trying through the agent: whatever it acknowledges must survive).
        during = self.client("agent", "fb-during", time.monotonic() + 300, 41, 1, 0) \
            if p.hosts else None
        h.start_one("A")
        if p.restart == "both":
            h.start_one("B")
        self.wait("A sees the takeover at C",
                  lambda: (self.dr_view("A") or {}).get("state") == "suspended", 30)
        rc, body = self.command("failback", ["dr", "failback"],
                                lambda err: "not connected" in err, timeout=180)
        if p.restart == "both" and rc != 0 and "is up" in rep.commands[-1]["stderr"]:
            # Refused as the README says while B (older than C) is up: stop it, fail
            # back, start it again (it resyncs from A).
            h.kill9("B")
            self.event("stop B for the failback")
            time.sleep(1.0)
            rc, body = self.command("failback (B stopped)", ["dr", "failback"],
                                    lambda err: "not connected" in err or "is up" in err,
                                    timeout=180)
            h.start_one("B")
        elif p.restart != "both":
            h.start_one("B")
        if during is not None:
            time.sleep(1.0)
            self.stop_client(during)
        if rc != 0 or not isinstance(body, dict) or not body.get("groups"):
            # Noted (the seed fails), and the rest still checked: a failback that goes on
            # after its command gave up must still leave every site equal.
            rep.notes.append(f"dr failback failed: {rep.commands[-1]['stderr']}")
        else:
            c_writes = [o for o in c_ops if o.op == "w"]
            # every write so far (the agent's, while A and B returned, too) that may be
            # after the recovery point
            after_rp = [o for o in self.ops() if o.op == "w" and o.client != "C" and not (
                o.acked and o.done_at < rp_time - self.margin())]
            # A and B both crashed: their resync when they returned covers whole
            # activity-log extents of the writes in flight, and A sends C every chunk it
            # got that way (it cannot know which C already has).
            rep.add(check_failback_report(
                body["groups"][0], rp_seq, (len(chunks_of(o for o in c_writes if o.acked)),
                                            len(chunks_of(c_writes))),
                len(chunks_of(c_writes) | extent_chunks(after_rp, self.h.blocks))))
        self._settle_and_compare(since=took, what=" (acknowledged after the takeover at C)")

    def standby(self) -> None:
        h, p, rep = self.h, self.plan, self.rep
        began = time.monotonic()
        writers = self.client("agent", "dr-agent", time.monotonic() + 120, 11, 2, 0)
        time.sleep(p.writes)
        self._pause_c()
        h.kill9("A")                  # the writers go on through B
        self.event("kill A")
        h.resume("C")
        self.wait("B writes alone", lambda: (h.views().get("B") or {}).get("io_mode")
                  == "local", 30)
        time.sleep(1.0)
        rc, body = self.command("takeover B", ["dr", "takeover", "--site", "B"],
                                lambda err: "still feeds" in err or "not connected" in err)
        time.sleep(1.0)
        self.stop_client(writers)
        time.sleep(0.5)
        if rc != 0 or not isinstance(body, dict) or not body.get("groups"):
            rep.notes.append(f"dr takeover --site B failed: {rep.commands[-1]['stderr']}")
            return
        ops = self.ops()
        dr_writes = [o for o in ops if o.op == "w" and o.send >= began]
        rep.add(check_feed(body["groups"][0], "feed", len(dr_writes),
                           len(chunks_of(dr_writes))))
        caught = self.wait("C caught up with B", lambda: h.dr_mirrored(), self.lag_bound)
        self.event("caught up", seconds=caught)
        disk_b, _ = self.values("B")
        disk_c, values_c = self.values("C")
        rep.add(check_equal({"B": disk_b, "C": disk_c}, "after the takeover at B"))
        rep.add(check_present(ops, values_c, "C", what=" (any acknowledged write)"))

        h.start_one("A")
        self.wait("A resynced from B", lambda: h.mirrored(), 60)
        self.wait("A is the standby", lambda: (self.dr_view("A") or {}).get("group_role")
                  == "standby", 30)
        rc, body = self.command("failback A", ["dr", "failback", "--site", "A"],
                                lambda err: "not mirrored" in err or "not connected" in err,
                                within=30, timeout=180)
        if rc != 0 or not isinstance(body, dict) or not body.get("groups"):
            rep.notes.append(f"dr failback --site A failed: {rep.commands[-1]['stderr']}")
        else:
            rep.add(check_feed(body["groups"][0], "return", 0, 0))
        self._settle_and_compare(since=INF_GAP, what="")

    def _settle_and_compare(self, since: float, what: str) -> None:
        """Both pairs mirrored again, a burst of writes through the agent that must
        reach C, then A, B and C equal; writes sent after `since` on all of them."""
        h, rep = self.h, self.rep
        self.wait("the active-active pair mirrored after the failback", h.mirrored, 60)
        self.wait("the far copy caught up after the failback", h.dr_mirrored, self.lag_bound)
        burst = self.client("agent", "fb-agent", time.monotonic() + 1.5, 31, 1, 0)
        try:
            burst.wait(AGENT_TIMEOUT + 10)
        except subprocess.TimeoutExpired:
            self.stop_client(burst)
        tail = load_history(self.logs[-1:])
        if not any(o.op == "w" and o.acked for o in tail):
            rep.add([_finding("served", "no write through the agent was acknowledged after "
                                        "the failback")])
        self.wait("the far copy caught up after the last writes", h.dr_mirrored,
                  self.lag_bound)
        view = self.dr_view("C") or {}
        if view.get("feeder") != "A":
            rep.add([_finding("report", f"C is fed by {view.get('feeder')!r} after the "
                                        "failback, not A")])
        disks = {n: self.values(n) for n in ("A", "B", "C")}
        rep.add(check_equal({n: d[0] for n, d in disks.items()}, "after the failback"))
        ops = self.ops()
        if since < INF_GAP:
            rep.add(check_present(ops, disks["A"][1], "A", sent_after=since, what=what))
        first = min((o.send for o in tail), default=INF_GAP)
        rep.add(check_present(ops, disks["C"][1], "C", sent_after=first - 1e-6,
                              what=" (through the agent after the failback)"))


def _finding(kind: str, message: str) -> Finding:
    return Finding(kind, -1, message)

"""One seed of the sweep: build the namespaces and the cluster, run clients and nemesis
for `duration` seconds, heal, read both copies, verify, check, clean up."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from .checker import Finding, Op, Report, check
from .harness import Harness
from .nemesis import DEFAULT_KINDS, Nemesis, schedule
from .netns import Net

BLOCKS = 4096            # a 16 MiB volume: 256 chunks of 64 KiB, 4 activity-log extents
HOLD_TIMEOUT = 30.0      # the agent holds requests this long while no path serves
DIRECT_TIMEOUT = 10.0    # a direct request unanswered this long is abandoned (> pauses)
AGENT_TIMEOUT = HOLD_TIMEOUT + 10.0
# target -> (writers, readers); each thread has one request in flight at a time
CLIENTS = {"agent": (2, 2), "A": (1, 1), "B": (1, 1)}
THINK = 0.002            # up to this many seconds between a thread's requests


@dataclass
class SeedResult:
    seed: int
    duration: float
    overlap: bool = False
    faults: list[dict[str, Any]] = field(default_factory=list)
    report: Report | None = None
    error: str = ""           # the run itself broke (setup, harness), not a finding
    revision: str = ""        # see revision()
    src_changed: bool = False  # twinvol's sources changed while it ran
    seconds: float = 0.0
    directory: str = ""

    @property
    def verdict(self) -> str:
        if self.error:
            return "ERROR"
        return "PASS" if self.report is not None and self.report.ok else "FAIL"

    def line(self) -> str:
        done = [f for f in self.faults if "start" in f]
        kinds = ",".join(f"{f['kind']}:{f['target']}" for f in done) or "-"
        head = (f"seed={self.seed} duration={self.duration:g}s"
                f"{' overlap' if self.overlap else ''} faults={len(done)} [{kinds}]")
        rep = self.report.summary() if self.report else "ops=0"
        if self.report is not None and self.report.agent_write_gap > 1.0:
            x = self._fault_at(self.report.agent_gap_at)
            rep += f" (gap after {x['kind']}:{x['target']} began)" if x else ""
        tail = f"{self.verdict} {self.seconds:.0f}s"
        if self.src_changed:
            tail += " (WARNING: src/twinvol changed during the run: rerun it)"
        if self.error:
            tail += f" ({self.error})"
        elif self.report is not None and self.report.notes:
            tail += f" ({'; '.join(self.report.notes)})"
        return f"{head} {rep} {tail} rev={self.revision}"

    def details(self, limit: int = 5) -> list[str]:
        """The first findings of each kind, with the fault active when they were seen."""
        out: list[str] = []
        if self.report is None:
            return out
        for kind, items in self.report.findings.items():
            for f in items[:limit]:
                out.append(f"  {kind}: block {f.block}: {f.message}{self._during(f)}")
            if len(items) > limit:
                out.append(f"  {kind}: ... {len(items) - limit} more")
        return out

    def _fault_at(self, at: float) -> dict[str, Any] | None:
        """The last fault that began before `at`, if it was healed at most 5 s before."""
        began = [x for x in self.faults if "start" in x and x["start"] - 0.5 <= at]
        if not began or at > began[-1].get("end", at) + 5.0:
            return None
        return began[-1]

    def _during(self, f: Finding) -> str:
        if not f.at:
            return ""
        x = self._fault_at(f.at)
        if x is None:
            return " [no fault in the 5 s before]"
        return (f" [{x['kind']}:{x['target']} began {f.at - x['start']:.2f}s before, "
                f"healed after {x.get('end', f.at) - x['start']:.2f}s]")


def load_history(paths: list[str]) -> list[Op]:
    ops: list[Op] = []
    for path in paths:
        with open(path) as f:
            for line in f:
                if line.endswith("\n"):  # a last line cut short by a kill is dropped
                    ops.append(Op.from_line(json.loads(line)))
    return ops


def run_seed(seed: int, duration: float, kinds: tuple[str, ...] = DEFAULT_KINDS,
             base_dir: str | None = None, keep: bool = False, overlap: bool = False,
             witness: str = "builtin") -> SeedResult:
    """Run one seed; the run directory is kept when it fails (or with `keep`)."""
    began = time.monotonic()
    directory = tempfile.mkdtemp(prefix=f"sweep-{seed}-", dir=base_dir)
    res = SeedResult(seed, duration, overlap=overlap, directory=directory,
                     revision=revision())
    net = Net()
    harness: Harness | None = None
    nemesis: Nemesis | None = None
    try:
        net.setup()
        harness = Harness(directory, net, BLOCKS, hold_timeout=HOLD_TIMEOUT, witness=witness)
        harness.start()
        faults = schedule(seed, duration, kinds, overlap)
        t0 = time.monotonic() + 0.5
        until = t0 + duration
        outs = []
        for i, (target, (writers, readers)) in enumerate(CLIENTS.items()):
            out = os.path.join(directory, f"ops-{target}.jsonl")
            harness.start_client(target, out, until, seed, 64 * i + 1, writers, readers,
                                 AGENT_TIMEOUT if target == "agent" else DIRECT_TIMEOUT,
                                 THINK)
            outs.append(out)
        nemesis = Nemesis(harness, net, faults, t0, until - 2.0, overlap)
        nemesis.start()
        nemesis.wait_done(duration + 120)
        res.faults = nemesis.log
        if nemesis.error is not None:
            raise RuntimeError(f"nemesis: {nemesis.error!r}")
        notes = _restore(harness, net)
        for p in harness.clients:
            try:
                p.wait(max(0.0, until - time.monotonic()) + AGENT_TIMEOUT + 5)
            except Exception:
                p.terminate()
                p.wait(10)
                notes.append(f"a client had to be stopped: {p.args!r}")
        if not harness.wait_mirrored(60):
            notes.append(f"pair not mirrored 60 s after healing: {_states(harness)}")
        final: dict[str, Any] = {}
        for n in ("A", "B"):
            final[n], why = harness.dump(n)
            if final[n] is None:
                notes.append(f"dump of {n}: {why}")
        mismatches, verify_out = harness.verify()
        if mismatches is None:
            notes.append(f"pair verify: {verify_out}")
        res.src_changed = revision() != res.revision
        report = check(load_history(outs), final, mismatches if mismatches is not None else 0)
        report.notes = notes + [n for n in report.notes if n not in notes]
        res.report = report
        with open(os.path.join(directory, "result.json"), "w") as f:
            json.dump({"seed": seed, "duration": duration, "overlap": overlap,
                       "revision": res.revision, "src_changed": res.src_changed,
                       "faults": res.faults,
                       "verify": verify_out, "summary": report.summary(),
                       "notes": report.notes,
                       "findings": {k: [x.as_dict() for x in v]
                                    for k, v in report.findings.items()}}, f, indent=1)
    except Exception as e:
        res.error = f"{type(e).__name__}: {e}"
    finally:
        if harness is not None:
            harness.close()
        if nemesis is not None:
            nemesis.stop()
        net.close()
        res.seconds = time.monotonic() - began
        if res.verdict == "PASS" and not keep:
            shutil.rmtree(directory, ignore_errors=True)
            res.directory = ""
    return res


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def revision() -> str:
    """The commit the nodes run, plus a digest of twinvol's sources when they differ
    from it: a working tree edited during a run makes its result meaningless."""
    try:
        head = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "src"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        head, dirty = "?", "?"
    digest = hashlib.sha1()
    for path in sorted(glob.glob(os.path.join(ROOT, "src", "twinvol", "**", "*.[pc]*"),
                                 recursive=True)):
        with contextlib.suppress(OSError), open(path, "rb") as f:
            digest.update(path.encode() + b"\0" + f.read())
    return f"{head}+src:{digest.hexdigest()[:10]}" if dirty else head


def _states(harness: Harness) -> str:
    views = harness.views()
    return ", ".join(f"{n}: {v['state']}/{v['io_mode']} ({v.get('reason') or '-'})"
                     if v else f"{n}: unreachable" for n, v in views.items())


def _restore(harness: Harness, net: Net) -> list[str]:
    """Undo anything still broken; a process that died without the nemesis is a note."""
    notes: list[str] = []
    net.heal_all()
    for name in ("W", "A", "B", "host"):
        harness.resume(name)
        if not harness.alive(name):
            notes.append(f"{name} exited by itself: {harness.tail(name)!r}")
            harness.start_one(name, wait=False)
    return notes

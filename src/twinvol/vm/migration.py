"""Live migration of a VM to another host, driven from the origin.

The steps (the destination's side is the manager's `prepare_incoming`, `take_held`
and `resume_incoming`):

1. the destination gets the VM's definition in logical names (and the virtual identity
   each volume has here), resolves every name to its own resources, checks them and
   its limits, and starts QEMU paused, waiting for the incoming state (`-S -incoming`);
   its gates wait: nothing reaches its storage yet. A refusal leaves the VM untouched.
2. QEMU live migration runs (RAM in passes, converging under the downtime limit). Shortly
   before QEMU is expected to switch over, the origin's gates start holding: new writes
   are kept in order and acknowledged, so when QEMU stops the VM its drain does not wait
   for storage. If the switchover does not come, the gates release and re-arm later.
3. When QEMU reports the state sent, the held requests go to the destination, whose
   gates apply them (in order, once, flushed) before any of its own requests; only then
   is the destination VM resumed, and the origin's QEMU is quit.
4. Any failure before the resume (destination refuses, dies, QEMU fails, no convergence
   within the timeout) cancels the migration: the origin applies what it holds and its
   VM runs on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from qemu.qmp import EventListener

from twinvol.vm.calls import HostCallError, HostCalls
from twinvol.vm.gate import encode_held
from twinvol.vm.gateio import GateError
from twinvol.vm.qemu import Qemu, QemuError
from twinvol.vm.state import Vm, VmError

log = logging.getLogger("twinvol.vm")

POLL = 0.02
HOLD_LEAD_MS = 500.0   # start holding when QEMU should switch over within about this long
HOLD_MAX = 1.0         # release and re-arm when the switchover has not come by then
SWITCHOVER_TIMEOUT = 30.0  # VM stopped, state not sent by then: give up, run on at origin


class MigrateOptions(msgspec.Struct, forbid_unknown_fields=True):
    to: str
    downtime_limit_ms: int = 300
    timeout: float = 60.0
    max_bandwidth: int | str | None = None  # bytes/s ("64M"); None: unlimited
    hold_lead_ms: float = HOLD_LEAD_MS


@dataclass
class Migration:
    """Progress and, at the end, the report of one migration."""

    vm: str
    origin: str
    to: str
    status: str = "preparing"  # preparing, migrating, holding, handover, completed, failed
    started: float = field(default_factory=time.time)
    transferred: int = 0
    remaining: int = 0
    total: int = 0
    passes: int = 0
    mbps: float = 0.0
    held: int = 0
    replayed: int = 0
    holds: int = 0  # times the gates started holding
    total_s: float | None = None
    handover_ms: float | None = None  # held requests to the destination, applied there
    resume_ms: float | None = None    # destination loaded the state and resumed
    downtime_ms: float | None = None
    qemu_downtime_ms: float | None = None
    error: str | None = None

    def view(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class Outgoing:
    """One migration of `vm` from this host (`here`) to `opts.to`, reported in `job`."""

    def __init__(self, vm: Vm, job: Migration, opts: MigrateOptions, *, here: str,
                 accel: str, calls: HostCalls, forget: Callable[[str], None]) -> None:
        self.vm = vm
        self.job = job
        self.opts = opts
        self.here = here
        self.accel = accel
        self.calls = calls
        self.forget = forget  # the VM runs elsewhere now: drop its definition here

    async def run(self) -> None:
        """Migrate; on any failure before the destination resumed, the VM runs on here."""
        vm, job, opts = self.vm, self.job, self.opts
        t0 = time.monotonic()
        name = vm.spec.name
        q = vm.qemu
        assert q is not None
        log.info("migration starts", extra={"vm": name, "to": opts.to})
        prepared = False
        try:
            try:
                resp = await self.calls.call_host(opts.to, "POST", "/api/v1/incoming", {
                    "spec": msgspec.to_builtins(vm.spec), "origin": self.here,
                    "identities": vm.identities, "accel": self.accel}, timeout=30)
            except HostCallError as e:
                raise VmError(f"host {opts.to} refused VM {name}: {e}") from None
            prepared = True
            t_stop = await self._precopy(vm, q, job, opts, resp["uri"], t0)
            # The state is at the destination: hand over what the gates held, once no
            # flush the guest issued before it stopped is still being made durable here.
            job.status = "handover"
            for g in vm.gates:
                g.gate.stopped = True
            for g in vm.gates:
                await g.settle()
            held = {f"disk{i}": g.gate.take_snapshot() for i, g in enumerate(vm.gates)}
            job.held = sum(len(v) for v in held.values())
            t_hand = time.monotonic()
            try:
                res = await self.calls.call_host(opts.to, "POST", f"/api/v1/incoming/{name}/held",
                                                 raw=encode_held(held), timeout=30)
            except HostCallError as e:
                raise VmError(f"handing the held requests to host {opts.to} failed: "
                              f"{e}") from None
            for g, ops in zip(vm.gates, held.values(), strict=True):
                if ops:
                    g.gate.discard_through(ops[-1].seq)
            job.replayed = int(res["applied"])
            t_res = time.monotonic()
            job.handover_ms = round((t_res - t_hand) * 1000, 1)
            try:
                await self.calls.call_host(opts.to, "POST", f"/api/v1/incoming/{name}/resume",
                                           timeout=30)
            except HostCallError as e:
                if not e.unreachable and not await self._dropped(opts.to, name):
                    # It may be running there: running it here too would split it in two.
                    job.error = (f"resuming VM {name} at host {opts.to} failed ({e}) and "
                                 f"host {opts.to} cannot confirm it stopped it: the VM stays "
                                 f"paused at host {self.here}; check host {opts.to}")
                    job.status = "failed"
                    vm.state = "paused"
                    vm.error = job.error
                    log.error("migration in doubt", extra={"vm": name, "error": job.error})
                    return
                raise VmError(f"resuming VM {name} at host {opts.to} failed: {e}") from None
            t_run = time.monotonic()
            job.resume_ms = round((t_run - t_res) * 1000, 1)
        except (VmError, QemuError, GateError) as e:
            job.error = str(e)
            job.status = "failed"
            job.total_s = round(time.monotonic() - t0, 3)
            log.warning("migration failed: the VM runs on at the origin",
                        extra={"vm": name, "to": opts.to, "error": str(e)})
            if prepared:
                with contextlib.suppress(HostCallError):
                    await self.calls.call_host(opts.to, "DELETE", f"/api/v1/incoming/{name}",
                                               timeout=10)
            await self._run_on(vm, q)
            return
        # Committed: the VM runs at the destination.
        job.downtime_ms = round((t_run - t_stop) * 1000, 1)
        job.total_s = round(t_run - t0, 3)
        job.status = "completed"
        vm.state = "stopped"
        await q.quit(timeout=5)
        gates, vm.gates = vm.gates, []
        for g in gates:
            await g.close()
        vm.qemu = None
        self.forget(name)
        log.info("migration completed", extra={"vm": name, "to": opts.to,
                                               "total_s": job.total_s,
                                               "downtime_ms": job.downtime_ms,
                                               "held": job.held})

    async def _precopy(self, vm: Vm, q: Qemu, job: Migration, opts: MigrateOptions,
                       uri: str, t0: float) -> float:
        """Run QEMU's migration to `uri` until the state is sent; hold the gates around
        the switchover. Returns when the VM stopped (monotonic)."""
        gates = vm.gates
        t_stop: float | None = None
        done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        listener = EventListener(("STOP", "MIGRATION"))

        async def events() -> None:
            nonlocal t_stop
            async for ev in listener:
                if ev["event"] == "STOP" and t_stop is None:
                    t_stop = time.monotonic()
                    for g in gates:  # from now on flushes are QEMU's, not the guest's
                        g.gate.stopped = True
                elif ev["event"] == "MIGRATION":
                    data: Any = ev["data"]
                    st = data["status"]
                    if st in ("completed", "failed", "cancelled") and not done.done():
                        done.set_result(st)

        with q.qmp.listen(listener):
            watcher = asyncio.ensure_future(events())
            try:
                await q.execute("migrate-set-capabilities", {"capabilities": [
                    {"capability": "events", "state": True}]})
                params: dict[str, Any] = {"downtime-limit": opts.downtime_limit_ms}
                params["max-bandwidth"] = int(opts.max_bandwidth or 10 << 30)
                await q.execute("migrate-set-parameters", params)
                await q.execute("migrate", {"uri": uri})
                job.status = "migrating"
                held_since: float | None = None
                last: tuple[float, int] | None = None
                while not done.done():
                    info = await q.execute("query-migrate")
                    self._progress(job, info)
                    now = time.monotonic()
                    eta = self._eta(last, now, job)
                    last = (now, job.remaining)
                    if info.get("status") in ("completed", "failed", "cancelled"):
                        if not done.done():
                            done.set_result(str(info["status"]))
                        break
                    if t_stop is None and now - t0 > opts.timeout:
                        await q.execute("migrate_cancel")
                        raise VmError(f"migration did not converge within {opts.timeout:g}s "
                                      f"({job.remaining >> 20} MiB still dirty); cancelled")
                    if t_stop is not None and now - t_stop > SWITCHOVER_TIMEOUT:
                        await q.execute("migrate_cancel")
                        raise VmError("the switchover did not finish within "
                                      f"{SWITCHOVER_TIMEOUT:g}s; cancelled")
                    if held_since is None and job.total and eta is not None and (
                            eta * 1000 <= opts.downtime_limit_ms + opts.hold_lead_ms):
                        for g in gates:
                            g.gate.hold()
                        held_since = now
                        job.holds += 1
                        job.status = "holding"
                    elif (held_since is not None and t_stop is None
                          and now - held_since > HOLD_MAX):
                        for g in gates:  # no switchover yet: do not hold for long
                            await g.release()
                        held_since = None
                        job.status = "migrating"
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(done), POLL)
                status = done.result()
                info = await q.execute("query-migrate")
                self._progress(job, info)
                if status != "completed":
                    raise VmError(f"QEMU migration {status}: "
                                  f"{info.get('error-desc', 'no reason given')}")
                job.qemu_downtime_ms = info.get("downtime")
            finally:
                watcher.cancel()
                with contextlib.suppress(BaseException):
                    await watcher
        return t_stop if t_stop is not None else time.monotonic()

    async def _dropped(self, host: str, name: str) -> bool:
        """Whether `host` confirms it dropped (killed) the incoming VM."""
        try:
            await self.calls.call_host(host, "DELETE", f"/api/v1/incoming/{name}", timeout=10)
            return True
        except HostCallError as e:
            return e.unreachable

    @staticmethod
    def _eta(last: tuple[float, int] | None, now: float, job: Migration) -> float | None:
        """Seconds until QEMU runs out of dirty RAM at the pace `remaining` fell since the
        last sample (None while it is not falling). QEMU switches over about then: the
        gates start holding when that is within the downtime limit plus a lead, so the
        hold covers the switchover while QEMU still picks its moment."""
        if last is None:
            return None
        dt, dropped = now - last[0], last[1] - job.remaining
        if job.remaining == 0:
            return 0.0
        if dt <= 0 or dropped <= 0:
            return None
        return job.remaining / (dropped / dt)

    @staticmethod
    def _progress(job: Migration, info: dict[str, Any]) -> None:
        ram = info.get("ram") or {}
        job.transferred = int(ram.get("transferred", job.transferred))
        job.remaining = int(ram.get("remaining", job.remaining))
        job.total = int(ram.get("total", job.total))
        job.passes = int(ram.get("dirty-sync-count", job.passes))
        job.mbps = float(ram.get("mbps", job.mbps))

    async def _run_on(self, vm: Vm, q: Qemu) -> None:
        """After a failed migration: apply what the gates hold, then let the VM run."""
        for g in vm.gates:
            try:
                await g.release()
            except GateError as e:
                log.error("held requests could not be applied at the origin",
                          extra={"vm": vm.spec.name, "error": str(e)})
                vm.error = f"held requests could not be applied: {e}"
                vm.state = "paused"
                return
        try:
            if await q.status() != "running":
                await q.execute("cont")
            vm.state = "running"
        except QemuError as e:
            vm.error = str(e)
            vm.state = "paused" if q.alive else "stopped"

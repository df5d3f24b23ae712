"""The hypervisor host manager: VMs defined here, their QEMU processes and I/O gates,
the logical-name registry of this host, and live migration to another host.

Migration, seen from the origin (the destination's side is `prepare_incoming`,
`take_held` and `resume_incoming`):

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
import json
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgspec
from aiohttp import web
from qemu.qmp import EventListener

from twinvol import __version__
from twinvol.cluster import ClusterConfig, VmHostConfig, split_hostport
from twinvol.httpapi import bearer_auth, error_response
from twinvol.nbd.aio_client import ConnectionLost, NegotiationError
from twinvol.sizes import parse_size
from twinvol.vm import qemu as qemu_mod
from twinvol.vm.gate import GateMode, HeldOp, decode_held, encode_held
from twinvol.vm.gateio import GateError, GateServer
from twinvol.vm.qemu import DiskPath, Qemu, QemuError
from twinvol.vm.spec import SpecError, VmSpec, from_dict, logical

log = logging.getLogger("twinvol.vm")

POLL = 0.02
HOLD_LEAD_MS = 500.0   # start holding when QEMU should switch over within about this long
HOLD_MAX = 1.0         # release and re-arm when the switchover has not come by then
SWITCHOVER_TIMEOUT = 30.0  # VM stopped, state not sent by then: give up, run on at origin


class VmError(Exception):
    """A refused operation: `code` maps to an HTTP status like the node API's."""

    def __init__(self, message: str, code: str = "conflict") -> None:
        super().__init__(message)
        self.code = code


_STATUS = {"invalid": 400, "not_found": 404, "conflict": 409, "unavailable": 503, "io": 500}


class MigrateOptions(msgspec.Struct, forbid_unknown_fields=True):
    to: str
    downtime_limit_ms: int = 300
    timeout: float = 60.0
    max_bandwidth: int | str | None = None  # bytes/s ("64M"); None: unlimited
    hold_lead_ms: float = HOLD_LEAD_MS


class Incoming(msgspec.Struct, forbid_unknown_fields=True):
    spec: dict[str, Any]
    origin: str
    identities: list[dict[str, Any]]
    accel: str


@dataclass
class Resolved:
    host: str
    port: int
    export: str
    identity: dict[str, Any]


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


@dataclass
class Vm:
    spec: VmSpec
    state: str = "stopped"  # stopped, running, paused, migrating, incoming
    qemu: Qemu | None = None
    gates: list[GateServer] = field(default_factory=list)
    identities: list[dict[str, Any]] = field(default_factory=list)
    resources: dict[str, str] = field(default_factory=dict)
    started: float | None = None
    origin: str | None = None  # incoming: where it comes from
    error: str | None = None


class HostCallError(Exception):
    def __init__(self, message: str, unreachable: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable


class Manager:
    def __init__(self, cfg: ClusterConfig, name: str) -> None:
        self.cfg = cfg
        self.name = name
        self.host: VmHostConfig = cfg.vmhost(name)
        d = self.host.data_dir
        self.data_dir = d if os.path.isabs(d) else os.path.join(os.path.dirname(cfg.path), d)
        self.defs_dir = os.path.join(self.data_dir, "vms")
        self.run_dir = os.path.join(self.data_dir, "run")
        self.accel = qemu_mod.choose_accel(self.host.accel)
        self.memory_limit = parse_size(self.host.memory)
        self.vms: dict[str, Vm] = {}
        self.incoming: dict[str, Vm] = {}
        self.migrations: dict[str, Migration] = {}
        self.session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.started = time.time()

    # ---- definitions ---------------------------------------------------------

    def load_definitions(self) -> None:
        os.makedirs(self.defs_dir, exist_ok=True)
        os.makedirs(self.run_dir, exist_ok=True)
        for fn in sorted(os.listdir(self.defs_dir)):
            if not fn.endswith(".json"):
                continue
            try:
                with open(os.path.join(self.defs_dir, fn), "rb") as f:
                    spec = from_dict(json.loads(f.read()))
            except (OSError, ValueError, SpecError) as e:
                log.error("unreadable VM definition skipped", extra={"file": fn,
                                                                     "error": str(e)})
                continue
            self.vms[spec.name] = Vm(spec)

    def _save(self, spec: VmSpec) -> None:
        path = os.path.join(self.defs_dir, f"{spec.name}.json")
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(msgspec.json.encode(spec))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def _unsave(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.defs_dir, f"{name}.json"))

    async def define(self, spec: VmSpec) -> Vm:
        where = await self._find_elsewhere(spec.name)
        if spec.name in self.vms or spec.name in self.incoming:
            raise VmError(f"VM {spec.name} is already defined on host {self.name}")
        if where:
            raise VmError(f"VM {spec.name} is already defined on host {where}")
        self._save(spec)
        vm = self.vms[spec.name] = Vm(spec)
        log.info("VM defined", extra={"vm": spec.name})
        return vm

    async def _find_elsewhere(self, name: str) -> str | None:
        for other in self.cfg.vmhosts:
            if other == self.name:
                continue
            with contextlib.suppress(HostCallError):
                vms = await self.call_host(other, "GET", "/api/v1/vms", timeout=3)
                if any(v["name"] == name for v in vms["vms"]):
                    return other
        return None

    def undefine(self, name: str) -> None:
        vm = self.get(name)
        if vm.state != "stopped":
            raise VmError(f"VM {name} is {vm.state}: stop it first")
        self._unsave(name)
        del self.vms[name]

    def get(self, name: str) -> Vm:
        try:
            return self.vms[name]
        except KeyError:
            raise VmError(f"VM {name} is not defined on host {self.name}", "not_found") from None

    # ---- logical names --------------------------------------------------------

    async def resolve_volume(self, name: str) -> Resolved:
        """`volume:NAME` here: the export NAME through this host's storage path."""
        storage = self.host.storage
        who = f"host {self.name} cannot resolve volume:{name}"
        if storage == "host":
            assert self.cfg.host is not None
            h, p = split_hostport(str(self.cfg.host["nbd"]))
            nodes = list(self.cfg.host.get("nodes") or self.cfg.nodes)
        else:
            h, p = self.cfg.node(storage).nbd_hostport
            nodes = [storage]
        errors = []
        for node in nodes:
            try:
                ex = await self._node_get(node, f"/api/v1/exports/{name}")
            except HostCallError as e:
                errors.append(str(e))
                continue
            if ex is None:
                errors.append(f"node {node} has no volume exported as {name}")
                continue
            if ex.get("io_mode") == "block" and storage != "host":
                raise VmError(f"{who}: node {node}'s copy is blocked (stale); resync the "
                              "pair first")
            return Resolved(h, p, name, ex["virtual_identity"])
        raise VmError(f"{who}: {'; '.join(errors)}")

    def resolve_network(self, name: str) -> str:
        backend = self.host.networks.get(name)
        if backend is None:
            have = ", ".join(f"network:{n}" for n in sorted(self.host.networks)) or "none"
            raise VmError(f"host {self.name} cannot resolve network:{name} (it has: {have})")
        if backend not in ("user", "isolated"):
            raise VmError(f"host {self.name}: network:{name} has unknown backend {backend!r} "
                          "(use \"user\" or \"isolated\")")
        return backend

    def _check_limits(self, spec: VmSpec) -> None:
        active = [v for v in (*self.vms.values(), *self.incoming.values())
                  if v.qemu is not None and v.spec.name != spec.name]
        cpus = sum(v.spec.cpus for v in active) + spec.cpus
        mem = sum(v.spec.memory_bytes for v in active) + spec.memory_bytes
        if cpus > self.host.cpus:
            raise VmError(f"host {self.name} has {self.host.cpus - cpus + spec.cpus} of "
                          f"{self.host.cpus} vCPUs free; VM {spec.name} needs {spec.cpus}")
        if mem > self.memory_limit:
            free = (self.memory_limit - mem + spec.memory_bytes) >> 20
            raise VmError(f"host {self.name} has {free} MiB of {self.memory_limit >> 20} MiB "
                          f"memory free; VM {spec.name} needs {spec.memory_bytes >> 20} MiB")

    # ---- running QEMU -----------------------------------------------------------

    async def _launch(self, vm: Vm, *, incoming: bool,
                      identities: list[dict[str, Any]] | None = None) -> None:
        """Resolve the definition here, open the gates, start QEMU."""
        spec = vm.spec
        for path in (spec.kernel, spec.initrd):
            if path is not None and not os.path.isfile(path):
                raise VmError(f"host {self.name}: boot file {path} does not exist")
        self._check_limits(spec)
        resolved = [await self.resolve_volume(logical(d, "volume")) for d in spec.disks]
        nets = [self.resolve_network(logical(n, "network")) for n in spec.nics]
        if identities is not None:
            for d, r, theirs in zip(spec.disks, resolved, identities, strict=True):
                if r.identity != theirs:
                    raise VmError(f"configuration mismatch: {d} at host {self.name} is "
                                  f"{_ident(r.identity)}, at the origin {_ident(theirs)}")
        gates: list[GateServer] = []
        try:
            for i, r in enumerate(resolved):
                g = GateServer(f"{spec.name}/disk{i}", r.host, r.port, r.export,
                               GateMode.WAITING if incoming else GateMode.OPEN)
                try:
                    await g.start()
                except (NegotiationError, ConnectionLost, OSError, TimeoutError) as e:
                    raise VmError(f"host {self.name}: storage path for "
                                  f"{spec.disks[i]} failed: {e}") from None
                gates.append(g)
            qmp = os.path.join(self.run_dir, f"{spec.name}.qmp")
            q = Qemu(spec.name, qemu_mod.argv(
                spec, [DiskPath(g.port, g.export) for g in gates], nets, accel=self.accel,
                qmp=qmp, console=self.console_path(spec.name), incoming=incoming),
                qmp, os.path.join(self.run_dir, f"{spec.name}.qemu.log"))
            try:
                await q.start()
            except QemuError as e:
                raise VmError(f"host {self.name}: {e}", "io") from None
        except BaseException:
            for g in gates:
                await g.close()
            raise
        vm.qemu, vm.gates, vm.identities = q, gates, [r.identity for r in resolved]
        vm.resources = {**{d: f"nbd://{r.host}:{r.port}/{r.export}"
                           for d, r in zip(spec.disks, resolved, strict=True)},
                        **{n: b for n, b in zip(spec.nics, nets, strict=True)}}
        vm.started = time.time()
        vm.error = None
        self._spawn(self._watch(vm, q))

    def console_path(self, name: str) -> str:
        return os.path.join(self.run_dir, f"{name}.console.log")

    async def _watch(self, vm: Vm, q: Qemu) -> None:
        assert q.exited is not None
        rc = await asyncio.shield(q.exited)
        if vm.qemu is not q:
            return
        log.info("QEMU exited", extra={"vm": vm.spec.name, "status": rc})
        if vm.state not in ("stopped",):
            vm.error = f"QEMU exited with status {rc}: {q.tail()}"
        vm.qemu = None
        vm.state = "stopped"
        gates, vm.gates = vm.gates, []
        for g in gates:
            await g.close()
        if self.incoming.get(vm.spec.name) is vm:
            del self.incoming[vm.spec.name]

    async def start_vm(self, name: str) -> Vm:
        vm = self.get(name)
        if vm.state != "stopped":
            raise VmError(f"VM {name} is already {vm.state} on host {self.name}")
        vm.state = "starting"
        try:
            await self._launch(vm, incoming=False)
        except BaseException:
            vm.state = "stopped"
            raise
        vm.state = "running"
        log.info("VM started", extra={"vm": name, "accel": self.accel})
        return vm

    async def stop_vm(self, name: str, force: bool = False) -> Vm:
        vm = self.get(name)
        if vm.state == "migrating":
            raise VmError(f"VM {name} is migrating; wait for the migration to end")
        q = vm.qemu
        vm.state = "stopped"
        if q is not None:
            if force:
                await q.kill()
            else:
                await q.quit()
            assert q.exited is not None
            await asyncio.shield(q.exited)
        vm.qemu = None
        gates, vm.gates = vm.gates, []
        for g in gates:
            await g.close()
        log.info("VM stopped", extra={"vm": name, "force": force})
        return vm

    # ---- migration: origin ------------------------------------------------------

    def start_migration(self, name: str, opts: MigrateOptions) -> Migration:
        vm = self.get(name)
        if opts.to == self.name:
            raise VmError(f"VM {name} already runs on host {self.name}: name another host "
                          "with --to", "invalid")
        if opts.to not in self.cfg.vmhosts:
            known = ", ".join(sorted(self.cfg.vmhosts))
            raise VmError(f"host {opts.to!r} is not in the cluster file (vmhosts: {known})",
                          "invalid")
        if vm.state != "running" or vm.qemu is None:
            raise VmError(f"VM {name} is {vm.state}; only a running VM migrates")
        if opts.max_bandwidth is not None and isinstance(opts.max_bandwidth, str):
            opts.max_bandwidth = parse_size(opts.max_bandwidth)
        job = self.migrations[name] = Migration(name, self.name, opts.to)
        vm.state = "migrating"
        self._spawn(self._migrate(vm, job, opts))
        return job

    async def _migrate(self, vm: Vm, job: Migration, opts: MigrateOptions) -> None:
        t0 = time.monotonic()
        name = vm.spec.name
        q = vm.qemu
        assert q is not None
        log.info("migration starts", extra={"vm": name, "to": opts.to})
        prepared = False
        try:
            try:
                resp = await self.call_host(opts.to, "POST", "/api/v1/incoming", {
                    "spec": msgspec.to_builtins(vm.spec), "origin": self.name,
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
                res = await self.call_host(opts.to, "POST", f"/api/v1/incoming/{name}/held",
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
                await self.call_host(opts.to, "POST", f"/api/v1/incoming/{name}/resume",
                                     timeout=30)
            except HostCallError as e:
                if not e.unreachable and not await self._dropped(opts.to, name):
                    # It may be running there: running it here too would split it in two.
                    job.error = (f"resuming VM {name} at host {opts.to} failed ({e}) and "
                                 f"host {opts.to} cannot confirm it stopped it: the VM stays "
                                 f"paused at host {self.name}; check host {opts.to}")
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
                    await self.call_host(opts.to, "DELETE", f"/api/v1/incoming/{name}",
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
        self._unsave(name)
        self.vms.pop(name, None)
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
            await self.call_host(host, "DELETE", f"/api/v1/incoming/{name}", timeout=10)
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

    # ---- migration: destination ---------------------------------------------------

    async def prepare_incoming(self, req: Incoming) -> dict[str, Any]:
        try:
            spec = from_dict(req.spec)
        except SpecError as e:
            raise VmError(f"bad VM definition: {e}", "invalid") from None
        name = spec.name
        if name in self.vms:
            raise VmError(f"VM {name} is already defined on host {self.name}")
        if name in self.incoming:
            raise VmError(f"VM {name} is already coming in to host {self.name}")
        if req.accel != self.accel:
            raise VmError(f"configuration mismatch: the origin runs QEMU with {req.accel}, "
                          f"host {self.name} with {self.accel}")
        if len(req.identities) != len(spec.disks):
            raise VmError("configuration mismatch: identities do not match the disks",
                          "invalid")
        vm = Vm(spec, state="incoming", origin=req.origin)
        self.incoming[name] = vm
        try:
            await self._launch(vm, incoming=True, identities=req.identities)
            assert vm.qemu is not None
            port = free_port()
            host = split_hostport(self.host.api)[0]
            await vm.qemu.execute("migrate-set-capabilities", {"capabilities": [
                {"capability": "events", "state": True}]})
            await vm.qemu.execute("migrate-incoming", {"uri": f"tcp:{host}:{port}"})
        except QemuError as e:
            await self._drop_incoming(name)
            raise VmError(f"host {self.name}: {e}", "io") from None
        except BaseException:
            await self._drop_incoming(name)
            raise
        log.info("incoming VM prepared", extra={"vm": name, "origin": req.origin})
        return {"uri": f"tcp:{host}:{port}", "qemu_pid": vm.qemu.pid}

    def _incoming(self, name: str) -> Vm:
        vm = self.incoming.get(name)
        if vm is None or vm.qemu is None:
            raise VmError(f"no incoming VM {name} on host {self.name}", "not_found")
        return vm

    async def take_held(self, name: str, data: bytes) -> dict[str, Any]:
        vm = self._incoming(name)
        try:
            held = decode_held(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise VmError(f"bad held requests: {e}", "invalid") from None
        applied = 0
        for i, g in enumerate(vm.gates):
            ops: list[HeldOp] = held.get(f"disk{i}", [])
            try:
                applied += await g.apply(ops)
            except GateError as e:
                raise VmError(f"host {self.name}: {e}", "io") from None
        return {"applied": applied}

    async def resume_incoming(self, name: str) -> dict[str, Any]:
        vm = self._incoming(name)
        q = vm.qemu
        assert q is not None
        deadline = time.monotonic() + 30
        while (status := await q.status()) == "inmigrate":
            if time.monotonic() > deadline:
                raise VmError(f"host {self.name}: the incoming state did not arrive", "io")
            await asyncio.sleep(POLL / 2)
        if status not in ("paused", "prelaunch"):
            raise VmError(f"host {self.name}: incoming VM is {status}, not resumable", "io")
        for g in vm.gates:  # replay of what arrived in take_held, then QEMU's own I/O
            await g.replay([])
        await q.execute("cont")
        vm.state = "running"
        vm.origin = None
        del self.incoming[name]
        self.vms[name] = vm
        self._save(vm.spec)
        log.info("incoming VM resumed", extra={"vm": name})
        return self.view(vm)

    async def _drop_incoming(self, name: str) -> None:
        vm = self.incoming.pop(name, None)
        if vm is None:
            return
        vm.state = "stopped"
        if vm.qemu is not None:
            await vm.qemu.kill()
            vm.qemu = None
        for g in vm.gates:
            await g.close()
        vm.gates = []

    # ---- views ------------------------------------------------------------------

    def view(self, vm: Vm) -> dict[str, Any]:
        out: dict[str, Any] = {"name": vm.spec.name, "host": self.name, "site": self.host.site,
                               "state": vm.state, "cpus": vm.spec.cpus,
                               "memory": vm.spec.memory_bytes,
                               "disks": vm.spec.disks, "nics": vm.spec.nics,
                               "kernel": vm.spec.kernel, "initrd": vm.spec.initrd,
                               "resources": vm.resources,
                               "qemu_pid": vm.qemu.pid if vm.qemu else None,
                               "console": self.console_path(vm.spec.name),
                               "gates": [g.status() for g in vm.gates],
                               "error": vm.error}
        if vm.origin:
            out["origin"] = vm.origin
        job = self.migrations.get(vm.spec.name)
        if job is not None:
            out["migration"] = job.view()
        return out

    def host_view(self) -> dict[str, Any]:
        active = [v for v in (*self.vms.values(), *self.incoming.values()) if v.qemu]
        return {"name": self.name, "site": self.host.site, "pid": os.getpid(),
                "version": __version__, "accel": self.accel, "storage": self.host.storage,
                "networks": {f"network:{k}": v for k, v in self.host.networks.items()},
                "limits": {"cpus": self.host.cpus, "memory": self.memory_limit},
                "used": {"cpus": sum(v.spec.cpus for v in active),
                         "memory": sum(v.spec.memory_bytes for v in active)},
                "vms": sorted(self.vms), "incoming": sorted(self.incoming),
                "uptime": round(time.time() - self.started, 1)}

    # ---- HTTP to nodes and other hosts ----------------------------------------------

    def _headers(self) -> dict[str, str]:
        s = self.cfg.cluster.secret
        return {"Authorization": f"Bearer {s}"} if s else {}

    async def _node_get(self, node: str, path: str) -> Any:
        """GET on a node's API; None for 404; HostCallError when unreachable."""
        url = self.cfg.node(node).api_url + path
        assert self.session is not None
        try:
            async with self.session.get(url, headers=self._headers(),
                                        timeout=aiohttp.ClientTimeout(total=5)) as r:
                if r.status == 404:
                    return None
                body = await r.json(content_type=None)
                if r.status >= 400:
                    raise HostCallError(f"node {node}: {body['error']['message']}")
                return body
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            raise HostCallError(f"storage node {node} is not reachable ({e or type(e)})",
                                unreachable=True) from None

    async def call_host(self, host: str, method: str, path: str,
                        body: dict[str, Any] | None = None, raw: bytes | None = None,
                        timeout: float = 10) -> Any:
        url = self.cfg.vmhost(host).api_url + path
        assert self.session is not None
        headers = self._headers()
        data: bytes | None = raw
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            async with self.session.request(method, url, data=data, headers=headers,
                                            timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                res = await r.json(content_type=None)
                if r.status >= 400:
                    msg = res["error"]["message"] if isinstance(res, dict) else str(res)
                    raise HostCallError(msg)
                return res
        except TimeoutError:
            raise HostCallError(f"host {host} did not answer within {timeout:g}s") from None
        except (aiohttp.ClientConnectionError, OSError) as e:
            raise HostCallError(f"host {host} is not reachable ({e or type(e).__name__})",
                                unreachable=True) from None
        except (ValueError, KeyError, TypeError, aiohttp.ClientError) as e:
            raise HostCallError(f"host {host}: bad answer ({e})") from None

    # ---- life cycle -------------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        for name in list(self.incoming):
            await self._drop_incoming(name)
        for vm in list(self.vms.values()):
            if vm.qemu is not None:
                vm.state = "stopped"
                await vm.qemu.quit(timeout=5)
                for g in vm.gates:
                    await g.close()
                vm.gates = []
                vm.qemu = None
        for t in list(self._tasks):
            t.cancel()
        if self.session is not None:
            await self.session.close()


def free_port() -> int:
    from twinvol.supervisor import free_ports

    return free_ports(1)[0]


def _ident(identity: dict[str, Any]) -> str:
    return (f"serial {identity.get('serial')} volume id {identity.get('volume_id')} "
            f"size {identity.get('size')}")


# ---- HTTP API -----------------------------------------------------------------------


_error = error_response


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)  # type: ignore[no-any-return]
    except VmError as e:
        return _error(_STATUS.get(e.code, 409), e.code, str(e))
    except SpecError as e:
        return _error(400, "invalid", str(e))
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        return _error(400, "invalid", f"bad request body: {e}")


async def _json(request: web.Request, kind: type[Any]) -> Any:
    return msgspec.json.decode(await request.read() or b"{}", type=kind)


def make_app(m: Manager) -> web.Application:
    app = web.Application(middlewares=[bearer_auth(m.cfg.cluster.secret), _errors],
                          client_max_size=256 << 20)
    r = web.RouteTableDef()

    @r.get("/api/v1/health")
    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "vmhost": m.name})

    @r.get("/api/v1/host")
    async def host(_: web.Request) -> web.Response:
        return web.json_response(m.host_view())

    @r.get("/api/v1/vms")
    async def vms(_: web.Request) -> web.Response:
        return web.json_response({"vms": [m.view(v) for v in m.vms.values()],
                                  "incoming": [m.view(v) for v in m.incoming.values()]})

    @r.post("/api/v1/vms")
    async def define(request: web.Request) -> web.Response:
        raw = await _json(request, dict[str, Any])
        vm = await m.define(from_dict(raw))
        return web.json_response(m.view(vm), status=201)

    @r.get("/api/v1/vms/{name}")
    async def show(request: web.Request) -> web.Response:
        return web.json_response(m.view(m.get(request.match_info["name"])))

    @r.delete("/api/v1/vms/{name}")
    async def undefine(request: web.Request) -> web.Response:
        m.undefine(request.match_info["name"])
        return web.json_response({"undefined": request.match_info["name"]})

    @r.post("/api/v1/vms/{name}/start")
    async def start(request: web.Request) -> web.Response:
        return web.json_response(m.view(await m.start_vm(request.match_info["name"])))

    @r.post("/api/v1/vms/{name}/stop")
    async def stop(request: web.Request) -> web.Response:
        force = request.query.get("force") in ("1", "true")
        return web.json_response(m.view(await m.stop_vm(request.match_info["name"], force)))

    @r.post("/api/v1/vms/{name}/migrate")
    async def migrate(request: web.Request) -> web.Response:
        opts = await _json(request, MigrateOptions)
        job = m.start_migration(request.match_info["name"], opts)
        return web.json_response(job.view(), status=202)

    @r.get("/api/v1/vms/{name}/migration")
    async def migration(request: web.Request) -> web.Response:
        job = m.migrations.get(request.match_info["name"])
        if job is None:
            raise VmError(f"no migration of VM {request.match_info['name']} from host "
                          f"{m.name}", "not_found")
        return web.json_response(job.view())

    @r.post("/api/v1/incoming")
    async def incoming(request: web.Request) -> web.Response:
        return web.json_response(await m.prepare_incoming(await _json(request, Incoming)),
                                 status=201)

    @r.post("/api/v1/incoming/{name}/held")
    async def held(request: web.Request) -> web.Response:
        return web.json_response(await m.take_held(request.match_info["name"],
                                                   await request.read()))

    @r.post("/api/v1/incoming/{name}/resume")
    async def resume(request: web.Request) -> web.Response:
        return web.json_response(await m.resume_incoming(request.match_info["name"]))

    @r.delete("/api/v1/incoming/{name}")
    async def drop(request: web.Request) -> web.Response:
        await m._drop_incoming(request.match_info["name"])
        return web.json_response({"dropped": request.match_info["name"]})

    app.add_routes(r)
    return app


async def serve(cfg: ClusterConfig, name: str) -> None:
    m = Manager(cfg, name)
    m.load_definitions()
    m.session = aiohttp.ClientSession()
    runner = web.AppRunner(make_app(m), access_log=None, handle_signals=False)
    await runner.setup()
    host, port = split_hostport(m.host.api)
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as e:
        await m.session.close()
        raise VmError(f"cannot listen on {m.host.api}: {e.strerror}") from None
    log.info("vm host manager serving", extra={"vmhost": name, "api": m.host.api,
                                               "accel": m.accel})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await m.stop()
        await runner.cleanup()


def run(cfg: ClusterConfig, name: str) -> None:
    """Run a hypervisor host manager in the foreground until SIGTERM/SIGINT."""
    cfg.vmhost(name)
    asyncio.run(serve(cfg, name))

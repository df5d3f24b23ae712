"""The hypervisor host manager: VMs defined here, their QEMU processes and I/O gates,
the logical-name registry of this host, and the destination's side of live migration
(`prepare_incoming`, `take_held`, `resume_incoming`; the steps and the origin's side
are in `vm/migration.py`). Its HTTP API is `vm/api.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import msgspec

from twinvol import __version__
from twinvol.cluster import ClusterConfig, VmHostConfig, split_hostport
from twinvol.nbd.aio_client import ConnectionLost, NegotiationError
from twinvol.sizes import parse_size
from twinvol.vm import qemu as qemu_mod
from twinvol.vm.calls import HostCallError, HostCalls
from twinvol.vm.gate import GateMode, HeldOp, decode_held
from twinvol.vm.gateio import GateError, GateServer
from twinvol.vm.migration import POLL, MigrateOptions, Migration, Outgoing
from twinvol.vm.qemu import DiskPath, Qemu, QemuError
from twinvol.vm.spec import SpecError, VmSpec, from_dict, logical
from twinvol.vm.state import Vm, VmError

log = logging.getLogger("twinvol.vm")


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
        self.calls = HostCalls(cfg)
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

    def _forget(self, name: str) -> None:
        """The VM migrated away: its definition is the destination's now."""
        self._unsave(name)
        self.vms.pop(name, None)

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
                vms = await self.calls.call_host(other, "GET", "/api/v1/vms", timeout=3)
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
                ex = await self.calls.node_get(node, f"/api/v1/exports/{name}")
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
        self._spawn(Outgoing(vm, job, opts, here=self.name, accel=self.accel,
                             calls=self.calls, forget=self._forget).run())
        return job


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
        if self.calls.session is not None:
            await self.calls.session.close()


def free_port() -> int:
    from twinvol.supervisor import free_ports

    return free_ports(1)[0]


def _ident(identity: dict[str, Any]) -> str:
    return (f"serial {identity.get('serial')} volume id {identity.get('volume_id')} "
            f"size {identity.get('size')}")

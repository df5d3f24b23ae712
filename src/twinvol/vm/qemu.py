"""QEMU for one VM: the command line built from a resolved definition, the process, and
its QMP monitor (qemu.qmp).

Both ends of a migration build the command line from the same logical definition, so
the device model is identical (same devices, ids and PCI slots); only the real
resources behind it differ: each disk is an NBD connection to this host's gate.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
from dataclasses import dataclass
from typing import Any

from qemu.qmp import QMPClient
from qemu.qmp.error import QMPError

from twinvol.vm.spec import VmSpec

log = logging.getLogger("twinvol.vm.qemu")

QEMU = "qemu-system-x86_64"
PR_SET_PDEATHSIG = 1


class QemuError(Exception):
    """QEMU could not be started or its monitor failed."""


def choose_accel(setting: str) -> str:
    """`auto`: KVM when /dev/kvm is usable and the CPU has hardware virtualisation."""
    if setting in ("kvm", "tcg"):
        return setting
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        flags = ""
    hw = " vmx" in flags or " svm" in flags
    return "kvm" if hw and os.access("/dev/kvm", os.R_OK | os.W_OK) else "tcg"


@dataclass
class DiskPath:
    """Where QEMU reaches one disk: the gate's loopback NBD port."""

    port: int
    export: str


def argv(spec: VmSpec, disks: list[DiskPath], nets: list[str], *, accel: str, qmp: str,
         console: str, incoming: bool) -> list[str]:
    """The QEMU command line. `nets` are backends ("user" or "isolated") per NIC."""
    mem = spec.memory_bytes >> 20
    args = [QEMU, "-name", spec.name, "-nodefaults", "-no-user-config",
            "-machine", "pc", "-accel", accel, "-m", str(mem), "-smp", str(spec.cpus),
            "-display", "none", "-vga", "none", "-no-reboot",
            "-chardev", f"file,id=console,path={console},append=on",
            "-serial", "chardev:console",
            "-qmp", f"unix:{qmp},server=on,wait=off"]
    if spec.kernel is not None:
        args += ["-kernel", spec.kernel]
        if spec.initrd is not None:
            args += ["-initrd", spec.initrd]
        args += ["-append", spec.cmdline or "console=ttyS0"]
    for i, d in enumerate(disks):
        args += ["-blockdev", json.dumps({
            "driver": "nbd", "node-name": f"nbd{i}", "export": d.export,
            "server": {"type": "inet", "host": "127.0.0.1", "port": str(d.port)}}),
            "-blockdev", json.dumps({"driver": "raw", "node-name": f"disk{i}",
                                     "file": f"nbd{i}"}),
            "-device", f"virtio-blk-pci,id=vd{i},drive=disk{i},addr={4 + i:#x}"
            + (",bootindex=1" if i == 0 and spec.kernel is None else "")]
    for i, backend in enumerate(nets):
        if backend == "user":
            args += ["-netdev", f"user,id=net{i}"]
        else:  # isolated: a hub port with nothing else on the hub
            args += ["-netdev", f"hubport,id=net{i},hubid={100 + i}"]
        args += ["-device", f"virtio-net-pci,id=nic{i},netdev=net{i},mac={spec.mac(i)},"
                 f"addr={0x10 + i:#x},romfile="]
    if incoming:
        args += ["-S", "-incoming", "defer"]
    return args


def _die_with_parent() -> None:
    """QEMU dies with its host manager (even on kill -9): no VM runs unmanaged."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class Qemu:
    """One QEMU process and its QMP connection."""

    def __init__(self, name: str, args: list[str], qmp_path: str, log_path: str) -> None:
        self.name = name
        self.args = args
        self.qmp_path = qmp_path
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None
        self.qmp = QMPClient(name)
        self.exited: asyncio.Future[int] | None = None
        self._waiter: asyncio.Future[None] | None = None

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    @property
    def alive(self) -> bool:
        return self.exited is not None and not self.exited.done()

    async def start(self, timeout: float = 10.0) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.qmp_path)
        logf = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.args, stdin=asyncio.subprocess.DEVNULL, stdout=logf, stderr=logf,
                preexec_fn=_die_with_parent)
        except OSError as e:
            raise QemuError(f"cannot run {self.args[0]}: {e.strerror}") from None
        finally:
            logf.close()
        loop = asyncio.get_running_loop()
        self.exited = loop.create_future()
        proc = self.proc

        async def wait() -> None:
            rc = await proc.wait()
            assert self.exited is not None
            if not self.exited.done():
                self.exited.set_result(rc)

        self._waiter = asyncio.ensure_future(wait())
        deadline = loop.time() + timeout
        while True:
            if self.exited.done():
                raise QemuError(f"QEMU exited at start ({self.exited.result()}): "
                                f"{self.tail()}")
            if os.path.exists(self.qmp_path):
                try:
                    await self.qmp.connect(self.qmp_path)
                    break
                except (QMPError, OSError) as e:
                    if loop.time() > deadline:
                        raise QemuError(f"cannot connect to QMP: {e}") from None
            if loop.time() > deadline:
                await self.kill()
                raise QemuError(f"QEMU did not open its monitor within {timeout:.0f}s")
            await asyncio.sleep(0.02)

    def tail(self, lines: int = 3) -> str:
        try:
            with open(self.log_path, "rb") as f:
                text = f.read().decode(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])

    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        """A QMP command; QemuError when QEMU answers an error or is gone."""
        if not self.alive:
            raise QemuError("QEMU is not running")
        try:
            return await self.qmp.execute(cmd, args)
        except QMPError as e:
            raise QemuError(f"{cmd}: {e}") from None
        except (OSError, EOFError) as e:
            raise QemuError(f"{cmd}: monitor lost: {e}") from None

    async def status(self) -> str:
        res = await self.execute("query-status")
        return str(res["status"])

    async def quit(self, timeout: float = 10.0) -> None:
        """Orderly exit (QEMU drains and flushes its disks), then kill if it lingers."""
        if self.alive:
            with contextlib.suppress(QemuError):
                await self.execute("quit")
        await self._wait_or_kill(timeout)

    async def kill(self) -> None:
        if self.proc is not None and self.alive:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        await self._wait_or_kill(5.0)

    async def _wait_or_kill(self, timeout: float) -> None:
        if self.exited is not None and not self.exited.done():
            try:
                await asyncio.wait_for(asyncio.shield(self.exited), timeout)
            except TimeoutError:
                if self.proc is not None:
                    with contextlib.suppress(ProcessLookupError):
                        self.proc.kill()
                await self.exited
        with contextlib.suppress(Exception):
            await self.qmp.disconnect()

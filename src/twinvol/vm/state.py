"""What the hypervisor host manager records of each VM, and the error its API maps
to an HTTP status (shared by the manager, migration and the API)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from twinvol.vm.gateio import GateServer
from twinvol.vm.qemu import Qemu
from twinvol.vm.spec import VmSpec


class VmError(Exception):
    """A refused operation: `code` maps to an HTTP status like the node API's."""

    def __init__(self, message: str, code: str = "conflict") -> None:
        super().__init__(message)
        self.code = code


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

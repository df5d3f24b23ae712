"""VM definitions in logical names, and what a hypervisor host resolves them to.

A VM file (TOML)::

    name = "web01"
    memory = "128M"
    cpus = 1
    kernel = "vmlinuz"            # direct kernel boot (relative to the file), or
    initrd = "initrd.gz"          # leave both out to boot from the first disk
    cmdline = "console=ttyS0"
    disks = ["volume:demo"]       # logical names: each host maps them to its own storage
    nics = ["network:lan"]

Nothing in it names a real resource of one host: `volume:NAME` is the export NAME
(an active-active volume's shared virtual identity) through the host's own site's
storage path, `network:NAME` a backend from the host's `networks` table.
"""

from __future__ import annotations

import hashlib
import os
import re
import tomllib
from typing import Any

import msgspec

from twinvol.sizes import SizeError, parse_size

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
NETWORK_BACKENDS = ("user", "isolated")


class SpecError(ValueError):
    """A VM definition is malformed."""


class VmSpec(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    memory: str | int = "128M"
    cpus: int = 1
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str = ""
    disks: list[str] = msgspec.field(default_factory=list)
    nics: list[str] = msgspec.field(default_factory=list)

    @property
    def memory_bytes(self) -> int:
        return self.memory if isinstance(self.memory, int) else parse_size(self.memory)

    def mac(self, index: int) -> str:
        """A stable MAC per VM and NIC: the same on every host (migration needs it)."""
        h = hashlib.sha256(f"{self.name}/{index}".encode()).digest()
        return "52:54:00:" + ":".join(f"{b:02x}" for b in h[:3])


def logical(value: str, kind: str) -> str:
    """`kind:NAME` -> NAME (raises SpecError otherwise)."""
    prefix, sep, name = value.partition(":")
    if not sep or prefix != kind or not _NAME.match(name):
        raise SpecError(f"{value!r} is not a logical {kind} name (write {kind}:NAME)")
    return name


def validate(spec: VmSpec) -> VmSpec:
    if not _NAME.match(spec.name):
        raise SpecError(f"VM name {spec.name!r}: use 1-64 of A-Z a-z 0-9 . _ -")
    try:
        mem = spec.memory_bytes
    except SizeError as e:
        raise SpecError(f"memory: {e}") from None
    if mem < 16 << 20 or mem % (1 << 20):
        raise SpecError(f"memory {spec.memory!r}: at least 16M, in whole MiB")
    if not 1 <= spec.cpus <= 64:
        raise SpecError(f"cpus {spec.cpus}: 1 to 64")
    if spec.initrd is not None and spec.kernel is None:
        raise SpecError("initrd without kernel")
    if spec.kernel is None and not spec.disks:
        raise SpecError("nothing to boot: give a kernel or at least one disk")
    for d in spec.disks:
        logical(d, "volume")
    for n in spec.nics:
        logical(n, "network")
    if len(set(spec.disks)) != len(spec.disks):
        raise SpecError("the same volume is attached twice")
    return spec


def from_dict(raw: dict[str, Any]) -> VmSpec:
    try:
        spec = msgspec.convert(raw, VmSpec)
    except msgspec.ValidationError as e:
        raise SpecError(str(e)) from None
    return validate(spec)


def load_file(path: str) -> VmSpec:
    """Read a VM file; relative kernel/initrd paths are made absolute."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as e:
        raise SpecError(f"cannot read {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{path} is not valid TOML: {e}") from None
    base = os.path.dirname(os.path.abspath(path))
    for key in ("kernel", "initrd"):
        if isinstance(raw.get(key), str) and not os.path.isabs(raw[key]):
            raw[key] = os.path.join(base, raw[key])
    try:
        return from_dict(raw)
    except SpecError as e:
        raise SpecError(f"{path}: {e}") from None

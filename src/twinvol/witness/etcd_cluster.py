"""A three-member etcd cluster on loopback for `twinvol up --witness etcd` and the tests.

The members are the Debian package's ``etcd`` binary, each its own process under the
`Supervisor`, with data in ``DIR/etcd/NAME``. Their ports are chosen once and kept in
``DIR/etcd/members.json``: a member restarted on its data must find its peers where the
cluster was formed.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import time
import urllib.request
from dataclasses import dataclass

import msgspec

from twinvol.supervisor import Supervisor, free_ports

MEMBERS = ("etcd1", "etcd2", "etcd3")
MEMBERS_FILE = "members.json"


class EtcdStartError(Exception):
    """The etcd members cannot be started (binary missing, bad members file, no quorum)."""


class Member(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    client: str  # host:port clients use
    peer: str    # host:port the members use between them


@dataclass
class EtcdCluster:
    """The members of one loopback cluster and where their data lives."""

    directory: str
    members: list[Member]
    token: str
    exec_prefix: tuple[str, ...] = ()   # e.g. `ip netns exec NS` (the fault sweep)
    # (CA, certificate, key): clients must speak TLS and show a certificate of that CA
    tls: tuple[str, str, str] | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def endpoints(self) -> list[str]:
        return [m.client for m in self.members]

    @classmethod
    def open(cls, directory: str, token: str = "twinvol") -> EtcdCluster:
        """The cluster kept in `directory`, or a new one with fresh ports."""
        path = os.path.join(directory, MEMBERS_FILE)
        try:
            with open(path, "rb") as f:
                members = msgspec.json.decode(f.read(), type=list[Member])
        except FileNotFoundError:
            ports = iter(free_ports(2 * len(MEMBERS)))
            members = [Member(n, f"127.0.0.1:{next(ports)}", f"127.0.0.1:{next(ports)}")
                       for n in MEMBERS]
            os.makedirs(directory, exist_ok=True)
            tmp = path + ".tmp"
            with open(tmp, "wb") as f:
                f.write(msgspec.json.encode(members) + b"\n")
            os.replace(tmp, path)
        except (OSError, msgspec.DecodeError, msgspec.ValidationError) as e:
            raise EtcdStartError(f"cannot read the etcd members file {path}: {e}") from None
        return cls(directory, members, token)

    def argv(self, member: Member) -> list[str]:
        binary = shutil.which("etcd")
        if binary is None:
            raise EtcdStartError("the etcd binary is not installed (Debian package "
                                 "etcd-server; scripts/setup installs it)")
        initial = ",".join(f"{m.name}=http://{m.peer}" for m in self.members)
        tls: list[str] = []
        if self.tls:
            ca, cert, key = self.tls
            tls = ["--client-cert-auth", "--trusted-ca-file", ca, "--cert-file", cert,
                   "--key-file", key]
        return [*self.exec_prefix, binary, "--name", member.name,
                "--data-dir", os.path.join(self.directory, member.name),
                "--listen-client-urls", f"{self.scheme}://{member.client}",
                "--advertise-client-urls", f"{self.scheme}://{member.client}", *tls,
                "--listen-peer-urls", f"http://{member.peer}",
                "--initial-advertise-peer-urls", f"http://{member.peer}",
                "--initial-cluster", initial, "--initial-cluster-state", "new",
                "--initial-cluster-token", self.token,
                "--logger", "zap", "--log-level", "warn"]

    def start(self, sup: Supervisor, log_dir: str, *names: str) -> None:
        """Start members `names` (all by default) under `sup`, as components ``etcd1``..."""
        for m in self.members:
            if not names or m.name in names:
                sup.start(m.name, self.argv(m), os.path.join(log_dir, f"{m.name}.log"))

    def wait_ready(self, sup: Supervisor, timeout: float = 30.0) -> None:
        """Until every started member answers ``/health`` with a quorum behind it."""
        deadline = time.monotonic() + timeout
        pending = [m for m in self.members if m.name in sup.components
                   and sup.components[m.name].alive()]
        while pending:
            m = pending[0]
            comp = sup.components[m.name]
            if not comp.alive():
                raise EtcdStartError(f"etcd member {m.name} exited with status "
                                     f"{comp.proc.returncode if comp.proc else '?'}: "
                                     f"{comp.tail()}")
            if self._healthy(m.client):
                pending.pop(0)
                continue
            if time.monotonic() > deadline:
                raise EtcdStartError(f"etcd member {m.name} has no quorum after "
                                     f"{timeout:.0f}s: {comp.tail()}")
            time.sleep(0.1)

    def pids(self, sup: Supervisor) -> list[int]:
        return [sup.components[m.name].pid for m in self.members if m.name in sup.components]

    def _healthy(self, client: str) -> bool:
        ctx = None
        if self.tls:
            ca, cert, key = self.tls
            ctx = ssl.create_default_context(cafile=ca)
            ctx.load_cert_chain(cert, key)
        try:
            with urllib.request.urlopen(f"{self.scheme}://{client}/health", timeout=1,
                                        context=ctx) as r:
                return bool(json.loads(r.read()).get("health") == "true")
        except (OSError, ValueError):
            return False


__all__ = ["MEMBERS", "EtcdCluster", "EtcdStartError", "Member"]

"""The `Witness` a node uses, built from its cluster file's ``[witness]`` table.

Kept apart from the replication code so that it only has to say "give me my witness":
the builtin HTTP witness, or the etcd backend with a `ServeGate` that stops the node's
lone copies from serving when its etcd lease runs out.
"""

from __future__ import annotations

from ssl import SSLContext
from typing import Any

from twinvol.cluster import ClusterConfig, ClusterError
from twinvol.tls.https import service_client
from twinvol.witness import Backend, table_config
from twinvol.witness.client import HttpWitness, Witness, WitnessError


class ManagerGate:
    """`ServeGate` over a replication manager: refuses host I/O on the volumes of the
    pairs it fences (while they serve alone, io_mode ``local``), and lets them serve
    again afterwards -- unless something else holds them meanwhile."""

    def __init__(self, mgr: Any) -> None:
        self.mgr = mgr
        self.reasons: dict[str, str] = {}   # volume -> the reason we held it with

    def alone(self) -> list[str]:
        """Active-active pairs whose copy here serves (``local``) with the partner away."""
        return [name for name, pr in self.mgr.pairs.items()
                if pr.rec.io_mode == "local" and not pr.rec.remote
                and not self.mgr.peers.is_up(pr.rec.partner)]

    def fence(self, pairs: list[str], reason: str) -> None:
        for name in pairs:
            pr = self.mgr.pairs.get(name)
            if pr is None or pr.rec.io_mode != "local" or pr.rec.volume in self.mgr.holds:
                continue
            self.reasons[pr.rec.volume] = reason
            self.mgr.hold(pr.rec.volume, reason)
            self.mgr.node.events.publish("witness_lease_lost", pair=name, reason=reason)

    def unfence(self) -> None:
        for volume, reason in list(self.reasons.items()):
            if self.mgr.holds.get(volume) == reason:
                self.mgr.unhold(volume)
        self.reasons.clear()


def witness_for(cluster: ClusterConfig, mgr: Any) -> Witness | None:
    """The witness `mgr`'s node asks (None: the cluster has none)."""
    if not cluster.witness:
        return None
    try:
        cfg = table_config(cluster.witness, cluster.path or "cluster.toml")
    except ClusterError:
        if not cluster.witness.get("addr"):
            raise
        # An older table the builtin witness itself still accepts.
        return HttpWitness(str(cluster.witness["addr"]), cluster.cluster.secret or None,
                           ssl=_https(cluster, mgr))
    if cfg.backend is Backend.ETCD:
        from twinvol.witness.etcd import EtcdWitness

        try:
            return EtcdWitness(cfg, cluster.cluster.name, cluster.nodes, ManagerGate(mgr))
        except WitnessError as e:  # the TLS files
            raise ClusterError(f"cluster file {cluster.path}, [witness]: {e}") from None
    return HttpWitness(cfg.addr, cluster.cluster.secret or None, ssl=_https(cluster, mgr))


def _https(cluster: ClusterConfig, mgr: Any) -> SSLContext | None:
    """[tls] api: the node shows its own certificate to the witness's HTTPS API."""
    if not cluster.https_apis:
        return None
    return service_client(cluster.tls_dir(), node=getattr(getattr(mgr, "node", None),
                                                           "name", None))


__all__ = ["ManagerGate", "witness_for"]

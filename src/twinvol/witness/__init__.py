"""The witness: the third party that decides which side of a broken pair keeps writing.

`logic` holds the rules (a pure `Arbiter`), `server` the builtin HTTP service with its
persisted grants, `client` the `Witness` interface nodes use and its builtin HTTP
implementation, `etcd` the same rules kept in an etcd cluster instead.

The cluster file configures it in an optional table, the builtin witness (the default)::

    [witness]
    addr = "127.0.0.1:8790"     # HTTP listen address
    data_dir = "witness"        # relative to the cluster file

and ``[cluster] secret = "..."``, when set, is the bearer token every request must carry;
or an etcd v3 cluster the operators already run::

    [witness]
    backend = "etcd"
    endpoints = ["10.0.0.1:2379", "10.0.0.2:2379", "10.0.0.3:2379"]
    # optional: prefix (default /twinvol/CLUSTER-NAME/), lease_ttl (seconds, default 2),
    # ca_file, cert_file + key_file (TLS with a client certificate)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import msgspec

from twinvol.cluster import ClusterError, TlsConfig, http_url, read_toml, split_hostport

MIN_LEASE_TTL = 2  # etcd's own floor with its default election timeout


class Backend(StrEnum):
    """Who keeps the decisions: the builtin witness process or an etcd cluster."""

    BUILTIN = "builtin"
    ETCD = "etcd"


class WitnessConfig(msgspec.Struct, forbid_unknown_fields=True):
    """The ``[witness]`` table of the cluster file."""

    addr: str = ""
    data_dir: str = ""
    backend: Backend = Backend.BUILTIN
    endpoints: list[str] = msgspec.field(default_factory=list)
    prefix: str = ""
    lease_ttl: int = MIN_LEASE_TTL
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""

    def check(self) -> None:
        """The fields the backend needs, and only those (raises ClusterError)."""
        if self.backend is Backend.BUILTIN:
            for name in ("addr", "data_dir"):
                if not getattr(self, name):
                    raise ClusterError(f"the builtin witness needs {name}")
            self.hostport  # noqa: B018 - validates the address
            extra = [f for f in ("endpoints", "prefix", "ca_file", "cert_file", "key_file")
                     if getattr(self, f)]
            if extra:
                raise ClusterError(f"{extra[0]} is for backend = \"etcd\" only")
            return
        if not self.endpoints:
            raise ClusterError('backend = "etcd" needs endpoints = ["HOST:PORT", ...]')
        for ep in self.endpoints:
            split_hostport(ep)
        if self.addr:
            raise ClusterError('addr is for the builtin witness; backend = "etcd" uses '
                               "endpoints")
        if self.lease_ttl < MIN_LEASE_TTL:
            raise ClusterError(f"lease_ttl must be at least {MIN_LEASE_TTL} seconds, "
                               f"not {self.lease_ttl}")
        if bool(self.cert_file) != bool(self.key_file):
            raise ClusterError("cert_file and key_file go together (a client certificate "
                               "and its key)")
        if self.prefix and not self.prefix.startswith("/"):
            raise ClusterError(f"prefix must start with /, not {self.prefix!r}")

    @property
    def tls(self) -> bool:
        return bool(self.ca_file or self.cert_file)

    def key_prefix(self, cluster_name: str) -> str:
        """Where the etcd backend keeps its keys (ends with /)."""
        return (self.prefix or f"/twinvol/{cluster_name}").rstrip("/") + "/"

    def resolve(self, cluster_path: str) -> WitnessConfig:
        """File paths resolved against the cluster file's directory."""
        base = os.path.dirname(os.path.abspath(cluster_path))

        def full(p: str) -> str:
            return p if not p or os.path.isabs(p) else os.path.join(base, p)

        return msgspec.structs.replace(self, ca_file=full(self.ca_file),
                                       cert_file=full(self.cert_file),
                                       key_file=full(self.key_file))

    @property
    def hostport(self) -> tuple[str, int]:
        return split_hostport(self.addr)

    @property
    def url(self) -> str:
        return http_url(self.addr)

    def data_path(self, cluster_path: str) -> str:
        """`data_dir` resolved against the cluster file's directory."""
        if os.path.isabs(self.data_dir):
            return self.data_dir
        return os.path.join(os.path.dirname(os.path.abspath(cluster_path)), self.data_dir)


@dataclass(frozen=True)
class WitnessSettings:
    """Everything the witness process needs from the cluster file."""

    cluster_path: str
    config: WitnessConfig
    nodes: tuple[str, ...]
    secret: str | None
    tls_dir: str | None = None  # [tls] api: the API is HTTPS with client certificates

    @property
    def data_dir(self) -> str:
        return self.config.data_path(self.cluster_path)


def _config(path: str, raw: dict[str, Any]) -> WitnessConfig:
    table = raw.get("witness")
    if table is None:
        raise ClusterError(f"cluster file {path} has no [witness] table; add one with "
                           'addr = "HOST:PORT" and data_dir = "witness"')
    try:
        cfg = msgspec.convert(table, WitnessConfig)
        cfg.check()
    except msgspec.ValidationError as e:
        raise ClusterError(f"cluster file {path}, [witness]: {e}") from None
    except ClusterError as e:
        raise ClusterError(f"cluster file {path}, [witness]: {e}") from None
    return cfg


def witness_config(cluster_path: str | None) -> WitnessConfig:
    """The ``[witness]`` table of a cluster file (`None` means ``$TWINVOL_CLUSTER``)."""
    path, raw = read_toml(cluster_path)
    return _config(path, raw)


def witness_settings(cluster_path: str | None) -> WitnessSettings:
    """The witness table, the node names and the shared secret of a cluster file."""
    path, raw = read_toml(cluster_path)
    cfg = _config(path, raw)
    nodes = raw.get("nodes")
    if not isinstance(nodes, dict) or not nodes:
        raise ClusterError(f"cluster file {path} names no nodes")
    bad = [n for n, v in nodes.items() if not isinstance(v, dict)]
    if bad:
        raise ClusterError(f"cluster file {path}: nodes.{bad[0]} must be a table")
    section = raw.get("cluster", {})
    secret = section.get("secret") if isinstance(section, dict) else None
    if secret is not None and (not isinstance(secret, str) or not secret):
        raise ClusterError(f"cluster file {path}: [cluster] secret must be a non-empty string")
    return WitnessSettings(path, cfg, tuple(sorted(nodes)), secret, https_dir(path, raw))


def https_dir(path: str, raw: dict[str, Any]) -> str | None:
    """The certificate directory when the cluster file's [tls] api is on, else None."""
    try:
        tls = msgspec.convert(raw["tls"], TlsConfig) if "tls" in raw else None
    except msgspec.ValidationError as e:
        raise ClusterError(f"cluster file {path}, [tls]: {e}") from None
    if tls is None or not tls.api:
        return None
    return tls.dir if os.path.isabs(tls.dir) else os.path.join(os.path.dirname(path), tls.dir)


def table_config(table: dict[str, Any], cluster_path: str) -> WitnessConfig:
    """A ``[witness]`` table already read (a node's cluster config) as a checked config."""
    return _config(cluster_path, {"witness": table}).resolve(cluster_path)


__all__ = ["Backend", "WitnessConfig", "WitnessSettings", "https_dir", "table_config",
           "witness_config", "witness_settings"]

"""The witness: the third party that decides which side of a broken pair keeps writing.

`logic` holds the rules (a pure `Arbiter`), `server` the builtin HTTP service with its
persisted grants, `client` the `Witness` interface nodes use (HTTP now, etcd later).

The cluster file configures it in an optional table::

    [witness]
    addr = "127.0.0.1:8790"     # HTTP listen address
    data_dir = "witness"        # relative to the cluster file

and ``[cluster] secret = "..."``, when set, is the bearer token every request must carry.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import msgspec

from twinvol.cluster import ClusterError, http_url, read_toml, split_hostport


class WitnessConfig(msgspec.Struct, forbid_unknown_fields=True):
    """The ``[witness]`` table of the cluster file."""

    addr: str
    data_dir: str

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
        cfg.hostport  # noqa: B018 - validates the address
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
    return WitnessSettings(path, cfg, tuple(sorted(nodes)), secret)


__all__ = ["WitnessConfig", "WitnessSettings", "witness_config", "witness_settings"]

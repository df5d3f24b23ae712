"""The host agent: a multipath NBD proxy on the host (dm-multipath + HDLM in one process).

Clients (qemu, fio, nbdcopy...) connect to the agent as to any NBD server; the agent
forwards each request over NBD "paths" to the storage nodes that serve the same
virtual identity, fails over between them, holds I/O while no path is usable, and
learns I/O mode changes from the nodes' pushed event streams.

Configuration is the `[host]` table of the cluster file::

    [host]
    nbd = "127.0.0.1:10810"      # where clients connect
    socket = "host.sock"         # optional: also a Unix socket (relative to the cluster file)
    api = "127.0.0.1:8710"       # status API
    hold_timeout = 30.0          # seconds to hold I/O while no path is usable
    nodes = ["A", "B"]           # which nodes are this host's paths (default: all)
    io_timeout = 15.0            # a path silent this long with requests outstanding is dead
    fault_log = "host-faults.jsonl"  # received fault reports (JSON lines)
    data_path = "native"         # "native" (C relay) or "python" (same rules, slower)
    [[host.sinks]]               # optional: type = "webhook" (url), "syslog" (address),
    type = "webhook"             # or "command" (command = [argv]); min_severity = "error"
    url = "http://127.0.0.1:9000/hook"

`[cluster] secret`, when set, is sent to the nodes' APIs as a bearer token, and the
agent's own API wants it (admin) or a scoped token (`twinvol token create`; hashes in
`host-tokens.json`, calls that change something in `host-audit.log`, both next to the
cluster file). With `[tls] api = true` the API is HTTPS and callers show a certificate.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import msgspec

from twinvol.cluster import (
    ClusterError,
    LimitsConfig,
    TlsConfig,
    http_url,
    read_toml,
    split_hostport,
)
from twinvol.faults.sinks import SinkConfig
from twinvol.nbd.server_events import TlsMode

# The longest Unix socket path bind() takes (sun_path holds 108 bytes with its NUL).
UNIX_PATH_MAX = 107


class HostConfig(msgspec.Struct, forbid_unknown_fields=True):
    nbd: str
    api: str
    hold_timeout: float = 30.0
    nodes: list[str] | None = None
    # A path with requests outstanding and no reply for this long is declared dead
    # (a hung node or a cut link that TCP has not noticed yet).
    io_timeout: float = 15.0
    # Fault reports pushed by the nodes: appended here (relative to the cluster file)
    # and handed to the sinks (webhook, syslog, command).
    fault_log: str = "host-faults.jsonl"
    sinks: list[SinkConfig] = []
    # Who relays requests and replies: the C extension (twinvol.host._relay) or the
    # Python session code. Both follow the same rules; "python" is the reference.
    data_path: str = "native"
    # Optional Unix socket for clients on this host (nbd+unix:///EXPORT?socket=PATH):
    # no TCP port to guard, and the cheapest hop for local clients.
    socket: str | None = None
    # NBD TLS towards clients (default: [tls] nbd); towards each node the agent follows
    # that node's mode. Either one on means the Python data path (the relay is plain TCP).
    tls: TlsMode | None = None
    # TLS towards clients with pre-shared keys (a psktool file) instead of certificates.
    tls_psk: str | None = None


class NodeAddr(msgspec.Struct):
    """What the agent needs of a `[nodes.X]` table (unknown keys are other components')."""

    site: str
    nbd: str
    api: str
    tls: TlsMode | None = None  # the node's own NBD TLS mode
    api_tls: bool | None = None  # its API is HTTPS (default: [tls] api)
    tls_psk: str | None = None  # its NBD TLS uses pre-shared keys: the agent dials with these

    @property
    def nbd_hostport(self) -> tuple[str, int]:
        return split_hostport(self.nbd)

    @property
    def api_url(self) -> str:
        return http_url(self.api, https=bool(self.api_tls))


@dataclass
class HostSetup:
    """Everything the agent reads from the cluster file."""

    config: HostConfig
    nodes: dict[str, NodeAddr]  # the path nodes, in preference order
    secret: str | None
    path: str
    cluster_name: str = "twinvol"
    tls: TlsConfig | None = None
    metrics_open: bool = False  # [cluster] metrics_open: /metrics without a read token
    limits: LimitsConfig = field(default_factory=LimitsConfig)  # [limits], as on a node

    @property
    def tls_dir(self) -> str | None:
        return None if self.tls is None else self._relative(self.tls.dir)

    @property
    def client_tls(self) -> TlsMode:
        """The agent's NBD TLS mode towards its clients."""
        own = self.config.tls
        return own if own is not None else self.tls.nbd if self.tls else TlsMode.OFF

    def node_tls(self, name: str) -> bool:
        """Whether the agent must speak TLS to node `name` (its mode is not off)."""
        mode = self.nodes[name].tls
        mode = mode if mode is not None else self.tls.nbd if self.tls else TlsMode.OFF
        return mode is not TlsMode.OFF

    @property
    def fault_log(self) -> str:
        return self._relative(self.config.fault_log)

    @property
    def socket(self) -> str | None:
        """The Unix socket path clients may use, or None."""
        return None if self.config.socket is None else self._relative(self.config.socket)

    def _relative(self, p: str) -> str:
        return p if os.path.isabs(p) else os.path.join(os.path.dirname(self.path), p)


def load(path: str | None) -> HostSetup:
    """Read the `[host]` table and node addresses; raise ClusterError with one clear line."""
    path, raw = read_toml(path)
    if "host" not in raw:
        raise ClusterError(f"cluster file {path} has no [host] table (nbd = \"HOST:PORT\", "
                           "api = \"HOST:PORT\")")
    try:
        config = msgspec.convert(raw["host"], HostConfig)
        nodes = msgspec.convert(raw.get("nodes", {}), dict[str, NodeAddr])
        tls = msgspec.convert(raw["tls"], TlsConfig) if "tls" in raw else None
        limits = msgspec.convert(raw.get("limits", {}), LimitsConfig)
    except msgspec.ValidationError as e:
        raise ClusterError(f"cluster file {path}: {e}") from None
    section = raw.get("cluster", {})
    secret = section.get("secret") if isinstance(section, dict) else None
    if secret is not None and not isinstance(secret, str):
        raise ClusterError(f"cluster file {path}: [cluster] secret must be a string")
    for what, addr in (("nbd", config.nbd), ("api", config.api)):
        try:
            split_hostport(addr)
        except ClusterError as e:
            raise ClusterError(f"cluster file {path}, [host] {what}: {e}") from None
    if config.data_path not in ("native", "python"):
        raise ClusterError(f"cluster file {path}: [host] data_path must be \"native\" or "
                           f"\"python\", not {config.data_path!r}")
    if config.socket is not None and not config.socket.strip():
        raise ClusterError(f"cluster file {path}: [host] socket must be a path, not empty")
    if config.hold_timeout < 0 or config.io_timeout <= 0:
        raise ClusterError(f"cluster file {path}: [host] hold_timeout must be >= 0 and "
                           "io_timeout > 0")
    names = config.nodes if config.nodes is not None else list(nodes)
    if not names:
        raise ClusterError(f"cluster file {path}: no nodes for the host agent to use")
    chosen: dict[str, NodeAddr] = {}
    for name in names:
        if name not in nodes:
            known = ", ".join(sorted(nodes)) or "none"
            raise ClusterError(f"cluster file {path}: [host] nodes names {name!r}, which is "
                               f"not a [nodes.{name}] table (nodes: {known})")
        try:
            split_hostport(nodes[name].nbd)
            split_hostport(nodes[name].api)
        except ClusterError as e:
            raise ClusterError(f"cluster file {path}, node {name}: {e}") from None
        chosen[name] = nodes[name]
    name = section.get("name", "twinvol") if isinstance(section, dict) else "twinvol"
    for node_addr in chosen.values():
        if node_addr.api_tls is None and tls is not None:
            node_addr.api_tls = tls.api
    setup = HostSetup(config, chosen, secret, path, str(name), tls,
                      isinstance(section, dict) and section.get("metrics_open") is True, limits)
    if config.tls_psk and setup.client_tls is TlsMode.OFF:
        raise ClusterError(f"cluster file {path}: [host] tls_psk needs tls = \"allow\" or "
                           "\"require\"")
    if tls is None and ((setup.client_tls is not TlsMode.OFF and not config.tls_psk)
                        or any(setup.node_tls(n) and not chosen[n].tls_psk for n in chosen)):
        raise ClusterError(f"cluster file {path}: TLS on the host agent or its nodes needs a "
                           "[tls] table with dir = the certificate directory")
    return setup


__all__ = ["UNIX_PATH_MAX", "HostConfig", "HostSetup", "NodeAddr", "load"]

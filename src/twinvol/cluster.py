"""The cluster file (TOML): which nodes exist, their sites, addresses and data directories.

Example::

    [cluster]
    name = "demo"

    [nodes.A]
    site = "A"
    nbd = "127.0.0.1:10809"
    api = "127.0.0.1:8701"
    data_dir = "A"          # relative paths are relative to this file
"""

from __future__ import annotations

import os
import tomllib
from typing import Any, TypeVar

import msgspec
import tomli_w

from twinvol.nbd.constants import MAX_OPTIONS
from twinvol.nbd.server_events import TlsMode
from twinvol.sizes import SizeError, parse_size

T = TypeVar("T")

# The HTTP header with which a node names itself in every API answer.
NODE_HEADER = "X-Twinvol-Node"


class ClusterError(Exception):
    """The cluster file is missing, unreadable or inconsistent."""


class FaultConfig(msgspec.Struct, forbid_unknown_fields=True):
    """Fault detection thresholds: `[faults]` for every node, `[nodes.X.faults]` to
    override single fields for one node."""

    capacity_warn: float = 0.90  # fraction of the data directory's space in use
    capacity_critical: float = 0.97
    capacity_quota: int | str | None = None  # bytes the data directory may use ("64M")
    check_interval: float = 1.0  # seconds between capacity and disk probes
    slow_io: float = 1.0  # seconds: a flush or disk probe slower than this is slow I/O
    flap_count: int = 3  # peer link losses within flap_window that make it "flapping"
    flap_window: float = 30.0
    rate_burst: int = 20  # reports of one kind per rate_window before they are summarised
    rate_window: float = 10.0
    retention: int = 10000  # reports kept in each node's outbox and log


class TlsConfig(msgspec.Struct, forbid_unknown_fields=True):
    """`[tls]`: where the certificates are (`twinvol certs`) and who must use them."""

    dir: str  # ca-cert.pem, server-*.pem, client-*.pem, nodes/NAME/ (relative: to this file)
    nbd: TlsMode = TlsMode.OFF  # NBD on every node and the host agent ([nodes.X] tls overrides)
    verify_clients: bool = False  # NBD clients must show a certificate signed by the CA
    peer: bool = False  # peer links use mutual TLS; each node proves its name (nodes/NAME/)
    api: bool = False  # node HTTP APIs are HTTPS with client certificates (mutual TLS)


class LimitsConfig(msgspec.Struct, forbid_unknown_fields=True):
    """`[limits]`: what one NBD listener accepts before it refuses (each refusal is
    logged once, as one line)."""

    nbd_negotiation_timeout: float = 30.0  # seconds from accept to transmission
    nbd_max_connections: int = 1024  # per node
    nbd_max_per_client: int = 128  # per client address
    nbd_max_options: int = MAX_OPTIONS  # options in one negotiation


class NodeConfig(msgspec.Struct, forbid_unknown_fields=True):
    site: str
    nbd: str
    api: str
    data_dir: str
    peer: str | None = None  # replication listen address; nodes without one cannot pair
    faults: dict[str, Any] | None = None  # overrides of [faults] for this node
    tls: TlsMode | None = None  # NBD TLS of this node (default: [tls] nbd)
    api_tls: bool | None = None  # its API is HTTPS (default: [tls] api)
    tls_psk: str | None = None  # NBD TLS with pre-shared keys from this psktool file

    @property
    def peer_hostport(self) -> tuple[str, int]:
        assert self.peer is not None
        return split_hostport(self.peer)

    @property
    def nbd_hostport(self) -> tuple[str, int]:
        return split_hostport(self.nbd)

    @property
    def api_hostport(self) -> tuple[str, int]:
        return split_hostport(self.api)

    @property
    def api_url(self) -> str:
        return http_url(self.api, https=bool(self.api_tls))

    def nbd_uri(self, export: str = "") -> str:
        host, port = self.nbd_hostport
        return f"nbd://{_urlhost(host)}:{port}/{export}"


class VmHostConfig(msgspec.Struct, forbid_unknown_fields=True):
    """A hypervisor host (`[vmhosts.H]`): where its manager listens and which real
    resources it registers under logical names (see `twinvol.vm`)."""

    site: str
    api: str                 # the host manager's HTTP API (HOST:PORT)
    storage: str             # node serving its volumes (`volume:NAME`), or "host" (the agent)
    data_dir: str            # VM definitions, QMP sockets, console logs
    cpus: int = 4            # limits: vCPUs and memory of all its running VMs together
    memory: str = "4G"
    networks: dict[str, str] = msgspec.field(default_factory=dict)  # name -> "user"|"isolated"
    accel: str = "auto"      # "kvm", "tcg" or "auto" (KVM when usable)
    api_tls: bool | None = None  # its API is HTTPS (default: [tls] api)

    @property
    def api_url(self) -> str:
        return http_url(self.api, https=bool(self.api_tls))


class ClusterSection(msgspec.Struct, forbid_unknown_fields=True):
    name: str = "twinvol"
    secret: str = ""  # shared by every component; peers and API clients must prove it
    metrics_open: bool = False  # /metrics answers without a token (else a read token)


class ClusterConfig(msgspec.Struct, forbid_unknown_fields=True):
    nodes: dict[str, NodeConfig]
    cluster: ClusterSection = msgspec.field(default_factory=ClusterSection)
    faults: FaultConfig = msgspec.field(default_factory=FaultConfig)
    # Sections owned by the witness and the host agent, validated by them.
    witness: dict[str, Any] | None = None
    host: dict[str, Any] | None = None
    vmhosts: dict[str, VmHostConfig] = msgspec.field(default_factory=dict)
    tls: TlsConfig | None = None
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    path: str = ""  # where it was loaded from (not stored in the file)

    def _entry(self, table: dict[str, T], name: str, what: str, key: str) -> T:
        """table[name], or a ClusterError naming what the file does have."""
        try:
            return table[name]
        except KeyError:
            known = ", ".join(sorted(table)) or "none"
            raise ClusterError(f"{what} {name!r} is not in cluster file {self.path} "
                               f"({key}: {known})") from None

    def node(self, name: str) -> NodeConfig:
        return self._entry(self.nodes, name, "node", "nodes")

    def fault_config(self, name: str) -> FaultConfig:
        """`[faults]` with this node's `[nodes.NAME.faults]` overrides applied."""
        over = self.node(name).faults or {}
        merged = {**msgspec.to_builtins(self.faults), **over}
        try:
            cfg = msgspec.convert(merged, FaultConfig)
            if cfg.capacity_quota is not None:
                try:
                    parse_size(str(cfg.capacity_quota))
                except SizeError as e:
                    raise ClusterError(f"capacity_quota: {e}") from None
        except msgspec.ValidationError as e:
            raise ClusterError(f"cluster file {self.path}, faults of node {name}: {e}") from None
        return cfg

    def data_dir(self, name: str) -> str:
        d = self.node(name).data_dir
        return d if os.path.isabs(d) else os.path.join(os.path.dirname(self.path), d)

    def tls_dir(self) -> str | None:
        if self.tls is None:
            return None
        d = self.tls.dir
        return d if os.path.isabs(d) else os.path.join(os.path.dirname(self.path), d)

    def relative(self, p: str) -> str:
        """A path of the cluster file, resolved against its directory."""
        return p if os.path.isabs(p) else os.path.join(os.path.dirname(self.path), p)

    def nbd_tls(self, name: str) -> TlsMode:
        """The NBD TLS mode of node `name`."""
        own = self.node(name).tls
        if own is not None:
            return own
        return self.tls.nbd if self.tls is not None else TlsMode.OFF

    def vmhost(self, name: str) -> VmHostConfig:
        return self._entry(self.vmhosts, name, "hypervisor host", "vmhosts")

    @property
    def https_apis(self) -> bool:
        """[tls] api: every HTTP API (nodes, host agent, witness, VM hosts) is HTTPS."""
        return self.tls is not None and self.tls.api

    def service_url(self, addr: str) -> str:
        """The base URL of the host agent's or the witness's API at `addr`."""
        return http_url(addr, https=self.https_apis)


def split_hostport(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ClusterError(f"address {value!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def _urlhost(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def http_url(addr: str, *, https: bool = False) -> str:
    """`http://HOST:PORT` (or https) for a HOST:PORT address (IPv6 hosts bracketed)."""
    host, port = split_hostport(addr)
    return f"{'https' if https else 'http'}://{_urlhost(host)}:{port}"


def read_toml(path: str | None) -> tuple[str, dict[str, Any]]:
    """Read a cluster file as plain TOML: (absolute path, tables). `None` means
    `$TWINVOL_CLUSTER`. Components read their own tables from it."""
    path = path or os.environ.get("TWINVOL_CLUSTER")
    if not path:
        raise ClusterError("no cluster file: pass --cluster FILE or set TWINVOL_CLUSTER")
    path = os.path.abspath(path)
    try:
        with open(path, "rb") as f:
            return path, tomllib.load(f)
    except FileNotFoundError:
        raise ClusterError(f"cluster file {path} does not exist") from None
    except OSError as e:
        raise ClusterError(f"cannot read cluster file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ClusterError(f"cluster file {path} is not valid TOML: {e}") from None


def load(path: str | None) -> ClusterConfig:
    """Load and validate a cluster file; `None` means `$TWINVOL_CLUSTER`."""
    path, raw = read_toml(path)
    try:
        cfg = msgspec.convert(raw, ClusterConfig)
    except msgspec.ValidationError as e:
        raise ClusterError(explain(path, raw, e)) from None
    if not cfg.nodes:
        raise ClusterError(f"cluster file {path} names no nodes")
    _check_unique(path, cfg)
    for name, node in cfg.nodes.items():
        try:
            split_hostport(node.nbd)
            split_hostport(node.api)
            if node.peer is not None:
                split_hostport(node.peer)
        except ClusterError as e:
            raise ClusterError(f"cluster file {path}, node {name}: {e}") from None
    for name, vh in cfg.vmhosts.items():
        try:
            split_hostport(vh.api)
        except ClusterError as e:
            raise ClusterError(f"cluster file {path}, vmhost {name}: {e}") from None
        if vh.storage not in cfg.nodes and not (vh.storage == "host" and cfg.host):
            raise ClusterError(f"cluster file {path}, vmhost {name}: storage {vh.storage!r} "
                               "is neither a node nor \"host\" (with a [host] table)")
    cfg.path = path
    for vh in cfg.vmhosts.values():
        if vh.api_tls is None and cfg.https_apis:
            vh.api_tls = True
    for name in cfg.nodes:
        cfg.fault_config(name)
        node = cfg.nodes[name]
        if node.api_tls is None and cfg.tls is not None and cfg.tls.api:
            node.api_tls = True
        if node.tls_psk and cfg.nbd_tls(name) is TlsMode.OFF:
            raise ClusterError(f"cluster file {path}, node {name}: tls_psk needs tls = "
                               "\"allow\" or \"require\"")
        if ((cfg.nbd_tls(name) is not TlsMode.OFF and not node.tls_psk) or node.api_tls) \
                and cfg.tls is None:
            raise ClusterError(f"cluster file {path}, node {name}: TLS (tls = "
                               f"\"{cfg.nbd_tls(name)}\", api_tls = {bool(node.api_tls)}) "
                               "needs a [tls] table with dir = the certificate directory "
                               "(`twinvol certs init`)")
    return cfg


def _check_unique(path: str, cfg: ClusterConfig) -> None:
    """Two components on one address would answer for each other (node B showing A's pid):
    refuse the file instead."""
    seen: dict[tuple[str, int], str] = {}
    owners: list[tuple[str, str | None]] = []
    for name, node in cfg.nodes.items():
        owners += [(f"node {name} nbd", node.nbd), (f"node {name} api", node.api),
                   (f"node {name} peer", node.peer)]
    owners += [(f"vmhost {name} api", vh.api) for name, vh in cfg.vmhosts.items()]
    for who, addr in owners:
        if addr is None:
            continue
        key = split_hostport(addr)
        if key in seen:
            raise ClusterError(f"cluster file {path}: {seen[key]} and {who} have the same "
                               f"address {addr}; each needs its own")
        seen[key] = who


_TABLES: dict[str, type[msgspec.Struct]] = {"nodes": NodeConfig, "vmhosts": VmHostConfig}
_SECTIONS: dict[str, type[msgspec.Struct]] = {"cluster": ClusterSection,
                                              "faults": FaultConfig, "tls": TlsConfig,
                                              "limits": LimitsConfig}


def explain(path: str, raw: dict[str, Any], err: msgspec.ValidationError) -> str:
    """msgspec's "unknown field `x` - at `$.nodes[...]`" as the table, line and key an
    operator edits: "line 7, [nodes.B]: unknown key `sitee` (known: site, ...)"."""
    tables: list[tuple[str, Any, type[msgspec.Struct] | None]] = [
        (f"{t}.{name}", entry, kind) for t, kind in _TABLES.items()
        for name, entry in (raw.get(t) or {}).items() if isinstance(raw.get(t), dict)]
    tables += [(t, raw.get(t), kind) for t, kind in _SECTIONS.items() if t in raw]
    for table, entry, kind in tables:
        if kind is None:
            continue
        try:
            msgspec.convert(entry, kind)
        except msgspec.ValidationError as e:
            return _describe(path, table, str(e), kind)
    return _describe(path, "", str(err), ClusterConfig)


def _describe(path: str, table: str, message: str, kind: type[msgspec.Struct]) -> str:
    text, _, where = message.partition(" - at `$")
    where = where.rstrip("`").lstrip(".")
    known = ", ".join(f.name for f in msgspec.structs.fields(kind) if f.name != "path")
    key = ""
    if text.startswith("Object contains unknown field `"):
        key = text.split("`")[1]
        text = f"unknown key `{key}` (known keys: {known})"
    elif text.startswith("Object missing required field `"):
        text = f"missing key `{text.split('`')[1]}`"
    else:
        key = where.split(".")[-1] if where else ""
        text = f"`{where}`: {text}" if where else text
    header = f"[{table}]" if table else "top level"
    line = _line_of(path, table, key)
    at = f"line {line}, " if line else ""
    return f"cluster file {path}, {at}{header}: {text}"


def _line_of(path: str, table: str, key: str) -> int | None:
    """The line of `key = ...` under the `[table]` header (best effort: None if not found)."""
    if not key:
        return None
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    inside = not table
    for no, text in enumerate(lines, 1):
        stripped = text.strip()
        if stripped.startswith("["):
            header = stripped.strip("[] ")
            if not table and (header == key or header.startswith(key + ".")):
                return no  # an unknown top-level table
            inside = header == table
        elif inside and stripped.split("=")[0].strip().strip('"') == key:
            return no
    return None


def dump(cfg: ClusterConfig, path: str) -> None:
    """Write a cluster file atomically."""
    data: dict[str, Any] = msgspec.to_builtins(cfg)
    data.pop("path", None)
    if data.get("limits") == msgspec.to_builtins(LimitsConfig()):
        data.pop("limits", None)
    for key in ("witness", "host", "tls"):
        if data.get(key) is None:
            data.pop(key, None)
    if not data.get("vmhosts"):
        data.pop("vmhosts", None)
    for vh in data.get("vmhosts", {}).values():
        if vh.get("api_tls") is None or cfg.https_apis:
            vh.pop("api_tls", None)
    if data.get("faults") == msgspec.to_builtins(FaultConfig()):
        data.pop("faults", None)
    elif data.get("faults"):
        data["faults"] = {k: v for k, v in data["faults"].items() if v is not None}
    for node in data["nodes"].values():
        for key in ("peer", "faults", "tls", "api_tls", "tls_psk"):
            if node.get(key) is None or (key == "api_tls" and cfg.tls and cfg.tls.api):
                node.pop(key, None)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        tomli_w.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)

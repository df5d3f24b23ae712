"""SSL contexts from a certificate directory (`twinvol certs`), and a node's NBD guard.

A node uses its own certificate (`nodes/NAME/server-*.pem`) when there is one, else the
shared `server-*.pem`; TLS 1.2 is the floor (the NBD spec's MUST).
"""

from __future__ import annotations

import asyncio
import os
import ssl
import urllib.request

from twinvol.cluster import ClusterConfig, ClusterError
from twinvol.nbd.guard import Admission, Guard
from twinvol.nbd.server_events import TlsMode
from twinvol.tls.certs import CA_CERT, NODE_PREFIX
from twinvol.tls.psk import PskContext, PskError


def _server_files(directory: str, node: str | None) -> tuple[str, str]:
    if node is not None:
        own = os.path.join(directory, "nodes", node)
        if os.path.exists(os.path.join(own, "server-cert.pem")):
            return os.path.join(own, "server-cert.pem"), os.path.join(own, "server-key.pem")
    return os.path.join(directory, "server-cert.pem"), os.path.join(directory, "server-key.pem")


def server_context(directory: str, *, node: str | None = None,
                   verify_clients: bool = False) -> ssl.SSLContext:
    """A server context; with `verify_clients` a client must show a certificate signed by
    the directory's CA (and valid now), or the handshake fails."""
    cert, key = _server_files(directory, node)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
        if verify_clients:
            ctx.load_verify_locations(os.path.join(directory, CA_CERT))
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as e:
        raise ClusterError(f"TLS certificates in {directory} cannot be used: {e} (make them "
                           "with `twinvol certs init` and `twinvol certs issue`)") from None
    return ctx


def client_context(directory: str, *, node: str | None = None) -> ssl.SSLContext:
    """A client context trusting the directory's CA and showing a client certificate (the
    node's own when `node` is given)."""
    base = os.path.join(directory, "nodes", node) if node is not None else directory
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_verify_locations(os.path.join(directory, CA_CERT))
        cert = os.path.join(base, "client-cert.pem")
        if os.path.exists(cert):
            ctx.load_cert_chain(cert, os.path.join(base, "client-key.pem"))
    except (OSError, ssl.SSLError) as e:
        raise ClusterError(f"TLS certificates in {directory} cannot be used: {e}") from None
    return ctx


def nbd_guard(cluster: ClusterConfig, node: str) -> Guard:
    """The NBD listener policy of `node` from the cluster file's [tls] and [limits]."""
    limits = cluster.limits
    mode = cluster.nbd_tls(node)
    ctx = psk = None
    directory = cluster.tls_dir()
    psk_file = cluster.node(node).tls_psk
    if mode is not TlsMode.OFF and psk_file:
        try:
            psk = PskContext(cluster.relative(psk_file))
        except PskError as e:
            raise ClusterError(str(e)) from None
    elif mode is not TlsMode.OFF:
        assert directory is not None and cluster.tls is not None  # checked by cluster.load
        ctx = server_context(directory, node=node, verify_clients=cluster.tls.verify_clients)
    return Guard(tls=mode, ssl=ctx, psk=psk, negotiation_timeout=limits.nbd_negotiation_timeout,
                 max_options=limits.nbd_max_options,
                 admission=Admission(limits.nbd_max_connections, limits.nbd_max_per_client))


def peer_contexts(cluster: ClusterConfig, node: str
                  ) -> tuple[ssl.SSLContext, ssl.SSLContext] | None:
    """(accepting, dialing) contexts for `node`'s peer links when [tls] peer is on: both
    sides show their node certificate and require one signed by the cluster CA. Names
    are checked by the link itself (`cert_node`), against the node it says it is."""
    if cluster.tls is None or not cluster.tls.peer:
        return None
    directory = cluster.tls_dir()
    assert directory is not None
    own = os.path.join(directory, "nodes", node)
    if not os.path.exists(os.path.join(own, "server-cert.pem")):
        raise ClusterError(f"[tls] peer = true but node {node} has no certificate in {own} "
                           f"(`twinvol certs issue node --name {node} --dir {directory}`)")
    accept = server_context(directory, node=node, verify_clients=True)
    dial = client_context(directory, node=node)
    dial.check_hostname = False  # the name is checked against the cluster file instead
    dial.verify_mode = ssl.CERT_REQUIRED
    return accept, dial


def cert_node(peercert: dict[str, object] | None) -> str | None:
    """The node a verified certificate names (subject CN `twinvol-node:NAME`), if any."""
    for rdn in (peercert or {}).get("subject", ()):  # type: ignore[attr-defined]
        for key, value in rdn:
            if key == "commonName" and str(value).startswith(NODE_PREFIX):
                return str(value)[len(NODE_PREFIX):]
    return None


def cert_mismatch(transport: asyncio.BaseTransport | None, name: str) -> str | None:
    """Over TLS, why the peer's certificate does not prove it is node `name` (None if it
    does, or if the link is plain)."""
    if transport is None or transport.get_extra_info("ssl_object") is None:
        return None
    named = cert_node(transport.get_extra_info("peercert"))
    if named == name:
        return None
    what = f"node {named!r}" if named else "no node"
    return f"the peer's certificate names {what}, but it says it is node {name!r}"


def api_contexts(cluster: ClusterConfig, node: str | None = None
                 ) -> tuple[ssl.SSLContext | None, ssl.SSLContext | None]:
    """(server, client) contexts for node APIs over HTTPS with client certificates
    ([tls] api): the server side of `node` (None when not given or its API is plain), and
    a client side showing `node`'s certificate, or the directory's client certificate."""
    directory = cluster.tls_dir()
    if directory is None or not any(n.api_tls for n in cluster.nodes.values()):
        return None, None
    own = node is not None and cluster.node(node).api_tls
    server = server_context(directory, node=node, verify_clients=True) if own else None
    has_own = node is not None and os.path.exists(os.path.join(directory, "nodes", node))
    return server, client_context(directory, node=node if has_own else None)


def use_for_urllib(cluster: ClusterConfig) -> None:
    """Make this process's urllib calls (the CLI, readiness probes) show the client
    certificate and trust the cluster CA, when any API is HTTPS."""
    _, client = api_contexts(cluster)
    directory = cluster.tls_dir()
    if client is None and cluster.https_apis and directory is not None:
        client = client_context(directory)
    if client is not None:
        urllib.request.install_opener(
            urllib.request.build_opener(urllib.request.HTTPSHandler(context=client)))

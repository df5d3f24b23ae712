"""The host agent's TLS and API access, from the cluster file's [tls] (see twinvol.tls):
the listener's policy towards clients, NBD TLS towards the nodes that want it, HTTPS to
node APIs and on its own API, scoped tokens there."""

from __future__ import annotations

import os
import ssl
from typing import Any

import aiohttp
from aiohttp import web

from twinvol.api_tokens import service_access
from twinvol.cluster import ClusterError
from twinvol.host import HostSetup
from twinvol.host.nodes import HttpNodeLink, NodeLink
from twinvol.nbd.guard import Admission, Guard
from twinvol.nbd.server_events import TlsMode
from twinvol.tls.context import client_context, server_context
from twinvol.tls.https import service_server
from twinvol.tls.psk import PskClientContext, PskContext, PskError


def api_session(setup: HostSetup) -> aiohttp.ClientSession:
    """The agent's HTTP session to the nodes: with the client certificate when their
    APIs are HTTPS ([tls] api)."""
    ctx: ssl.SSLContext | None = None
    if setup.tls_dir and any(a.api_tls for a in setup.nodes.values()):
        ctx = client_context(setup.tls_dir)
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx) if ctx else None)


def limited(setup: HostSetup, *, unix: bool = False) -> Guard:
    """A plain listener guard with the cluster file's [limits], as a node applies them
    (on the Unix socket every client has the same address: only the total is capped)."""
    lim = setup.limits
    per_client = lim.nbd_max_connections if unix else lim.nbd_max_per_client
    return Guard(negotiation_timeout=lim.nbd_negotiation_timeout,
                 max_options=lim.nbd_max_options,
                 admission=Admission(lim.nbd_max_connections, per_client,
                                     who="the host agent"))


def apply_tls(setup: HostSetup, links: dict[str, NodeLink]) -> Guard:
    """The TCP listener's guard (limits and TLS policy), and a client context on each
    node link whose node wants NBD over TLS (the directory's client certificate)."""
    guard = limited(setup)
    directory = setup.tls_dir
    for name, link in links.items():  # PSK nodes: the first identity of their key file
        psk_file = setup.nodes[name].tls_psk
        if isinstance(link, HttpNodeLink) and setup.node_tls(name) and psk_file:
            try:
                link.tls = PskClientContext(setup._relative(psk_file))
            except PskError as e:
                raise ClusterError(f"node {name}: {e}") from None
    if setup.config.tls_psk and setup.client_tls is not TlsMode.OFF:
        try:
            guard.psk = PskContext(setup._relative(setup.config.tls_psk))
        except PskError as e:
            raise ClusterError(str(e)) from None
        guard.tls = setup.client_tls
    if directory is None:
        return guard
    for name, link in links.items():
        if isinstance(link, HttpNodeLink) and setup.node_tls(name) and link.tls is None:
            link.tls = client_context(directory)
    if setup.client_tls is not TlsMode.OFF and guard.psk is None:
        assert setup.tls is not None
        guard.tls = setup.client_tls
        guard.ssl = server_context(directory, verify_clients=setup.tls.verify_clients)
    return guard


def plain_only(guard: Guard, links: dict[str, NodeLink]) -> bool:
    """The native relay moves plain TCP: usable only with TLS off on both sides."""
    return guard.tls is TlsMode.OFF and not any(getattr(link, "tls", None)
                                                 for link in links.values())


def api_access(setup: HostSetup) -> tuple[ssl.SSLContext | None, tuple[Any, web.RouteTableDef]]:
    """The agent API's server context ([tls] api: HTTPS, callers show a certificate of the
    CA) and its access guard: tokens in `host-tokens.json`, `host-audit.log`, both next to
    the cluster file."""
    https = setup.tls_dir if setup.tls is not None and setup.tls.api else None
    access = service_access(os.path.dirname(setup.path), setup.secret, "host agent", prefix="host-",
                            metrics_open=setup.metrics_open)
    return service_server(https), access

"""`twinvol host run|status`: the host agent (multipath NBD proxy)."""

from __future__ import annotations

import json
import os
import ssl
import urllib.error
import urllib.request
from typing import Any

import typer
from rich.table import Table

from twinvol import logs, sdnotify
from twinvol.cli.common import TOKEN_ENV, CliError, ClusterOpt, JsonOpt, console, emit_json
from twinvol.cluster import ClusterError, http_url
from twinvol.tls.https import service_client

app = typer.Typer(help="Run and inspect the host agent (multipath NBD proxy).",
                  no_args_is_help=True)


def _setup(cluster: str | None) -> Any:
    from twinvol import host

    try:
        return host.load(cluster)
    except ClusterError as e:
        raise CliError(str(e)) from None


def _api(setup: Any) -> tuple[str, ssl.SSLContext | None]:
    """The agent API's base URL, and the client context when it is HTTPS ([tls] api)."""
    https = setup.tls_dir if setup.tls is not None and setup.tls.api else None
    try:
        return http_url(setup.config.api, https=https is not None), service_client(https)
    except ClusterError as e:
        raise CliError(str(e)) from None


@app.command()
def run(cluster: str = ClusterOpt) -> None:
    """Run the host agent in the foreground (stops on SIGTERM/SIGINT)."""
    from twinvol.host.agent import AgentStartError
    from twinvol.host.process import run as run_agent

    setup = _setup(cluster)
    logs.setup("host")
    base, ctx = _api(setup)
    sdnotify.ready_when_answering(f"{base}/api/v1/health", what="host agent", context=ctx)
    try:
        run_agent(setup)
    except AgentStartError as e:
        raise CliError(f"host agent cannot start: {e}") from None


@app.command()
def status(cluster: str = ClusterOpt, json_out: bool = JsonOpt) -> None:
    """Show the host agent's exports, paths and counters."""
    setup = _setup(cluster)
    base, ctx = _api(setup)
    url = f"{base}/api/v1/status"
    token = os.environ.get(TOKEN_ENV) or setup.secret
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"}
                                 if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10, context=ctx) as r:
            st = json.loads(r.read())
    except (urllib.error.URLError, OSError) as e:
        raise CliError(f"host agent ({url}) is not reachable: {getattr(e, 'reason', e)}; is "
                       "it running (`twinvol host run`)?") from None
    if json_out:
        emit_json(st)
        return
    table = Table("export", "sessions", "node", "path", "io mode", "requests", "held",
                  "failovers")
    for name, ex in st["exports"].items():
        for i, (node, p) in enumerate(ex["paths"].items()):
            colour = {"up": "green", "blocked": "yellow", "down": "red",
                      "mismatch": "red"}.get(p["state"], "white")
            table.add_row(name if i == 0 else "", str(ex["sessions"]) if i == 0 else "", node,
                          f"[{colour}]{p['state']}[/]", p["io_mode"] or "-",
                          str(p["requests"]), str(ex["held"]) if i == 0 else "",
                          str(ex["failovers"]) if i == 0 else "")
    console.print(table)
    console.print(f"held {st['held']}  failovers {st['failovers']}  retries {st['retries']}  "
                  f"connections {st['connections']}  data path {st.get('data_path', '?')}")
    if st.get("socket"):
        console.print(f"unix socket {st['socket']}", highlight=False)
    for export, sw in sorted((st.get("switching") or {}).items()):
        console.print(f"switched: export {export}: {sw['source']} -> {sw['target']}",
                      highlight=False)

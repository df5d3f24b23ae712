"""`twinvol dashboard`: serve the read-only web dashboard of a cluster."""

from __future__ import annotations

import typer

from twinvol import logs, sdnotify
from twinvol.cli.common import ClusterOpt, UsageError, load_cluster
from twinvol.cluster import ClusterError, split_hostport


def dashboard(
    cluster: str = ClusterOpt,
    listen: str = typer.Option("127.0.0.1:8780", "--listen",
                               help="HOST:PORT to serve the page on (keep it on a trusted "
                                    "network: the page shows the whole cluster)."),
    interval: float = typer.Option(1.0, "--interval", min=0.2,
                                   help="Seconds between the page's updates."),
) -> None:
    """Serve a read-only web page of the cluster (nodes, pairs, host paths, faults, VMs)
    that updates itself; runs in the foreground until Ctrl-C/SIGTERM."""
    from twinvol.dashboard import run

    cfg = load_cluster(cluster)
    try:
        host, port = split_hostport(listen)
    except ClusterError as e:
        raise UsageError(f"--listen: {e}") from None
    logs.setup("dashboard")
    sdnotify.ready_when_answering(f"http://{listen}/api/v1/health", what="dashboard")
    run(cfg, host, port, interval)

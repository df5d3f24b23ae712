"""`twinvol up --tls`: certificates for the demo cluster and the `nbds://` view of its
ready object. Kept apart from cli/up.py so the default output stays exactly as it is."""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import quote

from twinvol.cli.common import CliError
from twinvol.cluster import ClusterConfig, TlsConfig
from twinvol.nbd.server_events import TlsMode
from twinvol.tls.certs import setup_dir
from twinvol.tls.context import use_for_urllib

__all__ = ["check", "decorate", "enable", "use_for_urllib"]

TLS_DIR = "tls"  # under the --dir, next to the cluster file


def enable(cfg: ClusterConfig, directory: str) -> None:
    """Make the CA and every certificate, and turn on TLS everywhere: NBD required (with
    client certificates) on the nodes and the host agent, mutual TLS on peer links and
    on the nodes' HTTP APIs."""
    hosts = {name: ["127.0.0.1", "localhost"] for name in cfg.nodes}
    setup_dir(os.path.join(directory, TLS_DIR), hosts, name="twinvol-up")
    cfg.tls = TlsConfig(dir=TLS_DIR, nbd=TlsMode.REQUIRE, verify_clients=True, peer=True,
                        api=True)


def check(cfg: ClusterConfig, directory: str, wanted: bool) -> None:
    if wanted and cfg.tls is None:
        raise CliError(f"the cluster in {directory} was made without TLS: run without --tls "
                       "or choose another --dir", exit_code=2)


def decorate(ready: dict[str, Any], cfg: ClusterConfig) -> dict[str, Any]:
    """With TLS: `"tls": {"dir"}` and nbds:// URIs (with tls-certificates=DIR, as libnbd
    takes them); without, the object unchanged."""
    directory = cfg.tls_dir()
    if directory is None:
        return ready
    q = f"?tls-certificates={quote(directory)}"

    def secure(uri: str) -> str:
        return "nbds://" + uri.removeprefix("nbd://") + q if uri.startswith("nbd://") else uri

    out = {**ready, "tls": {"dir": directory}}
    out["volumes"] = {k: secure(v) for k, v in ready["volumes"].items()}
    out["nodes"] = {n: {**v, "nbd": secure(v["nbd"])} for n, v in ready["nodes"].items()}
    if ready.get("host"):
        out["host"] = {**ready["host"], "nbd": secure(ready["host"]["nbd"])}
    return out

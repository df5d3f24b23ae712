"""`twinvol witness run`: the builtin witness service, in the foreground; `twinvol witness
status`: which backend decides, and what it holds for each pair."""

from __future__ import annotations

import asyncio
from typing import Any

import typer

from twinvol import logs, sdnotify
from twinvol.cli.common import CliError, ClusterOpt, JsonOpt, console, emit_json
from twinvol.cluster import ClusterError, http_url
from twinvol.tls.https import service_client
from twinvol.witness.logic import DEFAULT_TAKEOVER_AFTER

app = typer.Typer(help="Run the witness that decides which side of a broken pair writes.",
                  no_args_is_help=True)


@app.callback()
def witness() -> None:
    """Run the witness that decides which side of a broken pair keeps writing."""


@app.command()
def run(
    cluster: str = ClusterOpt,
    takeover_after: float = typer.Option(
        DEFAULT_TAKEOVER_AFTER, "--takeover-after", metavar="SECONDS",
        help="How long a primary must be silent before its secondary may take over."),
) -> None:
    """Run the witness configured in the cluster file (stops on SIGTERM/SIGINT)."""
    from twinvol.witness import witness_settings
    from twinvol.witness.server import WitnessStartError
    from twinvol.witness.server import run as run_witness

    if not takeover_after > 0:
        raise CliError(f"--takeover-after must be positive, not {takeover_after:g}")
    from twinvol.witness import Backend

    try:
        settings = witness_settings(cluster)
    except ClusterError as e:
        raise CliError(str(e)) from None
    if settings.config.backend is Backend.ETCD:
        raise CliError(f"cluster file {settings.cluster_path} uses the etcd backend "
                       f"({', '.join(settings.config.endpoints)}): there is no witness "
                       "process to run; the nodes ask etcd directly")
    logs.setup("witness")
    sdnotify.ready_when_answering(
        http_url(settings.config.addr, https=settings.tls_dir is not None) + "/api/v1/health",
        settings.secret, what="witness", context=service_client(settings.tls_dir))
    try:
        run_witness(settings, takeover_after)
    except WitnessStartError as e:
        raise CliError(f"witness cannot start: {e}") from None


@app.command()
def status(cluster: str = ClusterOpt, json_out: bool = JsonOpt) -> None:
    """Which backend decides for the broken pairs, and what it holds for each pair."""
    from twinvol.witness import witness_settings

    try:
        settings = witness_settings(cluster)
    except ClusterError as e:
        raise CliError(str(e)) from None
    view = asyncio.run(_status(settings))
    if json_out:
        emit_json(view)
        return
    where = ", ".join(view["endpoints"]) if view["backend"] == "etcd" else view["addr"]
    console.print(f"witness: {view['backend']} ({where})", highlight=False)
    for m in view.get("members", []):
        state = ("leader" if m.get("leader") else "member") if m["reachable"] else \
            f"unreachable: {m['error']}"
        console.print(f"  etcd {m['endpoint']}: {state}", highlight=False)
    for n, alive in view["nodes"].items():
        console.print(f"  node {n}: {'alive' if alive else 'silent'}", highlight=False)
    if not view["pairs"]:
        console.print("  no pair is held: every pair is mirrored or undecided", highlight=False)
    for p in view["pairs"]:
        console.print(f"  pair {p['pair']}: held by {p['holder']} (partner {p['partner']}, "
                      f"generation {p['generation']})", highlight=False)


async def _status(settings: Any) -> dict[str, Any]:
    """The status view of either backend (raises CliError when it cannot be read)."""
    from twinvol.witness import Backend
    from twinvol.witness.client import HttpWitness, WitnessError

    cfg = settings.config.resolve(settings.cluster_path)
    if cfg.backend is Backend.ETCD:
        from twinvol.cluster import load
        from twinvol.witness.etcd import EtcdWitness

        name = load(settings.cluster_path).cluster.name
        w: Any = EtcdWitness(cfg, name, settings.nodes)
        try:
            members = await w.members()
            return {"backend": "etcd", "endpoints": cfg.endpoints,
                    "prefix": w.prefix, "members": members,
                    "nodes": await w.alive(), "pairs": await w.pairs()}
        except WitnessError as e:
            raise CliError(f"etcd witness: {e}") from None
        finally:
            await w.close()
    w = HttpWitness(cfg.addr, settings.secret, ssl=service_client(settings.tls_dir))
    try:
        st = await w.status()
        return {"backend": "builtin", "addr": cfg.addr, "pid": st["pid"],
                "nodes": {n: not v["gone"] for n, v in st["nodes"].items()},
                "pairs": await w.pairs()}
    except WitnessError as e:
        raise CliError(str(e)) from None
    finally:
        await w.close()

"""`twinvol witness run`: the builtin witness service, in the foreground."""

from __future__ import annotations

import typer

from twinvol import logs, sdnotify
from twinvol.cli.common import CliError, ClusterOpt
from twinvol.cluster import ClusterError
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
    try:
        settings = witness_settings(cluster)
    except ClusterError as e:
        raise CliError(str(e)) from None
    logs.setup("witness")
    sdnotify.ready_when_answering(f"{settings.config.url}/api/v1/health", settings.secret,
                                  what="witness")
    try:
        run_witness(settings, takeover_after)
    except WitnessStartError as e:
        raise CliError(f"witness cannot start: {e}") from None

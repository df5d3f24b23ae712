"""The `twinvol` command. Errors are one line on stderr and a non-zero exit."""

from __future__ import annotations

import json
import os
import signal
import sys
from enum import StrEnum

import click
import typer

from twinvol import __version__, logs
from twinvol.cli import (
    certs,
    config,
    dashboard,
    dr,
    events,
    host,
    node,
    pair,
    status,
    switch,
    systemd,
    token,
    up,
    vm,
    volume,
    witness,
)
from twinvol.cli.common import CliError
from twinvol.cluster import ClusterError


class LogLevel(StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


# `--show-completion bash|zsh|fish` takes the shell by name, as the README says, instead
# of guessing it from the parent processes (which fails under a service manager, a
# script or CI, where there is no interactive shell to find).
os.environ.setdefault("_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION", "1")

app = typer.Typer(
    name="twinvol",
    help="twinvol: replicated block storage served over NBD.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
)
app.add_typer(node.app, name="node")
app.add_typer(volume.app, name="volume")
app.add_typer(pair.app, name="pair")
app.add_typer(dr.app, name="dr")
app.add_typer(witness.app, name="witness")
app.add_typer(host.app, name="host")
app.add_typer(vm.app, name="vm")
app.add_typer(config.app, name="config")
app.add_typer(certs.app, name="certs")
app.add_typer(token.app, name="token")
app.add_typer(systemd.app, name="systemd")
app.command("up")(up.up)
app.command("status")(status.status)
app.command("dashboard")(dashboard.dashboard)
app.command("events")(events.events)
app.command("switch")(switch.switch)


_LogLevelOpt = typer.Option(None, "--log-level", case_sensitive=False, show_envvar=False,
                            help="Log level of the components this command runs (node run, "
                                 "up, ...); default info or $TWINVOL_LOG_LEVEL.")


def _print_version(value: bool) -> None:
    if value:
        print(f"twinvol {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    _version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                  help="Print the version and exit."),
    log_level: LogLevel = _LogLevelOpt,
) -> None:
    """twinvol: replicated block storage served over NBD."""
    if log_level is not None:
        # An environment variable, so the processes `twinvol up` starts inherit it.
        os.environ[logs.LEVEL_ENV] = log_level.value


@app.command()
def version(json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Print the version."""
    if json_out:
        print(json.dumps({"version": __version__}))
    else:
        print(__version__)


def _fail(message: str, code: int) -> None:
    sys.stderr.write(f"twinvol: error: {message}\n")
    sys.exit(code)


def main() -> None:
    # Ctrl-C (SIGINT) stops a command even when it was started from a context that
    # ignores SIGINT (a background job, a script): `--watch` and `--wait` rely on it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        rc = app(standalone_mode=False)
    except CliError as e:
        _fail(str(e), e.exit_code)
    except ClusterError as e:
        _fail(str(e), 1)
    except click.exceptions.NoArgsIsHelpError:
        sys.exit(0)
    except click.UsageError as e:
        where = f" (see `{e.ctx.command_path} --help`)" if e.ctx else ""
        _fail(f"{e.format_message()}{where}", 2)
    except click.exceptions.Abort:
        _fail("aborted", 130)
    except click.ClickException as e:
        _fail(e.format_message(), e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:  # a bug, not a user mistake: still one line unless debugging
        if os.environ.get("TWINVOL_DEBUG"):
            raise
        _fail(f"internal error: {type(e).__name__}: {e} (rerun with TWINVOL_DEBUG=1 for the "
              "traceback)", 70)
    if isinstance(rc, int) and rc:
        sys.exit(rc)

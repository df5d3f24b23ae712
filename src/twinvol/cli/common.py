"""What every CLI command shares: cluster loading, API calls, output and errors."""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from typing import Any

import typer
from rich.console import Console

from twinvol import cluster as cluster_mod
from twinvol.cluster import NODE_HEADER, ClusterConfig, ClusterError
from twinvol.sizes import SizeError, decimal_looking, format_size, parse_size
from twinvol.tls.context import use_for_urllib

ClusterOpt = typer.Option(None, "--cluster", "-c", envvar="TWINVOL_CLUSTER",
                          help="Cluster file (default: $TWINVOL_CLUSTER).", show_envvar=False)
JsonOpt = typer.Option(False, "--json", help="Print machine-readable JSON.")
NodeOpt = typer.Option(None, "--node", "-n", help="Node name from the cluster file.")

TOKEN_ENV = "TWINVOL_TOKEN"  # an API token to use instead of the cluster secret
console = Console()
err_console = Console(stderr=True, soft_wrap=True)


class CliError(Exception):
    """A user-facing error: printed as one line, non-zero exit."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class UsageError(CliError):
    """A mistake in how a command was called: exit code 2, as for a missing argument."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 2)


def cli_size(text: str, option: str = "--size") -> int:
    """A size given on the command line; a bad one is a usage mistake (exit 2). A decimal-
    looking unit ('1GB') is read as binary, and the operator is told so on stderr."""
    try:
        n = parse_size(text)
    except SizeError as e:
        raise UsageError(f"{option}: {e}") from None
    if decimal_looking(text):
        err_console.print(f"note: {option} {text} is read as {format_size(n)} ({n} bytes): "
                          "twinvol sizes are binary (1G = 1GB = 1GiB = 1073741824 bytes)",
                          highlight=False)
    return n


def load_cluster(path: str | None) -> ClusterConfig:
    try:
        cfg = cluster_mod.load(path)
        use_for_urllib(cfg)  # HTTPS node APIs: show the client certificate
        return cfg
    except ClusterError as e:
        raise CliError(str(e)) from None


class Unreachable(CliError):
    """No answer. `maybe_done`: the request may have reached the component (not a
    refused connection), so what it asked for may have been done there."""

    def __init__(self, message: str, maybe_done: bool) -> None:
        super().__init__(message)
        self.maybe_done = maybe_done


class ApiError(CliError):
    def __init__(self, message: str, status: int, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class WrongNode(ApiError):
    """The address of one node was answered by another. An ApiError (status 0), so the
    many `except ApiError` that re-raise what is not a 404 never mistake it for an
    unreachable node or a missing object."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 0, "wrong_node")


def check_node(expect: str | None, url: str, headers: Any) -> None:
    got = headers.get(NODE_HEADER) if headers is not None else None
    if expect is not None and got is not None and got != expect:
        raise WrongNode(f"node {expect}'s address ({url}) is answered by node {got}: two "
                        "nodes share an address, or the cluster file is out of date (check it "
                        "with `twinvol config check`)")


def auth_headers(cfg: ClusterConfig) -> dict[str, str]:
    """The caller's credential: $TWINVOL_TOKEN, else the cluster secret (admin)."""
    token = os.environ.get(TOKEN_ENV) or cfg.cluster.secret
    return {"Authorization": f"Bearer {token}"} if token else {}


def call_json(cfg: ClusterConfig, url: str, method: str, body: dict[str, Any] | None,
              timeout: float, *, prefix: str, unreachable: str,
              expect_node: str | None = None) -> Any:
    """One JSON call to a twinvol component's HTTP API with the cluster secret. An error
    answer becomes ApiError(`prefix` + the server's message); no answer becomes
    CliError(`unreachable`, with the URL and the reason); an answer from another node than
    `expect_node` becomes WrongNode."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **auth_headers(cfg)}
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            check_node(expect_node, url, resp.headers)
            return json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        check_node(expect_node, url, e.headers)
        try:
            err = json.loads(e.read())["error"]
            raise ApiError(prefix + str(err["message"]), e.code, err["code"]) from None
        except (ValueError, KeyError, TypeError):
            raise ApiError(f"{prefix}HTTP {e.code} {e.reason}", e.code, "http") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise Unreachable(unreachable.format(url=url, reason=reason),
                          not isinstance(reason, ConnectionRefusedError)) from None


def api(cfg: ClusterConfig, node: str, method: str, path: str,
        body: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
    """Call a node's HTTP API; raise CliError with the server's message on failure."""
    return call_json(cfg, cfg.node(node).api_url + path, method, body, timeout,
                     prefix=f"node {node}: ", expect_node=node,
                     unreachable=f"node {node} ({{url}}) is not reachable: {{reason}}; is it "
                                 "running (`twinvol node run` or `twinvol up`)?")


def collect(cfg: ClusterConfig, path: str, key: str, only: str | None = None
            ) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """`key` items from `path` on every node (or `only`): (items, unreachable node -> error).
    An unreachable node is reported, not fatal, unless it was asked for by name."""
    items: list[dict[str, Any]] = []
    unreachable: dict[str, str] = {}
    for n in [only] if only else list(cfg.nodes):
        cfg.node(n)
        try:
            items.extend(api(cfg, n, "GET", path, timeout=5)[key])
        except ApiError:
            raise  # an answer from the wrong node too: it is no "unreachable" node
        except CliError as e:
            if only:
                raise
            unreachable[n] = str(e)
    return items, unreachable


def warn_unreachable(unreachable: dict[str, str]) -> None:
    for msg in unreachable.values():
        console.print(f"[yellow]warning:[/] {msg}", highlight=False)


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=False) + "\n")

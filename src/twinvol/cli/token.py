"""`twinvol token create|list|delete`: named API tokens with a scope (read, operate,
admin). The token is made here, shown once, and only its hash goes to every component
with an API: the nodes, the host agent, the builtin witness and the VM hosts.

A create is all or nothing: the components refuse a name they already hold (409), and
when any of them refuses or cannot be reached, the CLI removes the hash again from those
that took it (naming the hash, so a concurrent create of the same name is never undone
by mistake). Two concurrent creates of one name therefore leave at most one token.
"""

from __future__ import annotations

from urllib.parse import quote

import typer
from rich.table import Table

from twinvol.access import Scope, hash_token, new_token
from twinvol.cli.common import (
    ApiError,
    CliError,
    ClusterOpt,
    JsonOpt,
    call_json,
    console,
    emit_json,
    load_cluster,
    warn_unreachable,
)
from twinvol.cluster import ClusterConfig

app = typer.Typer(help="API tokens with scopes (read, operate, admin).", no_args_is_help=True)

NameArg = typer.Argument(..., help="Token name (shown in the audit log).")
ScopeOpt = typer.Option(..., "--scope", help="read, operate or admin.")
TIMEOUT = 15.0


def holders(cfg: ClusterConfig) -> list[tuple[str, str]]:
    """(label, API base URL) of every component that checks tokens."""
    out = [(f"node {n}", node.api_url) for n, node in cfg.nodes.items()]
    if cfg.host and isinstance(cfg.host.get("api"), str):
        out.append(("host agent", cfg.service_url(str(cfg.host["api"]))))
    w = cfg.witness or {}
    if isinstance(w.get("addr"), str) and w.get("backend", "builtin") == "builtin":
        out.append(("witness", cfg.service_url(str(w["addr"]))))
    out += [(f"vmhost {h}", vh.api_url) for h, vh in cfg.vmhosts.items()]
    return out


def _call(cfg: ClusterConfig, label: str, url: str, method: str,
          body: dict[str, str] | None = None) -> object:
    return call_json(cfg, url, method, body, TIMEOUT, prefix=f"{label}: ",
                     unreachable=f"{label} ({{url}}) is not reachable: {{reason}}")


def _undo(cfg: ClusterConfig, targets: list[tuple[str, str]], name: str, token_hash: str
          ) -> tuple[list[str], list[str]]:
    """Remove this create's hash again: (labels cleaned, labels that could not be)."""
    cleaned: list[str] = []
    stuck: list[str] = []
    for label, base in targets:
        try:
            _call(cfg, label, f"{base}/api/v1/tokens/{quote(name)}?hash={quote(token_hash)}",
                  "DELETE")
            cleaned.append(label)
        except ApiError as e:
            (cleaned if e.status in (404, 409) else stuck).append(label)  # not ours: left
        except CliError:
            stuck.append(label)
    return cleaned, stuck


@app.command("create")
def create(name: str = NameArg, scope: Scope = ScopeOpt, cluster: str = ClusterOpt,
           json_out: bool = JsonOpt) -> None:
    """Make a token and register its hash everywhere, or nowhere; prints the token once."""
    cfg = load_cluster(cluster)
    token = new_token()
    body = {"name": name, "scope": scope.value, "hash": hash_token(token)}
    where = holders(cfg)
    done: list[tuple[str, str]] = []
    for label, base in where:
        try:
            _call(cfg, label, base + "/api/v1/tokens", "POST", body)
        except CliError as e:
            # An unanswered call may still have been done there: undo it too.
            maybe = [*done, (label, base)] if getattr(e, "maybe_done", False) else done
            cleaned, stuck = _undo(cfg, maybe, name, body["hash"])
            msg = f"token {name} was not created: {e}"
            back = [c for c in cleaned if c in {lbl for lbl, _ in done}]
            if back:
                msg += f"; removed again from {', '.join(back)}"
            if stuck:
                msg += (f"; it may remain on {', '.join(stuck)}, which did not answer: run "
                        f"`twinvol token delete {name}` once it does")
            raise CliError(msg) from None
        done.append((label, base))
    if json_out:
        emit_json({"name": name, "scope": scope.value, "token": token,
                   "nodes": sorted(cfg.nodes), "components": [lbl for lbl, _ in where]})
    else:
        console.print(f"token {name} ({scope.value}) on {len(where)} component(s); it is "
                      "shown only now:", highlight=False)
        print(token)


@app.command("list")
def list_tokens(cluster: str = ClusterOpt, json_out: bool = JsonOpt) -> None:
    """Tokens known to each component (names and scopes, never the tokens)."""
    cfg = load_cluster(cluster)
    rows: list[dict[str, object]] = []
    unreachable: dict[str, str] = {}
    for label, base in holders(cfg):
        try:
            got = _call(cfg, label, base + "/api/v1/tokens", "GET")
        except ApiError:
            raise
        except CliError as e:
            unreachable[label] = str(e)
            continue
        where = label.removeprefix("node ")
        tokens: list[dict[str, object]] = got.get("tokens", []) if isinstance(got, dict) else []
        rows += [{**t, "node": where} for t in tokens]
    if json_out:
        emit_json({"tokens": rows})
        return
    table = Table("COMPONENT", "NAME", "SCOPE")
    for r in rows:
        table.add_row(str(r["node"]), str(r["name"]), str(r["scope"]))
    console.print(table)
    warn_unreachable(unreachable)


@app.command("delete")
def delete(name: str = NameArg, cluster: str = ClusterOpt, json_out: bool = JsonOpt) -> None:
    """Remove a token from every component (those without it are skipped)."""
    cfg = load_cluster(cluster)
    gone: list[str] = []
    failed: dict[str, str] = {}
    for label, base in holders(cfg):
        try:
            _call(cfg, label, f"{base}/api/v1/tokens/{quote(name)}", "DELETE")
            gone.append(label)
        except ApiError as e:
            if e.status != 404:
                failed[label] = str(e)
        except CliError as e:
            failed[label] = str(e)
    if failed:
        raise CliError(f"token {name} is still on {', '.join(failed)}: "
                       + "; ".join(failed.values()))
    if not gone:
        raise CliError(f"no token named {name!r} on any component")
    if json_out:
        emit_json({"deleted": name, "nodes": sorted(cfg.nodes), "components": gone})
    else:
        console.print(f"token {name} deleted on {len(gone)} component(s)", highlight=False)

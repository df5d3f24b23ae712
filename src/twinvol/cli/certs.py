"""`twinvol certs init|issue`: a cluster CA and the certificates NBD clients, nodes and
peers use, in the layout libnbd and QEMU read (see twinvol.tls.certs)."""

from __future__ import annotations

import json

import typer

from twinvol.cli.common import CliError, JsonOpt, UsageError
from twinvol.tls.certs import CA_CERT, CertError, Role, init_ca, issue

app = typer.Typer(help="Make a CA and TLS certificates (libnbd/QEMU layout).",
                  no_args_is_help=True)

DirOpt = typer.Option(..., "--dir", "-d", help="Certificate directory (created if missing).")
RoleArg = typer.Argument(..., help="server, client or node.")
NameOpt = typer.Option("", "--name", help="Node name (node) or common name.")
HostOpt = typer.Option([], "--host", help="Host name or IP the certificate names (repeatable).")


@app.command("init")
def init(directory: str = DirOpt, name: str = typer.Option("twinvol", help="CA name."),
         days: int = typer.Option(3650, help="Validity in days."),
         force: bool = typer.Option(False, "--force", help="Replace an existing CA."),
         json_out: bool = JsonOpt) -> None:
    """Create a CA (ca-cert.pem, ca-key.pem) in DIR."""
    if days < 1:
        raise UsageError("--days must be at least 1")
    try:
        path = init_ca(directory, name, days=days, force=force)
    except CertError as e:
        raise CliError(str(e)) from None
    if json_out:
        print(json.dumps({"ca_cert": path}))
    else:
        print(f"CA created: {path}")


@app.command("issue")
def issue_cmd(role: Role = RoleArg, directory: str = DirOpt, name: str = NameOpt,
              host: list[str] = HostOpt, days: int = typer.Option(825, help="Validity in days."),
              json_out: bool = JsonOpt) -> None:
    """Sign a server, client or node certificate with the CA in DIR."""
    if days < 1:
        raise UsageError("--days must be at least 1")
    if role is Role.NODE and not name:
        raise UsageError("a node certificate needs --name NODE")
    try:
        out = issue(directory, role, name=name, hosts=host or None, days=days)
    except CertError as e:
        raise CliError(str(e)) from None
    if json_out:
        print(json.dumps({"cert": out.cert, "key": out.key, "ca_cert": f"{directory}/{CA_CERT}"}))
    else:
        print(f"{role.value} certificate: {out.cert} (key {out.key})")

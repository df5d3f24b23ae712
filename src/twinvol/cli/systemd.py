"""`twinvol systemd install`: service units for the components of a real cluster.

One unit per kind of component: `twinvol-node@NAME` (instance = node name),
`twinvol-witness`, `twinvol-host` (the host agent) and `twinvol-vmhost@NAME`. Each is
Type=notify (the component says READY=1 once its API serves, see twinvol.sdnotify) and
restarts on failure; the cluster file is named by absolute path, and the log level is
an Environment= line an operator can override with a drop-in.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass

import typer

from twinvol.cli.common import (
    CliError,
    ClusterOpt,
    JsonOpt,
    UsageError,
    console,
    emit_json,
    load_cluster,
)
from twinvol.logs import LEVELS

app = typer.Typer(help="Run twinvol under systemd.", no_args_is_help=True)


@dataclass(frozen=True, slots=True)
class Unit:
    name: str           # file name, e.g. twinvol-node@.service
    description: str
    args: str           # after the twinvol executable
    instances: tuple[str, ...] = ()  # template instances to enable (node names ...)

    def enable_names(self) -> list[str]:
        if "@" not in self.name:
            return [self.name]
        stem = self.name.split("@")[0]
        return [f"{stem}@{i}.service" for i in self.instances]


def twinvol_exe() -> str:
    """The absolute path of this twinvol (the venv's script, or `python -m twinvol`)."""
    found = shutil.which("twinvol", path=os.path.dirname(sys.executable))
    return found or f"{sys.executable} -m twinvol"


def render(unit: Unit, exe: str, log_level: str) -> str:
    return f"""# Made by `twinvol systemd install`; change it with a drop-in (systemctl edit).
[Unit]
Description={unit.description}
After=network-online.target
Wants=network-online.target

[Service]
Type=notify
NotifyAccess=main
ExecStart={exe} {unit.args}
Environment=TWINVOL_LOG_LEVEL={log_level}
Restart=on-failure
RestartSec=2
TimeoutStartSec=300
TimeoutStopSec=60
KillMode=mixed
LimitNOFILE=65536

[Install]
WantedBy=multi-user.target
"""


def units(cluster_path: str, nodes: list[str], vmhosts: list[str], witness: bool,
          host: bool) -> list[Unit]:
    c = f"--cluster {cluster_path}"
    out = [Unit("twinvol-node@.service", "twinvol storage node %i", f"node run {c} --node %i",
                tuple(nodes))]
    if witness:
        out.append(Unit("twinvol-witness.service", "twinvol witness", f"witness run {c}"))
    if host:
        out.append(Unit("twinvol-host.service", "twinvol host agent (multipath NBD)",
                        f"host run {c}"))
    if vmhosts:
        out.append(Unit("twinvol-vmhost@.service", "twinvol hypervisor host %i",
                        f"vm host run {c} --name %i", tuple(vmhosts)))
    return out


@app.command()
def install(
    cluster: str = ClusterOpt,
    directory: str = typer.Option("/etc/systemd/system", "--dir",
                                  help="Where to write the unit files."),
    log_level: str = typer.Option("info", "--unit-log-level",
                                  help="TWINVOL_LOG_LEVEL of the services."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the units; write nothing."),
    json_out: bool = JsonOpt,
) -> None:
    """Write systemd units for the cluster file's components and say how to start them
    (`systemctl daemon-reload`, then `systemctl enable --now` the names it prints)."""
    if log_level not in LEVELS:
        raise UsageError(f"--unit-log-level {log_level!r}: use one of {', '.join(LEVELS)}")
    cfg = load_cluster(cluster)
    todo = units(cfg.path, list(cfg.nodes), list(cfg.vmhosts), cfg.witness is not None,
                 cfg.host is not None)
    exe = twinvol_exe()
    texts = {u.name: render(u, exe, log_level) for u in todo}
    enable = [n for u in todo for n in u.enable_names()]
    written: list[str] = []
    if not dry_run:
        if not os.path.isdir(directory):
            raise CliError(f"directory {directory} does not exist")
        for name, text in texts.items():
            path = os.path.join(directory, name)
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, path)
            written.append(path)
    if json_out:
        emit_json({"dir": directory, "written": written, "units": texts, "enable": enable,
                   "dry_run": dry_run})
        return
    if dry_run:
        for name, text in texts.items():
            console.print(f"# {os.path.join(directory, name)}", highlight=False)
            console.print(text, highlight=False, markup=False)
        return
    for path in written:
        console.print(f"wrote {path}", highlight=False)
    console.print(f"now: systemctl daemon-reload && systemctl enable --now {' '.join(enable)}",
                  highlight=False)

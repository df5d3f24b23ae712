"""`twinvol vm ...`: hypervisor host managers, VM definitions in logical names, and
live migration between hosts."""

from __future__ import annotations

import time
from typing import Any

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from twinvol import logs, sdnotify
from twinvol.cli.common import (
    CliError,
    ClusterOpt,
    JsonOpt,
    call_json,
    console,
    emit_json,
    load_cluster,
)
from twinvol.cluster import ClusterConfig
from twinvol.sizes import format_size
from twinvol.tls.https import service_client

app = typer.Typer(help="Virtual machines on hypervisor hosts: define, start, stop, migrate.",
                  no_args_is_help=True)
host_app = typer.Typer(help="Hypervisor host managers (QEMU over QMP).", no_args_is_help=True)
app.add_typer(host_app, name="host")

HostOpt = typer.Option(None, "--host", "-H", help="Hypervisor host from the cluster file.")


def call(cfg: ClusterConfig, host: str, method: str, path: str,
         body: dict[str, Any] | None = None, timeout: float = 60.0) -> Any:
    """Call a hypervisor host manager's API; CliError with its message on failure."""
    return call_json(cfg, cfg.vmhost(host).api_url + path, method, body, timeout, prefix="",
                     unreachable=f"hypervisor host {host} ({{url}}) is not reachable: "
                                 f"{{reason}}; is it running (`twinvol vm host run --name "
                                 f"{host}`)?")


def _hosts(cfg: ClusterConfig) -> list[str]:
    if not cfg.vmhosts:
        raise CliError(f"cluster file {cfg.path} has no [vmhosts.NAME] tables")
    return list(cfg.vmhosts)


def find_vm(cfg: ClusterConfig, name: str) -> str:
    """The host a VM is defined on (asks every host; unreachable ones are skipped)."""
    unreachable = []
    for h in _hosts(cfg):
        try:
            vms = call(cfg, h, "GET", "/api/v1/vms", timeout=5)["vms"]
        except CliError:
            unreachable.append(h)
            continue
        if any(v["name"] == name for v in vms):
            return h
    extra = f" (unreachable: {', '.join(unreachable)})" if unreachable else ""
    raise CliError(f"VM {name} is not defined on any hypervisor host{extra}")


@host_app.command("run")
def host_run(cluster: str = ClusterOpt,
             name: str = typer.Option(..., "--name", help="Host name ([vmhosts.NAME]).")) -> None:
    """Run a hypervisor host manager in the foreground (stops on SIGTERM/SIGINT)."""
    from twinvol.vm.api import run
    from twinvol.vm.state import VmError

    cfg = load_cluster(cluster)
    cfg.vmhost(name)
    logs.setup(f"vmhost-{name}")
    sdnotify.ready_when_answering(
        cfg.vmhost(name).api_url + "/api/v1/health", cfg.cluster.secret,
        what=f"hypervisor host {name}",
        context=service_client(cfg.tls_dir() if cfg.https_apis else None))
    try:
        run(cfg, name)
    except VmError as e:
        raise CliError(f"hypervisor host {name} cannot start: {e}") from None


@host_app.command("list")
def host_list(cluster: str = ClusterOpt, json_out: bool = JsonOpt) -> None:
    """Hypervisor hosts: their logical resources, limits and VMs."""
    cfg = load_cluster(cluster)
    out = []
    for h in _hosts(cfg):
        try:
            out.append(call(cfg, h, "GET", "/api/v1/host", timeout=5))
        except CliError as e:
            out.append({"name": h, "error": str(e)})
    if json_out:
        emit_json({"hosts": out})
        return
    table = Table("host", "site", "storage", "networks", "cpus", "memory", "VMs")
    for h in out:
        if "error" in h:
            table.add_row(h["name"], "", "", f"[red]{h['error']}[/]", "", "", "")
            continue
        table.add_row(h["name"], h["site"], f"volume:* -> node {h['storage']}",
                      " ".join(f"{k}={v}" for k, v in h["networks"].items()) or "-",
                      f"{h['used']['cpus']}/{h['limits']['cpus']}",
                      f"{format_size(h['used']['memory'])}/{format_size(h['limits']['memory'])}",
                      " ".join(h["vms"]) or "-")
    console.print(table)


@app.command()
def define(file: str = typer.Argument(..., help="VM file (TOML, logical names)."),
           cluster: str = ClusterOpt, host: str = HostOpt,
           start: bool = typer.Option(False, "--start", help="Start it right away."),
           json_out: bool = JsonOpt) -> None:
    """Define a VM on a hypervisor host (default: the first in the cluster file)."""
    from twinvol.vm.spec import SpecError, load_file

    cfg = load_cluster(cluster)
    host = host or _hosts(cfg)[0]
    cfg.vmhost(host)
    try:
        spec = load_file(file)
    except SpecError as e:
        raise CliError(str(e), 2) from None
    import msgspec

    vm = call(cfg, host, "POST", "/api/v1/vms", msgspec.to_builtins(spec))
    if start:
        vm = call(cfg, host, "POST", f"/api/v1/vms/{spec.name}/start")
    if json_out:
        emit_json(vm)
    else:
        console.print(f"VM {vm['name']} defined on host {host}"
                      + (f", {vm['state']}" if start else ""), highlight=False)


@app.command()
def start(name: str, cluster: str = ClusterOpt, json_out: bool = JsonOpt) -> None:
    """Start a defined VM on its host."""
    cfg = load_cluster(cluster)
    vm = call(cfg, find_vm(cfg, name), "POST", f"/api/v1/vms/{name}/start")
    if json_out:
        emit_json(vm)
    else:
        console.print(f"VM {name} {vm['state']} on host {vm['host']} (QEMU pid "
                      f"{vm['qemu_pid']})", highlight=False)


@app.command()
def stop(name: str, cluster: str = ClusterOpt,
         force: bool = typer.Option(False, "--force", help="Kill QEMU instead of quitting it."),
         json_out: bool = JsonOpt) -> None:
    """Stop a VM (QEMU quits after flushing its disks)."""
    cfg = load_cluster(cluster)
    vm = call(cfg, find_vm(cfg, name), "POST",
              f"/api/v1/vms/{name}/stop" + ("?force=1" if force else ""))
    if json_out:
        emit_json(vm)
    else:
        console.print(f"VM {name} stopped on host {vm['host']}", highlight=False)


@app.command()
def undefine(name: str, cluster: str = ClusterOpt, json_out: bool = JsonOpt) -> None:
    """Remove a stopped VM's definition."""
    cfg = load_cluster(cluster)
    res = call(cfg, find_vm(cfg, name), "DELETE", f"/api/v1/vms/{name}")
    if json_out:
        emit_json(res)
    else:
        console.print(f"VM {name} undefined", highlight=False)


@app.command("list")
def list_(cluster: str = ClusterOpt, json_out: bool = JsonOpt) -> None:
    """VMs of every hypervisor host."""
    cfg = load_cluster(cluster)
    vms: list[dict[str, Any]] = []
    unreachable: dict[str, str] = {}
    for h in _hosts(cfg):
        try:
            vms.extend(call(cfg, h, "GET", "/api/v1/vms", timeout=5)["vms"])
        except CliError as e:
            unreachable[h] = str(e)
    if json_out:
        emit_json({"vms": vms, "unreachable": unreachable})
        return
    table = Table("VM", "host", "site", "state", "cpus", "memory", "disks", "nics")
    for v in vms:
        table.add_row(v["name"], v["host"], v["site"], v["state"], str(v["cpus"]),
                      format_size(v["memory"]), " ".join(v["disks"]), " ".join(v["nics"]))
    console.print(table)
    for msg in unreachable.values():
        console.print(f"[yellow]warning:[/] {msg}", highlight=False)


@app.command()
def show(name: str, cluster: str = ClusterOpt, json_out: bool = JsonOpt) -> None:
    """One VM: state, logical names and what its host resolved them to, gates."""
    cfg = load_cluster(cluster)
    vm = call(cfg, find_vm(cfg, name), "GET", f"/api/v1/vms/{name}")
    if json_out:
        emit_json(vm)
        return
    console.print(f"VM {vm['name']} on host {vm['host']} (site {vm['site']}): {vm['state']}, "
                  f"{vm['cpus']} vCPU, {format_size(vm['memory'])}", highlight=False)
    for logical_name in (*vm["disks"], *vm["nics"]):
        console.print(f"  {logical_name} -> {vm['resources'].get(logical_name, '-')}",
                      highlight=False)
    for i, g in enumerate(vm["gates"]):
        console.print(f"  gate disk{i}: {g['mode']}, held {g['held']}, "
                      f"held in total {g['held_total']}", highlight=False)
    if vm.get("error"):
        console.print(f"  [red]error:[/] {vm['error']}", highlight=False)


@app.command()
def migrate(name: str, cluster: str = ClusterOpt,
            to: str = typer.Option(..., "--to", help="Destination hypervisor host."),
            downtime_limit: int = typer.Option(300, "--downtime-limit",
                                               help="Downtime limit in ms."),
            timeout: float = typer.Option(60.0, "--timeout",
                                          help="Give up (VM stays) if not converged by then."),
            max_bandwidth: str = typer.Option(None, "--max-bandwidth",
                                              help="Migration bandwidth limit per second "
                                                   "(e.g. 64M); default unlimited."),
            hold_lead: float = typer.Option(500.0, "--hold-lead",
                                            help="Start holding the VM's writes this many ms "
                                                 "before the expected switchover."),
            json_out: bool = JsonOpt) -> None:
    """Live-migrate a running VM to another hypervisor host."""
    cfg = load_cluster(cluster)
    cfg.vmhost(to)
    origin = find_vm(cfg, name)
    body: dict[str, Any] = {"to": to, "downtime_limit_ms": downtime_limit, "timeout": timeout,
                            "hold_lead_ms": hold_lead}
    if max_bandwidth:
        body["max_bandwidth"] = max_bandwidth
    job = call(cfg, origin, "POST", f"/api/v1/vms/{name}/migrate", body)
    path = f"/api/v1/vms/{name}/migration"
    if json_out:
        while job["status"] not in ("completed", "failed"):
            time.sleep(0.1)
            job = call(cfg, origin, "GET", path)
    else:
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                      DownloadColumn(binary_units=True), TextColumn("{task.fields[info]}"),
                      TimeElapsedColumn(), console=console, transient=False) as progress:
            task = progress.add_task(f"{name} {origin}->{to}", total=None, info="preparing")
            while True:
                done = job["transferred"]
                total = done + job["remaining"] if job["total"] else None
                progress.update(task, completed=done, total=total,
                                info=f"{job['status']}, remaining "
                                     f"{format_size(job['remaining'])}, pass {job['passes']}")
                if job["status"] in ("completed", "failed"):
                    break
                time.sleep(0.1)
                job = call(cfg, origin, "GET", path)
    if json_out:
        emit_json(job)
    if job["status"] == "failed":
        raise CliError(f"migration of VM {name} to {to} failed: {job['error']}; the VM "
                       f"continues on host {origin}")
    if not json_out:
        console.print(f"VM {name} migrated {origin} -> {to} in {job['total_s']:.2f}s, "
                      f"downtime {job['downtime_ms']:.1f} ms, "
                      f"{format_size(job['transferred'])} sent, {job['held']} held "
                      f"requests replayed at {to}", highlight=False)

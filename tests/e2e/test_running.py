"""Running twinvol for real (issue 18, point 5): --version, --log-level, UTC `Z` log times,
shell completion, systemd units that systemd-analyze accepts, and the READY=1 a
Type=notify service waits for, sent by a real node process once its API serves."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from test_cli import one_error_line

from nodeproc import NodeProc
from twinvol import __version__
from twinvol.supervisor import Supervisor, twinvol_argv

pytestmark = pytest.mark.e2e

Z_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def twinvol(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "twinvol", *args], capture_output=True,
                          text=True, timeout=60, env=env)


def test_version_and_log_level_usage() -> None:
    p = twinvol("--version")
    assert (p.returncode, p.stdout) == (0, f"twinvol {__version__}\n")
    p = twinvol("--log-level", "loud", "version")
    assert p.returncode == 2
    assert "Invalid value for '--log-level': 'loud' is not one of 'debug', 'info', " \
        "'warning', 'error'" in one_error_line(p)


def test_shell_completion_bash() -> None:
    """The installed `twinvol` script completes as bash asks it (what the script that
    --show-completion prints does on each Tab)."""
    exe = shutil.which("twinvol", path=os.path.dirname(sys.executable))
    assert exe is not None
    script = subprocess.run([exe, "--show-completion", "bash"], capture_output=True, text=True)
    assert script.returncode == 0 and "complete -o default -F _twinvol_completion twinvol" \
        in script.stdout

    def complete(words: str) -> list[str]:
        env = {**os.environ, "_TWINVOL_COMPLETE": "complete_bash", "COMP_WORDS": words,
               "COMP_CWORD": str(len(words.split()) - 1)}
        return subprocess.run([exe], env=env, capture_output=True, text=True).stdout.split()

    assert complete("twinvol sta") == ["status"]
    assert complete("twinvol volume create v --ad") == ["--adopt"]


def test_node_says_ready_to_systemd_and_logs_utc(tmp_path: object) -> None:
    """A real node under a NOTIFY_SOCKET (as systemd gives a Type=notify service): READY=1
    comes once the API answers; --log-level warning keeps info lines out of its log."""
    d = str(tmp_path)
    probe = NodeProc(d)  # for its cluster file and ports; started by hand below
    sock_path = os.path.join(d, "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(sock_path)
    listener.settimeout(30)
    sup = Supervisor()
    log = os.path.join(d, "A.log")
    try:
        t0 = time.monotonic()
        sup.start("A", twinvol_argv("--log-level", "warning", "node", "run", "--cluster",
                                    probe.cluster_path, "--node", "A"), log,
                  env={**os.environ, "NOTIFY_SOCKET": sock_path})
        msg = listener.recv(4096).decode()
        assert msg.startswith("READY=1\nSTATUS=node A at ")
        with urllib.request.urlopen(probe.config.api_url + "/api/v1/health", timeout=5) as r:
            assert json.loads(r.read())["status"] == "ok"  # ready means serving
        assert time.monotonic() - t0 < 30
        probe.create_volume("v", 1 << 20)
        sup.stop("A")
        with open(log) as f:
            lines = [json.loads(line) for line in f if line.startswith("{")]
        assert all(entry["level"] in ("warning", "error") for entry in lines), lines
    finally:
        sup.stop_all()
        listener.close()
    # The same node at the default level logs info lines, each with a UTC Z time.
    sup = Supervisor()
    try:
        sup.start("A", twinvol_argv("node", "run", "--cluster", probe.cluster_path, "--node",
                                    "A"), log)
        sup.wait_http("A", probe.config.api_url + "/api/v1/health")
        probe.create_volume("w", 1 << 20)
    finally:
        sup.stop_all()
    with open(log) as f:
        lines = [json.loads(line) for line in f if line.startswith("{")]
    infos = [e for e in lines if e["level"] == "info"]
    assert any(e["msg"] == "volume created" and e["volume"] == "w" for e in infos)
    assert all(Z_TIME.match(e["time"]) for e in lines), [e["time"] for e in lines]


def test_systemd_units_are_valid(tmp_path: object) -> None:
    d = str(tmp_path)
    cluster = os.path.join(d, "cluster.toml")
    with open(cluster, "w") as f:
        f.write("[cluster]\nname = 'prod'\nsecret = 's'\n"
                "[nodes.A]\nsite = 'A'\nnbd = '10.0.0.1:10809'\napi = '10.0.0.1:8701'\n"
                "data_dir = '/srv/twinvol/A'\n"
                "[nodes.B]\nsite = 'B'\nnbd = '10.0.0.2:10809'\napi = '10.0.0.2:8701'\n"
                "data_dir = '/srv/twinvol/B'\n"
                "[witness]\naddr = '10.0.0.3:8790'\ndata_dir = 'witness'\n"
                "[host]\nnbd = '127.0.0.1:10810'\napi = '127.0.0.1:8710'\nnodes = ['A', 'B']\n"
                "[vmhosts.H1]\nsite = 'A'\napi = '10.0.0.5:8720'\nstorage = 'A'\n"
                "data_dir = '/srv/vm'\n")
    units = os.path.join(d, "units")
    os.mkdir(units)
    p = twinvol("systemd", "install", "--cluster", cluster, "--dir", units, "--json")
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert sorted(os.listdir(units)) == ["twinvol-host.service", "twinvol-node@.service",
                                         "twinvol-vmhost@.service", "twinvol-witness.service"]
    assert res["enable"] == ["twinvol-node@A.service", "twinvol-node@B.service",
                             "twinvol-witness.service", "twinvol-host.service",
                             "twinvol-vmhost@H1.service"]
    with open(os.path.join(units, "twinvol-node@.service")) as f:
        node_unit = f.read()
    for line in ("Type=notify", "Restart=on-failure", "Environment=TWINVOL_LOG_LEVEL=info",
                 f"node run --cluster {cluster} --node %i"):
        assert line in node_unit
    exe = node_unit.split("ExecStart=")[1].split()[0]
    assert os.path.isabs(exe) and os.access(exe, os.X_OK)
    # systemd's own checker reads every unit (as instances) without a complaint.
    assert shutil.which("systemd-analyze"), "scripts/setup installs systemd"
    checked = []
    for name in res["enable"]:
        template = re.sub(r"@[^.]+\.", "@.", name)
        shutil.copyfile(os.path.join(units, template), os.path.join(d, name))
        checked.append(os.path.join(d, name))
    v = subprocess.run(["systemd-analyze", "verify", "--man=no", *checked], capture_output=True,
                       text=True, timeout=60)
    assert (v.returncode, v.stderr) == (0, ""), v.stderr
    # A wrong level is a usage mistake; a dry run writes nothing.
    assert twinvol("systemd", "install", "--cluster", cluster, "--dir", units,
                   "--unit-log-level", "loud").returncode == 2
    dry = twinvol("systemd", "install", "--cluster", cluster, "--dir", os.path.join(d, "no"),
                  "--dry-run")
    assert dry.returncode == 0 and "Type=notify" in dry.stdout
    assert not os.path.exists(os.path.join(d, "no"))

"""`twinvol up --tls`: the demo cluster with TLS everywhere; its JSON names the
certificate directory and gives nbds:// URIs that real clients use."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from twinvol import cluster as cluster_mod
from twinvol.nbd.server_events import TlsMode

pytestmark = pytest.mark.e2e


def test_up_tls_json_and_clients(tmp_path: object) -> None:
    directory = os.path.join(str(tmp_path), "up")
    proc = subprocess.Popen([sys.executable, "-m", "twinvol", "up", "--dir", directory,
                             "--json", "--tls"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline())
        certs = os.path.join(directory, "tls")
        assert ready["tls"] == {"dir": certs}
        for f in ("ca-cert.pem", "server-cert.pem", "client-cert.pem", "client-key.pem"):
            assert os.path.exists(os.path.join(certs, f)), f
        host = ready["host"]["nbd"]
        assert host.startswith("nbds://127.0.0.1:") and host.endswith(
            f"/?tls-certificates={certs}")
        uri = ready["volumes"]["demo"]
        assert uri == host.replace("/?", "/demo?")
        assert ready["nodes"]["A"]["nbd"].startswith("nbds://")
        assert ready["host"]["api"].startswith("https://127.0.0.1:")  # every API is HTTPS
        size = subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True,
                              check=True, timeout=60).stdout
        assert int(size) == 1 << 30
        plain = subprocess.run(["nbdinfo", "--size", uri.replace("nbds://", "nbd://")
                                .split("?")[0]], capture_output=True, text=True, timeout=60)
        assert plain.returncode != 0
        env = {**os.environ, "TWINVOL_CLUSTER": ready["cluster"]}
        pairs = json.loads(subprocess.run(
            [sys.executable, "-m", "twinvol", "pair", "list", "--json"], env=env,
            capture_output=True, text=True, check=True, timeout=60).stdout)["pairs"]
        assert {(p["name"], p["node"], p["state"]) for p in pairs if p["name"] == "demo"} == {
            ("demo", "A", "mirrored"), ("demo", "B", "mirrored")}  # over mutual TLS
        cfg = cluster_mod.load(ready["cluster"])
        assert cfg.tls is not None and cfg.tls.peer and cfg.tls.nbd is TlsMode.REQUIRE
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

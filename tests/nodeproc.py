"""Test helper: one real `twinvol node run` process with its own cluster file and ports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from typing import Any

from twinvol import cluster as cluster_mod
from twinvol.cluster import (
    ClusterConfig,
    ClusterSection,
    LimitsConfig,
    NodeConfig,
    TlsConfig,
)
from twinvol.supervisor import Supervisor, free_ports, twinvol_argv


class NodeProc:
    def __init__(self, directory: str, name: str = "A", *, tls: TlsConfig | None = None,
                 limits: LimitsConfig | None = None, secret: str = "") -> None:
        self.dir = directory
        self.name = name
        nbd_port, api_port = free_ports(2)
        self.nbd_port = nbd_port
        self.secret = secret
        self.cluster_path = os.path.join(directory, "cluster.toml")
        cfg = ClusterConfig(nodes={name: NodeConfig(site=name, nbd=f"127.0.0.1:{nbd_port}",
                                                    api=f"127.0.0.1:{api_port}",
                                                    data_dir=f"data-{name}")},
                            tls=tls, limits=limits or LimitsConfig(),
                            cluster=ClusterSection(secret=secret))
        cluster_mod.dump(cfg, self.cluster_path)
        self.config = cluster_mod.load(self.cluster_path).node(name)
        self.data_dir = os.path.join(directory, f"data-{name}")
        self.log_path = os.path.join(directory, f"{name}.log")
        self.sup = Supervisor()

    @property
    def pid(self) -> int:
        return self.sup.components[self.name].pid

    def start(self) -> None:
        self.sup.start(self.name, twinvol_argv("node", "run", "--cluster", self.cluster_path,
                                               "--node", self.name), self.log_path)
        self.sup.wait_http(self.name, self.config.api_url + "/api/v1/health")

    def stop(self) -> None:
        self.sup.stop_all()

    def kill9(self) -> None:
        self.sup.kill(self.name)

    def alive(self) -> bool:
        return self.sup.components[self.name].alive()

    def uri(self, export: str) -> str:
        return self.config.nbd_uri(export)

    def api(self, method: str, path: str, body: dict[str, Any] | None = None
            ) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.secret:
            headers["Authorization"] = f"Bearer {self.secret}"
        req = urllib.request.Request(self.config.api_url + path, data=data, method=method,
                                     headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def create_volume(self, name: str, size: int = 64 << 20, **kw: Any) -> dict[str, Any]:
        status, body = self.api("POST", "/api/v1/volumes", {"name": name, "size": size, **kw})
        assert status == 201, body
        return body  # type: ignore[no-any-return]

    def cli(self, *args: str, check: bool = False, timeout: float = 60
            ) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "TWINVOL_CLUSTER": self.cluster_path}
        return subprocess.run([sys.executable, "-m", "twinvol", *args], env=env, text=True,
                              capture_output=True, check=check, timeout=timeout)

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

"""The `twinvol` CLI: volume commands with --json, one-line errors, and `twinvol up`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from nodeproc import NodeProc

pytestmark = pytest.mark.e2e

MiB = 1 << 20


def one_error_line(p: subprocess.CompletedProcess[str]) -> str:
    assert p.returncode != 0, p.stdout
    assert "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("twinvol: error: ")
    return lines[0]


def test_volume_lifecycle_json(node: NodeProc) -> None:
    p = node.cli("volume", "create", "clivol", "--size", "8M", "--description", "cli test",
                 "--json", check=True)
    created = json.loads(p.stdout)
    assert created["name"] == "clivol" and created["size"] == 8 * MiB
    assert created["node"] == "A" and created["kind"] == "thin"
    assert created["nbd_uri"] == node.uri("clivol")
    assert set(created["virtual_identity"]) == {"serial", "volume_id", "export_name", "size",
                                                "description"}
    assert created["io_mode"] == "local"

    listed = json.loads(node.cli("volume", "list", "--json", check=True).stdout)
    assert "clivol" in {v["name"] for v in listed["volumes"]}
    assert listed["unreachable"] == {}

    shown = json.loads(node.cli("volume", "show", "clivol", "--json", check=True).stdout)
    assert shown["id"] == created["id"]

    resized = json.loads(node.cli("volume", "resize", "clivol", "--size", "16M", "--json",
                                  check=True).stdout)
    assert resized["size"] == 16 * MiB
    info = subprocess.run(["nbdinfo", "--size", node.uri("clivol")], capture_output=True,
                          text=True, check=True)
    assert int(info.stdout) == 16 * MiB

    deleted = json.loads(node.cli("volume", "delete", "clivol", "--json", check=True).stdout)
    assert deleted["deleted"] == "clivol"
    assert not os.path.exists(created["path"])
    one_error_line(node.cli("volume", "show", "clivol"))


def test_volume_on_given_file(node: NodeProc, tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "backing.img")
    with open(path, "wb") as f:
        f.truncate(4 * MiB)
    p = node.cli("volume", "create", "onfile", "--path", path, "--adopt", "--export-name",
                 "exp-onfile", "--json", check=True)
    vol = json.loads(p.stdout)
    assert vol["kind"] == "file" and vol["size"] == 4 * MiB and vol["path"] == path
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x7 0 4k", node.uri("exp-onfile")],
                   check=True, capture_output=True)
    with open(path, "rb") as f:
        assert f.read(4096) == b"\x07" * 4096
    node.cli("volume", "delete", "onfile", check=True)
    assert os.path.exists(path)  # a given file is kept


def test_table_output(node: NodeProc) -> None:
    node.cli("volume", "create", "tbl", "--size", "1M", check=True)
    out = node.cli("volume", "list", check=True).stdout
    assert "tbl" in out and "1MiB" in out
    out = node.cli("node", "status", check=True).stdout
    assert "A" in out


@pytest.mark.parametrize(("args", "needle"), [
    (["volume", "create", "x1", "--size", "12Q"], "invalid size '12Q'"),
    (["volume", "create", "x2", "--size", "1000"], "multiple of 512"),
    (["volume", "create", "bad name!", "--size", "1M"], "invalid volume name"),
    (["volume", "create", "x3"], "needs a size"),
    (["volume", "create", "x4", "--size", "1M", "--node", "Z"], "node 'Z' is not in"),
    (["volume", "create", "x5", "--path", "/nonexistent/dir/f.img", "--size", "1M"],
     "does not exist"),
    (["volume", "show", "missing"], "does not exist on any node"),
    (["volume", "resize", "missing", "--size", "1G"], "does not exist"),
    (["volume", "delete", "missing"], "does not exist"),
    (["volume", "create"], "Missing argument"),
    (["volume", "list", "--bogus"], "No such option"),
    (["nosuchcommand"], "No such command"),
])
def test_bad_arguments_one_line(node: NodeProc, args: list[str], needle: str) -> None:
    line = one_error_line(node.cli(*args))
    assert needle in line, line


def test_conflicts_and_shrink(node: NodeProc) -> None:
    node.cli("volume", "create", "dup", "--size", "1M", check=True)
    assert "already exists" in one_error_line(node.cli("volume", "create", "dup", "--size", "1M"))
    assert "already used" in one_error_line(
        node.cli("volume", "create", "dup2", "--size", "1M", "--export-name", "dup"))
    assert "shrinking is not supported" in one_error_line(
        node.cli("volume", "resize", "dup", "--size", "512K"))


def test_cluster_file_errors(tmp_path: object) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TWINVOL_CLUSTER"}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "twinvol", *args], env=env, text=True,
                              capture_output=True, timeout=30)

    assert "no cluster file" in one_error_line(cli("volume", "list"))
    missing = os.path.join(str(tmp_path), "nope.toml")
    assert "does not exist" in one_error_line(cli("volume", "list", "--cluster", missing))
    bad = os.path.join(str(tmp_path), "bad.toml")
    with open(bad, "w") as f:
        f.write("[nodes.A]\nsite = 'A'\nnbd = 'nohost'\napi = '127.0.0.1:1'\ndata_dir = 'a'\n")
    assert "not HOST:PORT" in one_error_line(cli("volume", "list", "--cluster", bad))
    with open(bad, "w") as f:
        f.write("[nodes.A\n")
    assert "not valid TOML" in one_error_line(cli("volume", "list", "--cluster", bad))
    with open(bad, "w") as f:
        f.write("[nodes.A]\nsite = 'A'\nnbd = '127.0.0.1:2'\napi = '127.0.0.1:1'\n"
                "data_dir = 'a'\n")
    line = one_error_line(cli("volume", "list", "--node", "A", "--cluster", bad))
    assert "not reachable" in line


def _pids_alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split()[2] != "Z":
                    alive.append(pid)
        except FileNotFoundError:
            pass
    return alive


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_up_json_and_clean_stop(tmp_path: object, sig: signal.Signals) -> None:
    directory = os.path.join(str(tmp_path), "up")
    proc = subprocess.Popen([sys.executable, "-m", "twinvol", "up", "--dir", directory, "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        ready = json.loads(line)
        assert set(ready) >= {"cluster", "nodes", "witness", "host", "volumes"}
        assert ready["cluster"] == os.path.join(directory, "cluster.toml")
        assert set(ready["nodes"]) == {"A", "B", "C"}
        for n in ready["nodes"].values():
            assert set(n) >= {"pid", "nbd", "api"}
        pids = [n["pid"] for n in ready["nodes"].values()] + [ready["witness"]["pid"],
                                                               ready["host"]["pid"]]
        assert len(_pids_alive(pids)) == 5
        assert ready["volumes"]["demo"] == ready["host"]["nbd"] + "demo"
        assert ready["witness"]["addr"].startswith("127.0.0.1:")
        uri = ready["volumes"]["demo"]
        size = subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True,
                              check=True).stdout
        assert int(size) == 1 << 30
        sock = os.path.join(directory, "host.sock")
        assert ready["host"]["socket"] == sock
        assert ready["unix_volumes"] == {"demo": f"nbd+unix:///demo?socket={sock}"}
        size = subprocess.run(["nbdinfo", "--size", ready["unix_volumes"]["demo"]],
                              capture_output=True, text=True, check=True).stdout
        assert int(size) == 1 << 30
        env = {**os.environ, "TWINVOL_CLUSTER": ready["cluster"]}
        listed = json.loads(subprocess.run(
            [sys.executable, "-m", "twinvol", "volume", "list", "--json"], env=env,
            capture_output=True, text=True, check=True).stdout)
        # demo: active-active between A and B, async copy on C (blocked until a DR takeover)
        assert sorted((v["name"], v["node"], v["io_mode"]) for v in listed["volumes"]) == [
            ("demo", "A", "mirror"), ("demo", "B", "mirror"), ("demo", "C", "block")]
        dr = json.loads(subprocess.run(
            [sys.executable, "-m", "twinvol", "pair", "show", "demo-dr", "--json"], env=env,
            capture_output=True, text=True, check=True).stdout)["sides"]
        assert {n: v["role"] for n, v in dr.items()} == {
            "A": "primary", "B": "standby", "C": "secondary"}
        assert dr["A"]["state"] == dr["C"]["state"] == "mirrored"
        assert dr["C"]["io_mode"] == "block"
        assert dr["C"]["remote_copy"]["group_state"] == "mirrored"   # a consistent far copy
        pairs = json.loads(subprocess.run(
            [sys.executable, "-m", "twinvol", "pair", "list", "--json"], env=env,
            capture_output=True, text=True, check=True).stdout)["pairs"]
        assert {(p["name"], p["node"], p["state"]) for p in pairs
                if p["name"] == "demo"} == {("demo", "A", "mirrored"), ("demo", "B", "mirrored")}
        # A second `up` on the running directory refuses at once and starts nothing.
        again = subprocess.run([sys.executable, "-m", "twinvol", "up", "--dir", directory],
                               capture_output=True, text=True, timeout=30)
        assert again.returncode == 1 and again.stdout == ""
        assert one_error_line(again) == (
            f"twinvol: error: twinvol up is already running on {directory} (pid {proc.pid}); "
            f"stop it first (Ctrl-C in its terminal, or kill {proc.pid})")
        assert len(_pids_alive(pids)) == 5
        with urllib.request.urlopen(ready["dashboard"], timeout=10) as r:  # the web page
            assert r.status == 200 and b"<title>twinvol</title>" in r.read()
        with urllib.request.urlopen(ready["dashboard"] + "api/v1/status", timeout=30) as r:
            assert json.loads(r.read())["pairs"]["demo"]["state"] == "mirrored"
        # The demo as `twinvol status` judges it: all well, the far copy included.
        health = subprocess.run([sys.executable, "-m", "twinvol", "status", "--json"], env=env,
                                capture_output=True, text=True, timeout=60)
        st = json.loads(health.stdout)
        assert (health.returncode, st["verdict"], st["reasons"]) == (0, "healthy", []), st
        assert {p: (v["state"], v["serving"]) for p, v in st["pairs"].items()} == {
            "demo": ("mirrored", ["A", "B"]), "demo-dr": ("mirrored", ["A", "B"])}
        assert st["pairs"]["demo-dr"]["lag_seconds"] is not None
        proc.send_signal(sig)
        assert proc.wait(30) == 0
        deadline = time.monotonic() + 10
        while _pids_alive(pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _pids_alive(pids) == []
        assert not os.path.exists(sock)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_up_leaves_out_the_unix_socket_when_the_dir_is_too_deep() -> None:
    from twinvol.cli.up import _new_cluster

    shallow = _new_cluster("/srv/twinvol")
    assert shallow.host is not None and shallow.host["socket"] == "host.sock"
    deep = _new_cluster("/srv/" + "d" * 100)  # /srv/ddd.../host.sock is 115 bytes
    assert deep.host is not None and "socket" not in deep.host
    assert deep.host["nodes"] == ["A", "B"]


def test_up_adds_vm_hosts_to_a_cluster_file_made_without_them(tmp_path: object) -> None:
    from twinvol import cluster as cluster_mod
    from twinvol.cli.up import _add_vmhosts, _new_cluster

    path = os.path.join(str(tmp_path), "cluster.toml")
    old = _new_cluster(str(tmp_path))
    old.vmhosts = {}
    cluster_mod.dump(old, path)
    cfg = _add_vmhosts(cluster_mod.load(path), path)
    again = cluster_mod.load(path)
    assert again.vmhosts == cfg.vmhosts
    assert {h: (v.site, v.storage, v.data_dir) for h, v in again.vmhosts.items()} == {
        "H1": ("A", "A", "vm-H1"), "H2": ("B", "B", "vm-H2")}
    assert again.nodes == old.nodes and again.cluster == old.cluster  # the rest is kept
    assert _add_vmhosts(again, path).vmhosts == again.vmhosts  # added once, ports kept


def test_up_killed_takes_nodes_down(tmp_path: object) -> None:
    directory = os.path.join(str(tmp_path), "up")
    proc = subprocess.Popen([sys.executable, "-m", "twinvol", "up", "--dir", directory, "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    ready = json.loads(proc.stdout.readline())
    pids = [n["pid"] for n in ready["nodes"].values()]
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 15
    while _pids_alive(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _pids_alive(pids) == []
    # Starting again on the same directory reuses the cluster and keeps the data.
    proc = subprocess.Popen([sys.executable, "-m", "twinvol", "up", "--dir", directory, "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        again = json.loads(proc.stdout.readline())
        assert again["volumes"] == ready["volumes"]
    finally:
        proc.terminate()
        try:
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:  # never leave a cluster running behind a failed test
                proc.kill()
                proc.wait()

"""What an operator meets first (issue 18): `volume create --path` never writes into a file
it did not make unless told to, and a refused size is one clear JSON error that leaves
nothing behind. Real node process, real CLI, real NBD clients."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess

import pytest
from test_cli import one_error_line

from nodeproc import NodeProc

pytestmark = pytest.mark.e2e

MiB = 1 << 20


def digest(path: str) -> tuple[int, str]:
    with open(path, "rb") as f:
        data = f.read()
    return len(data), hashlib.sha256(data).hexdigest()


def volume_names(node: NodeProc) -> set[str]:
    listed = json.loads(node.cli("volume", "list", "--json", check=True).stdout)
    return {v["name"] for v in listed["volumes"]}


def test_system_file_is_refused_and_untouched(node: NodeProc, tmp_path: object) -> None:
    """The /etc/passwd case, on a copy: refused with the reason and the way out, not grown."""
    victim = os.path.join(str(tmp_path), "passwd")
    shutil.copyfile("/etc/passwd", victim)
    before = digest(victim)
    line = one_error_line(node.cli("volume", "create", "b5", "--size", "1M", "--path", victim))
    assert line == (f"twinvol: error: node A: {victim} already exists (file of {before[0]} "
                    "bytes) and twinvol did not create it; refusing to write into it. Pass "
                    "--adopt to use its contents as the volume, or give a path that does not "
                    "exist yet")
    # --adopt is no way around it either: the file is not a disk image.
    line = one_error_line(node.cli("volume", "create", "b5", "--size", "1M", "--path", victim,
                                   "--adopt"))
    assert "not a multiple of 512: it is no disk image" in line
    assert digest(victim) == before
    assert "b5" not in volume_names(node)


def test_dry_run_says_and_does_nothing(node: NodeProc, tmp_path: object) -> None:
    new = os.path.join(str(tmp_path), "new.img")
    p = node.cli("volume", "create", "dry1", "--size", "2M", "--path", new, "--dry-run",
                 check=True)
    assert p.stdout.split() == (f"dry run: node A would create a new sparse file {new} of "
                                f"{2 * MiB} bytes for volume dry1 (2MiB); nothing was done"
                                ).split()
    assert not os.path.exists(new)
    res = json.loads(node.cli("volume", "create", "dry1", "--size", "2M", "--path", new,
                              "--dry-run", "--json", check=True).stdout)
    assert res["dry_run"] is True and res["action"] == "create" and res["size"] == 2 * MiB
    assert "dry1" not in volume_names(node)
    # A refusal is the same in a dry run.
    with open(new, "wb") as f:
        f.truncate(MiB)
    assert "--adopt" in one_error_line(node.cli("volume", "create", "dry1", "--path", new,
                                                "--dry-run"))


def test_new_path_is_created_and_adopt_grows_only_when_told(node: NodeProc,
                                                             tmp_path: object) -> None:
    new = os.path.join(str(tmp_path), "made.img")
    out = node.cli("volume", "create", "made", "--size", "1M", "--path", new, check=True).stdout
    assert f"backing: created a new sparse file {new} of {MiB} bytes" in " ".join(out.split())
    assert os.path.getsize(new) == MiB

    old = os.path.join(str(tmp_path), "old.img")
    with open(old, "wb") as f:
        f.write(b"\x5a" * MiB)
    vol = json.loads(node.cli("volume", "create", "adopted", "--path", old, "--adopt",
                              "--size", "4M", "--json", check=True).stdout)
    assert vol["action"] == "adopt-grow" and vol["size"] == 4 * MiB
    assert os.path.getsize(old) == 4 * MiB
    read = subprocess.run(["nbdcopy", node.uri("adopted"), "-"], capture_output=True,
                          check=True).stdout
    assert read == b"\x5a" * MiB + bytes(3 * MiB)  # its data kept, the growth reads as zeroes


def test_files_in_use_or_owned_are_refused(node: NodeProc, tmp_path: object) -> None:
    held = os.path.join(str(tmp_path), "held.img")
    with open(held, "wb") as f:
        f.truncate(MiB)
        line = one_error_line(node.cli("volume", "create", "held", "--path", held, "--adopt"))
        assert f"{held} is in use by pid {os.getpid()} (" in line
    thin = node.create_volume("owned", MiB)
    line = one_error_line(node.cli("volume", "create", "steal", "--path", thin["path"],
                                   "--adopt"))
    assert line == f"twinvol: error: node A: {thin['path']} already backs volume 'owned'"
    catalog = os.path.join(node.data_dir, "catalog.sqlite")
    line = one_error_line(node.cli("volume", "create", "cat", "--path", catalog, "--adopt"))
    assert f"inside the twinvol node data directory {node.data_dir}" in line
    fifo = os.path.join(str(tmp_path), "fifo")
    os.mkfifo(fifo)
    for odd in (fifo, "/dev/null", str(tmp_path)):
        line = one_error_line(node.cli("volume", "create", "odd", "--path", odd, "--adopt"))
        assert "is neither a regular file nor a block device" in line, line
    assert not {"held", "steal", "cat", "odd"} & volume_names(node)


def test_impossible_size_is_a_clear_json_error_leaving_no_file(node: NodeProc) -> None:
    vol_dir = os.path.join(node.data_dir, "volumes")
    before = set(os.listdir(vol_dir))
    status, body = node.api("POST", "/api/v1/volumes", {"name": "huge", "size": "10P"})
    assert status == 400, body
    assert body["error"]["code"] == "invalid"
    assert body["error"]["message"].startswith(f"the file system of {vol_dir} cannot hold a "
                                               f"file of {10 << 50} bytes (10PiB)")
    line = one_error_line(node.cli("volume", "create", "huge", "--size", "10PiB"))
    assert "cannot hold a file" in line and "choose a smaller size" in line
    assert set(os.listdir(vol_dir)) == before
    assert "huge" not in volume_names(node)


# ---- point 3: errors an operator can act on ----------------------------------------

def write(path: str, text: str) -> str:
    with open(path, "w") as f:
        f.write(text)
    return path


def node_table(name: str, port: int, data: str = "d") -> str:
    return (f"[nodes.{name}]\nsite = '{name}'\nnbd = '127.0.0.1:{port}'\n"
            f"api = '127.0.0.1:{port + 1}'\ndata_dir = '{data}'\n")


def test_cluster_file_typo_names_table_and_line(node: NodeProc, tmp_path: object) -> None:
    bad = write(os.path.join(str(tmp_path), "typo.toml"),
                "[cluster]\nname = 'x'\n\n" + node_table("A", 1) + "\n[nodes.B]\n"
                "site = 'B'\nsitee = 'B'\nnbd = '127.0.0.1:3'\napi = '127.0.0.1:4'\n"
                "data_dir = 'b'\n")
    for args in (["volume", "list"], ["config", "check"]):
        line = one_error_line(node.cli(*args, "--cluster", bad))
        assert line == (f"twinvol: error: cluster file {bad}, line 12, [nodes.B]: unknown key "
                        "`sitee` (known keys: site, nbd, api, data_dir, peer, faults, tls, "
                        "api_tls, tls_psk)")
    p = node.cli("config", "check", "--cluster", bad, "--json")
    assert p.returncode == 1 and json.loads(p.stdout)["error"].endswith("unknown key `sitee` "
                                                                        "(known keys: site, "
                                                                        "nbd, api, data_dir, "
                                                                        "peer, faults, tls, "
                                                                        "api_tls, tls_psk)")


def test_two_nodes_on_one_address_are_refused(node: NodeProc, tmp_path: object) -> None:
    dup = write(os.path.join(str(tmp_path), "dup.toml"),
                node_table("A", 10) + node_table("B", 20).replace("127.0.0.1:21",
                                                                  "127.0.0.1:11"))
    line = one_error_line(node.cli("node", "status", "--cluster", dup))
    assert line == (f"twinvol: error: cluster file {dup}: node A api and node B api have the "
                    "same address 127.0.0.1:11; each needs its own")


def test_config_check_and_the_node_that_answers(node: NodeProc, tmp_path: object) -> None:
    ok = node.cli("config", "check", "--json", check=True)
    res = json.loads(ok.stdout)
    assert res["ok"] is True and res["nodes"]["A"]["state"] == "ok"
    assert res["nodes"]["A"]["pid"] == node.pid
    # A file that calls the running node A "B" (and puts A elsewhere): every command
    # notices that the answer came from another node.
    api = node.config.api
    wrong = write(os.path.join(str(tmp_path), "wrong.toml"),
                  "[nodes.B]\nsite = 'B'\nnbd = '127.0.0.1:9'\n"
                  f"api = '{api}'\ndata_dir = 'b'\n" + node_table("A", 7))
    p = node.cli("config", "check", "--cluster", wrong)
    assert p.returncode == 1
    out = " ".join(p.stdout.split())
    assert (f"node B: wrong_node: node B's address (http://{api}/api/v1/node) is answered "
            "by node A") in out
    assert "node A: unreachable:" in out
    line = one_error_line(node.cli("volume", "list", "--node", "B", "--cluster", wrong))
    assert f"node B's address (http://{api}/api/v1/volumes) is answered by node A" in line
    # Listing every node fails too: a wrong answer is not an unreachable node to skip,
    # nor a missing pair; a followed event stream is checked as well.
    line = one_error_line(node.cli("volume", "list", "--cluster", wrong))
    assert f"node B's address (http://{api}/api/v1/volumes) is answered by node A" in line
    line = one_error_line(node.cli("pair", "show", "nope", "--cluster", wrong))
    assert f"node B's address (http://{api}/api/v1/pairs/nope) is answered by node A" in line
    line = one_error_line(node.cli("events", "--node", "B", "--follow", "--cluster", wrong))
    assert f"node B's address (http://{api}/api/v1/events?follow=1&since=0) is answered " \
        "by node A" in line


def test_usage_mistakes_exit_2(node: NodeProc) -> None:
    for args, needle in [
        (["volume", "create", "u1", "--size", "10X"], "--size: invalid size '10X'"),
        (["pair", "create", "u2", "--mode", "bogus", "--primary", "A", "--secondary", "B"],
         "unknown pair mode 'bogus'"),
        (["volume", "create", "u3", "--adopt", "--size", "1M"], "--adopt needs --path"),
    ]:
        p = node.cli(*args)
        assert p.returncode == 2, (args, p.stderr)
        assert needle in one_error_line(p)


def test_decimal_units_are_stated(node: NodeProc) -> None:
    p = node.cli("volume", "create", "gbvol", "--size", "1GB", "--json", check=True)
    assert json.loads(p.stdout)["size"] == 1 << 30
    assert " ".join(p.stderr.split()) == ("note: --size 1GB is read as 1GiB (1073741824 "
                                          "bytes): twinvol sizes are binary (1G = 1GB = 1GiB "
                                          "= 1073741824 bytes)")


def test_node_status_with_a_node_down(node: NodeProc, tmp_path: object) -> None:
    two = write(os.path.join(str(tmp_path), "two.toml"),
                f"[nodes.A]\nsite = 'A'\nnbd = '{node.config.nbd}'\napi = '{node.config.api}'\n"
                f"data_dir = '{node.data_dir}'\n" + node_table("Z", 5))
    p = node.cli("node", "status", "--cluster", two)
    assert p.returncode == 1
    rows = {r.split()[1]: r.split() for r in p.stdout.splitlines() if r.startswith("│")}
    assert rows["A"][5] == "up" and rows["Z"][5] == "down"
    assert rows["Z"][-2] == "-"  # the error is not in the free column ...
    assert re.fullmatch(r"\d+(\.\d)?[KMGTP]iB", rows["A"][-2]), rows["A"]
    assert ("node Z is down: node Z (http://127.0.0.1:6/api/v1/node) is not reachable"
            in " ".join(p.stdout.split()))  # ... but on its own line
    p = node.cli("node", "status", "--cluster", two, "--json")
    assert p.returncode == 1 and "error" in json.loads(p.stdout)["nodes"]["Z"]


def test_zeroes_written_with_no_hole_are_not_a_hole(node: NodeProc) -> None:
    """WRITE_ZEROES without the may-trim flag (qemu-io `write -z` sends NO_HOLE) leaves the
    range allocated: block status says zero (2), not hole (3), as nbdkit does."""
    node.create_volume("nohole", 4 * MiB)
    uri = node.uri("nohole")
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 1 0 64k", "-c", "write -z 1M 1M",
                    "-c", "write -z -u 3M 1M", uri], check=True, capture_output=True)
    extents = json.loads(subprocess.run(["nbdinfo", "--map", "--json", uri], check=True,
                                        capture_output=True, text=True).stdout)
    got = [(e["offset"], e["length"], e["type"]) for e in extents]
    assert got == [(0, 64 << 10, 0), (64 << 10, MiB - (64 << 10), 3), (MiB, MiB, 2),
                   (2 * MiB, 2 * MiB, 3)]
    data = subprocess.run(["nbdcopy", uri, "-"], capture_output=True, check=True).stdout
    assert data == b"\x01" * (64 << 10) + bytes(4 * MiB - (64 << 10))

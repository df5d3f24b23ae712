"""What an operator meets first (issue 18): `volume create --path` never writes into a file
it did not make unless told to, and a refused size is one clear JSON error that leaves
nothing behind. Real node process, real CLI, real NBD clients."""

from __future__ import annotations

import hashlib
import json
import os
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

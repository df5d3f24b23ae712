"""The PSK key file (psktool's IDENTITY:HEXKEY lines): read as written, and anything
else is one clear error naming the file and line."""

from __future__ import annotations

import os

import pytest

from twinvol.tls.psk import PskContext, PskError, load_keys


def write(tmp_path: object, text: str) -> str:
    path = os.path.join(str(tmp_path), "keys.psk")
    with open(path, "w") as f:
        f.write(text)
    return path


def test_keys_as_psktool_writes_them(tmp_path: object) -> None:
    path = write(tmp_path, "alice:00ff10\n\nbob:ABCDEF\n")
    assert load_keys(path) == {"alice": b"\x00\xff\x10", "bob": b"\xab\xcd\xef"}
    assert PskContext(path).keys["bob"] == b"\xab\xcd\xef"


@pytest.mark.parametrize(("text", "message"), [
    ("alice 00ff\n", "line 1: not IDENTITY:HEXKEY (make it with `psktool -u NAME -p FILE`)"),
    ("alice:00f\n", "line 1: not IDENTITY:HEXKEY"),
    ("alice:00ff\nbob:xyz\n", "line 2: not IDENTITY:HEXKEY"),
    ("\n", "has no keys"),
])
def test_bad_key_files(tmp_path: object, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(PskError) as e:
        load_keys(path)
    assert message in str(e.value) and path in str(e.value)


def test_missing_key_file(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "nope.psk")
    with pytest.raises(PskError, match=f"PSK file {path} cannot be read: No such file"):
        PskContext(path)

"""Which scope each API call needs, and the token store (hashes only, atomic file)."""

from __future__ import annotations

import json
import pathlib

import pytest

from twinvol.access import Scope, TokenError, TokenStore, hash_token, new_token, required_scope


@pytest.mark.parametrize(("method", "path", "scope"), [
    ("GET", "/api/v1/volumes", Scope.READ),
    ("GET", "/metrics", Scope.READ),
    ("GET", "/api/v1/events", Scope.READ),
    ("GET", "/api/v1/tokens", Scope.ADMIN),
    ("POST", "/api/v1/volumes", Scope.ADMIN),
    ("DELETE", "/api/v1/volumes/v1", Scope.ADMIN),
    ("POST", "/api/v1/volumes/v1/resize", Scope.ADMIN),
    ("POST", "/api/v1/tokens", Scope.ADMIN),
    ("POST", "/api/v1/pairs", Scope.OPERATE),
    ("POST", "/api/v1/pairs/p/switch", Scope.OPERATE),
    ("POST", "/api/v1/dr/takeover", Scope.OPERATE),
    ("POST", "/api/v1/switching", Scope.OPERATE),
    ("POST", "/api/v1/volumesX", Scope.OPERATE),  # a prefix is a path segment, not text
])
def test_required_scope(method: str, path: str, scope: Scope) -> None:
    assert required_scope(method, path) is scope


def test_scopes_nest() -> None:
    assert Scope.ADMIN.allows(Scope.OPERATE) and Scope.OPERATE.allows(Scope.READ)
    assert not Scope.READ.allows(Scope.OPERATE) and not Scope.OPERATE.allows(Scope.ADMIN)


def test_store_keeps_hashes_and_survives_reload(tmp_path: pathlib.Path) -> None:
    path = str(tmp_path / "tokens.json")
    store = TokenStore(path)
    tok = new_token()
    store.add("ci", "operate", hash_token(tok))
    assert tok not in (tmp_path / "tokens.json").read_text()
    again = TokenStore(path)
    found = again.identify(tok)
    assert found is not None and (found.name, found.scope) == ("ci", Scope.OPERATE)
    assert again.identify(tok + "x") is None
    again.remove("ci")
    assert json.loads((tmp_path / "tokens.json").read_text()) == []
    with pytest.raises(TokenError, match="no token named 'ci'"):
        again.remove("ci")
    with pytest.raises(TokenError, match="not allowed"):
        again.add("cluster-secret", "admin", hash_token(tok))
    with pytest.raises(TokenError, match="64 hex digits"):
        again.add("x", "read", "md5:abc")


def test_damaged_store_is_a_clear_error(tmp_path: pathlib.Path) -> None:
    (tmp_path / "tokens.json").write_text("{not json")
    with pytest.raises(TokenError, match="cannot be read"):
        TokenStore(str(tmp_path / "tokens.json"))

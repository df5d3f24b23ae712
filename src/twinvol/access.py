"""Who may call what: named tokens with a scope, stored hashed, and the scope each API call
needs.

Scopes nest: `read` (status, metrics, events) < `operate` (pairs, switching, DR, VMs,
fault reports) < `admin` (volumes, tokens). The cluster secret is an admin credential
named "cluster-secret", so nodes and existing tools keep working. A token is 32 random
bytes shown once; only its SHA-256 is kept (a random token needs no slow hash).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import time
from enum import StrEnum

import msgspec

SECRET_NAME = "cluster-secret"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class Scope(StrEnum):
    READ = "read"
    OPERATE = "operate"
    ADMIN = "admin"

    def allows(self, needed: Scope) -> bool:
        return _RANK[self] >= _RANK[needed]


_RANK = {Scope.READ: 0, Scope.OPERATE: 1, Scope.ADMIN: 2}
_READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_ADMIN_PREFIXES = ("/api/v1/volumes", "/api/v1/tokens")


def required_scope(method: str, path: str) -> Scope:
    """The scope a call needs: reads need `read` (tokens are listed by admins only),
    changes to volumes and tokens `admin`, every other change `operate`."""
    admin = any(path == p or path.startswith(p + "/") for p in _ADMIN_PREFIXES)
    if method in _READ_METHODS:
        return Scope.ADMIN if path.startswith("/api/v1/tokens") else Scope.READ
    return Scope.ADMIN if admin else Scope.OPERATE


def hash_token(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return "tvt_" + secrets.token_urlsafe(32)


class TokenError(Exception):
    """A token request that cannot be done (bad name or scope, unknown token)."""


class Token(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    scope: Scope
    hash: str
    created: float = 0.0


class TokenStore:
    """A node's tokens in `tokens.json` of its data directory (written atomically)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.tokens: dict[str, Token] = {}
        try:
            with open(path, "rb") as f:
                for t in msgspec.json.decode(f.read(), type=list[Token]):
                    self.tokens[t.name] = t
        except FileNotFoundError:
            pass
        except (OSError, msgspec.DecodeError) as e:
            raise TokenError(f"token file {path} cannot be read: {e}") from None

    def _save(self) -> None:
        tmp = self.path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(msgspec.json.encode(sorted(self.tokens.values(), key=lambda t: t.name)))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def add(self, name: str, scope: str, token_hash: str) -> Token:
        """Add or replace the token `name` (its hash, made by the client: the token itself
        never reaches a node's disk)."""
        if not _NAME.match(name) or name == SECRET_NAME:
            raise TokenError(f"token name {name!r} is not allowed (letters, digits, '_', '.', "
                             f"'-', at most 64, not {SECRET_NAME!r})")
        try:
            sc = Scope(scope)
        except ValueError:
            raise TokenError(f"scope {scope!r} is not one of read, operate, admin") from None
        if not re.fullmatch(r"sha256:[0-9a-f]{64}", token_hash):
            raise TokenError("hash must be 'sha256:' and 64 hex digits")
        tok = Token(name, sc, token_hash, time.time())
        self.tokens[name] = tok
        self._save()
        return tok

    def remove(self, name: str) -> None:
        if self.tokens.pop(name, None) is None:
            raise TokenError(f"no token named {name!r}")
        self._save()

    def identify(self, token: str) -> Token | None:
        """The token a bearer credential is, compared in constant time against each."""
        h = hash_token(token)
        found = None
        for t in self.tokens.values():
            if hmac.compare_digest(t.hash, h):
                found = t
        return found

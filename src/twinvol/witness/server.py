"""The builtin witness service: the `Arbiter` behind a small HTTP JSON API, with its grants
persisted (write, fsync, rename, fsync the directory) before any reply that depends on
them, so a witness killed at any point never forgets who may write.

Errors are ``{"error": {"code": ..., "message": ...}}``: ``invalid`` (400), ``unauthorized``
(401), ``conflict`` (409), ``io`` (503: the decision could not be persisted, so none was
made).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import msgspec
from aiohttp import web

from twinvol import __version__
from twinvol.access import TokenError
from twinvol.api_tokens import service_access
from twinvol.cluster import ClusterError
from twinvol.httpapi import error_response
from twinvol.tls.https import api_site, service_server
from twinvol.witness import WitnessSettings
from twinvol.witness.logic import (
    DEFAULT_TAKEOVER_AFTER,
    Arbiter,
    ArbitrateRequest,
    RequestError,
    StateError,
)

STATE_FILE = "state.json"

log = logging.getLogger("twinvol.witness")


class WitnessStartError(Exception):
    """The witness cannot start (state file damaged, data directory locked, port taken...)."""


class PersistError(Exception):
    """A decision could not be made durable, so it was not made."""


class HeartbeatBody(msgspec.Struct, forbid_unknown_fields=True):
    node: str


class ReleaseBody(msgspec.Struct, forbid_unknown_fields=True):
    pair: str
    node: str


class StateStore:
    """The witness's state file: one JSON document, replaced atomically."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.path = os.path.join(directory, STATE_FILE)

    def load(self) -> Any | None:
        """The saved state, or None if there is none yet; a damaged file is an error."""
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise WitnessStartError(f"cannot read state file {self.path}: {e.strerror}") from None
        try:
            return msgspec.json.decode(data)
        except msgspec.DecodeError as e:
            raise WitnessStartError(_corrupt(self.path, str(e))) from None

    def save(self, state: Any) -> None:
        tmp = self.path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, msgspec.json.encode(state) + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dfd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _corrupt(path: str, detail: str) -> str:
    return (f"state file {path} is damaged ({detail}); it records which node may write to "
            "each broken pair, so the witness will not start without it: restore it, or "
            "remove it only after checking that every pair is mirrored")


class WitnessServer:
    """A running witness: arbiter, state file, data-directory lock and HTTP API."""

    def __init__(self, settings: WitnessSettings,
                 takeover_after: float = DEFAULT_TAKEOVER_AFTER,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.clock = clock
        self.started = clock()
        self.data_dir = settings.data_dir
        try:
            os.makedirs(self.data_dir, exist_ok=True)
        except OSError as e:
            raise WitnessStartError(f"cannot create data directory {self.data_dir}: "
                                    f"{e.strerror}") from None
        self._lock_fd = self._lock()
        try:
            self.store = StateStore(self.data_dir)
            self.arbiter = Arbiter(settings.nodes, self.started, takeover_after)
            saved = self.store.load()
            if saved is not None:
                try:
                    self.arbiter.restore(saved)
                except StateError as e:
                    raise WitnessStartError(_corrupt(self.store.path, str(e))) from None
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._runner: web.AppRunner | None = None

    def _lock(self) -> int:
        path = os.path.join(self.data_dir, "witness.lock")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise WitnessStartError(f"cannot open {path}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise WitnessStartError(f"data directory {self.data_dir} is in use by another "
                                    "witness process") from None
        return fd

    def persist_since(self, before: dict[str, Any], seq: int) -> None:
        """Make any change since `seq` durable, or undo it and raise PersistError."""
        if self.arbiter.seq == seq:
            return
        try:
            self.store.save(self.arbiter.snapshot())
        except OSError as e:
            self.arbiter.restore(before)
            log.error("cannot persist witness state", extra={"error": str(e)})
            raise PersistError(f"cannot persist the decision to {self.store.path}: "
                               f"{e.strerror}; no decision was made") from None

    async def start(self) -> None:
        try:
            app = make_app(self)
        except TokenError as e:
            raise WitnessStartError(str(e)) from None
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        host, port = self.settings.config.hostport
        try:
            ctx = service_server(self.settings.tls_dir)
        except ClusterError as e:
            raise WitnessStartError(str(e)) from None
        try:
            await api_site(self._runner, host, port, ctx, "witness").start()
        except OSError as e:
            raise WitnessStartError(f"cannot listen on {host}:{port}: {e.strerror}") from e
        for pair in self.arbiter.unknown_holders():
            log.warning("pair held by a node missing from the cluster file",
                        extra={"pair": pair, "holder": self.arbiter.holder(pair)})
        log.info("witness serving", extra={"addr": self.settings.config.addr, "pid": os.getpid(),
                                           "holds": len(self.arbiter.holds),
                                           "takeover_after": self.arbiter.takeover_after,
                                           "auth": self.settings.secret is not None,
                                           "https": ctx is not None})

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        os.close(self._lock_fd)
        log.info("witness stopped")


_error = error_response


async def _body(request: web.Request, kind: type[Any]) -> Any:
    raw = await request.read()
    if not raw.strip():
        raise RequestError("request body must be a JSON object")
    try:
        return msgspec.json.decode(raw, type=kind)
    except msgspec.DecodeError as e:
        raise RequestError(f"bad request body: {e}") from None


def make_app(server: WitnessServer) -> web.Application:
    arbiter = server.arbiter
    # Every call needs a credential, the health probe too (it tells the witness's state):
    # the cluster secret (admin, what nodes send) or a scoped token; changes are audited.
    auth, token_api = service_access(server.data_dir, server.settings.secret, "witness",
                                     open_paths=())

    @web.middleware
    async def errors(request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            return await handler(request)  # type: ignore[no-any-return]
        except RequestError as e:
            return _error(409 if e.code == "conflict" else 400, e.code, str(e))
        except PersistError as e:
            return _error(503, "io", str(e))
        except web.HTTPException as e:
            if e.status >= 400:
                code = "not_found" if e.status == 404 else "http"
                return _error(e.status, code, f"{e.reason}: {request.method} {request.path}")
            raise

    app = web.Application(middlewares=[auth, errors], client_max_size=64 << 10)
    routes = web.RouteTableDef()

    @routes.get("/api/v1/health")
    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    @routes.get("/api/v1/status")
    async def status(_: web.Request) -> web.Response:
        now = server.clock()
        return web.json_response({
            "pid": os.getpid(),
            "version": __version__,
            "addr": server.settings.config.addr,
            "uptime": round(now - server.started, 3),
            "takeover_after": arbiter.takeover_after,
            "nodes": arbiter.node_status(now),
            "pairs": len(arbiter.holds),
            "seq": arbiter.seq,
        })

    @routes.get("/api/v1/pairs")
    async def pairs(_: web.Request) -> web.Response:
        return web.json_response({"pairs": [
            {"pair": p, "holder": h.node, "partner": h.partner, "role": h.role,
             "generation": h.generation} for p, h in sorted(arbiter.holds.items())]})

    @routes.post("/api/v1/heartbeat")
    async def heartbeat(request: web.Request) -> web.Response:
        body: HeartbeatBody = await _body(request, HeartbeatBody)
        arbiter.heartbeat(body.node, server.clock())
        return web.json_response({"status": "ok"})

    @routes.post("/api/v1/arbitrate")
    async def arbitrate(request: web.Request) -> web.Response:
        req: ArbitrateRequest = await _body(request, ArbitrateRequest)
        before, seq = arbiter.snapshot(), arbiter.seq
        decision = arbiter.arbitrate(req, server.clock())
        server.persist_since(before, seq)
        extra = {"pair": req.pair, "node": req.node, "role": req.role,
                 "generation": req.generation, "decision": decision.decision,
                 "holder": decision.holder, "reason": decision.reason}
        log.log(logging.DEBUG if decision.decision == "wait" else logging.INFO,
                "arbitrated", extra=extra)
        return web.json_response(msgspec.to_builtins(decision))

    @routes.post("/api/v1/release")
    async def release(request: web.Request) -> web.Response:
        body: ReleaseBody = await _body(request, ReleaseBody)
        before, seq = arbiter.snapshot(), arbiter.seq
        released = arbiter.release(body.pair, body.node, server.clock())
        server.persist_since(before, seq)
        if released:
            log.info("released", extra={"pair": body.pair, "node": body.node})
        return web.json_response({"pair": body.pair, "released": released, "holder": None})

    app.add_routes(routes)
    app.add_routes(token_api)
    return app


async def serve(settings: WitnessSettings, takeover_after: float = DEFAULT_TAKEOVER_AFTER
                ) -> None:
    server = WitnessServer(settings, takeover_after)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
        await stop.wait()
    finally:
        await server.stop()


def run(settings: WitnessSettings, takeover_after: float = DEFAULT_TAKEOVER_AFTER) -> None:
    """Run the witness in the foreground until SIGTERM/SIGINT."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a pinned dependency
        asyncio.run(serve(settings, takeover_after))
        return
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(serve(settings, takeover_after))


__all__ = ["PersistError", "StateStore", "WitnessServer", "WitnessStartError", "run", "serve"]

"""The real witness process driven through `HttpWitness`: sticky grants, waiting and
takeover, kill -9 and restart, the shared secret, bad input, damaged state."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import tomli_w

from twinvol.supervisor import Supervisor, free_ports
from twinvol.witness.client import HttpWitness, WitnessRejected, WitnessUnreachable
from twinvol.witness.logic import HEARTBEAT_INTERVAL, WAIT_RETRY, Role

pytestmark = pytest.mark.e2e

SECRET = "s3cret"
TAKEOVER = 1.0

# `twinvol witness ...` through the real CLI entry point (its one-line errors), also
# before cli/main.py registers the witness sub-app.
RUNNER = ("from twinvol.cli import main as m, witness as w; "
          "any(g.name == 'witness' for g in m.app.registered_groups) "
          "or m.app.add_typer(w.app, name='witness'); m.main()")


class WitnessProc:
    """One witness process with its own cluster file (nodes A and B are never started)."""

    def __init__(self, directory: str, secret: str | None = SECRET) -> None:
        self.dir = directory
        self.secret = secret
        ports = free_ports(5)
        self.addr = f"127.0.0.1:{ports[4]}"
        self.url = f"http://{self.addr}"
        self.cluster_path = os.path.join(directory, "cluster.toml")
        self.data_dir = os.path.join(directory, "witness")
        self.state_path = os.path.join(self.data_dir, "state.json")
        self.log_path = os.path.join(directory, "witness.log")
        cluster: dict[str, Any] = {"name": "wt"}
        if secret:
            cluster["secret"] = secret
        doc = {
            "cluster": cluster,
            "nodes": {n: {"site": n, "nbd": f"127.0.0.1:{ports[2 * i]}",
                          "api": f"127.0.0.1:{ports[2 * i + 1]}", "data_dir": n}
                      for i, n in enumerate(("A", "B"))},
            "witness": {"addr": self.addr, "data_dir": "witness"},
        }
        with open(self.cluster_path, "wb") as f:
            tomli_w.dump(doc, f)
        self.sup = Supervisor()

    def argv(self) -> list[str]:
        return [sys.executable, "-c", RUNNER, "witness", "run", "--cluster", self.cluster_path,
                "--takeover-after", str(TAKEOVER)]

    def start(self) -> None:
        comp = self.sup.start("witness", self.argv(), self.log_path)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert comp.alive(), f"witness exited: {comp.tail()}"
            try:
                if self.http("GET", "/api/v1/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"witness not ready: {comp.tail()}")

    def run_once(self, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run the command expecting it to refuse to start."""
        return subprocess.run(self.argv(), text=True, capture_output=True, timeout=timeout)

    def stop(self) -> int | None:
        self.sup.stop_all()
        proc = self.sup.components["witness"].proc if "witness" in self.sup.components else None
        return None if proc is None else proc.returncode

    def kill9(self) -> None:
        self.sup.kill("witness")

    def client(self, secret: str | None = None) -> HttpWitness:
        return HttpWitness(self.addr, secret if secret is not None else self.secret)

    def http(self, method: str, path: str, body: bytes | None = None,
             auth: str | None = "default") -> tuple[int, Any]:
        headers = {"Content-Type": "application/json"}
        token = self.secret if auth == "default" else auth
        if token:
            headers["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()


@pytest.fixture
def witness(tmp_path: Any) -> Iterator[WitnessProc]:
    w = WitnessProc(str(tmp_path))
    w.start()
    yield w
    w.stop()


@pytest.fixture
def open_witness(tmp_path: Any) -> Iterator[WitnessProc]:
    """A witness without a secret."""
    w = WitnessProc(str(tmp_path), secret=None)
    w.start()
    yield w
    w.stop()


def test_grants_are_sticky_until_the_holder_releases(witness: WitnessProc) -> None:
    async def go() -> None:
        async with witness.client() as w:
            d = await w.arbitrate("P", "A", "B", "primary", "gA")
            assert (d.decision, d.holder) == ("continue", "A")
            roles: tuple[Role, ...] = ("secondary", "primary")
            for role in roles:
                d = await w.arbitrate("P", "B", "A", role, "gB")
                assert (d.decision, d.holder) == ("block", "A")
            assert (await w.arbitrate("P", "A", "B", "primary", "gA")).decision == "continue"
            assert await w.pairs() == [{"pair": "P", "holder": "A", "partner": "B",
                                        "role": "primary", "generation": "gA"}]
            with pytest.raises(WitnessRejected) as e:
                await w.release("P", "B")
            assert (e.value.status, e.value.code) == (409, "conflict")
            assert await w.pairs() != []
            assert await w.release("P", "A") is True
            assert await w.release("P", "A") is False  # not held: a no-op success
            assert await w.pairs() == []
            # A was just heard from, so its secondary must wait rather than take over.
            assert (await w.arbitrate("P", "B", "A", "secondary", "gB")).decision == "wait"

    asyncio.run(go())
    assert witness.stop() == 0  # SIGTERM stops it cleanly
    assert '"witness stopped"' in witness.log()


def test_link_cut_primary_keeps_writing_secondary_is_blocked(witness: WitnessProc) -> None:
    async def go() -> None:
        async with witness.client() as w:
            await w.heartbeat("A")
            await w.heartbeat("B")
            d = await w.arbitrate("P", "B", "A", "secondary", "gB")
            assert (d.decision, d.holder) == ("wait", None)
            assert (await w.arbitrate("P", "A", "B", "primary", "gA")).decision == "continue"
            d = await w.arbitrate("P", "B", "A", "secondary", "gB")
            assert (d.decision, d.holder) == ("block", "A")

    asyncio.run(go())


def test_secondary_takes_over_only_after_the_primary_stops(open_witness: WitnessProc) -> None:
    async def go() -> None:
        async with open_witness.client() as w:
            async def primary_alive() -> None:
                while True:  # faster than a node would, so a loaded machine cannot flake
                    await w.heartbeat("A")
                    await asyncio.sleep(HEARTBEAT_INTERVAL / 5)

            beats = asyncio.create_task(primary_alive())
            await asyncio.sleep(0.1)
            waited_until = time.monotonic() + 2 * TAKEOVER
            while time.monotonic() < waited_until:  # longer than takeover_after
                d = await w.arbitrate("P", "B", "A", "secondary", "gB")
                assert (d.decision, d.holder) == ("wait", None), d
                await asyncio.sleep(WAIT_RETRY)
            beats.cancel()  # the primary dies without ever asking
            decisions = []
            for _ in range(100):
                d = await w.arbitrate("P", "B", "A", "secondary", "gB")
                decisions.append(d.decision)
                if d.decision != "wait":
                    break
                await asyncio.sleep(WAIT_RETRY)
            assert decisions[-1] == "continue" and set(decisions[:-1]) <= {"wait"}
            assert d.holder == "B" and "silent" in d.reason
            status = await w.status()
            assert status["nodes"]["A"]["gone"] is True
            assert status["nodes"]["B"]["gone"] is False
            # The primary comes back: it is the stale side.
            await w.heartbeat("A")
            d = await w.arbitrate("P", "A", "B", "primary", "gA")
            assert (d.decision, d.holder) == ("block", "B")

    asyncio.run(go())


def test_kill9_and_restart_keep_the_grant(witness: WitnessProc) -> None:
    async def grant() -> None:
        async with witness.client() as w:
            assert (await w.arbitrate("P", "A", "B", "primary", "gA")).decision == "continue"

    async def after_kill() -> None:
        async with witness.client() as w:
            with pytest.raises(WitnessUnreachable):
                await w.heartbeat("A")

    async def after_restart() -> None:
        async with witness.client() as w:
            await asyncio.sleep(TAKEOVER)  # even with A silent since the restart
            d = await w.arbitrate("P", "B", "A", "secondary", "gB")
            assert (d.decision, d.holder) == ("block", "A")
            assert [p["holder"] for p in await w.pairs()] == ["A"]
            assert (await w.arbitrate("P", "A", "B", "primary", "gA")).decision == "continue"

    asyncio.run(grant())
    witness.kill9()
    asyncio.run(after_kill())
    witness.start()
    asyncio.run(after_restart())


def test_a_fresh_witness_gives_the_primary_time_to_check_in(witness: WitnessProc) -> None:
    witness.kill9()
    witness.start()

    async def go() -> None:
        async with witness.client() as w:
            assert (await w.arbitrate("P", "B", "A", "secondary", "g")).decision == "wait"

    asyncio.run(go())


def test_secret_is_required(witness: WitnessProc) -> None:
    for token in (None, "wrong", SECRET + "x"):
        status, body = witness.http("GET", "/api/v1/health", auth=token)
        assert status == 401 and body["error"]["code"] == "unauthorized"
        status, body = witness.http(
            "POST", "/api/v1/arbitrate", auth=token,
            body=b'{"pair":"P","node":"B","partner":"A","role":"primary","generation":"g"}')
        assert status == 401

    async def go() -> None:
        async with witness.client("wrong") as w:
            with pytest.raises(WitnessRejected) as e:
                await w.arbitrate("P", "B", "A", "primary", "g")
            assert (e.value.status, e.value.code) == (401, "unauthorized")
        async with witness.client() as w:
            assert await w.pairs() == []  # nothing was granted to the unauthenticated caller
            await w.heartbeat("A")

    asyncio.run(go())
    assert witness.http("GET", "/api/v1/health") == (200, {"status": "ok"})


def test_no_secret_means_open(open_witness: WitnessProc) -> None:
    assert open_witness.http("GET", "/api/v1/health", auth=None) == (200, {"status": "ok"})


ASK = {"pair": "P", "node": "B", "partner": "A", "role": "primary", "generation": "g"}


def js(**changes: Any) -> bytes:
    """`ASK` with `changes`; a value of None drops the field."""
    return json.dumps({k: v for k, v in {**ASK, **changes}.items() if v is not None}).encode()


BAD = [
    ("/api/v1/arbitrate", b""),
    ("/api/v1/arbitrate", b"not json"),
    ("/api/v1/arbitrate", b"[]"),
    ("/api/v1/arbitrate", js(generation=None)),
    ("/api/v1/arbitrate", js(role="boss")),
    ("/api/v1/arbitrate", js(partner="B")),
    ("/api/v1/arbitrate", js(node="Z")),
    ("/api/v1/arbitrate", js(partner="Z")),
    ("/api/v1/arbitrate", js(pair=7)),
    ("/api/v1/arbitrate", js(pair="")),
    ("/api/v1/arbitrate", js(pair="Q", generation=1)),
    ("/api/v1/arbitrate", js(pair="Q", extra=1)),
    ("/api/v1/heartbeat", b"{}"),
    ("/api/v1/heartbeat", b'{"node":"Z"}'),
    ("/api/v1/heartbeat", b'{"node":["A"]}'),
    ("/api/v1/release", b'{"pair":"P"}'),
    ("/api/v1/release", b'{"pair":"P","node":"Z"}'),
]


def test_bad_input_is_refused_and_changes_nothing(witness: WitnessProc) -> None:
    async def grant() -> None:
        async with witness.client() as w:
            assert (await w.arbitrate("P", "A", "B", "primary", "gA")).decision == "continue"

    asyncio.run(grant())
    with open(witness.state_path, "rb") as f:
        state = f.read()
    _, before = witness.http("GET", "/api/v1/status")
    for path, body in BAD:
        status, answer = witness.http("POST", path, body)
        assert status == 400, (path, body, answer)
        assert answer["error"]["code"] == "invalid" and answer["error"]["message"]
    assert witness.http("GET", "/api/v1/pairs")[1]["pairs"] == [
        {"pair": "P", "holder": "A", "partner": "B", "role": "primary", "generation": "gA"}]
    _, after = witness.http("GET", "/api/v1/status")
    assert after["seq"] == before["seq"]
    assert after["nodes"]["B"]["last_heartbeat_ago"] is None  # not even counted as alive
    with open(witness.state_path, "rb") as f:
        assert f.read() == state
    status, answer = witness.http("GET", "/api/v1/nowhere")
    assert status == 404 and answer["error"]["code"] == "not_found"


def test_unreachable_witness(tmp_path: Any) -> None:
    (port,) = free_ports(1)

    async def go() -> None:
        async with HttpWitness(f"127.0.0.1:{port}", SECRET) as w:
            with pytest.raises(WitnessUnreachable):
                await w.arbitrate("P", "A", "B", "primary", "g")

    asyncio.run(go())


@pytest.mark.parametrize("content", [
    b"", b"{not json", b'{"format": "twinvol-witness/1", "seq": 3, "holds": {"P": 1}}',
    b'{"format": "something-else/2", "seq": 0, "holds": {}}',
])
def test_damaged_state_file_refuses_to_start(tmp_path: Any, content: bytes) -> None:
    w = WitnessProc(str(tmp_path))
    os.makedirs(w.data_dir)
    with open(w.state_path, "wb") as f:
        f.write(content)
    r = w.run_once()
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "witness cannot start" in lines[0] and w.state_path in lines[0]
    assert "damaged" in lines[0]
    with open(w.state_path, "rb") as f:
        assert f.read() == content  # left for the operator, never silently replaced


def test_start_errors_are_one_line(witness: WitnessProc, tmp_path: Any) -> None:
    # A second witness on the same data directory.
    r = witness.run_once()
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1
    assert "in use by another witness" in r.stderr
    # A cluster file without a [witness] table.
    other = tmp_path / "other.toml"
    other.write_text('[nodes.A]\nsite = "A"\nnbd = "127.0.0.1:1"\napi = "127.0.0.1:2"\n'
                     'data_dir = "A"\n')
    r = subprocess.run([sys.executable, "-c", RUNNER, "witness", "run", "--cluster",
                        str(other)], text=True, capture_output=True, timeout=30)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1
    assert "[witness]" in r.stderr

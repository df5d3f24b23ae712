"""Volume switching as the host agent sees it: the nodes keep the switching table;
the agent keeps a copy (for its status and API) and carries switch commands to them.
"""

from __future__ import annotations

import logging
from typing import Any

from twinvol.host.nodes import HttpNodeLink, NodeLink, NodeUnreachable

log = logging.getLogger("twinvol.host")


class Switching:
    """This host's copy of the switching table, and the switch command's carrier."""

    def __init__(self, links: dict[str, NodeLink]) -> None:
        self.links = links  # the agent's, filled when it starts
        # export -> entry, as this host last learned it: read from the nodes at start,
        # then kept by their `switched*` events.
        self.table: dict[str, dict[str, Any]] = {}

    def on_event(self, node: str, export: str, ev: dict[str, Any]) -> None:
        """A node pushed `switched` or `switched_back` for `export`."""
        cur = self.table.get(export)
        version = ev.get("version")
        if ev["type"] == "switched":
            if cur is None or int(cur.get("version") or 0) <= int(version or 0):
                self.table[export] = {k: ev.get(k)
                                      for k in ("source", "target", "version", "nodes")}
        elif cur is not None and cur.get("version") == version:
            del self.table[export]
        log.info("node pushed a switching change", extra={
            "node": node, "export": export, "event": ev["type"], "target": ev.get("target")})

    async def load(self) -> None:
        """Read the switching table from the nodes (after a start or a reconnect)."""
        table: dict[str, dict[str, Any]] = {}
        for link in self.links.values():
            if not isinstance(link, HttpNodeLink):
                continue
            try:
                status, body = await link.call("GET", "/api/v1/switching", timeout=5.0)
            except NodeUnreachable:
                continue
            if status != 200 or not isinstance(body, dict):
                continue
            for e in body.get("entries") or []:
                if isinstance(e, dict) and isinstance(e.get("host_id"), str):
                    old = table.get(e["host_id"])
                    if old is None or int(old["version"]) < int(e.get("version") or 0):
                        table[e["host_id"]] = {k: e.get(k) for k in ("source", "target",
                                                                      "version", "nodes")}
        self.table = table

    async def switch(self, export: str, to: str | None, back: bool) -> tuple[int, Any]:
        """Carry a switch command to a node: the target's node when the target names one
        of this host's nodes, else the first that answers. Returns (status, body)."""
        order = list(self.links)
        where = (to or "").partition(":")[0] if to and ":" in to else None
        cur = self.table.get(export)
        if back and cur is not None:
            where = str(cur.get("source", "")).partition(":")[0]
        if where in self.links:
            order.remove(where)
            order.insert(0, where)

        body: dict[str, Any] = {"host_id": export}
        if not back:
            body["to"] = to
            body["nodes"] = list(self.links)
        errors = []
        unknown: list[tuple[int, Any]] = []
        for name in order:
            link = self.links[name]
            if not isinstance(link, HttpNodeLink):
                continue
            try:
                status, answer = await link.call(
                    "POST", "/api/v1/switching/back" if back else "/api/v1/switching", body)
            except NodeUnreachable as e:
                errors.append(str(e))
                continue
            if status == 404 and not back:
                # This node's copy has no such partner (e.g. it is the target itself, a far
                # copy): the source is on another node.
                unknown.append((status, answer))
                continue
            if status < 300:
                await self.load()
            return status, answer
        if unknown:
            return unknown[-1]
        return 503, {"error": {"code": "io", "message": "no storage node took the switch "
                                                        "command: " + "; ".join(errors)}}

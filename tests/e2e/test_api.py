"""Node API pieces that hosts use: export identity and the pushed event stream."""

from __future__ import annotations

import json
import urllib.request

import pytest

from nodeproc import NodeProc

pytestmark = pytest.mark.e2e


def test_export_identity_and_override(node: NodeProc) -> None:
    node.create_volume("idv", 1 << 20, serial="TVSHARED1", volume_id=4242,
                       export_name="shared-exp", description="one device")
    status, body = node.api("GET", "/api/v1/exports/shared-exp")
    assert status == 200
    assert body["volume"] == "idv" and body["io_mode"] == "local"
    assert body["virtual_identity"] == {"serial": "TVSHARED1", "volume_id": 4242,
                                        "export_name": "shared-exp", "size": 1 << 20,
                                        "description": "one device"}
    status, body = node.api("GET", "/api/v1/exports/nope")
    assert status == 404 and body["error"]["code"] == "not_found"
    status, body = node.api("POST", "/api/v1/volumes",
                            {"name": "badid", "size": 512, "serial": "no spaces!"})
    assert status == 400 and "invalid serial" in body["error"]["message"]


def test_event_stream_push(node: NodeProc) -> None:
    status, body = node.api("GET", "/api/v1/events")
    assert status == 200
    start = body["seq"]
    url = node.config.api_url + f"/api/v1/events?follow=1&since={start}"
    with urllib.request.urlopen(url, timeout=10) as stream:
        node.create_volume("evv", 1 << 20)
        while True:
            ev = json.loads(stream.readline())
            if ev["type"] != "heartbeat":
                break
    assert ev["type"] == "volume_created" and ev["volume"] == "evv"
    assert ev["seq"] == start + 1 and ev["node"] == "A"
    status, body = node.api("GET", f"/api/v1/events?since={start}")
    assert [e["volume"] for e in body["events"]] == ["evv"]

"""The web dashboard in a real headless Chromium (Debian's package) driven over the
DevTools protocol: the page shows the cluster, and a pair split from the CLI appears on
the open page without a reload."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from clusterproc import ClusterProc
from twinvol.supervisor import free_ports, twinvol_argv

pytestmark = pytest.mark.e2e

MiB = 1 << 20


class Page:
    """One Chromium tab reached through its DevTools websocket."""

    def __init__(self, ws_url: str) -> None:
        self.ws_url = ws_url
        self.n = 0

    async def _call(self, method: str, params: dict[str, Any]) -> Any:
        async with aiohttp.ClientSession() as s, s.ws_connect(self.ws_url, max_msg_size=0) as ws:
            self.n += 1
            await ws.send_json({"id": self.n, "method": method, "params": params})
            async for msg in ws:
                data = json.loads(msg.data)
                if data.get("id") == self.n:
                    return data.get("result")
        raise AssertionError(f"no answer to {method}")

    def eval(self, expr: str) -> Any:
        res = asyncio.run(self._call("Runtime.evaluate",
                                     {"expression": expr, "returnByValue": True}))
        return res["result"].get("value")

    def wait(self, expr: str, want: Any, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        got = None
        while time.monotonic() < deadline:
            got = self.eval(expr)
            if got == want:
                return
            time.sleep(0.1)
        raise AssertionError(f"{expr} is {got!r}, not {want!r}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterProc]:
    c = ClusterProc(str(tmp_path_factory.mktemp("dash")), host=True)
    c.start()
    status, body = c.api("A", "POST", "/api/v1/volumes", {"name": "p1", "size": 8 * MiB})
    assert status == 201, body
    assert c.cli("pair", "create", "p1", "--primary", "A", "--secondary", "B",
                 "--wait").returncode == 0
    yield c
    c.stop()


@pytest.fixture
def page(cluster: ClusterProc, tmp_path: Any) -> Iterator[Page]:
    chromium = shutil.which("chromium")
    assert chromium, "scripts/setup installs chromium"
    port, devtools = free_ports(2)
    url = f"http://127.0.0.1:{port}/"
    cluster.sup.start("dashboard", twinvol_argv("dashboard", "--cluster", cluster.path,
                                                "--listen", f"127.0.0.1:{port}",
                                                "--interval", "0.3"),
                      os.path.join(str(tmp_path), "dashboard.log"))
    cluster.sup.wait_http("dashboard", url + "api/v1/health")
    browser = subprocess.Popen(
        [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
         f"--remote-debugging-port={devtools}", f"--user-data-dir={tmp_path}/chrome",
         "--window-size=1200,1400", url],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        ws = None
        while ws is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{devtools}/json/list",
                                            timeout=2) as r:
                    tabs = json.loads(r.read())
                ws = next((t["webSocketDebuggerUrl"] for t in tabs
                           if t.get("type") == "page" and t["url"] == url), None)
            except OSError:
                pass
            time.sleep(0.2)
        assert ws, "Chromium did not open the dashboard"
        yield Page(ws)
    finally:
        os.killpg(browser.pid, signal.SIGKILL)
        browser.wait()
        cluster.sup.stop("dashboard")


STATE_OF_P1 = "document.querySelector('tr[data-pair=\"p1\"] td:nth-child(4)')?.textContent"


def test_a_split_shows_up_without_a_reload(cluster: ClusterProc, page: Page,
                                           tmp_path: Any) -> None:
    page.wait(STATE_OF_P1, "mirrored")
    page.wait("document.getElementById('verdict').textContent", "HEALTHY")
    assert page.eval("document.getElementById('conn').textContent") == "live"
    assert page.eval("[...document.querySelectorAll('#nodes tbody tr')]"
                     ".map(r => r.dataset.node + ':' + r.cells[2].textContent)") == [
        "A:up", "B:up"]
    page.eval("window.testMarker = 'same page'")  # a reload would drop it
    split = cluster.cli("pair", "split", "p1")
    assert split.returncode == 0, split.stderr
    page.wait(STATE_OF_P1, "split")
    page.wait("document.getElementById('verdict').textContent", "DEGRADED")
    assert page.eval("window.testMarker") == "same page"
    assert "pair p1 is split" in page.eval("document.getElementById('reasons').textContent")
    # The fault stream reaches the page too: a test fault raised on node B.
    status, body = cluster.api("B", "POST", "/api/v1/faults/test",
                               {"severity": "error", "subject": "dash-probe"})
    assert status == 200, body
    page.wait("[...document.querySelectorAll('#faults tbody tr')].some("
              "r => r.cells[5].textContent === 'dash-probe' && r.cells[3].textContent === 'B')",
              True)
    shot = asyncio.run(page._call("Page.captureScreenshot", {"format": "png"}))
    with open(os.path.join(str(tmp_path), "dashboard.png"), "wb") as f:
        import base64
        f.write(base64.b64decode(shot["data"]))
    # Read-only: nothing but GET is served.
    url = page.eval("location.href")
    req = urllib.request.Request(url + "api/v1/status", data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=5)
    assert e.value.code == 405
    assert cluster.cli("pair", "resync", "p1").returncode == 0
    page.wait(STATE_OF_P1, "mirrored")

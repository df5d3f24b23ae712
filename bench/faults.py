"""Fault relay: what the host sees when nodes push fault reports, against polling every node.

Starts nodes A, B, C and a host agent whose paths are A and B only (C is the far site),
then raises the same fault reports on all three nodes over `--duration` seconds. Two
observers see them at once:

- push: the host agent, following A's and B's fault logs (C's reports come relayed);
- poll: a poller that asks every node (C included, which a real host could not even
  reach) `GET /api/v1/faults?since=N` every `--interval` seconds, the cheapest way to
  learn of a fault within that interval without push.

It prints the messages (pushed lines incl. heartbeats / HTTP requests) and bytes (both
directions, headers included) each observer handled, the ratio, and the delay from the
origin raising a report to the observer having it.

    .venv/bin/python bench/faults.py [--duration 20] [--faults 30] [--interval 1.0]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from typing import Any

import tomli_w
from rich.console import Console
from rich.table import Table

try:
    from twinvol.supervisor import Supervisor, free_ports, twinvol_argv
except ImportError:  # pragma: no cover - only when run with the wrong interpreter
    sys.exit("bench/faults.py needs twinvol importable: run it with .venv/bin/python")

SECRET = "bench-secret"
NODES = ("A", "B", "C")
console = Console(width=None if sys.stdout.isatty() else 120)


def call(url: str, body: dict[str, Any] | None = None) -> Any:
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                 method="GET" if body is None else "POST",
                                 headers={"Authorization": f"Bearer {SECRET}",
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


class Poller(threading.Thread):
    """Polls every node's fault log like a host without push would have to."""

    def __init__(self, apis: dict[str, str], interval: float) -> None:
        super().__init__(daemon=True)
        self.apis = apis
        self.interval = interval
        self.cursor = dict.fromkeys(apis, 0)
        self.requests = 0
        self.bytes = 0
        self.seen: dict[str, float] = {}  # fault id -> when the poller first had it
        self.stop = threading.Event()

    def prime(self) -> None:
        for n, api in self.apis.items():
            self.cursor[n] = int(call(f"{api}/api/v1/faults?since=1000000000")["lseq"])

    def run(self) -> None:
        conns = {n: http.client.HTTPConnection(api.removeprefix("http://"), timeout=5)
                 for n, api in self.apis.items()}
        while not self.stop.wait(self.interval):
            for n, conn in conns.items():
                path = f"/api/v1/faults?since={self.cursor[n]}"
                headers = {"Authorization": f"Bearer {SECRET}"}
                conn.request("GET", path, headers=headers)
                resp = conn.getresponse()
                body = resp.read()
                self.requests += 1
                req_bytes = len(f"GET {path} HTTP/1.1\r\n") + sum(
                    len(f"{k}: {v}\r\n") for k, v in headers.items()) + 40  # Host, encoding
                resp_bytes = 17 + sum(len(f"{k}: {v}\r\n") for k, v in resp.getheaders())
                self.bytes += req_bytes + resp_bytes + len(body)
                got = json.loads(body)
                now = time.time()
                for e in got["faults"]:
                    # Each node's log holds its own reports and the ones relayed to it.
                    self.seen.setdefault(e["report"]["id"], now)
                self.cursor[n] = max(self.cursor[n], int(got["lseq"]))
        for conn in conns.values():
            conn.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--faults", type=int, default=30)
    ap.add_argument("--interval", type=float, default=1.0, help="polling interval (s)")
    ap.add_argument("--json-out")
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="twinvol-bench-faults-")
    ports = iter(free_ports(3 * len(NODES) + 2))
    cfg: dict[str, Any] = {
        "cluster": {"name": "bench", "secret": SECRET},
        "nodes": {n: {"site": n, "nbd": f"127.0.0.1:{next(ports)}",
                      "api": f"127.0.0.1:{next(ports)}", "peer": f"127.0.0.1:{next(ports)}",
                      "data_dir": f"data-{n}"} for n in NODES},
        "host": {"nbd": f"127.0.0.1:{next(ports)}", "api": f"127.0.0.1:{next(ports)}",
                 "nodes": ["A", "B"]},
        "faults": {"rate_burst": 1000},
    }
    path = os.path.join(tmp, "cluster.toml")
    with open(path, "wb") as f:
        tomli_w.dump(cfg, f)
    apis = {n: f"http://{cfg['nodes'][n]['api']}" for n in NODES}
    host_api = f"http://{cfg['host']['api']}"
    sup = Supervisor()
    try:
        for n in NODES:
            sup.start(n, twinvol_argv("node", "run", "--cluster", path, "--node", n),
                      os.path.join(tmp, f"{n}.log"))
        for n in NODES:
            sup.wait_http(n, apis[n] + "/api/v1/health")
        sup.start("host", twinvol_argv("host", "run", "--cluster", path),
                  os.path.join(tmp, "host.log"))
        sup.wait_http("host", host_api + "/api/v1/health")
        deadline = time.monotonic() + 20
        while call(f"{apis['C']}/api/v1/faults/status")["route"] \
                not in ("A", "B"):
            if time.monotonic() > deadline:
                sys.exit("C never found a relay with the host listening")
            time.sleep(0.1)
        time.sleep(2.5)  # start-up reports (peer links) settle before counting

        def streams() -> dict[str, Any]:
            with urllib.request.urlopen(host_api + "/api/v1/status", timeout=10) as r:
                return json.loads(r.read())["faults"]["streams"]  # type: ignore[no-any-return]

        poller = Poller(apis, args.interval)
        poller.prime()
        before = streams()
        poller.start()
        ids: list[str] = []
        start = time.monotonic()
        with console.status("raising faults on A, B, C") as status:
            for i in range(args.faults):
                node = NODES[i % len(NODES)]
                ans = call(apis[node] + "/api/v1/faults/test",
                           {"description": f"bench fault {i}", "kind": "bench"})
                ids.append(f"{ans['stream']}/{ans['last_seq']}")
                status.update(f"raised {i + 1}/{args.faults}")
                time.sleep(max(0.0, start + (i + 1) * args.duration / args.faults
                               - time.monotonic()))
            time.sleep(max(2 * args.interval, 1.0))
        poller.stop.set()
        poller.join()
        after = streams()
        with urllib.request.urlopen(host_api + "/api/v1/faults", timeout=10) as r:
            got = {e["report"]["id"]: e["report"] for e in json.loads(r.read())["faults"]}
        elapsed = time.monotonic() - start
    finally:
        sup.stop_all()

    missing = [i for i in ids if i not in got]
    push_msgs = sum(after[n]["messages"] - before[n]["messages"] for n in after)
    push_bytes = sum(after[n]["bytes"] - before[n]["bytes"] for n in after)
    push_delay = [got[i]["path"][-1]["time"] - got[i]["path"][0]["time"] for i in ids
                  if i in got]
    poll_delay = [poller.seen[i] - got[i]["path"][0]["time"] for i in ids
                  if i in poller.seen and i in got]
    result = {
        "duration_s": round(elapsed, 1), "faults": len(ids), "missing_at_host": len(missing),
        "poll_interval_s": args.interval,
        "push": {"messages": push_msgs, "bytes": push_bytes, "connections": 2,
                 "delay_median_ms": round(statistics.median(push_delay) * 1000, 1)
                 if push_delay else None},
        "poll": {"messages": poller.requests, "bytes": poller.bytes,
                 "connections": len(NODES),
                 "delay_median_ms": round(statistics.median(poll_delay) * 1000, 1)
                 if poll_delay else None},
    }
    result["reduction"] = {
        "messages": round(poller.requests / max(1, push_msgs), 2),
        "bytes": round(poller.bytes / max(1, push_bytes), 2)}
    t = Table(title=f"{len(ids)} faults on A, B, C over {elapsed:.0f} s; the host's paths are "
                    f"A and B (C relayed)")
    for col in ("observer", "messages", "bytes", "nodes contacted", "median delay"):
        t.add_column(col, justify="right")
    for name, key in (("push (host agent)", "push"), (f"poll every {args.interval:g} s", "poll")):
        r = result[key]
        t.add_row(name, str(r["messages"]), str(r["bytes"]),
                  "A, B" if key == "push" else "A, B, C",
                  f"{r['delay_median_ms']} ms")
    console.print(t)
    console.print(f"polling costs {result['reduction']['messages']}x the messages and "
                  f"{result['reduction']['bytes']}x the bytes of push, and needs a route to "
                  f"every node; missing at the host: {len(missing)}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)
    if missing:
        sys.exit(1)


if __name__ == "__main__":
    main()

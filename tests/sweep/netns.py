"""The sweep's network: nodes A, B and the witness W in their own network namespaces,
one veth pair per link, so each link can be cut alone with `ip link set DEV down`.

Each namespace has one /32 service address on `lo` that its processes listen on. Every
link is a veth pair with a /30; each end routes the other end's service address over
it (sourced from its own service address), so a link carries exactly one path. The root
namespace (the host: agent, clients, harness) reaches A, B and W over its own veths;
its `unreachable` route for the service /24 makes a cut host link fail fast instead of
leaking to the default route. A, B and W have no default route.

Names carry a random tag, and `Net.close` (also run at exit) removes everything.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import random
import subprocess
from dataclasses import dataclass

NODES = ("A", "B", "W")
HOST = "host"
# link name -> (end 0, end 1); the host<->W link is for the harness and never cut
LINKS: dict[str, tuple[str, str]] = {
    "hA": (HOST, "A"), "hB": (HOST, "B"), "hW": (HOST, "W"),
    "AB": ("A", "B"), "AW": ("A", "W"), "BW": ("B", "W"),
}


def full_mesh(nodes: tuple[str, ...]) -> dict[str, tuple[str, str]]:
    """The links of `nodes`: one from the host to each, one between every two of them
    (for the three-site sweep: A, B, C and W)."""
    links = {f"h{n}": (HOST, n) for n in nodes}
    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            links[f"{a}{b}"] = (a, b)
    return links


class NetError(RuntimeError):
    """A namespace or link could not be set up."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if check and p.returncode != 0:
        raise NetError(f"ip {' '.join(args)}: {p.stderr.strip()}")
    return p


def _free_octet() -> int:
    """A second octet 10.N.0.0/16 that no address or route of the host uses yet."""
    used = ip("-4", "addr").stdout + ip("-4", "route").stdout
    for n in random.sample(range(64, 128), 64):
        if f"10.{n}." not in used:
            return n
    raise NetError("no free 10.N.0.0/16 between 10.64 and 10.127")


@dataclass(frozen=True)
class End:
    link: str
    side: str      # HOST or a namespace's node name
    dev: str
    addr: str      # this end's /30 address
    peer: str      # the other end's /30 address
    peer_side: str


class Net:
    """The namespaces and links of one sweep run."""

    def __init__(self, tag: str | None = None, nodes: tuple[str, ...] = NODES,
                 links: dict[str, tuple[str, str]] | None = None) -> None:
        self.tag = tag or os.urandom(2).hex()
        self.octet = _free_octet()
        self.nodes = nodes
        self.ns = {n: f"tv{self.tag}{n}" for n in nodes}
        self.ends: dict[str, tuple[End, End]] = {}
        for i, (link, (s0, s1)) in enumerate((links or LINKS).items(), start=1):
            a0, a1 = f"10.{self.octet}.{i}.1", f"10.{self.octet}.{i}.2"
            self.ends[link] = (End(link, s0, f"tv{self.tag}{link}0", a0, a1, s1),
                               End(link, s1, f"tv{self.tag}{link}1", a1, a0, s0))
        self.cut_links: set[str] = set()
        self._closed = False
        atexit.register(self.close)

    def addr(self, node: str) -> str:
        """The service address of a node (A, B, W, ...)."""
        return f"10.{self.octet}.0.{self.nodes.index(node) + 1}"

    @property
    def subnet(self) -> str:
        return f"10.{self.octet}.0.0/24"

    def _ip(self, side: str, *args: str, check: bool = True) -> None:
        prefix = () if side == HOST else ("-n", self.ns[side])
        ip(*prefix, *args, check=check)

    def exec_prefix(self, node: str) -> list[str]:
        """argv prefix that runs a command inside `node`'s namespace."""
        return ["ip", "netns", "exec", self.ns[node]]

    def setup(self) -> None:
        try:
            for node, ns in self.ns.items():
                ip("netns", "add", ns)
                self._ip(node, "link", "set", "lo", "up")
                self._ip(node, "addr", "add", f"{self.addr(node)}/32", "dev", "lo")
            for e0, e1 in self.ends.values():
                ns0 = () if e0.side == HOST else ("netns", self.ns[e0.side])
                ip("link", "add", e0.dev, *ns0, "type", "veth", "peer", "name", e1.dev,
                   "netns", self.ns[e1.side])
                for e in (e0, e1):
                    self._ip(e.side, "addr", "add", f"{e.addr}/30", "dev", e.dev)
            ip("route", "add", "unreachable", self.subnet, "metric", "4000")
            for link in self.ends:
                self.heal(link)
        except BaseException:
            self.close()
            raise

    def _routes(self, e: End) -> None:
        if e.peer_side == HOST:
            return  # the connected /30 already leads back to the host's end
        src = () if e.side == HOST else ("src", self.addr(e.side))
        self._ip(e.side, "route", "replace", f"{self.addr(e.peer_side)}/32", "via", e.peer,
                 "dev", e.dev, *src)

    def cut(self, link: str) -> None:
        """Take both ends of `link` down: nothing passes either way."""
        for e in self.ends[link]:
            self._ip(e.side, "link", "set", e.dev, "down")
        self.cut_links.add(link)

    def heal(self, link: str) -> None:
        """Both ends up again, with the routes the kernel dropped when they went down."""
        for e in self.ends[link]:
            self._ip(e.side, "link", "set", e.dev, "up")
        for e in self.ends[link]:
            self._routes(e)
        self.cut_links.discard(link)

    def heal_all(self) -> None:
        for link in sorted(self.cut_links):
            self.heal(link)

    def close(self) -> None:
        """Remove the namespaces (which takes their veths) and the host's leftovers."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            ip("route", "del", "unreachable", self.subnet, "metric", "4000", check=False)
        for ns in self.ns.values():
            with contextlib.suppress(Exception):
                ip("netns", "del", ns, check=False)
        for e0, _ in self.ends.values():
            if e0.side == HOST:
                with contextlib.suppress(Exception):
                    ip("link", "del", e0.dev, check=False)
        atexit.unregister(self.close)


def leftovers(prefix: str = "tv") -> list[str]:
    """Namespaces that look like a sweep's (for a test that cleanup really happened)."""
    out = ip("netns", "list", check=False).stdout.split()
    return [n for n in out if n.startswith(prefix) and n[-1] in (*NODES, "C") and len(n) == 7]

"""systemd readiness: tell the service manager when a component really serves.

The sd_notify protocol is one datagram ("READY=1") to the Unix socket named by
$NOTIFY_SOCKET (a leading '@' is the abstract namespace). It is a few lines, so no
libsystemd binding is needed. Readiness is judged from outside the component's own code:
a thread asks the component's health URL until it answers, so every component (node,
witness, host agent, hypervisor host) is "ready" by the same rule: its API serves.
"""

from __future__ import annotations

import os
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request

ENV = "NOTIFY_SOCKET"


def notify(state: str) -> bool:
    """Send `state` (e.g. "READY=1") to the service manager; False when there is none."""
    addr = os.environ.get(ENV)
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.connect(addr)
        s.sendall(state.encode())
    return True


def ready_when_answering(url: str, secret: str | None = None, what: str = "",
                         timeout: float = 300.0, context: ssl.SSLContext | None = None
                         ) -> threading.Thread | None:
    """Under systemd (Type=notify), send READY=1 once `url` answers 200; else nothing.
    `context`: the client side of an HTTPS API (its CA and client certificate)."""
    if not os.environ.get(ENV):
        return None
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}

    def probe() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                            timeout=2, context=context) as r:
                    if r.status == 200:
                        notify(f"READY=1\nSTATUS={what or 'serving'} at {url}")
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)

    t = threading.Thread(target=probe, name="sd-notify", daemon=True)
    t.start()
    return t

"""A TCP proxy the tests control, to cut a link while both ends keep running."""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading


class LinkProxy:
    """Forwards 127.0.0.1:`port` to `target`. `cut()` drops every connection and makes new
    ones hang (like a dead network, not a refused port); `restore()` heals it."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.addr = f"127.0.0.1:{self.port}"
        self._cut = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        self.listener.settimeout(0.1)
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self._cut.is_set():
                with self._lock:
                    self._held.append(client)  # accepted but never answered
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=2)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        sel = selectors.DefaultSelector()
        sel.register(a, selectors.EVENT_READ, b)
        sel.register(b, selectors.EVENT_READ, a)
        try:
            while not self._cut.is_set() and not self._stop.is_set():
                for key, _ in sel.select(0.1):
                    src = key.fileobj
                    assert isinstance(src, socket.socket)
                    data = src.recv(65536)
                    if not data or self._cut.is_set():  # cut while waiting: bytes vanish
                        return
                    key.data.sendall(data)
        except OSError:
            pass
        finally:
            sel.close()
            if not self._cut.is_set():
                for s in (a, b):
                    with contextlib.suppress(OSError):
                        s.close()

    def cut(self) -> None:
        """Stop forwarding: bytes in flight vanish, both ends see silence."""
        self._cut.set()

    def restore(self) -> None:
        with self._lock:
            for s in self._conns + self._held:
                with contextlib.suppress(OSError):
                    s.close()
            self._conns.clear()
            self._held.clear()
        self._cut.clear()

    def close(self) -> None:
        self._stop.set()
        self._cut.set()
        self.listener.close()
        self.restore()

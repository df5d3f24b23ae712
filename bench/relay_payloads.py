"""CPU the host agent's relay spends per large write, and what moving the bytes costs.

    .venv/bin/python bench/relay_payloads.py [--requests 300] [--size 1M] [--runs 4]

`relay`: the native relay (twinvol.host._relay) between two loopback TCP connections,
played by this process: a client sending WRITE requests one at a time and a node
answering them. Only the CPU of the relay's own calls is counted (thread CPU time around
them), so the client's and node's work is left out. The lowest of --runs is printed too:
on a shared machine it is the least disturbed.

`move`: moving the same bytes between two loopback TCP sockets three ways, with no NBD:
recv into a buffer + send (what the relay does), splice socket -> pipe -> socket, and the
same with tee(2) into a second pipe (a copy kept for a resend). The floor for the agent's
data path on loopback, whatever the relay does.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import os
import socket
import struct
import threading
import time

from twinvol.host import _relay
from twinvol.sizes import parse_size

HDR = struct.Struct(">IHHQQI")
REQUEST_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
WRITE = 1
F_SETPIPE_SZ = 1031


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        a = socket.create_connection(listener.getsockname())
        b, _ = listener.accept()
    return a, b


def relay_cpu(requests: int, size: int) -> float:
    """Microseconds of relay CPU per write of `size` bytes."""
    relay = _relay.Relay(1 << 40)
    client, c_relay = tcp_pair()
    node, p_relay = tcp_pair()
    relay.add_path(0, os.dup(p_relay.fileno()), "A", 0, True, 1)
    relay.attach_client(os.dup(c_relay.fileno()), False, False, False, b"", b"")
    client.setblocking(False)
    node.setblocking(False)
    payload = os.urandom(size)
    buf = bytearray(size + HDR.size)
    spent = 0.0
    try:
        for i in range(requests):
            view = memoryview(HDR.pack(REQUEST_MAGIC, 0, WRITE, i, 0, size) + payload)
            got = 0
            while view or got < len(buf):
                if view:
                    with contextlib.suppress(BlockingIOError):
                        view = view[client.send(view):]
                t = time.thread_time()
                relay.client_readable()
                relay.writable(relay.path_fd(0))
                spent += time.thread_time() - t
                with contextlib.suppress(BlockingIOError):
                    got += node.recv_into(memoryview(buf)[got:])
            handle = HDR.unpack_from(buf)[3]
            node.send(struct.pack(">IIQ", SIMPLE_MAGIC, 0, handle))
            while True:
                t = time.thread_time()
                relay.path_readable(0)
                spent += time.thread_time() - t
                with contextlib.suppress(BlockingIOError):
                    if client.recv(16):
                        break
    finally:
        relay.close()
        for s in (client, c_relay, node, p_relay):
            s.close()
    return spent / requests * 1e6


def move_cpu(mode: str, requests: int, size: int) -> float:
    """Microseconds of this thread's CPU per `size` bytes moved socket to socket."""
    src_w, src_r = tcp_pair()
    dst_w, dst_r = tcp_pair()
    data = os.urandom(size)
    libc = ctypes.CDLL(None, use_errno=True)

    def client() -> None:
        for _ in range(requests):
            src_w.sendall(data)

    def node() -> None:
        sink = memoryview(bytearray(size))
        for _ in range(requests):
            got = 0
            while got < size:
                got += dst_r.recv_into(sink[got:])

    p_r, p_w = os.pipe()
    k_r, k_w = os.pipe()
    for fd in (p_w, k_w):
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, F_SETPIPE_SZ, 1 << 20)
    devnull = os.open(os.devnull, os.O_WRONLY)
    threads = [threading.Thread(target=client), threading.Thread(target=node)]
    for th in threads:
        th.start()
    buf = memoryview(bytearray(size))
    t0 = time.thread_time()
    for _ in range(requests):
        if mode == "copy":
            got = 0
            while got < size:
                got += src_r.recv_into(buf[got:])
            dst_w.sendall(buf)
            continue
        left = size
        while left:
            n = os.splice(src_r.fileno(), p_w, left)
            left -= n
            if mode == "tee" and libc.tee(p_r, k_w, ctypes.c_size_t(n), 0) != n:
                raise OSError(ctypes.get_errno(), "tee")
            m = n
            while m:
                m -= os.splice(p_r, dst_w.fileno(), m)
            m = n if mode == "tee" else 0
            while m:  # the kept copy is dropped once "answered"
                m -= os.splice(k_r, devnull, m)
    spent = time.thread_time() - t0
    for th in threads:
        th.join()
    for fd in (p_r, p_w, k_r, k_w, devnull):
        os.close(fd)
    for s in (src_w, src_r, dst_w, dst_r):
        s.close()
    return spent / requests * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--size", default="1M", help="bytes per write (default 1M)")
    ap.add_argument("--runs", type=int, default=4)
    args = ap.parse_args()
    size = parse_size(args.size)
    results: dict[str, list[float]] = {}
    for _ in range(args.runs):
        results.setdefault("relay", []).append(relay_cpu(args.requests, size))
        for mode in ("copy", "splice", "tee"):
            results.setdefault(f"move: {mode}", []).append(move_cpu(mode, args.requests, size))
    for name, values in results.items():
        print(f"{name:14} lowest {min(values):7.1f} us   runs "
              + " ".join(f"{v:.1f}" for v in values))


if __name__ == "__main__":
    main()

"""Start, watch and stop twinvol component processes (used by `twinvol up`, tests, bench)."""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Child setup: get SIGTERM when the supervising process dies, even by kill -9."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct free TCP ports (all held open together while choosing).

    They are picked below the kernel's ephemeral range: a port from that range can be
    taken as the source port of some outgoing connection between being chosen here and
    being bound by the process it is for."""
    low, high = 20000, min(_ephemeral_low(), 65536)
    if high - low < 4 * count:
        low, high = 1024, 65536
    socks: list[socket.socket] = []
    try:
        for port in random.sample(range(low, high), min(high - low, 64 * count)):
            if len(socks) == count:
                break
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind((host, port))
            except OSError:
                s.close()
                continue
            socks.append(s)
        while len(socks) < count:   # a crowded range: fall back to kernel-chosen ports
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def twinvol_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "twinvol", *args]


@dataclass
class Component:
    name: str
    argv: list[str]
    log_path: str
    proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, lines: int = 5) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return b"\n".join(f.read().splitlines()[-lines:]).decode(errors="replace")
        except OSError:
            return ""


@dataclass
class Supervisor:
    components: dict[str, Component] = field(default_factory=dict)

    def start(self, name: str, argv: list[str], log_path: str,
              env: dict[str, str] | None = None) -> Component:
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        comp = self.components.get(name) or Component(name, argv, log_path)
        comp.argv = argv
        with open(log_path, "ab") as log:
            comp.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
                                         env=env)
        self.components[name] = comp
        return comp

    def wait_http(self, name: str, url: str, timeout: float = 30.0,
                  headers: dict[str, str] | None = None) -> None:
        """Wait until `url` answers 200, or raise with the component's last log lines."""
        comp = self.components[name]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not comp.alive():
                status = comp.proc.returncode if comp.proc else "?"
                raise RuntimeError(f"{name} exited with status {status}: {comp.tail()}")
            try:
                req = urllib.request.Request(url, headers=headers or {})
                with urllib.request.urlopen(req, timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{name} did not become ready within {timeout:.0f}s: {comp.tail()}")

    def stop(self, name: str, timeout: float = 10.0) -> None:
        comp = self.components.get(name)
        if comp is None or comp.proc is None or comp.proc.poll() is not None:
            return
        comp.proc.send_signal(signal.SIGTERM)
        try:
            comp.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            comp.proc.kill()
            comp.proc.wait()

    def kill(self, name: str) -> None:
        """kill -9, for failure tests."""
        comp = self.components[name]
        if comp.proc is not None and comp.proc.poll() is None:
            comp.proc.kill()
            comp.proc.wait()

    def stop_all(self, timeout: float = 10.0) -> None:
        """SIGTERM in reverse start order: clients of a component (the host agent of its
        nodes, nodes of the witness) stop while what they use is still there."""
        comps = [c for c in reversed(self.components.values()) if c.proc is not None]
        for comp in comps:
            if comp.alive() and comp.proc is not None:
                comp.proc.send_signal(signal.SIGTERM)
                try:
                    comp.proc.wait(min(timeout, 5.0))
                except subprocess.TimeoutExpired:
                    comp.proc.kill()
                    comp.proc.wait()


class AlreadyRunning(Exception):
    """Another process holds the directory's lock."""


def hold_dir_lock(directory: str, what: str) -> int:
    """Take `directory`/.lock for this process's life (the kernel drops it when the process
    dies, however it dies), so a second `twinvol up` on a running directory refuses rather
    than start a second set of nodes on the same data. Returns the fd to keep open."""
    path = os.path.join(directory, ".lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise AlreadyRunning(f"{what} is already running on {directory} (pid {holder}); "
                             f"stop it first (Ctrl-C in its terminal, or kill {holder})"
                             ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd

"""libnbd clients of the sweep, run as a script under the system python (python3-libnbd).

`ops` runs writer and reader threads against one NBD URI (the host agent or one node)
until a monotonic deadline and logs every request as one JSON list per line:

    [label, thread, op, block, value, send, answer, status, detail]

op is "w" (value: the write id), "r" (value: what the block held, see blocks.decode),
"f" (a flush a writer sends after every `--flush-every` writes; block -1) or "c" (a
connection attempt that failed); send/answer are time.monotonic() (one clock for
every process on this machine); status is "ok", "err" or "timeout" (no answer: the
request may or may not have taken effect). Each request waits for its answer before the
next, so a thread's log is its real-time history.

`dump` reads every block of the export once and prints their decoded values as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import threading
import time
from functools import partial
from typing import Any

import nbd  # type: ignore[import-not-found, unused-ignore]

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from blocks import BLOCK, decode, encode

POLL_MS = 100
stop = threading.Event()


class Log:
    """Lines from all threads into one file, flushed now and then."""

    def __init__(self, path: str) -> None:
        self.f = open(path, "w")  # noqa: SIM115 - closed in close()
        self.lock = threading.Lock()
        self.flushed = time.monotonic()

    def add(self, rec: list[Any]) -> None:
        line = json.dumps(rec, separators=(",", ":")) + "\n"
        with self.lock:
            self.f.write(line)
            if time.monotonic() - self.flushed > 0.5:
                self.f.flush()
                self.flushed = time.monotonic()

    def close(self) -> None:
        with self.lock:
            self.f.close()


def wait(h: Any, done: Any, deadline: float) -> tuple[str, str]:
    """Poll `h` until done() is true, raises, or the deadline (or stop) comes."""
    while True:
        try:
            if done():
                return "ok", ""
        except nbd.Error as e:
            return "err", f"{e.string}"
        left = deadline - time.monotonic()
        if left <= 0 or stop.is_set():
            return "timeout", "no answer" if left <= 0 else "stopped"
        try:
            h.poll(int(min(POLL_MS, left * 1000)) + 1)
        except nbd.Error as e:
            # The connection died: let done() report the command's own error.
            try:
                if done():
                    return "ok", ""
            except nbd.Error as e2:
                return "err", f"{e2.string}"
            return "err", f"{e.string}"


def connect(uri: str, timeout: float) -> tuple[Any, str]:
    h = nbd.NBD()
    try:
        h.aio_connect_uri(uri)
    except nbd.Error as e:
        return None, f"{e.string}"  # the handle closes when dropped
    status, detail = wait(h, h.aio_is_ready, time.monotonic() + timeout)
    if status == "ok":
        return h, ""
    return None, detail or status


def worker(args: argparse.Namespace, log: Log, thread: int, kind: str) -> None:
    uid = args.uid_base + thread
    rng = random.Random(args.seed * 1000 + uid)
    counter = 0
    h: Any = None
    while time.monotonic() < args.until and not stop.is_set():
        if h is None:
            t0 = time.monotonic()
            h, why = connect(args.uri, args.timeout)
            if h is None:
                log.add([args.label, thread, "c", -1, None, t0, time.monotonic(), "err", why])
                stop.wait(0.2)
                continue
        block = rng.randrange(args.hot) if rng.random() < args.hot_share \
            else rng.randrange(args.blocks)
        off = block * BLOCK
        if kind == "w":
            counter += 1
            wid = uid << 32 | counter
            buf = nbd.Buffer.from_bytearray(bytearray(encode(block, wid)))
            send = time.monotonic()
            cookie = h.aio_pwrite(buf, off)
        else:
            buf = nbd.Buffer(BLOCK)
            send = time.monotonic()
            cookie = h.aio_pread(buf, off)
        status, detail = wait(h, partial(h.aio_command_completed, cookie),
                              send + args.timeout)
        answer = time.monotonic() if status != "timeout" else None
        if kind == "w":
            log.add([args.label, thread, "w", block, wid, send, answer, status, detail])
        else:
            value = decode(block, bytes(buf.to_bytearray())) if status == "ok" else None
            log.add([args.label, thread, "r", block, value, send, answer, status, detail])
        if status == "ok" and kind == "w" and args.flush_every and \
                counter % args.flush_every == 0 and not h.aio_is_dead():
            send = time.monotonic()
            cookie = h.aio_flush()
            status, detail = wait(h, partial(h.aio_command_completed, cookie),
                                  send + args.timeout)
            answer = time.monotonic() if status != "timeout" else None
            log.add([args.label, thread, "f", -1, None, send, answer, status, detail])
        if status != "ok" or h.aio_is_dead():
            h = None  # dropping the handle closes it: a late reply matches nothing
        if args.think > 0:
            time.sleep(rng.uniform(0, args.think))


def run_ops(args: argparse.Namespace) -> int:
    log = Log(args.out)
    kinds = ["w"] * args.writers + ["r"] * args.readers
    threads = [threading.Thread(target=worker, args=(args, log, i, k), daemon=True)
               for i, k in enumerate(kinds)]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():
            t.join(0.2)
    log.close()
    return 0


def run_dump(args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.timeout
    why = ""
    while time.monotonic() < deadline:
        h, why = connect(args.uri, max(0.1, deadline - time.monotonic()))
        if h is None:
            time.sleep(0.2)
            continue
        values: list[int | str] = []
        step = 64
        for first in range(0, args.blocks, step):
            n = min(step, args.blocks - first)
            buf = nbd.Buffer(n * BLOCK)
            cookie = h.aio_pread(buf, first * BLOCK)
            status, why = wait(h, partial(h.aio_command_completed, cookie), deadline)
            if status != "ok":
                break
            data = bytes(buf.to_bytearray())
            values += [decode(first + i, data[i * BLOCK:(i + 1) * BLOCK]) for i in range(n)]
        h = None
        if len(values) == args.blocks:
            json.dump({"values": values}, sys.stdout)
            return 0
    json.dump({"error": why or "timed out"}, sys.stdout)
    return 0


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=("ops", "dump"))
    p.add_argument("--uri", required=True)
    p.add_argument("--blocks", type=int, required=True)
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per request")
    p.add_argument("--label", default="")
    p.add_argument("--out", default="")
    p.add_argument("--writers", type=int, default=1)
    p.add_argument("--readers", type=int, default=1)
    p.add_argument("--hot", type=int, default=32, help="blocks of the hot set")
    p.add_argument("--hot-share", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--uid-base", type=int, default=1)
    p.add_argument("--until", type=float, default=0.0, help="time.monotonic() to stop at")
    p.add_argument("--think", type=float, default=0.002, help="max seconds between requests")
    p.add_argument("--flush-every", type=int, default=0,
                   help="writers send a flush after this many writes (0: never)")
    args = p.parse_args()
    # Set the event from another thread: Event.set() inside a handler that interrupted
    # the main thread while it held the event's lock (in wait) would deadlock.
    signal.signal(signal.SIGTERM,
                  lambda *_: threading.Thread(target=stop.set, daemon=True).start())
    return run_ops(args) if args.mode == "ops" else run_dump(args)


if __name__ == "__main__":
    sys.exit(main())

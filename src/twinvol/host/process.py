"""The host agent as a process: signal handling, its own event loop, a bounded exit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal

from twinvol.host import HostSetup
from twinvol.host.agent import STOP_WAIT, Agent

log = logging.getLogger("twinvol.host")


async def serve(setup: HostSetup) -> None:
    agent = Agent(setup)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set():  # a second signal while stopping: do not wait any more
            log.warning("second signal while stopping: exiting now", extra={"signal": sig.name})
            os._exit(1)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    await agent.start()
    try:
        await stop.wait()
    finally:
        await agent.stop()


def _finish(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what is left and give it STOP_WAIT to end; then close the loop regardless
    (asyncio.run would wait forever for a task that does not end when cancelled)."""
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for t in tasks:
        t.cancel()
    if tasks:
        _, pending = loop.run_until_complete(asyncio.wait(tasks, timeout=STOP_WAIT))
        for t in pending:
            log.warning("task still running at exit, abandoned", extra={"task": t.get_name()})
    with contextlib.suppress(Exception):
        loop.run_until_complete(asyncio.wait_for(loop.shutdown_asyncgens(), STOP_WAIT))
    loop.close()


def run(setup: HostSetup) -> None:
    """Run the host agent in the foreground until SIGTERM/SIGINT."""
    try:
        import uvloop
        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is a pinned dependency
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            loop.run_until_complete(serve(setup))
    finally:
        _finish(loop)
        asyncio.set_event_loop(None)


__all__ = ["run", "serve"]

"""The activity log's upkeep and what a machine restart means for it.

A mirrored write lands only in an extent whose activity-log bit is durable (on both
copies), so after a crash the extents that may differ are known. An extent leaves the
log once idle and flushed. A machine restart (a new boot, not only a new process) may
have lost writes that were still in the page cache: such a copy is not the one to
repair its partner from (`core.generations.meeting`).
"""

from __future__ import annotations

import asyncio
import logging
import os

from twinvol import clock
from twinvol.replication import data_messages as dm
from twinvol.replication.peer import PeerDown, RemoteError
from twinvol.replication.ports import ManagerPort

log = logging.getLogger("twinvol.replication")

AL_IDLE = 1.0          # seconds without writes before an activity-log extent is retired


async def retire_idle_extents(mgr: ManagerPort) -> None:
    """Retire idle activity-log extents once their data is durable on both copies: the
    bit is what marks an extent for repair after a power loss (of this machine, or of
    the partner's: a meeting with a partner whose machine restarted copies this side's
    extents to it), so it may go only after the writes it covers reached both disks: a
    flush here and one at the partner, sent after those writes on the ordered link.
    While the partner is away the extents stay. (Found by the simulator's power losses:
    extents retired with their writes in a page cache came back stale and unmarked.)"""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(AL_IDLE)
        now = clock.monotonic()
        for pr in list(mgr.pairs.values()):
            idle = [ext for ext in pr.al.iter_set() if pr.al_inflight.get(ext, 0) == 0
                    and now - pr.al_last.get(ext, 0) > AL_IDLE]
            if not idle:
                continue
            try:
                await loop.run_in_executor(mgr.node.executor, pr.vol.store.flush)
                if not pr.rec.remote:
                    link = mgr.link_or_none(pr.rec.partner)
                    if link is None or pr.rec.io_mode != "mirror":
                        continue   # the partner's copy of these writes may not be durable
                    await link.request(dm.encode(dm.Flush(pr.rec.name)))
            except (OSError, PeerDown, RemoteError) as e:
                log.info("activity log kept: flush failed", extra={
                    "pair": pr.rec.name, "error": str(e)})
                continue
            changed = False
            for ext in idle:   # no write since `now`: what they wrote is flushed
                if pr.al_inflight.get(ext, 0) == 0 and now - pr.al_last.get(ext, 0) > AL_IDLE:
                    pr.al.clear(ext)
                    pr.al_last.pop(ext, None)
                    changed = True
            if changed:
                await pr.al.sync(mgr.node.executor)


def machine_restarted(data_dir: str) -> bool:
    """Did the machine restart since this node last ran (so writes that were only in
    its page cache may be lost)? Kept in the data directory, durably."""
    path = os.path.join(data_dir, "boot_id")
    now = clock.boot_id()
    try:
        with open(path) as f:
            before = f.read().strip()
    except FileNotFoundError:
        before = now    # the first start of this data directory
    if before != now:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(now + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    elif not os.path.exists(path):
        with open(path, "w") as f:
            f.write(now + "\n")
    return before != now

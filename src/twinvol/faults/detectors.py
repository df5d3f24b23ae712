"""What each node event means as a fault: a pure mapping from EventBus events to drafts.

The node already publishes its state changes (peer links, pair states, I/O modes,
verify results, witness reachability); journal code publishes `journal_near_full`,
`journal_full` and `journal_overflow` (fields: `group` or `pair`, `used`, `capacity`);
remote copy publishes `remote_stalled` / `remote_catch_up` and `journal_resumed`.
Turning events into reports keeps detection out of the replication code paths.
"""

from __future__ import annotations

from typing import Any

from twinvol.faults.model import FaultDraft


def _s(ev: dict[str, Any], key: str) -> str:
    v = ev.get(key)
    return "" if v is None else str(v)


def from_event(ev: dict[str, Any]) -> FaultDraft | None:
    """The fault an event reports, or None for events that are not faults."""
    kind = ev.get("type")
    node = _s(ev, "node")
    t = float(ev.get("time") or 0.0)
    if kind == "peer_down":
        peer = _s(ev, "peer")
        return FaultDraft(component="peer_link", kind="peer_link_down", severity="error",
                          subject=peer, time=t,
                          description=f"peer link {node} -> {peer} is down: "
                                      f"{_s(ev, 'reason') or 'no reason given'}",
                          action=f"check node {peer}'s process and the network between "
                                 "the sites; pairs with it are suspended until it returns")
    if kind == "peer_up":
        peer = _s(ev, "peer")
        return FaultDraft(component="peer_link", kind="peer_link_down", severity="info",
                          state="cleared", subject=peer, time=t,
                          description=f"peer link {node} -> {peer} is up again")
    if kind == "peer_refused":
        peer = _s(ev, "peer")
        return FaultDraft(component="peer_link", kind="peer_refused", severity="error",
                          subject=peer, time=t,
                          description=f"peer link {node} <-> {peer} refused: "
                                      f"{_s(ev, 'reason')}",
                          action="check that both nodes use the same cluster file secret "
                                 "and cluster name")
    if kind == "pair_state":
        pair, state, reason = _s(ev, "pair"), _s(ev, "state"), _s(ev, "reason")
        if state == "suspended":
            return FaultDraft(component="pair", kind="pair_suspended", severity="error",
                              subject=pair, time=t,
                              description=f"pair {pair} suspended on node {node}"
                                          f"{': ' + reason if reason else ''}",
                              action="restore the partner or the link; the pair resyncs "
                                     "what changed by itself, or run `twinvol pair resync`")
        if state == "mirrored" and _s(ev, "previous") in ("suspended", "copying"):
            return FaultDraft(component="pair", kind="pair_suspended", severity="info",
                              state="cleared", subject=pair, time=t,
                              description=f"pair {pair} is mirrored again on node {node}")
        return FaultDraft(component="pair", kind="pair_state", severity="info", subject=pair,
                          time=t, description=f"pair {pair} on node {node}: "
                                              f"{_s(ev, 'previous')} -> {state}"
                                              f"{' (' + reason + ')' if reason else ''}")
    if kind == "pair_takeover":
        pair = _s(ev, "pair")
        return FaultDraft(component="pair", kind="pair_takeover", severity="warning",
                          subject=pair, time=t,
                          description=f"node {node} took over pair {pair} and writes alone",
                          action="bring the partner back; it resyncs from this node")
    if kind == "io_mode" and _s(ev, "mode") == "block" and not ev.get("expected"):
        vol = _s(ev, "volume")
        return FaultDraft(component="volume", kind="volume_blocked", severity="warning",
                          subject=vol, time=t,
                          description=f"volume {vol} on node {node} is blocked (no host I/O)"
                                      f": {_s(ev, 'reason')}",
                          action="hosts use the partner copy; the pair resync unblocks it")
    if kind == "io_mode" and _s(ev, "previous") == "block":
        vol = _s(ev, "volume")
        return FaultDraft(component="volume", kind="volume_blocked", severity="info",
                          state="cleared", subject=vol, time=t,
                          description=f"volume {vol} on node {node} serves again "
                                      f"({_s(ev, 'mode')})")
    if kind == "verify_mismatch":
        pair = _s(ev, "pair")
        return FaultDraft(component="checksum", kind="verify_mismatch", severity="error",
                          subject=pair, time=t,
                          description=f"pair {pair}: {_s(ev, 'chunks')} chunk(s) differ "
                                      f"between the copies (checked on node {node})",
                          action="the stale side is repaired by verify; check that disk's "
                                 "health if it happens again")
    if kind == "witness_unreachable":
        return FaultDraft(component="witness", kind="witness_unreachable", severity="warning",
                          time=t, description=f"node {node} cannot reach the witness: "
                                              f"{_s(ev, 'error')}",
                          action="restart the witness or fix the network to it; without it "
                                 "a broken pair holds writes instead of continuing")
    if kind == "witness_reachable":
        return FaultDraft(component="witness", kind="witness_unreachable", severity="info",
                          state="cleared", time=t,
                          description=f"node {node} reaches the witness again")
    if kind in ("journal_near_full", "journal_full", "journal_overflow"):
        group = _s(ev, "group") or _s(ev, "pair")
        used, cap = ev.get("used"), ev.get("capacity")
        fill = f" ({used} of {cap} bytes)" if used is not None and cap is not None else ""
        sev = {"journal_near_full": "warning", "journal_full": "error",
               "journal_overflow": "critical"}[kind]
        what = {"journal_near_full": "is nearly full", "journal_full": "is full",
                "journal_overflow": "overflowed: the far copy is inconsistent until it "
                                    "has caught up from dirty chunks"}[kind]
        return FaultDraft(component="journal", kind=kind, severity=sev,  # type: ignore[arg-type]
                          subject=group, time=t,
                          description=f"journal {group} on node {node} {what}{fill}",
                          action="check the link to the remote site and its apply rate; "
                                 "the catch-up runs by itself, or raise --journal-size")
    if kind in ("remote_stalled", "remote_catch_up"):
        group = _s(ev, "group")
        stalled = kind == "remote_stalled"
        return FaultDraft(component="journal", kind="remote_copy",
                          severity="error" if stalled else "warning", subject=group, time=t,
                          description=f"far copy of group {group} on node {node} "
                                      f"{'stopped advancing' if stalled else 'lacks records'}"
                                      f" ({_s(ev, 'reason')}): it is inconsistent until it "
                                      "has caught up from dirty chunks, which runs now",
                          action="nothing if the catch-up ends; check the far site and "
                                 "the node log if it comes back")
    if kind == "journal_resumed":
        group = _s(ev, "group")
        return FaultDraft(component="journal", kind="remote_copy", severity="info",
                          state="cleared", subject=group, time=t,
                          description=f"far copy of group {group} caught up; records "
                                      f"ship again from node {node}")
    if kind == "journal_damaged":
        group = _s(ev, "group")
        return FaultDraft(component="journal", kind="journal_damaged", severity="error",
                          subject=group, time=t,
                          description=f"journal {group} on node {node} could not be read "
                                      f"({_s(ev, 'error')}): every chunk of the group is "
                                      "copied again",
                          action="check the disk under the node's data directory; the far "
                                 "copy is inconsistent until the full copy ends")
    return None


__all__ = ["from_event"]

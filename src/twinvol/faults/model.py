"""The fault report: what a node tells hosts about something that went wrong (a SIM).

A report is numbered per origin *stream* (`origin/incarnation`, the incarnation
being a random id kept in the node's data directory), so `id` is globally unique
and `seq` orders the reports of one origin. Reports cross node boundaries, so they
are decoded strictly: unknown fields, wrong types, out-of-range values and an id
that does not match origin/incarnation/seq are refused.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

Component = Literal["disk", "volume", "pair", "peer_link", "journal", "witness", "capacity",
                    "checksum", "node"]
COMPONENTS: tuple[str, ...] = Component.__args__  # type: ignore[attr-defined]
Severity = Literal["info", "warning", "error", "critical"]
SEVERITIES: tuple[str, ...] = ("info", "warning", "error", "critical")
State = Literal["raised", "cleared"]

Name = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")]
Incarnation = Annotated[str, Meta(pattern=r"^[0-9a-f]{8,32}$")]
Kind = Annotated[str, Meta(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
Text = Annotated[str, Meta(max_length=2000)]
Short = Annotated[str, Meta(max_length=200)]
Time = Annotated[float, Meta(ge=0.0)]
MAX_HOPS = 8


def severity_rank(s: str) -> int:
    return SEVERITIES.index(s) if s in SEVERITIES else 0


class Hop(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """One step of the relay path: the node (or host agent) and when it got the report."""

    node: Name
    time: Time


class FaultDraft(msgspec.Struct, kw_only=True):
    """A fault as a detector sees it, before the node numbers and persists it."""

    component: Component
    kind: Kind
    severity: Severity
    description: Text
    action: Text = ""
    subject: Short = ""
    state: State = "raised"
    time: float = 0.0
    count: int = 1
    first_time: float | None = None

    def key(self) -> tuple[str, str, str]:
        """What "the same kind of fault" means for rate limiting."""
        return self.component, self.kind, self.subject


class FaultReport(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    id: Annotated[str, Meta(max_length=128)]
    origin: Name
    site: Name
    incarnation: Incarnation
    seq: Annotated[int, Meta(ge=1, le=2**62)]
    component: Component
    kind: Kind
    severity: Severity
    state: State = "raised"
    time: Time
    subject: Short = ""
    description: Text
    action: Text = ""
    count: Annotated[int, Meta(ge=1)] = 1  # occurrences this report stands for (summaries)
    first_time: Time | None = None  # a summary's first suppressed occurrence
    path: Annotated[list[Hop], Meta(min_length=1, max_length=MAX_HOPS)]

    def __post_init__(self) -> None:
        if self.id != make_id(self.origin, self.incarnation, self.seq):
            raise ValueError(f"id {self.id!r} does not match origin/incarnation/seq")
        if self.path[0].node != self.origin:
            raise ValueError("the relay path must start at the origin node")

    @property
    def stream(self) -> str:
        """The origin stream this report is numbered in (dedup and order key)."""
        return f"{self.origin}/{self.incarnation}"

    def via(self, node: str, now: float) -> FaultReport:
        """This report as received by `node` (one more hop on its path)."""
        if len(self.path) >= MAX_HOPS:
            return self
        return msgspec.structs.replace(self, path=[*self.path, Hop(node, now)])


def make_id(origin: str, incarnation: str, seq: int) -> str:
    return f"{origin}/{incarnation}/{seq}"


class RelayBatch(msgspec.Struct, forbid_unknown_fields=True):
    """POST /api/v1/faults/relay: an origin hands reports of its stream to a relay node.
    An empty batch is a probe (the answer says where the relay's copy of the stream ends
    and whether hosts are listening to the relay)."""

    origin: Name
    stream: Annotated[str, Meta(max_length=128)]
    reports: Annotated[list[FaultReport], Meta(max_length=1000)] = []


class RelayAnswer(msgspec.Struct):
    watermark: int  # the relay has the stream's reports up to this seq
    subscribers: int  # host streams following the relay now
    accepted: int = 0
    duplicates: int = 0


def path_text(report: FaultReport) -> str:
    return " -> ".join(h.node for h in report.path)


def decode_report(raw: bytes | str) -> FaultReport:
    return msgspec.json.decode(raw, type=FaultReport)


__all__ = ["COMPONENTS", "SEVERITIES", "FaultDraft", "FaultReport", "Hop", "RelayAnswer",
           "RelayBatch", "decode_report", "make_id", "path_text", "severity_rank"]

"""Structured logs: one JSON object per line on stderr, with the fields passed in `extra`.

`time` is UTC with milliseconds and a `Z` (2026-12-07T00:24:37.123Z), so lines from nodes
in different time zones sort and compare as they are. The level comes from
$TWINVOL_LOG_LEVEL (set by `twinvol --log-level`, and inherited by what `twinvol up`
starts)."""

from __future__ import annotations

import json
import logging
import os
import sys
import time

_STD = set(vars(logging.LogRecord("x", 0, "x", 0, "x", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def __init__(self, component: str) -> None:
        super().__init__()
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": round(record.created, 6),
            "time": utc_text(record.created),
            "level": record.levelname.lower(),
            "component": self.component,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in vars(record).items():
            if k not in _STD and not k.startswith("_"):
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


LEVELS = ("debug", "info", "warning", "error")
LEVEL_ENV = "TWINVOL_LOG_LEVEL"


def utc_text(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


def env_level() -> int:
    name = os.environ.get(LEVEL_ENV, "info").lower()
    return getattr(logging, name.upper()) if name in LEVELS else logging.INFO


def setup(component: str, level: int | None = None) -> None:
    level = env_level() if level is None else level
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(component))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)

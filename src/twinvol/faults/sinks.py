"""Where the host agent sends the fault reports it receives, besides its log: a webhook
(HTTP POST of JSON), syslog (RFC 5424 over a unix socket or UDP) and a command hook (the
report as JSON on stdin). Each sink has its own queue and task, so a sink that fails or
hangs delays only itself; a full queue drops its oldest report (counted).

Configured in the cluster file's `[host]` table::

    [[host.sinks]]
    type = "webhook"
    url = "http://127.0.0.1:9000/alerts"
    [[host.sinks]]
    type = "syslog"
    address = "/dev/log"          # or "HOST:PORT" for UDP
    [[host.sinks]]
    type = "command"
    command = ["/usr/local/bin/page-oncall"]
    min_severity = "error"
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from typing import Any

import aiohttp
import msgspec

from twinvol.faults.model import FaultReport, Severity, path_text, severity_rank

log = logging.getLogger("twinvol.host.sinks")

QUEUE = 1000
ATTEMPTS = 3


class WebhookSink(msgspec.Struct, tag="webhook", tag_field="type", forbid_unknown_fields=True):
    url: str
    timeout: float = 5.0
    min_severity: Severity = "info"
    headers: dict[str, str] = {}


class SyslogSink(msgspec.Struct, tag="syslog", tag_field="type", forbid_unknown_fields=True):
    address: str = "/dev/log"  # a unix datagram socket path, or HOST:PORT (UDP)
    facility: int = 3  # daemon
    min_severity: Severity = "info"


class CommandSink(msgspec.Struct, tag="command", tag_field="type", forbid_unknown_fields=True):
    command: list[str]
    timeout: float = 10.0
    min_severity: Severity = "info"


SinkConfig = WebhookSink | SyslogSink | CommandSink

_SYSLOG_SEVERITY = {"critical": 2, "error": 3, "warning": 4, "info": 6}


def describe(cfg: SinkConfig) -> str:
    if isinstance(cfg, WebhookSink):
        return f"webhook {cfg.url}"
    if isinstance(cfg, SyslogSink):
        return f"syslog {cfg.address}"
    return f"command {' '.join(cfg.command)}"


def payload(report: FaultReport, cluster: str) -> dict[str, Any]:
    return {"cluster": cluster, "fault": msgspec.to_builtins(report)}


def syslog_line(report: FaultReport, facility: int) -> bytes:
    pri = facility * 8 + _SYSLOG_SEVERITY.get(report.severity, 6)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(report.time))
    text = (f"{report.severity} {report.state} {report.component}/{report.kind} on "
            f"{report.origin}: {report.description} (id {report.id}, path {path_text(report)})")
    return (f"<{pri}>1 {stamp} {socket.gethostname()} twinvol {os.getpid()} fault - "
            f"{text}").encode()


class SinkWorker:
    def __init__(self, cfg: SinkConfig, cluster: str, session: aiohttp.ClientSession) -> None:
        self.cfg = cfg
        self.cluster = cluster
        self.session = session
        self.name = describe(cfg)
        self.queue: asyncio.Queue[FaultReport] = asyncio.Queue(QUEUE)
        self.sent = self.failed = self.dropped = 0
        self.last_error: str | None = None
        self._task: asyncio.Task[None] | None = None

    def offer(self, report: FaultReport) -> None:
        if severity_rank(report.severity) < severity_rank(self.cfg.min_severity):
            return
        if self.queue.full():
            self.queue.get_nowait()
            self.dropped += 1
        self.queue.put_nowait(report)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(),
                                                            name=f"sink {self.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task], timeout=1.0)

    def status(self) -> dict[str, Any]:
        return {"sink": self.name, "sent": self.sent, "failed": self.failed,
                "dropped": self.dropped, "queued": self.queue.qsize(), "error": self.last_error}

    async def _run(self) -> None:
        while True:
            report = await self.queue.get()
            for attempt in range(ATTEMPTS):
                try:
                    await self.send(report)
                    self.sent += 1
                    self.last_error = None
                    break
                except (OSError, TimeoutError, aiohttp.ClientError, RuntimeError) as e:
                    self.last_error = f"{type(e).__name__}: {e}"
                    if attempt == ATTEMPTS - 1:
                        self.failed += 1
                        log.error("fault sink failed", extra={"sink": self.name,
                                                              "fault": report.id,
                                                              "error": self.last_error})
                    else:
                        await asyncio.sleep(0.2 * 2 ** attempt)

    async def send(self, report: FaultReport) -> None:
        cfg = self.cfg
        if isinstance(cfg, WebhookSink):
            body = msgspec.json.encode(payload(report, self.cluster))
            async with self.session.post(cfg.url, data=body, headers={
                    "Content-Type": "application/json", **cfg.headers},
                    timeout=aiohttp.ClientTimeout(total=cfg.timeout)) as resp:
                if resp.status >= 300:
                    raise RuntimeError(f"webhook answered HTTP {resp.status}")
        elif isinstance(cfg, SyslogSink):
            line = syslog_line(report, cfg.facility)
            if cfg.address.startswith("/"):
                with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                    s.connect(cfg.address)
                    s.send(line)
            else:
                host, _, port = cfg.address.rpartition(":")
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.sendto(line, (host.strip("[]"), int(port)))
        else:
            env = {**os.environ, "TWINVOL_FAULT_ID": report.id,
                   "TWINVOL_FAULT_SEVERITY": report.severity,
                   "TWINVOL_FAULT_ORIGIN": report.origin,
                   "TWINVOL_FAULT_COMPONENT": report.component,
                   "TWINVOL_FAULT_KIND": report.kind, "TWINVOL_FAULT_STATE": report.state}
            proc = await asyncio.create_subprocess_exec(
                *cfg.command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL, env=env)
            try:
                await asyncio.wait_for(proc.communicate(
                    msgspec.json.encode(payload(report, self.cluster))), cfg.timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
                raise
            if proc.returncode:
                raise RuntimeError(f"command exited with status {proc.returncode}")


__all__ = ["CommandSink", "SinkConfig", "SinkWorker", "SyslogSink", "WebhookSink", "payload",
           "syslog_line"]

"""Where alert notifications go: a log, webhooks, Alertmanager (API v2).

`Dispatcher` decouples delivery from ingest: `submit` only enqueues; one
asyncio task per sink delivers in order, retrying with backoff. A dead or slow
sink fills its own bounded queue (overflow is dropped and counted), never
the ingest path.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass
from typing import Protocol

import aiohttp

from gradwatch.collector.alerts import Notification

log = logging.getLogger(__name__)


class Sink(Protocol):
    name: str
    #: True if firing alerts should be sent again periodically (a lease, as
    #: Prometheus does with Alertmanager); False for one-shot receivers.
    wants_resends: bool

    async def send(self, notifications: list[Notification]) -> None:
        """Delivers notifications or raises."""


class LogSink:
    """Writes each notification to the ``gradwatch.alerts`` logger."""

    name = "log"
    wants_resends = False

    def __init__(self) -> None:
        self._log = logging.getLogger("gradwatch.alerts")

    async def send(self, notifications: list[Notification]) -> None:
        for n in notifications:
            level = logging.WARNING if n.status == "firing" else logging.INFO
            labels = " ".join(f"{k}={v}" for k, v in n.alert.labels.items() if k != "alertname")
            self._log.log(level, "%s %s %s: %s", n.alert.name, n.status.upper(), labels,
                          n.alert.annotations.get("description", ""))


class _JsonPoster:
    """POSTs JSON with one shared aiohttp session (created on the event loop)."""

    def __init__(self, timeout_s: float) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def _post(self, url: str, body: object) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        async with self._session.post(url, json=body) as response:
            if response.status >= 300:
                text = (await response.text())[:200]
                raise RuntimeError(f"{url} answered HTTP {response.status}: {text}")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class WebhookSink(_JsonPoster):
    """POSTs each change as a JSON list of alerts in Alertmanager's API v2 shape
    (``endsAt`` only on resolved alerts)."""

    wants_resends = False

    def __init__(self, url: str, timeout_s: float = 5.0) -> None:
        super().__init__(timeout_s)
        self.url = url
        self.name = f"webhook:{url}"

    async def send(self, notifications: list[Notification]) -> None:
        await self._post(self.url, [n.to_alertmanager() for n in notifications])


class AlertmanagerSink(_JsonPoster):
    """``POST /api/v2/alerts`` to one Alertmanager. Firing alerts carry an ``endsAt``
    lease ``lease_s`` ahead and are re-sent before it runs out, so a collector that
    dies lets its alerts expire instead of firing forever."""

    wants_resends = True

    def __init__(self, url: str, lease_s: float = 120.0, timeout_s: float = 5.0) -> None:
        super().__init__(timeout_s)
        self.url = url.rstrip("/") + "/api/v2/alerts"
        self.name = f"alertmanager:{url}"
        self.lease_s = lease_s

    async def send(self, notifications: list[Notification]) -> None:
        lease_end = time.time() + self.lease_s
        await self._post(self.url, [n.to_alertmanager(lease_end=lease_end)
                                    for n in notifications])


@dataclass
class SinkState:
    """How delivery to one sink is going (Unix times; 0: never)."""

    last_success: float = 0.0
    last_failure: float = 0.0
    last_error: str = ""


#: What became of a notification: delivered, failed after every retry, or dropped (queue
#: full).
OUTCOMES = ("sent", "failed", "dropped")


class Dispatcher:
    """Queues notifications per sink and delivers them off the ingest path."""

    def __init__(self, sinks: list[Sink], queue_size: int = 10_000, retries: int = 3,
                 backoff_s: float = 0.2) -> None:
        self.sinks = sinks
        self.retries = retries
        self.backoff_s = backoff_s
        self.queue_size = queue_size
        #: (sink name, outcome) → count; outcome is sent, failed or dropped. Every series
        #: exists from the start at 0, so that Prometheus's increase() sees the first one.
        self.outcomes: collections.Counter[tuple[str, str]] = collections.Counter(
            {(s.name, outcome): 0 for s in sinks for outcome in OUTCOMES})
        self.states = {s.name: SinkState() for s in sinks}
        self._queues = {s.name: collections.deque() for s in sinks}
        self._wakeups = {s.name: asyncio.Event() for s in sinks}
        self._tasks: list[asyncio.Task] = []
        #: Sink name -> notifications of the batch being sent.
        self._sending: dict[str, int] = {}

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._deliver(s)) for s in self.sinks]

    def submit(self, notification: Notification, resend: bool = False) -> None:
        """Queues a notification for every sink (``resend``: only for sinks that
        want periodic re-sends of firing alerts). Never blocks."""
        for sink in self.sinks:
            if resend and not sink.wants_resends:
                continue
            queue = self._queues[sink.name]
            if len(queue) >= self.queue_size:
                queue.popleft()
                self.outcomes[(sink.name, "dropped")] += 1
            queue.append(notification)
            self._wakeups[sink.name].set()

    async def _deliver(self, sink: Sink) -> None:
        queue, wakeup = self._queues[sink.name], self._wakeups[sink.name]
        while True:
            await wakeup.wait()
            wakeup.clear()
            while queue:
                batch = list(queue)
                queue.clear()
                self._sending[sink.name] = len(batch)
                for attempt in range(self.retries + 1):
                    try:
                        await sink.send(batch)
                        self.outcomes[(sink.name, "sent")] += len(batch)
                        self.states[sink.name].last_success = time.time()
                        break
                    except Exception as error:  # any sink failure is counted, never raised
                        if attempt == self.retries:
                            self.outcomes[(sink.name, "failed")] += len(batch)
                            state = self.states[sink.name]
                            state.last_failure, state.last_error = time.time(), str(error)
                            log.warning("alert delivery to %s failed: %s", sink.name, error)
                        else:
                            await asyncio.sleep(self.backoff_s * 2**attempt)
                self._sending.pop(sink.name, None)

    async def flush(self, timeout_s: float = 5.0) -> None:
        """Waits until every queue is empty (used at shutdown)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while (any(self._queues.values()) or self._sending) and loop.time() < deadline:
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        """Stops delivering. What is still queued or being sent is lost: counted as
        dropped, and said once per sink (shutdown, after `flush` ran out of time)."""
        for task in self._tasks:
            task.cancel()
        for sink in self.sinks:
            lost = len(self._queues[sink.name]) + self._sending.pop(sink.name, 0)
            self._queues[sink.name].clear()
            if lost:
                self.outcomes[(sink.name, "dropped")] += lost
                log.warning("%d alert notifications to %s not delivered before shutdown "
                            "(it did not answer in time)", lost, sink.name)
        for sink in self.sinks:
            closer = getattr(sink, "close", None)
            if closer is not None:
                await closer()

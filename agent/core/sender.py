"""The agent's only background thread: drains sessions and streams them to a collector.

It runs its own asyncio loop with ``grpc.aio`` channels and puts three parts
together: the `Buffer` of steps not yet acknowledged (bounded in bytes), one
`Connection` at a time (the ``Report`` stream protocol) and the `Failover` that
picks the collector replica. Nothing here ever blocks the training thread: it
only hands over sessions under a lock.

A collector being away is an expected state: the log gets one line for each
reason a connection fails for the first time in an outage (so replicas or errors
that alternate cost a line each, not a line per attempt), one when streaming
resumes, and a summary at close; never a traceback per attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
import time
from collections.abc import Callable

from gradwatch.agent.core.buffer import Buffer
from gradwatch.agent.core.channel import ChannelSettings
from gradwatch.agent.core.endpoints import Endpoint, parse_targets
from gradwatch.agent.core.failover import Failback, Failover
from gradwatch.agent.core.session import Session
from gradwatch.agent.core.settings import AgentSettings
from gradwatch.agent.core.stream import Connection, Outcome

log = logging.getLogger(__name__)


class Sender:
    """Ships all sessions of one monitor to the job's collector, from its own thread.

    ``settings``: the collector address(es), buffer limit and timeouts; ``training_job``
    ranks the collector replicas.
    """

    def __init__(self, settings: AgentSettings, training_job: str,
                 rpc_timeout_s: float = 5.0) -> None:
        self.settings = settings
        self.channel = ChannelSettings.of(settings)
        self.buffer = Buffer(settings.max_buffer_bytes)
        self.failover = Failover(
            parse_targets(settings.collector), training_job, self.channel,
            flush_interval_s=settings.flush_interval_s,
            failback_interval_s=settings.failback_interval_s, rpc_timeout_s=rpc_timeout_s)
        self.rpc_timeout_s = rpc_timeout_s
        #: The collector currently streamed to (None while disconnected).
        self.endpoint: Endpoint | None = None
        self._loop = asyncio.new_event_loop()
        self._loop.set_exception_handler(_quiet_loop_error)
        self._stopping = asyncio.Event()
        self._drained = threading.Event()
        self._last_error = ""
        #: Reasons logged since streaming last worked (each is logged once per outage).
        self._reported: set[str] = set()
        #: Monotonic time the outage began and the steps dropped before it (None: none).
        self._outage: tuple[float, int] | None = None
        self._thread = threading.Thread(target=self._run, name="gradwatch-sender", daemon=True)
        self._thread.start()

    # -- called from any thread ---------------------------------------------------------

    def add_session(self, session: Session) -> None:
        self.buffer.add(session)

    def buffered_bytes(self) -> int:
        """Host memory held by steps not yet acknowledged (a snapshot; for benchmarks)."""
        return self.buffer.bytes()

    def close(self, timeout_s: float = 5.0) -> bool:
        """Sends what is buffered (waiting at most ``timeout_s``) and stops the thread.
        Returns True if everything recorded was acknowledged."""
        if self.buffer.holds_nothing():  # nothing was recorded: nothing to deliver
            self._drained.set()
        if self._thread.is_alive():
            self._call_soon(self._stopping.set)
            self._drained.wait(timeout_s)
            self._call_soon(self._cancel_all)
            self._thread.join(timeout=2.0)
        if not self._drained.is_set():
            if not self._thread.is_alive():  # count the steps still on the device too
                self.buffer.drain()
            steps = sum(b.buffered_steps() for b in self.buffer.sessions)
            dropped = sum(b.dropped for b in self.buffer.sessions)
            refused = next((f"the collector did not take {b.name}: {b.not_registered_because}"
                            for b in self.buffer.sessions if b.not_registered_because), "")
            reason = (self._last_error or refused
                      or f"no acknowledgement within {timeout_s:g} s")
            log.warning("gradwatch: closed with %d steps not delivered (%d dropped before): %s",
                        steps, dropped, reason)
        if not self._thread.is_alive():  # (else it may still read them)
            self.buffer.release()
        return self._drained.is_set()

    def _call_soon(self, callback: Callable[[], object]) -> None:
        try:
            self._loop.call_soon_threadsafe(callback)
        except RuntimeError:  # the loop has already finished
            pass

    # -- sender thread ------------------------------------------------------------------

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve())
        except asyncio.CancelledError:
            pass
        finally:
            leftovers = asyncio.all_tasks(self._loop)  # e.g. gRPC's own status watchers
            for task in leftovers:
                task.cancel()
            self._loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))
            # gRPC's poller thread may still deliver the cancelled calls' last events.
            with contextlib.suppress(asyncio.CancelledError):
                self._loop.run_until_complete(asyncio.sleep(0.1))
            self._loop.close()

    async def _serve(self) -> None:
        keeper = asyncio.ensure_future(self._keep_draining())
        try:
            await self.failover.run(
                self._connect, lambda: self._stopping.is_set() and self._drained.is_set())
        finally:
            keeper.cancel()

    async def _keep_draining(self) -> None:
        """Empties the device buffers when the connection has not for a flush interval and
        a half: while no collector answers (backing off between attempts) or one waits (a
        ``Register``, a write it does not read, a TLS or DNS lookup), the device rings, far
        smaller than the host buffer, would overflow first."""
        interval = self.settings.flush_interval_s
        while True:
            await asyncio.sleep(interval)
            if time.monotonic() - self.buffer.drained_at >= 1.5 * interval:
                self.buffer.drain()

    def _cancel_all(self) -> None:
        for task in asyncio.all_tasks(self._loop):
            task.cancel()

    async def _connect(self, endpoint: Endpoint, failback: Failback | None
                       ) -> tuple[Outcome, bool]:
        connection = Connection(
            self.buffer, endpoint, self.channel, stopping=self._stopping,
            drained=self._drained, flush_interval_s=self.settings.flush_interval_s,
            ack_timeout_s=self.settings.ack_timeout_s, rpc_timeout_s=self.rpc_timeout_s,
            on_streaming=lambda: self._back(endpoint))
        self.endpoint = endpoint
        try:
            outcome = await connection.run(failback)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # a bug: never let the sender thread die with it
            log.debug("gradwatch: unexpected error talking to collector %s", endpoint,
                      exc_info=True)
            connection.error = f"unexpected {_describe(error)}"
            outcome = Outcome.FAILED
        finally:
            self.endpoint = None
        if outcome is Outcome.LOST:  # not a failure: the sessions are registered at once
            log.info("gradwatch: collector %s does not know this task's sessions (it "
                     "restarted); registering them again", endpoint)
        elif connection.error:
            self._report_error(f"collector {endpoint}: {connection.error}")
        return outcome, connection.streamed

    def _back(self, endpoint: Endpoint) -> None:
        """Says at the outage's level that it is over (a log showing warnings only would
        otherwise end on the failure)."""
        if self._outage is not None:  # set with `_last_error`
            began, dropped_before = self._outage
            log.warning("gradwatch: streaming to collector %s again after %.1f s (%.1f kB "
                        "buffered, %d steps dropped meanwhile)", endpoint,
                        time.monotonic() - began, self.buffer.bytes() / 1e3,
                        self._dropped() - dropped_before)
            self._last_error = ""
            self._reported.clear()
            self._outage = None

    def _dropped(self) -> int:
        return sum(session.dropped for session in self.buffer.sessions)

    def _report_error(self, message: str) -> None:
        if self._outage is None:
            self._outage = (time.monotonic(), self._dropped())
        self._last_error = message
        if message not in self._reported and len(self._reported) < _MAX_REASONS:
            log.warning("gradwatch: %s (training continues; reports are buffered)", message)
            self._reported.add(message)


#: Distinct reasons logged per outage at most (a reason that embeds a changing detail
#: must not flood the log either).
_MAX_REASONS = 8


def _quiet_loop_error(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """What the sender's private event loop could not deliver to a task (gRPC's poller
    callback, at times, while channels close): one debug line, never asyncio's ERROR
    with a traceback in the user's log. The sender recovers by reconnecting."""
    error = context.get("exception")
    log.debug("gradwatch: sender event loop: %s%s", context.get("message", ""),
              f" ({_describe(error)})" if isinstance(error, Exception) else "")


def _describe(error: Exception) -> str:
    """``Type: first line of the message``, without object addresses, so that the same
    failure reads the same every time (and is logged once)."""
    text = re.sub(r" at 0x[0-9a-fA-F]+", "", str(error).partition("\n")[0])[:200]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__

"""One connection to one collector: register, replay, stream, read acknowledgements.

`Connection.run` registers the sessions the collector does not know, sends again
what the previous connection left unacknowledged (same sequence numbers: the
collector drops duplicates; a session with nothing to resend sends an empty batch of
sequence 0, so that an idle or hung task finds a collector that lost its session at
once: ``NOT_FOUND``, `Outcome.LOST`), then writes a batch per session with news every flush
interval on one ordered ``Report`` stream, while a task reads the acks. It ends with
an `Outcome` that tells `gradwatch.agent.core.failover` what to do next.

A batch the collector refuses (``INVALID_ARGUMENT``, ``RESOURCE_EXHAUSTED``: it would be
refused again) is dropped and its steps counted as dropped; the rest goes on. A session
whose registration is refused never holds up the others: ``INVALID_ARGUMENT`` (it would
be refused again) retires it for the rest of the connection, its statistics neither read
nor sent (the next connection, perhaps to a collector with other limits, asks again);
``RESOURCE_EXHAUSTED`` and ``ALREADY_EXISTS`` (the collector is full, another process
reports that task: both may clear) leave it waiting in the buffer, batches sent to an
earlier collector and not acknowledged included (sent again once it registers),
registered again every `REGISTER_RETRY_S`. A collector that acknowledges nothing for
``ack_timeout_s`` (or whose flow-control window stays full that long) is given up.
Sender thread (its event loop) only.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
import threading
import time
from collections.abc import Awaitable, Callable

import grpc

from gradwatch.agent.core.buffer import Buffer, SessionBuffer
from gradwatch.agent.core.channel import ChannelSettings
from gradwatch.agent.core.endpoints import Endpoint
from gradwatch.proto.v1 import gradwatch_pb2 as pb
from gradwatch.proto.v1 import gradwatch_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

#: Report stream statuses that refuse a batch itself: sent again, it would be refused again.
_REFUSED = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)
#: Register statuses that may clear: the session is registered again later.
_NOT_NOW = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ALREADY_EXISTS)
#: Seconds between registrations of a session the collector could not take yet.
REGISTER_RETRY_S = 30.0


class Outcome(enum.Enum):
    """How a connection ended."""

    DONE = "done"  # stopping, and everything was acknowledged
    FAILBACK = "failback"  # a preferred collector is back; everything here was acknowledged
    REFUSED = "refused"  # the collector refused a batch, which was dropped: reconnect
    LOST = "lost"  # the collector does not know our sessions: register again
    FAILED = "failed"  # unreachable, broken, ended or silent: try the next collector


class _Ended(Exception):
    """The connection ends with this outcome."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.value)
        self.outcome = outcome


def _hint(error: grpc.aio.AioRpcError) -> str:
    """What the agent's user can do about ``error``, where the collector's words are about
    the wire (its metadata, a TLS record)."""
    if error.code() == grpc.StatusCode.UNAUTHENTICATED:
        return " (the agent's token: GRADWATCH_TOKEN or GRADWATCH_TOKEN_FILE)"
    if error.code() == grpc.StatusCode.UNAVAILABLE and "handshake" in error.details().lower():
        return (" (TLS: does the collector serve TLS, --grpc-tls-cert-file, and does "
                "GRADWATCH_TLS_CA_FILE hold its CA? Without TLS there, unset GRADWATCH_TLS)")
    return ""


class Connection:
    """One connection's protocol.

    ``stopping`` is set when the monitor closes (then everything is flushed and the
    sessions say goodbye); ``drained`` is set once that is done; ``on_streaming`` is
    called once the collector answers (a registration or an acknowledgement). `run`'s
    ``failback`` returns when a preferred collector is healthy again (then this connection
    stops taking new steps, flushes, says goodbye and ends)."""

    def __init__(self, buffer: Buffer, endpoint: Endpoint, channel: ChannelSettings, *,
                 stopping: asyncio.Event, drained: threading.Event, flush_interval_s: float,
                 ack_timeout_s: float, rpc_timeout_s: float,
                 on_streaming: Callable[[], None] = lambda: None) -> None:
        self.buffer = buffer
        self.endpoint = endpoint
        self.channel = channel
        self.stopping = stopping
        self.drained = drained
        self.flush_interval_s = flush_interval_s
        self.ack_timeout_s = ack_timeout_s
        self.rpc_timeout_s = rpc_timeout_s
        self.on_streaming = on_streaming
        #: The collector answered (a registration or an acknowledgement).
        self.streamed = False
        #: (session, sequence) of the batches written on this call and not yet
        #: acknowledged, in the order written (the collector applies them in that order).
        self._in_flight: collections.deque[tuple[SessionBuffer, int]] = collections.deque()
        self._waiting_since = 0.0  # monotonic time since which an ack is awaited
        #: Why the connection failed, for the log ("" if it did not).
        self.error = ""

    async def run(self, failback: Callable[[], Awaitable[None]] | None) -> Outcome:
        """Streams until an outcome; a failure's reason is left in `error`. Unexpected
        exceptions (bugs) propagate."""
        try:
            await self.channel.verify(self.endpoint)
            async with self.channel.open(self.endpoint) as channel:
                await self._serve(pb_grpc.GradientWatchStub(channel), failback)
        except _Ended as ended:
            return ended.outcome
        except grpc.aio.AioRpcError as error:
            self.error = f"{error.code().name} {error.details()}{_hint(error)}"
            if error.code() == grpc.StatusCode.NOT_FOUND:
                for buffer in self.buffer.sessions:
                    buffer.forget(self.endpoint.address)
                return Outcome.LOST
        except (ConnectionError, asyncio.TimeoutError, OSError) as error:
            self.error = str(error) or type(error).__name__
        return Outcome.FAILED

    async def _serve(self, stub: pb_grpc.GradientWatchStub,
                     failback: Callable[[], Awaitable[None]] | None) -> None:
        self.buffer.drain()
        for buffer in self.buffer.sessions:
            buffer.connect(self.endpoint.address)
        await self._register_new(stub)
        call = stub.Report(metadata=self.channel.metadata())
        acks = asyncio.ensure_future(self._read_acks(call))
        # Its error is raised where the stream is used, or moot once the connection is
        # left: either way retrieved, so asyncio does not log it as lost.
        acks.add_done_callback(lambda task: task.cancelled() or task.exception())
        watcher = asyncio.ensure_future(failback()) if failback is not None else None
        # One waiter for the connection: a wait_for per flush creates and cancels a task.
        stop = asyncio.ensure_future(self.stopping.wait())
        try:
            await self._stream(call, stub, acks, watcher, stop)
        except grpc.aio.AioRpcError as error:
            if call.done() and await call.code() in _REFUSED:
                await asyncio.wait([acks], timeout=self.rpc_timeout_s)  # acks before it
                self._drop_refused_batch(error)
                raise _Ended(Outcome.REFUSED) from error
            raise
        finally:
            acks.cancel()
            stop.cancel()
            if watcher is not None:
                watcher.cancel()
            call.cancel()

    async def _stream(self, call, stub: pb_grpc.GradientWatchStub, acks: asyncio.Future,
                      failback: asyncio.Future | None, stop: asyncio.Future) -> None:
        """Streams until done; ``stop`` completes when the monitor closes."""
        self._waiting_since = time.monotonic()
        for buffer in self.buffer.sessions:  # replay what the previous connection left unacked
            if buffer.session_id:
                await self._replay(call, buffer, acks)
        while True:
            for buffer in self.buffer.sessions:
                if buffer.says_goodbye():  # its optimizer is gone
                    buffer.final_sent = True
                    await self._send(call, buffer, acks, final=True)
            self.buffer.remove_finished()
            for buffer in await self._register_new(stub):  # taken only now: what waited
                await self._replay(call, buffer, acks)
            for buffer in self.buffer.sessions:
                while buffer.has_news():
                    await self._send(call, buffer, acks)
            # Moving back to a preferred replica: no new steps here; once everything sent is
            # acknowledged, close the sessions here and go.
            moving = failback is not None and failback.done() and not self.stopping.is_set()
            if (self.stopping.is_set() or moving) and self.buffer.all_acked():
                # Say goodbye, so the collector knows these tasks finished (or moved), not hung.
                goodbyes = [b for b in self.buffer.sessions if b.session_id and not b.final_sent]
                for buffer in goodbyes:
                    buffer.final_sent = True
                    await self._send(call, buffer, acks, final=True, moving=moving)
                if not goodbyes:
                    await self._done_writing(call, acks)
                    if moving:
                        raise _Ended(Outcome.FAILBACK)
                    self.drained.set()
                    raise _Ended(Outcome.DONE)
            if self.stopping.is_set() or moving:  # wait for the last acks
                await asyncio.sleep(0.01)
            else:
                await asyncio.wait((stop,), timeout=self.flush_interval_s)
            if acks.done():
                acks.result()  # raises the stream's error
                raise ConnectionError("collector ended the report stream")
            self._check_acks_arrive()
            if not moving:
                self.buffer.drain()

    async def _done_writing(self, call, acks: asyncio.Future) -> None:
        """Half-closes the stream; a stream that failed already says why."""
        if acks.done():
            acks.result()  # raises the stream's error
        try:
            await call.done_writing()
        except Exception as error:  # gRPC's ExecuteBatchError: the call is over
            raise ConnectionError("collector ended the report stream") from error

    def _answered(self) -> None:
        if not self.streamed:
            self.streamed = True
            self.on_streaming()

    def _check_acks_arrive(self) -> None:
        if not self.buffer.any_unacked():
            self._waiting_since = time.monotonic()
        elif time.monotonic() - self._waiting_since > self.ack_timeout_s:
            raise ConnectionError(f"no acknowledgement for {self.ack_timeout_s:g} s")

    async def _replay(self, call, buffer: SessionBuffer, acks: asyncio.Future) -> None:
        """Sends again, under its session id here, what ``buffer`` has had no ack for; with
        nothing to resend, a batch of sequence 0 (it applies nothing), so that a quiet task
        learns at once whether the collector still knows the session (``NOT_FOUND``: it
        restarted, and the session is registered again) and its stream counts as the
        session's there (a task that hangs is kept, and pages as silent)."""
        if not buffer.unacked:
            await self._write(call, buffer, pb.ReportBatch(session_id=buffer.session_id), acks)
        for batch in list(buffer.unacked):  # acks arriving meanwhile remove from it
            batch.session_id = buffer.session_id
            buffer.attach_diagnoses(batch)  # registered again: they go with its first batch
            await self._write(call, buffer, batch, acks)

    async def _send(self, call, buffer: SessionBuffer, acks: asyncio.Future,
                    final: bool = False, moving: bool = False) -> None:
        if not self.buffer.any_unacked():
            self._waiting_since = time.monotonic()
        await self._write(call, buffer, buffer.next_batch(final, moving), acks)

    async def _write(self, call, buffer: SessionBuffer, batch: pb.ReportBatch,
                     acks: asyncio.Future) -> None:
        try:
            if not acks.done():
                self._in_flight.append((buffer, batch.sequence))
                # A collector that stops reading fills the flow-control window: don't
                # wait for it forever.
                await asyncio.wait_for(call.write(batch), self.ack_timeout_s)
                return
        except asyncio.TimeoutError:
            raise ConnectionError(f"no acknowledgement for {self.ack_timeout_s:g} s (a write "
                                  "waited that long)") from None
        except asyncio.InvalidStateError:  # the RPC ended; its status says why
            await asyncio.wait([acks], timeout=self.rpc_timeout_s)
        if acks.done():
            acks.result()  # raises the stream's error
        raise ConnectionError("collector ended the report stream")

    async def _register_new(self, stub: pb_grpc.GradientWatchStub) -> list[SessionBuffer]:
        """Registers the sessions not registered here that may be; returns those that
        were."""
        address = self.endpoint.address
        registered = []
        for buffer in self.buffer.sessions:
            if not buffer.session_id and not buffer.retired:
                buffer.connect(address)  # adopted since the connection opened
            if (buffer.session_id or buffer.retired or buffer.predecessor is not None
                    or time.monotonic() < buffer.register_after):
                continue
            try:
                response = await stub.Register(buffer.registration(),
                                               timeout=self.rpc_timeout_s,
                                               metadata=self.channel.metadata())
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    buffer.retire()
                    level, line = logging.ERROR, ("refused to register %s: %s; its "
                                                  "statistics are not sent")
                elif error.code() in _NOT_NOW:
                    buffer.register_after = time.monotonic() + REGISTER_RETRY_S
                    level, line = logging.WARNING, (f"cannot take %s now: {error.code().name} "
                                                    f"%s; trying again every "
                                                    f"{REGISTER_RETRY_S:g} s")
                else:
                    raise
                # One line per reason: a collector refuses again at every connection.
                if buffer.not_registered_because != error.details():
                    buffer.not_registered_because = error.details()
                    log.log(level, "gradwatch: collector %s " + line, self.endpoint,
                            buffer.name, error.details())
                self._answered()
                continue
            # (a hand-over: the front end said what changed)
            handed_over = buffer.follows and not buffer.registrations
            buffer.registered(address, response)
            self._answered()
            log.log(logging.DEBUG if handed_over else logging.INFO,
                    "gradwatch: registered %s with %s as session %s",
                    buffer.name, self.endpoint, buffer.session_id)
            registered.append(buffer)
        return registered

    async def _read_acks(self, call) -> None:
        by_id: dict[str, SessionBuffer] = {}
        async for ack in call:
            buffer = by_id.get(ack.session_id)
            if buffer is None:
                by_id = {b.session_id: b for b in self.buffer.sessions}
                buffer = by_id.get(ack.session_id)
            if buffer is None:
                continue
            buffer.acknowledge(ack.sequence)
            self._answered()
            while self._in_flight and self._in_flight[0][1] <= self._in_flight[0][0].acked:
                self._in_flight.popleft()
            self._waiting_since = time.monotonic()

    def _drop_refused_batch(self, error: grpc.aio.AioRpcError) -> None:
        """Drops the batch the collector refused: the first written on this call and not
        acknowledged (unless the buffer limit dropped it already). Its steps count as
        dropped; its diagnoses are not resent."""
        for buffer, sequence in self._in_flight:
            if sequence > buffer.acked:
                break
        else:
            return
        batch = buffer.drop_batch(sequence)
        if batch is not None:
            log.error("gradwatch: collector %s refused a batch of %s (%d steps): %s %s; "
                      "dropped it", self.endpoint, buffer.name, len(batch.steps),
                      error.code().name, error.details())

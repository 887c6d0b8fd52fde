"""The agent's only background thread: drains sessions and streams them to a collector.

It runs its own asyncio loop with ``grpc.aio`` channels. Every flush interval
it drains each session's new steps into a bounded host buffer, registers
sessions the collector does not know yet, and writes batches on one ordered
``Report`` stream. Batches stay buffered until acknowledged; after a
reconnect the unacknowledged ones are sent again with the same sequence
numbers, and the collector drops duplicates. Diagnoses of missing gradients
ride on the next batch (one without steps if need be), once per registration.

A batch the collector refuses (``INVALID_ARGUMENT``, ``RESOURCE_EXHAUSTED``: it would
be refused again) is dropped and its steps counted as dropped; the rest goes on.
Steps lower than the one before them are marked ``rewound`` (a checkpoint
restored into the optimizer), which the collector requires.

Faults: a collector that is unreachable, refuses a registration, breaks the
stream, ends it (draining), or stops acknowledging for ``ack_timeout_s`` is
left for the next replica in the job's ranking (`gradwatch.agent.endpoints`);
when every replica failed, the sender waits with exponential backoff and
jitter, then starts over from the preferred one. While on a fallback it checks
the preferred replicas' health every ``failback_interval_s`` and moves back
(closing its sessions on the fallback first), so all tasks of a job converge
on one collector.

When the buffer is full (``max_buffer_bytes``) the oldest steps are dropped
and counted; the count reaches the collector with the next batch. Nothing
here ever blocks the training thread: it only appends sessions under a lock.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gradwatch.agent.channel import ChannelSettings
from gradwatch.agent.endpoints import Endpoint, rank, resolve
from gradwatch.agent.session import Session
from gradwatch.proto.v1 import gradwatch_pb2 as pb
from gradwatch.proto.v1 import gradwatch_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GradientWatch"].full_name


#: Bytes a buffered step takes per statistic (5 packed arrays), plus per-step overhead.
_BYTES_PER_STATISTIC = 17
_BYTES_PER_STEP = 48


#: Report stream statuses that refuse a batch itself: sent again, it would be refused again.
_REFUSED = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)


class _Failback(Exception):
    """A preferred collector is healthy again: leave the fallback."""


class _Refused(Exception):
    """The collector refused a batch, which was dropped: reconnect and go on."""


@dataclass
class _Stream:
    """Sender-side state of one session."""

    session: Session
    session_id: str = ""  # on the current connection's collector
    #: Session ids by collector address: a reconnect to the same collector resumes the
    #: session, so batches it applied but never acknowledged are recognised as duplicates.
    registrations: dict = field(default_factory=dict)
    next_sequence: int = 1
    acked: int = 0  # the highest sequence acknowledged
    last_step: int = -1  # of the last step put in a batch
    dropped: int = 0
    max_batch_steps: int = 256
    final_sent: bool = False
    #: Diagnoses sent since the session was (re-)registered, by variable id.
    diagnoses_sent: dict = field(default_factory=dict)
    pending: collections.deque = field(default_factory=collections.deque)  # StepReports
    unacked: collections.deque = field(default_factory=collections.deque)  # ReportBatches

    def __post_init__(self) -> None:
        statistics = self.session.num_replicas * self.session.num_variables
        self.step_bytes = statistics * _BYTES_PER_STATISTIC + _BYTES_PER_STEP

    def unsent_diagnoses(self) -> list[pb.Diagnosis]:
        return [d for i, d in self.session.diagnoses().items()
                if self.diagnoses_sent.get(i) is not d]

    def buffered_steps(self) -> int:
        return len(self.pending) + sum(len(b.steps) for b in self.unacked)

    def next_steps(self) -> list[pb.StepReport]:
        """The oldest pending steps, as many as a batch may hold; a step lower than the
        one before it (the optimizer's counter was set back) is marked ``rewound``."""
        steps = [self.pending.popleft()
                 for _ in range(min(len(self.pending), self.max_batch_steps))]
        for step in steps:
            step.rewound = step.step < self.last_step
            self.last_step = step.step
        return steps

    def connect(self, endpoint: Endpoint) -> None:
        self.session_id = self.registrations.get(endpoint.address, "")
        self.final_sent = False


class Sender:
    """Background thread shipping all sessions of one monitor to the job's collector.

    ``targets``: collector addresses (see `gradwatch.agent.endpoints`), ranked by
    ``training_job``. ``max_buffer_bytes``: host memory for steps not yet
    acknowledged, across sessions.
    """

    def __init__(self, targets: list[str], training_job: str, *,
                 channel: ChannelSettings | None = None, flush_interval_s: float = 0.1,
                 max_buffer_bytes: int = 128 * 2**20, rpc_timeout_s: float = 5.0,
                 ack_timeout_s: float = 10.0, failback_interval_s: float = 30.0,
                 on_error: Callable[[str], None] | None = None) -> None:
        self.targets = targets
        self.training_job = training_job
        self.channel = channel or ChannelSettings()
        self.flush_interval_s = flush_interval_s
        self.max_buffer_bytes = max_buffer_bytes
        self.rpc_timeout_s = rpc_timeout_s
        self.ack_timeout_s = ack_timeout_s
        self.failback_interval_s = failback_interval_s
        #: The collector currently streamed to (None while disconnected).
        self.endpoint: Endpoint | None = None
        self._lock = threading.Lock()
        self._new_sessions: list[Session] = []
        self._streams: list[_Stream] = []
        self._loop = asyncio.new_event_loop()
        self._stopping = asyncio.Event()
        self._drained = threading.Event()
        self._last_error = ""
        self._waiting_since = 0.0  # monotonic time since which an ack is awaited
        #: (stream, sequence) of the batches written on the current call and not yet
        #: acknowledged, in the order written (the collector applies them in that order).
        self._in_flight: collections.deque = collections.deque()
        self._connected = False  # the current connection got as far as streaming
        self._on_error = on_error
        self._thread = threading.Thread(target=self._run, name="gradwatch-sender", daemon=True)
        self._thread.start()

    # -- called from any thread ---------------------------------------------------------

    def add_session(self, session: Session) -> None:
        with self._lock:
            self._new_sessions.append(session)

    def close(self, timeout_s: float = 5.0) -> bool:
        """Sends what is buffered (waiting at most ``timeout_s``) and stops the thread.
        Returns True if everything recorded was acknowledged."""
        if self._thread.is_alive():
            self._call_soon(self._stopping.set)
            self._drained.wait(timeout_s)
            self._call_soon(self._cancel_all)
            self._thread.join(timeout=2.0)
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
            self._loop.run_until_complete(self._main())
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

    def _cancel_all(self) -> None:
        for task in asyncio.all_tasks(self._loop):
            task.cancel()

    def _adopt_new_sessions(self) -> None:
        with self._lock:
            new, self._new_sessions = self._new_sessions, []
        self._streams.extend(_Stream(s) for s in new)

    def _drain_sessions(self) -> None:
        self._adopt_new_sessions()
        for stream in self._streams:
            try:
                reports, dropped = stream.session.drain()
            except Exception:  # a broken session must not stop the others
                log.exception("gradwatch: reading statistics of %s failed",
                              stream.session.optimizer)
                continue
            stream.dropped += dropped
            stream.pending.extend(reports)
        self._enforce_buffer_limit()

    def buffered_bytes(self) -> int:
        """Host memory held by steps not yet acknowledged (sender thread)."""
        return sum(s.buffered_steps() * s.step_bytes for s in self._streams)

    def _enforce_buffer_limit(self) -> None:
        """Drops the oldest steps of the largest buffers until the rest fits."""
        excess = self.buffered_bytes() - self.max_buffer_bytes
        for stream in sorted(self._streams, key=lambda s: -s.buffered_steps() * s.step_bytes):
            while excess > 0 and stream.unacked:
                steps = len(stream.unacked.popleft().steps)
                stream.dropped += steps
                excess -= steps * stream.step_bytes
            while excess > 0 and stream.pending:
                stream.pending.popleft()
                stream.dropped += 1
                excess -= stream.step_bytes

    def _all_acked(self) -> bool:
        return all(not s.pending and not s.unacked for s in self._streams)

    async def _main(self) -> None:
        backoff = self.flush_interval_s
        while True:
            endpoints = rank(resolve(self.targets), self.training_job)
            for preference, endpoint in enumerate(endpoints):
                preferred = endpoints[:preference]
                outcome = await self._attempt(endpoint, preferred)
                if outcome == "lost":  # the collector restarted: register again at once
                    outcome = await self._attempt(endpoint, preferred)
                while outcome == "refused":  # a batch was refused and dropped: the rest
                    outcome = await self._attempt(endpoint, preferred)
                if outcome == "done" or (self._stopping.is_set() and self._drained.is_set()):
                    return
                if outcome == "failback":
                    break
                if self._connected:  # it worked until now: back off from scratch
                    backoff = self.flush_interval_s
                self._drain_sessions()
            else:  # every replica failed
                await asyncio.sleep(backoff * random.uniform(0.5, 1.5))
                backoff = min(backoff * 2, 5.0)
                self._drain_sessions()

    async def _attempt(self, endpoint: Endpoint, preferred: list[Endpoint]) -> str:
        """Streams to ``endpoint`` until done ("done"), a preferred replica is back
        ("failback"), the collector lost our sessions ("lost") or another error ("failed")."""
        self.endpoint = endpoint
        self._connected = False
        try:
            async with self.channel.open(endpoint) as channel:
                await self._serve(channel, preferred)
            return "done"
        except _Failback:
            return "failback"
        except _Refused:
            return "refused"
        except grpc.aio.AioRpcError as error:
            self._report_error(f"collector {endpoint}: {error.code().name} {error.details()}")
            if error.code() == grpc.StatusCode.NOT_FOUND:
                for stream in self._streams:
                    stream.registrations.pop(endpoint.address, None)
                return "lost"
        except (ConnectionError, asyncio.TimeoutError, OSError) as error:
            self._report_error(f"collector {endpoint}: {error or type(error).__name__}")
        except Exception:  # never let the sender thread die: it would lose everything
            log.exception("gradwatch: unexpected error talking to collector %s", endpoint)
        finally:
            self.endpoint = None
        return "failed"

    async def _serve(self, channel: grpc.aio.Channel, preferred: list[Endpoint]) -> None:
        """One connection: register, then stream until stopped and flushed, or an error.
        ``preferred``: replicas ranked above this one (checked for failback)."""
        stub = pb_grpc.GradientWatchStub(channel)
        self._drain_sessions()
        for stream in self._streams:
            stream.connect(self.endpoint)
        await self._register_new(stub)
        self._connected = True
        call = stub.Report(metadata=self.channel.metadata())
        self._in_flight.clear()
        acks = asyncio.ensure_future(self._read_acks(call))
        # Its error is raised where the stream is used, or moot once the connection is
        # left: either way retrieved, so asyncio does not log it as lost.
        acks.add_done_callback(lambda task: task.cancelled() or task.exception())
        failback = (asyncio.ensure_future(self._watch_preferred(preferred))
                    if preferred else None)
        try:
            await self._stream(call, stub, acks, failback)
        except grpc.aio.AioRpcError as error:
            if call.done() and await call.code() in _REFUSED:
                await asyncio.wait([acks], timeout=self.rpc_timeout_s)  # acks before it
                self._drop_refused_batch(error)
                raise _Refused from error
            raise
        finally:
            acks.cancel()
            if failback is not None:
                failback.cancel()
            call.cancel()

    async def _stream(self, call, stub: pb_grpc.GradientWatchStub, acks: asyncio.Future,
                      failback: asyncio.Future | None) -> None:
        self._waiting_since = time.monotonic()
        for stream in self._streams:  # replay what the previous connection left unacked
            for batch in list(stream.unacked):  # acks arriving meanwhile remove from it
                batch.session_id = stream.session_id
                await self._write(call, stream, batch, acks)
        while True:
            await self._register_new(stub)
            for stream in self._streams:
                while stream.session_id and (stream.pending or stream.unsent_diagnoses()):
                    await self._send(call, stream, acks, steps=stream.next_steps())
            # Moving back to a preferred replica: no new steps here; once everything sent is
            # acknowledged, close the sessions here and go.
            moving = (failback is not None and failback.done()
                      and not self._stopping.is_set())
            if (self._stopping.is_set() or moving) and self._all_acked():
                # Say goodbye, so the collector knows these tasks finished (or moved), not hung.
                goodbyes = [s for s in self._streams if s.session_id and not s.final_sent]
                for stream in goodbyes:
                    stream.final_sent = True
                    await self._send(call, stream, acks, final=True)
                if not goodbyes:
                    await call.done_writing()
                    if moving:
                        raise _Failback
                    self._drained.set()
                    return
            if self._stopping.is_set() or moving:  # wait for the last acks
                await asyncio.sleep(0.01)
            else:
                try:
                    await asyncio.wait_for(self._stopping.wait(), self.flush_interval_s)
                except asyncio.TimeoutError:
                    pass
            if acks.done():
                acks.result()  # raises the stream's error
                raise ConnectionError("collector ended the report stream")
            self._check_acks_arrive()
            if not moving:
                self._drain_sessions()

    def _check_acks_arrive(self) -> None:
        if not any(s.unacked for s in self._streams):
            self._waiting_since = time.monotonic()
        elif time.monotonic() - self._waiting_since > self.ack_timeout_s:
            raise ConnectionError(f"no acknowledgement for {self.ack_timeout_s:g} s")

    async def _watch_preferred(self, preferred: list[Endpoint]) -> None:
        """Returns once a replica ranked above the current one reports SERVING."""
        request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        while True:
            await asyncio.sleep(self.failback_interval_s * random.uniform(0.8, 1.2))
            for endpoint in preferred:
                try:
                    async with self.channel.open(endpoint) as channel:
                        response = await health_pb2_grpc.HealthStub(channel).Check(
                            request, timeout=self.rpc_timeout_s)
                except (grpc.aio.AioRpcError, OSError):
                    continue
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    log.info("gradwatch: collector %s is back; moving there", endpoint)
                    return

    async def _send(self, call, stream: _Stream, acks, **fields) -> None:
        diagnoses = stream.unsent_diagnoses()
        stream.diagnoses_sent.update((d.variable_id, d) for d in diagnoses)
        batch = pb.ReportBatch(session_id=stream.session_id, sequence=stream.next_sequence,
                               dropped_steps=stream.dropped, diagnoses=diagnoses, **fields)
        stream.next_sequence += 1
        if not any(s.unacked for s in self._streams):
            self._waiting_since = time.monotonic()
        stream.unacked.append(batch)
        await self._write(call, stream, batch, acks)

    async def _write(self, call, stream: _Stream, batch: pb.ReportBatch, acks) -> None:
        try:
            if not acks.done():
                self._in_flight.append((stream, batch.sequence))
                # A collector that stops reading fills the flow-control window: don't
                # wait for it forever.
                await asyncio.wait_for(call.write(batch), self.ack_timeout_s)
                return
        except asyncio.InvalidStateError:  # the RPC ended; its status says why
            await asyncio.wait([acks], timeout=self.rpc_timeout_s)
        if acks.done():
            acks.result()  # raises the stream's error
        raise ConnectionError("collector ended the report stream")

    async def _register_new(self, stub: pb_grpc.GradientWatchStub) -> None:
        for stream in self._streams:
            if not stream.session_id:
                stream.connect(self.endpoint)  # adopted since the connection opened
            if not stream.session_id:
                response = await stub.Register(stream.session.registration(),
                                               timeout=self.rpc_timeout_s,
                                               metadata=self.channel.metadata())
                stream.session_id = response.session_id
                stream.registrations[self.endpoint.address] = response.session_id
                stream.diagnoses_sent = {}
                stream.max_batch_steps = response.max_batch_steps or stream.max_batch_steps
                log.info("gradwatch: registered %s with %s as session %s",
                         stream.session.optimizer, self.endpoint, stream.session_id)

    async def _read_acks(self, call) -> None:
        by_id = {}
        async for ack in call:
            stream = by_id.get(ack.session_id)
            if stream is None:
                by_id = {s.session_id: s for s in self._streams}
                stream = by_id.get(ack.session_id)
            if stream is None:
                continue
            stream.acked = max(stream.acked, ack.sequence)
            while stream.unacked and stream.unacked[0].sequence <= ack.sequence:
                stream.unacked.popleft()
            while self._in_flight and self._in_flight[0][1] <= self._in_flight[0][0].acked:
                self._in_flight.popleft()
            self._waiting_since = time.monotonic()

    def _drop_refused_batch(self, error: grpc.aio.AioRpcError) -> None:
        """Drops the batch the collector refused: the first written on this call and not
        acknowledged (unless the buffer limit dropped it already). Its steps count as
        dropped; its diagnoses are not resent."""
        for stream, sequence in self._in_flight:
            if sequence > stream.acked:
                break
        else:
            return
        batch = next((b for b in stream.unacked if b.sequence == sequence), None)
        if batch is None:  # the buffer limit dropped it already
            return
        stream.unacked.remove(batch)
        stream.dropped += len(batch.steps)
        log.error("gradwatch: collector %s refused a batch of %s (%d steps): %s %s; dropped it",
                  self.endpoint, stream.session.optimizer, len(batch.steps),
                  error.code().name, error.details())

    def _report_error(self, message: str) -> None:
        if message != self._last_error:
            log.warning("gradwatch: %s (training continues; reports are buffered)", message)
            self._last_error = message
        if self._on_error:
            self._on_error(message)

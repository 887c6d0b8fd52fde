"""The agent's only background thread: drains sessions and streams them to the collector.

It runs its own asyncio loop with a ``grpc.aio`` channel. Every flush interval
it drains each session's new steps into a bounded host buffer, registers
sessions the collector does not know yet, and writes batches on one ordered
``Report`` stream. Batches stay buffered until acknowledged; after a
reconnect the unacknowledged ones are sent again with the same sequence
numbers, and the collector drops duplicates. Diagnoses of missing gradients
ride on the next batch (one without steps if need be), once per registration.
When the buffer is full the oldest steps are dropped and counted. Nothing here
ever blocks the training thread: it only appends sessions under a lock.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from gradwatch.agent.session import Session
from gradwatch.proto.v1 import gradwatch_pb2 as pb
from gradwatch.proto.v1 import gradwatch_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


@dataclass
class _Stream:
    """Sender-side state of one session."""

    session: Session
    session_id: str = ""
    next_sequence: int = 1
    dropped: int = 0
    max_batch_steps: int = 256
    final_sent: bool = False
    #: Diagnoses sent since the session was (re-)registered, by variable id.
    diagnoses_sent: dict = field(default_factory=dict)
    pending: collections.deque = field(default_factory=collections.deque)  # StepReports
    unacked: collections.deque = field(default_factory=collections.deque)  # ReportBatches

    def unsent_diagnoses(self) -> list[pb.Diagnosis]:
        return [d for i, d in self.session.diagnoses().items()
                if self.diagnoses_sent.get(i) is not d]

    def buffered_steps(self) -> int:
        return len(self.pending) + sum(len(b.steps) for b in self.unacked)


class Sender:
    """Background thread shipping all sessions of one monitor to one collector."""

    def __init__(self, target: str, *, flush_interval_s: float = 0.1,
                 max_buffered_steps: int = 10_000, rpc_timeout_s: float = 5.0,
                 on_error: Callable[[str], None] | None = None) -> None:
        self.target = target
        self.flush_interval_s = flush_interval_s
        self.max_buffered_steps = max_buffered_steps
        self.rpc_timeout_s = rpc_timeout_s
        self._lock = threading.Lock()
        self._new_sessions: list[Session] = []
        self._streams: list[_Stream] = []
        self._loop = asyncio.new_event_loop()
        self._stopping = asyncio.Event()
        self._drained = threading.Event()
        self._last_error = ""
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

    def _enforce_buffer_limit(self) -> None:
        excess = sum(s.buffered_steps() for s in self._streams) - self.max_buffered_steps
        for stream in sorted(self._streams, key=lambda s: -s.buffered_steps()):
            while excess > 0 and stream.unacked:
                excess -= len(stream.unacked[0].steps)
                stream.dropped += len(stream.unacked.popleft().steps)
            while excess > 0 and stream.pending:
                stream.pending.popleft()
                stream.dropped += 1
                excess -= 1

    def _all_acked(self) -> bool:
        return all(not s.pending and not s.unacked for s in self._streams)

    async def _main(self) -> None:
        backoff = self.flush_interval_s
        while True:
            self._connected = False
            try:
                async with grpc.aio.insecure_channel(self.target) as channel:
                    await self._serve(pb_grpc.GradientWatchStub(channel))
                return  # stopping and flushed
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.NOT_FOUND:  # collector lost our sessions
                    for stream in self._streams:
                        stream.session_id = ""
                self._report_error(f"collector {self.target}: {error.code().name} "
                                   f"{error.details()}")
            except (ConnectionError, asyncio.TimeoutError) as error:
                self._report_error(f"collector {self.target}: {error}")
            if self._stopping.is_set() and self._drained.is_set():
                return
            if self._connected:  # it worked until now: retry soon, back off from scratch
                backoff = self.flush_interval_s
            await asyncio.sleep(backoff * random.uniform(0.5, 1.5))
            backoff = min(backoff * 2, 5.0)
            self._drain_sessions()

    async def _serve(self, stub: pb_grpc.GradientWatchStub) -> None:
        """One connection: register, then stream until stopped and flushed, or an error."""
        self._drain_sessions()
        await self._register_new(stub)
        self._connected = True
        call = stub.Report()
        acks = asyncio.ensure_future(self._read_acks(call))
        try:
            await self._stream(call, stub, acks)
        finally:
            acks.cancel()
            call.cancel()

    async def _stream(self, call, stub: pb_grpc.GradientWatchStub, acks: asyncio.Future) -> None:
        for stream in self._streams:  # replay what the previous connection left unacked
            for batch in stream.unacked:
                batch.session_id = stream.session_id
                await self._write(call, batch, acks)
        while True:
            await self._register_new(stub)
            for stream in self._streams:
                while stream.session_id and (stream.pending or stream.unsent_diagnoses()):
                    steps = [stream.pending.popleft()
                             for _ in range(min(len(stream.pending), stream.max_batch_steps))]
                    await self._send(call, stream, acks, steps=steps)
            if self._stopping.is_set() and self._all_acked():
                # Say goodbye, so the collector knows these tasks finished, not hung.
                goodbyes = [s for s in self._streams if s.session_id and not s.final_sent]
                for stream in goodbyes:
                    stream.final_sent = True
                    await self._send(call, stream, acks, final=True)
                if not goodbyes:
                    self._drained.set()
                    await call.done_writing()
                    return
            if self._stopping.is_set():  # flushing: wait for the last acks
                await asyncio.sleep(0.01)
            else:
                try:
                    await asyncio.wait_for(self._stopping.wait(), self.flush_interval_s)
                except asyncio.TimeoutError:
                    pass
            if acks.done():
                acks.result()  # raises the stream's error
                raise ConnectionError("collector closed the report stream")
            self._drain_sessions()

    async def _send(self, call, stream: _Stream, acks, **fields) -> None:
        diagnoses = stream.unsent_diagnoses()
        stream.diagnoses_sent.update((d.variable_id, d) for d in diagnoses)
        batch = pb.ReportBatch(session_id=stream.session_id, sequence=stream.next_sequence,
                               dropped_steps=stream.dropped, diagnoses=diagnoses, **fields)
        stream.next_sequence += 1
        stream.unacked.append(batch)
        await self._write(call, batch, acks)

    async def _write(self, call, batch: pb.ReportBatch, acks) -> None:
        if acks.done():
            acks.result()
            raise ConnectionError("collector closed the report stream")
        await call.write(batch)

    async def _register_new(self, stub: pb_grpc.GradientWatchStub) -> None:
        for stream in self._streams:
            if not stream.session_id:
                response = await stub.Register(stream.session.registration(),
                                               timeout=self.rpc_timeout_s)
                stream.session_id = response.session_id
                stream.diagnoses_sent = {}
                stream.max_batch_steps = response.max_batch_steps or stream.max_batch_steps
                log.info("gradwatch: registered %s with %s as session %s",
                         stream.session.optimizer, self.target, stream.session_id)

    async def _read_acks(self, call) -> None:
        by_id = {}
        async for ack in call:
            stream = by_id.get(ack.session_id)
            if stream is None:
                by_id = {s.session_id: s for s in self._streams}
                stream = by_id.get(ack.session_id)
            while stream and stream.unacked and stream.unacked[0].sequence <= ack.sequence:
                stream.unacked.popleft()

    def _report_error(self, message: str) -> None:
        if message != self._last_error:
            log.warning("gradwatch: %s (training continues; reports are buffered)", message)
            self._last_error = message
        if self._on_error:
            self._on_error(message)

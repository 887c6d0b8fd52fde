"""The ``gradwatch.v1.GradientWatch`` gRPC service: registration and report streams.

Runs on the collector's event loop (grpc.aio), which owns all state: a batch
is validated, applied and observed by the rules before the next message is
read, so an Ack means "applied"; the job's rules are evaluated at once or,
under load, within ``batch_evaluation_interval_s`` (see `RuleEngine`).

Graceful shutdown (`GradientWatchService.drain`): new calls get UNAVAILABLE;
each open Report stream applies and acks the batches already on their way,
then ends with status OK, so its agent reconnects (elsewhere) at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import grpc

from gradwatch.collector.auth import TokenAuthority
from gradwatch.collector.ingest import (
    InvalidReport,
    Limits,
    admit_registration,
    decode_batch,
    decode_diagnoses,
    find_session,
    validate_registration,
)
from gradwatch.collector.rules import RuleEngine
from gradwatch.collector.state import MissingCause, Registry, SessionState, StepBatch
from gradwatch.collector.telemetry import Telemetry
from gradwatch.proto.v1 import gradwatch_pb2 as pb
from gradwatch.proto.v1 import gradwatch_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
SHUTTING_DOWN = "collector is shutting down"


class GradientWatchService(pb_grpc.GradientWatchServicer):
    """Registration and Report streams (event loop only).

    Once draining, an open stream keeps applying batches that arrive less than
    ``drain_gap_s`` apart (those the agent sent before the drain began) for at most
    ``drain_window_s``, then ends with OK.

    With ``tokens``, every registration and every batch needs a bearer token that
    covers its training job (checked per batch, so a revoked token ends its streams).
    """

    def __init__(self, registry: Registry, rules: RuleEngine, telemetry: Telemetry,
                 limits: Limits, drain_gap_s: float = 0.25, drain_window_s: float = 1.0,
                 tokens: TokenAuthority | None = None) -> None:
        self.registry = registry
        self.tokens = tokens
        self.rules = rules
        self.telemetry = telemetry
        self.limits = limits
        self.drain_gap_s = drain_gap_s
        self.drain_window_s = drain_window_s
        self._draining = asyncio.Event()
        self._open_streams = 0
        self._no_open_streams = asyncio.Event()
        self._no_open_streams.set()

    @property
    def open_streams(self) -> int:
        """Report streams open now."""
        return self._open_streams

    def drain(self) -> None:
        """Starts a graceful shutdown: refuses new calls, winds down open streams."""
        self._draining.set()
        log.info("draining %d report streams", self._open_streams)

    async def streams_ended(self, timeout_s: float) -> bool:
        """Waits until no Report stream is open (at most ``timeout_s``); False on timeout."""
        if self._no_open_streams.is_set():
            return True
        try:
            await asyncio.wait_for(self._no_open_streams.wait(), timeout_s)
        except asyncio.TimeoutError:
            return False
        return True

    async def _reject(self, context: grpc.aio.ServicerContext, error: InvalidReport) -> None:
        """Counts and logs ``error``, then ends the call with its status (raises)."""
        self.telemetry.rejected[(error.code.name, error.reason.value)] += 1
        log.info("rejected message from %s: %s %s (%s)", context.peer(), error.code.name,
                 error.message, error.reason.value)
        await context.abort(error.code, error.message)

    async def Register(self, request: pb.RegisterRequest,
                       context: grpc.aio.ServicerContext) -> pb.RegisterResponse:
        if self._draining.is_set():
            await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
        try:
            if self.tokens is not None:
                self.tokens.authorize(self.tokens.caller(context), request.training_job)
            names = validate_registration(request, self.limits)
            admit_registration(request, names, self.registry, self.limits)
        except InvalidReport as error:
            await self._reject(context, error)
        session = self.registry.register(
            request.training_job, request.optimizer, request.task_type, request.task_index,
            request.num_replicas, names, strategy=request.strategy, hostname=request.hostname,
            pid=request.pid, versions=dict(request.versions), loss_scaled=request.loss_scaled,
            sharded=request.sharded, stepped_before=request.stepped,
        )
        self.telemetry.registrations += 1
        log.info("registered %s/%s %s (%s, %d variables, %d replicas) as %s",
                 request.training_job, session.task, request.optimizer,
                 request.strategy or "no strategy", len(names), request.num_replicas,
                 session.id)
        return pb.RegisterResponse(
            session_id=session.id,
            max_batch_steps=self.limits.batch_steps_for(len(names) * request.num_replicas),
            max_cause=max(pb.Diagnosis.Cause.values()),
        )

    async def Report(self, request_iterator: AsyncIterator[pb.ReportBatch],
                     context: grpc.aio.ServicerContext) -> AsyncIterator[pb.Ack]:
        if self._draining.is_set():
            await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
        carried: dict[str, SessionState] = {}  # sessions this stream has reported for
        caller = None if self.tokens is None else self.tokens.caller(context)
        self._open_streams += 1
        self._no_open_streams.clear()
        try:
            async with contextlib.aclosing(self._until_drained(request_iterator)) as batches:
                async for batch in batches:
                    try:
                        session = find_session(batch, self.registry)
                        if self.tokens is not None:
                            self.tokens.authorize(caller, session.group.training_job)
                        if session.id not in carried:
                            carried[session.id] = session
                            session.open_streams += 1
                        if batch.sequence <= session.last_sequence:  # 0: the agent asks
                            if batch.sequence:                         # if it is known here
                                self.telemetry.duplicate_batches += 1
                            yield pb.Ack(session_id=session.id, sequence=session.last_sequence)
                            continue
                        decoded = decode_batch(batch, session.num_replicas, session.num_variables,
                                               self.limits, session.last_step)
                        causes = decode_diagnoses(batch, session.num_variables, self.limits)
                    except InvalidReport as error:
                        await self._reject(context, error)
                        return
                    self._apply(session, batch, decoded, causes)
                    yield pb.Ack(session_id=session.id, sequence=batch.sequence)
        finally:
            for session in carried.values():
                session.open_streams -= 1
            self._open_streams -= 1
            if not self._open_streams:
                self._no_open_streams.set()

    async def _until_drained(self, requests: AsyncIterator[pb.ReportBatch]
                             ) -> AsyncIterator[pb.ReportBatch]:
        """The stream's batches, until the agent closes it or, once draining, until
        none arrived for ``drain_gap_s`` or ``drain_window_s`` has passed."""
        loop = asyncio.get_running_loop()
        iterator = aiter(requests)
        draining = asyncio.ensure_future(self._draining.wait())
        deadline = None
        read: asyncio.Future | None = None
        try:
            while True:
                read = asyncio.ensure_future(anext(iterator))
                if not draining.done():
                    await asyncio.wait((read, draining), return_when=asyncio.FIRST_COMPLETED)
                if not read.done():  # draining: only what is already on its way
                    if deadline is None:
                        deadline = loop.time() + self.drain_window_s
                    timeout = max(0.0, min(self.drain_gap_s, deadline - loop.time()))
                    await asyncio.wait((read,), timeout=timeout)
                    if not read.done():
                        return
                try:
                    batch = read.result()
                except StopAsyncIteration:
                    return
                yield batch
        finally:
            draining.cancel()
            if read is not None:
                read.cancel()

    def _apply(self, session: SessionState, batch: pb.ReportBatch, decoded: StepBatch,
               causes: dict[int, MissingCause]) -> None:
        """Folds a validated batch into state and lets the rules see it."""
        if decoded.rewound_to:
            log.info("%s/%s %s: step counter set back to %s (a checkpoint restored?)",
                     session.group.training_job, session.task, session.group.optimizer,
                     ", then ".join(map(str, decoded.rewound_to)))
        session.apply(batch.sequence, decoded)
        session.set_causes(causes)
        for variable_id, cause in causes.items():
            log.info("%s/%s %s: %s gets no gradient: %s", session.group.training_job,
                     session.task, session.group.optimizer,
                     session.group.names[session.columns[variable_id]], cause.explanation)
        session.closed = batch.final
        session.moved = batch.final and batch.moving
        self.rules.on_batch(session, decoded)
        self.telemetry.batches += 1
        self.telemetry.step_reports += decoded.steps.size
        self.telemetry.variable_statistics += decoded.present.size

"""The ``gradwatch.v1.GradientWatch`` gRPC service: registration and report streams.

Runs on the collector's event loop (grpc.aio), which owns all state: a batch
is validated, applied and observed by the rules before the next message is
read, so an Ack means "applied"; the job's rules are evaluated at once or,
under load, within ``batch_evaluation_interval_s`` (see `RuleEngine`).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc

from gradwatch.collector.ingest import (
    InvalidReport,
    Limits,
    decode_batch,
    decode_diagnoses,
    validate_registration,
)
from gradwatch.collector.rules import RuleEngine
from gradwatch.collector.state import Registry
from gradwatch.collector.telemetry import Telemetry
from gradwatch.proto.v1 import gradwatch_pb2 as pb
from gradwatch.proto.v1 import gradwatch_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


class GradientWatchService(pb_grpc.GradientWatchServicer):
    def __init__(self, registry: Registry, rules: RuleEngine, telemetry: Telemetry,
                 limits: Limits) -> None:
        self.registry = registry
        self.rules = rules
        self.telemetry = telemetry
        self.limits = limits

    async def _reject(self, context: grpc.aio.ServicerContext, error: InvalidReport) -> None:
        self.telemetry.rejected[error.code.name] += 1
        log.info("rejected message from %s: %s %s", context.peer(), error.code.name,
                 error.message)
        await context.abort(error.code, error.message)

    async def Register(self, request: pb.RegisterRequest,
                       context: grpc.aio.ServicerContext) -> pb.RegisterResponse:
        try:
            names = validate_registration(request, self.limits)
            if len(self.registry.sessions) >= self.limits.max_sessions:
                raise InvalidReport(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    f"collector holds {self.limits.max_sessions} sessions "
                                    "(its limit)")
        except InvalidReport as error:
            await self._reject(context, error)
        session = self.registry.register(
            request.training_job, request.optimizer, request.task_type, request.task_index,
            request.num_replicas, names, strategy=request.strategy, hostname=request.hostname,
            versions=dict(request.versions), loss_scaled=request.loss_scaled,
        )
        self.telemetry.registrations += 1
        log.info("registered %s/%s %s (%s, %d variables, %d replicas) as %s",
                 request.training_job, session.task, request.optimizer,
                 request.strategy or "no strategy", len(names), request.num_replicas,
                 session.id)
        return pb.RegisterResponse(
            session_id=session.id,
            max_batch_steps=self.limits.batch_steps_for(len(names) * request.num_replicas),
        )

    async def Report(self, request_iterator: AsyncIterator[pb.ReportBatch],
                     context: grpc.aio.ServicerContext) -> AsyncIterator[pb.Ack]:
        async for batch in request_iterator:
            session = self.registry.sessions.get(batch.session_id)
            try:
                if session is None:
                    raise InvalidReport(grpc.StatusCode.NOT_FOUND,
                                        f"unknown session_id {batch.session_id!r}; register "
                                        "again")
                if batch.sequence <= session.last_sequence:
                    self.telemetry.duplicate_batches += 1
                    yield pb.Ack(session_id=session.id, sequence=session.last_sequence)
                    continue
                decoded = decode_batch(batch, session.num_replicas, session.num_variables,
                                       self.limits)
                causes = decode_diagnoses(batch, session.num_variables, self.limits)
            except InvalidReport as error:
                await self._reject(context, error)
                return
            session.apply(batch.sequence, decoded)
            session.set_causes(causes)
            for variable_id, cause in causes.items():
                log.info("%s/%s %s: %s gets no gradient: %s", session.group.training_job,
                         session.task, session.group.optimizer,
                         session.group.names[session.columns[variable_id]], cause.explanation)
            session.closed = batch.final
            self.rules.on_batch(session, decoded)
            self.telemetry.batches += 1
            self.telemetry.step_reports += decoded.steps.size
            self.telemetry.variable_statistics += decoded.present.size
            yield pb.Ack(session_id=session.id, sequence=batch.sequence)

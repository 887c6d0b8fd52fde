"""Validation and decoding of what agents send; the only place that trusts no input.

Each check that fails raises `InvalidReport` with the gRPC status code, a
message naming the offending field and a `Reason` (the bounded ``reason`` label
of ``gradwatch_collector_rejected_messages_total``); nothing is applied from a
rejected message, so one bad client cannot corrupt another's state.
"""

from __future__ import annotations

import enum
import operator
import re
from dataclasses import dataclass

import grpc
import numpy as np

from gradwatch.collector.settings import number, setting
from gradwatch.collector.state import MissingCause, Registry, SessionState, StepBatch
from gradwatch.proto.layout import BYTES_PER_STATISTIC, STATISTICS, Kind, LayoutError, unpack_steps
from gradwatch.proto.v1 import gradwatch_pb2 as pb

_LABEL_VALUE = re.compile(r"^[^\x00-\x1f]*$")


_COUNT = number(int, 1)


@dataclass(frozen=True)
class Limits:
    """Explicit bounds on what one collector accepts (documented in docs/limits.md); the
    ``limits:`` section of the collector's settings."""

    max_message_bytes: int = setting(16 * 1024 * 1024, "largest gRPC message, in bytes",
                                     _COUNT)
    max_variables: int = setting(100_000, "variables per session", _COUNT)
    max_replicas: int = setting(4_096, "replicas per session", _COUNT)
    max_sessions: int = setting(10_000, "sessions per collector", _COUNT)
    max_jobs: int = setting(1_000, "training jobs per collector", _COUNT)
    max_sessions_per_job: int = setting(4_096, "sessions over all of a job's tasks and "
                                               "optimizers", _COUNT)
    #: Measured: 0.75-0.9 KB per session x variable, 0.13 KB per further replica.
    max_statistics: int = setting(1_000_000, "replicas x variables summed over all sessions "
                                             "(bounds the collector's memory)", _COUNT)
    #: A `Group`'s columns: the union of its tasks' tables, kept until its last session
    #: expires.
    max_variables_per_job: int = setting(200_000, "distinct variable names per training job "
                                                  "x optimizer", _COUNT)
    max_label_length: int = setting(256, "job, task type, optimizer, variable and host "
                                         "names, in characters", _COUNT)
    max_versions: int = setting(32, "entries of RegisterRequest.versions", _COUNT)
    max_batch_steps: int = setting(256, "steps per batch (lowered per session so a batch "
                                        "fits in half a message)", _COUNT)
    max_text_length: int = setting(4_096, "diagnosis file paths, op names and explanations, "
                                          "in characters", _COUNT)

    def batch_steps_for(self, num_statistics: int) -> int:
        """Largest batch (in steps) that fits the message limit with 2x headroom."""
        per_step = num_statistics * BYTES_PER_STATISTIC + 64
        return max(1, min(self.max_batch_steps, self.max_message_bytes // (2 * per_step)))


class Reason(enum.Enum):
    """Why a message was rejected: the ``reason`` label of
    ``gradwatch_collector_rejected_messages_total`` (docs/limits.md lists them)."""

    EMPTY = "empty"  # a required field is empty
    LABEL_LENGTH = "label_length"
    CONTROL_CHARACTERS = "control_characters"
    REPLICAS = "replicas"  # num_replicas out of range
    DUPLICATE_VARIABLE = "duplicate_variable"
    VERSIONS = "versions"  # too many RegisterRequest.versions entries
    VARIABLES_PER_SESSION = "variables_per_session"
    STEP_SIZE = "step_size"  # one step would not fit in half a message
    VARIABLES_PER_JOB = "variables_per_job"
    JOBS = "jobs"
    SESSIONS = "sessions"
    SESSIONS_PER_JOB = "sessions_per_job"
    STATISTICS = "statistics"  # replicas x variables over all sessions
    ALREADY_REPORTING = "already_reporting"  # the task streams from another process
    UNKNOWN_SESSION = "unknown_session"
    BATCH_STEPS = "batch_steps"
    ARRAY_LENGTH = "array_length"
    STEP = "step"  # a negative step number
    STEP_ORDER = "step_order"  # a step lower than the one before it, not marked rewound
    WALL_TIME = "wall_time"
    STATISTIC = "statistic"  # a negative norm or max |g|
    COUNT = "count"  # a NaN/Inf count that is negative, NaN or infinite
    DIAGNOSIS = "diagnosis"  # a variable id outside the table, or an unknown cause
    TEXT_LENGTH = "text_length"
    UNAUTHENTICATED = "unauthenticated"  # no, an unknown or a revoked token
    NOT_PERMITTED = "not_permitted"  # the token does not cover the training job


class InvalidReport(Exception):
    """A message the collector refuses: gRPC ``code``, precise ``message``, and ``reason``."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: Reason) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason


def _invalid(message: str, reason: Reason) -> InvalidReport:
    return InvalidReport(grpc.StatusCode.INVALID_ARGUMENT, message, reason)


def _exhausted(message: str, reason: Reason) -> InvalidReport:
    return InvalidReport(grpc.StatusCode.RESOURCE_EXHAUSTED, message, reason)


def _check_label(field: str, value: str, limits: Limits, required: bool = True) -> None:
    if required and not value:
        raise _invalid(f"{field} must not be empty", Reason.EMPTY)
    if len(value) > limits.max_label_length:
        raise _invalid(f"{field} is {len(value)} characters; the limit is "
                       f"{limits.max_label_length}", Reason.LABEL_LENGTH)
    if not _LABEL_VALUE.match(value):
        raise _invalid(f"{field} contains control characters", Reason.CONTROL_CHARACTERS)


def validate_registration(request: pb.RegisterRequest, limits: Limits) -> list[str]:
    """Checks a RegisterRequest on its own; returns its variable names."""
    _check_label("training_job", request.training_job, limits)
    _check_label("task_type", request.task_type, limits)
    _check_label("optimizer", request.optimizer, limits)
    _check_label("strategy", request.strategy, limits, required=False)
    _check_label("hostname", request.hostname, limits, required=False)
    if len(request.versions) > limits.max_versions:
        raise _invalid(f"versions has {len(request.versions)} entries; the limit is "
                       f"{limits.max_versions}", Reason.VERSIONS)
    for key, value in sorted(request.versions.items()):
        _check_label("versions key", key, limits)
        _check_label(f"versions[{key!r}]", value, limits, required=False)
    if not 1 <= request.num_replicas <= limits.max_replicas:
        raise _invalid(f"num_replicas must be in [1, {limits.max_replicas}], "
                       f"got {request.num_replicas}", Reason.REPLICAS)
    if not request.variables:
        raise _invalid("variables must not be empty", Reason.EMPTY)
    if len(request.variables) > limits.max_variables:
        raise _exhausted(f"{len(request.variables)} variables; the limit per session is "
                         f"{limits.max_variables}", Reason.VARIABLES_PER_SESSION)
    per_step = len(request.variables) * request.num_replicas * BYTES_PER_STATISTIC
    if 2 * per_step > limits.max_message_bytes:
        raise _exhausted(f"one step of {len(request.variables)} variables x "
                         f"{request.num_replicas} replicas is {per_step} bytes; the message "
                         f"limit is {limits.max_message_bytes} (half of it per step)",
                         Reason.STEP_SIZE)
    names = [v.name for v in request.variables]
    for i, name in enumerate(names):
        _check_label(f"variables[{i}].name", name, limits)
    if len(set(names)) != len(names):
        raise _invalid("variables[].name must be unique", Reason.DUPLICATE_VARIABLE)
    return names


def admit_registration(request: pb.RegisterRequest, names: list[str], registry: Registry,
                       limits: Limits) -> None:
    """Checks that registering a validated ``request`` keeps the collector within its
    limits and that its task is not streaming from another process. Changes nothing, so
    a refused registration leaves no trace (event loop only, like `Registry`)."""
    job, optimizer = request.training_job, request.optimizer
    previous = registry.find_task(job, optimizer, request.task_type, request.task_index)
    if (previous is not None and previous.open_streams
            and (previous.hostname, previous.pid) != (request.hostname, request.pid)):
        raise InvalidReport(
            grpc.StatusCode.ALREADY_EXISTS,
            f"task {previous.task} of job {job!r} (optimizer {optimizer!r}) is already "
            f"reporting from {previous.hostname}:{previous.pid}", Reason.ALREADY_REPORTING)
    jobs = registry.jobs()
    if job not in jobs and len(jobs) >= limits.max_jobs:
        raise _exhausted(f"collector serves {len(jobs)} training jobs, its limit "
                         f"(max_jobs); job {job!r} would be one more", Reason.JOBS)
    if previous is None:  # a task registering again replaces its session
        if len(registry.sessions) >= limits.max_sessions:
            raise _exhausted(f"collector holds {len(registry.sessions)} sessions, its limit "
                             "(max_sessions)", Reason.SESSIONS)
        in_job = registry.sessions_in_job(job)
        if in_job >= limits.max_sessions_per_job:
            raise _exhausted(f"job {job!r} has {in_job} sessions, the limit per job "
                             "(max_sessions_per_job)", Reason.SESSIONS_PER_JOB)
    statistics = registry.statistics + request.num_replicas * len(names)
    if previous is not None:  # it replaces the previous session
        statistics -= previous.num_replicas * previous.num_variables
    if statistics > limits.max_statistics:
        raise _exhausted(f"this session's {request.num_replicas} replicas x {len(names)} "
                         f"variables would bring the collector to {statistics} statistics per "
                         f"step over its sessions; the limit is {limits.max_statistics} "
                         "(max_statistics)", Reason.STATISTICS)
    group = registry.groups.get((job, optimizer))
    known = group.column_of if group is not None else {}
    columns = len(known) + sum(name not in known for name in names)
    if columns > limits.max_variables_per_job:
        raise _exhausted(f"job {job!r} (optimizer {optimizer!r}) would have {columns} distinct "
                         f"variables over its tasks; the limit is {limits.max_variables_per_job} "
                         "(max_variables_per_job)", Reason.VARIABLES_PER_JOB)


def find_session(batch: pb.ReportBatch, registry: Registry) -> SessionState:
    """The batch's session, or NOT_FOUND (the agent registers again)."""
    session = registry.sessions.get(batch.session_id)
    if session is None:
        shown = batch.session_id[:64] + ("..." if len(batch.session_id) > 64 else "")
        raise InvalidReport(grpc.StatusCode.NOT_FOUND,
                            f"unknown session_id {shown!r}; register again",
                            Reason.UNKNOWN_SESSION)
    return session


_step_fields = operator.attrgetter("step", "wall_time", "rewound")


def decode_batch(batch: pb.ReportBatch, num_replicas: int, num_variables: int,
                 limits: Limits, last_step: int = -1) -> StepBatch:
    """Checks a ReportBatch against its session's table and its ``last_step`` (-1: none
    yet), and decodes the packed arrays.

    Each statistic is checked by its `gradwatch.proto.layout.Kind`: magnitudes (norms)
    may be NaN or +Inf (that is what a non-finite gradient gives), never negative;
    counts must be finite and non-negative. The global norm of each step and replica is
    computed here, once. Steps are
    non-negative and never lower than the step before them (in the batch, or the
    session's last), unless marked ``rewound``: the agent reports the optimizer's
    counter, which a checkpoint restored into it sets back on purpose."""
    num_steps = len(batch.steps)
    if num_steps > limits.max_batch_steps:
        raise _invalid(f"batch has {num_steps} steps; the limit is {limits.max_batch_steps}",
                       Reason.BATCH_STEPS)
    try:
        arrays = unpack_steps(batch.steps, num_replicas, num_variables)
    except LayoutError as error:
        raise _invalid(str(error), Reason.ARRAY_LENGTH) from None
    for statistic in STATISTICS:
        values = arrays[statistic.name]
        if statistic.kind is Kind.MAGNITUDE:  # NaN and +Inf are what a bad gradient gives
            wrong, problem, reason = values < 0, "has a negative value", Reason.STATISTIC
        elif statistic.kind is Kind.COUNT:  # (NaN fails both comparisons)
            wrong = ~((values >= 0) & (values < np.inf))
            problem, reason = "must hold finite, non-negative counts", Reason.COUNT
        else:
            continue
        if wrong.any():
            i = np.flatnonzero(wrong.any(axis=(1, 2)))[0]
            raise _invalid(f"steps[{i}].{statistic.name} {problem}", reason)
    fields = list(zip(*map(_step_fields, batch.steps), strict=True)) or [(), (), ()]
    steps = np.array(fields[0], np.int64)
    wall_time = np.array(fields[1], np.float64)
    rewound = np.array(fields[2], bool)
    bad = np.flatnonzero(~np.isfinite(wall_time) | (wall_time < 0))
    if bad.size:
        raise _invalid(f"steps[{bad[0]}].wall_time is {wall_time[bad[0]]}; expected seconds "
                       "since the epoch", Reason.WALL_TIME)
    bad = np.flatnonzero(steps < 0)
    if bad.size:
        raise _invalid(f"steps[{bad[0]}].step is {steps[bad[0]]}; steps are non-negative",
                       Reason.STEP)
    before = np.concatenate(([last_step], steps[:-1]))
    bad = np.flatnonzero((steps < before) & ~rewound)
    if bad.size:
        i = bad[0]
        raise _invalid(f"steps[{i}].step is {steps[i]}, lower than the step before it "
                       f"({before[i]}); mark it rewound if the counter was set back on purpose",
                       Reason.STEP_ORDER)
    columns = {s.name: arrays[s.name] != 0 if s.kind is Kind.FLAG
               else arrays[s.name].astype(np.float32) for s in STATISTICS}
    norms = np.where(columns["present"], columns["l2_norm"], 0.0).astype(np.float64)
    return StepBatch(
        steps=steps,
        wall_time=wall_time,
        global_norm=np.sqrt(np.square(norms).sum(axis=2)),
        dropped_steps=batch.dropped_steps,
        rewound_to=tuple(steps[rewound].tolist()),
        **columns,
    )


def decode_diagnoses(batch: pb.ReportBatch, num_variables: int,
                     limits: Limits) -> dict[int, MissingCause]:
    """Checks a batch's diagnoses; returns them by session variable id."""
    causes = {}
    for i, diagnosis in enumerate(batch.diagnoses):
        if diagnosis.variable_id >= num_variables:
            raise _invalid(f"diagnoses[{i}].variable_id is {diagnosis.variable_id}; the session "
                           f"has {num_variables} variables", Reason.DIAGNOSIS)
        if diagnosis.cause not in pb.Diagnosis.Cause.values() or not diagnosis.cause:
            raise _invalid(f"diagnoses[{i}].cause {diagnosis.cause} is not a known cause",
                           Reason.DIAGNOSIS)
        for name in ("op_name", "op_type", "source_file", "reason", "hint", "message"):
            value = getattr(diagnosis, name)
            if len(value) > limits.max_text_length:
                raise _invalid(f"diagnoses[{i}].{name} is {len(value)} characters; the limit is "
                               f"{limits.max_text_length}", Reason.TEXT_LENGTH)
            if not _LABEL_VALUE.match(value):
                raise _invalid(f"diagnoses[{i}].{name} contains control characters",
                               Reason.CONTROL_CHARACTERS)
        source = (f"{diagnosis.source_file}:{diagnosis.source_line}"
                  if diagnosis.source_file else "")
        causes[diagnosis.variable_id] = MissingCause(
            cause=pb.Diagnosis.Cause.Name(diagnosis.cause).lower(),
            op_name=diagnosis.op_name, op_type=diagnosis.op_type, source=source,
            explanation=diagnosis.message)
    return causes

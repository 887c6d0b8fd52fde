"""Validation and decoding of what agents send; the only place that trusts no input.

Each check that fails raises `InvalidReport` with the gRPC status code and a
message naming the offending field; nothing is applied from a rejected
message, so one bad client cannot corrupt another's state.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import grpc
import numpy as np

from gradwatch.collector.state import MissingCause, StepBatch
from gradwatch.proto.v1 import gradwatch_pb2 as pb

_LABEL_VALUE = re.compile(r"^[^\x00-\x1f]*$")
# Packed arrays: (field, dtype). Everything is little-endian on the wire.
_ARRAYS = (("present", np.uint8), ("l2_norm", "<f4"), ("max_abs", "<f4"),
           ("nan_count", "<f4"), ("inf_count", "<f4"))
BYTES_PER_STATISTIC = sum(np.dtype(t).itemsize for _, t in _ARRAYS)


@dataclass(frozen=True)
class Limits:
    """Explicit bounds on what one collector accepts (documented in docs/limits.md)."""

    max_message_bytes: int = 16 * 1024 * 1024
    max_variables: int = 100_000       # per session
    max_replicas: int = 4_096          # per session
    max_sessions: int = 10_000         # per collector
    max_label_length: int = 256        # job, task type, optimizer, variable names
    max_batch_steps: int = 256
    max_text_length: int = 4_096       # diagnosis file paths, op names and explanations

    def batch_steps_for(self, num_statistics: int) -> int:
        """Largest batch (in steps) that fits the message limit with 2x headroom."""
        per_step = num_statistics * BYTES_PER_STATISTIC + 64
        return max(1, min(self.max_batch_steps, self.max_message_bytes // (2 * per_step)))


class InvalidReport(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _invalid(message: str) -> InvalidReport:
    return InvalidReport(grpc.StatusCode.INVALID_ARGUMENT, message)


def _check_label(field: str, value: str, limits: Limits, required: bool = True) -> None:
    if required and not value:
        raise _invalid(f"{field} must not be empty")
    if len(value) > limits.max_label_length:
        raise _invalid(f"{field} is {len(value)} characters; the limit is "
                       f"{limits.max_label_length}")
    if not _LABEL_VALUE.match(value):
        raise _invalid(f"{field} contains control characters")


def validate_registration(request: pb.RegisterRequest, limits: Limits) -> list[str]:
    """Checks a RegisterRequest; returns its variable names."""
    _check_label("training_job", request.training_job, limits)
    _check_label("task_type", request.task_type, limits)
    _check_label("optimizer", request.optimizer, limits)
    if not 1 <= request.num_replicas <= limits.max_replicas:
        raise _invalid(f"num_replicas must be in [1, {limits.max_replicas}], "
                       f"got {request.num_replicas}")
    if not request.variables:
        raise _invalid("variables must not be empty")
    if len(request.variables) > limits.max_variables:
        raise InvalidReport(grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"{len(request.variables)} variables; the limit per session is "
                            f"{limits.max_variables}")
    per_step = len(request.variables) * request.num_replicas * BYTES_PER_STATISTIC
    if 2 * per_step > limits.max_message_bytes:
        raise InvalidReport(grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"one step of {len(request.variables)} variables x "
                            f"{request.num_replicas} replicas is {per_step} bytes; the message "
                            f"limit is {limits.max_message_bytes} (half of it per step)")
    names = [v.name for v in request.variables]
    for i, name in enumerate(names):
        _check_label(f"variables[{i}].name", name, limits)
    if len(set(names)) != len(names):
        raise _invalid("variables[].name must be unique")
    return names


def decode_batch(batch: pb.ReportBatch, num_replicas: int, num_variables: int,
                 limits: Limits) -> StepBatch:
    """Checks a ReportBatch against its session's table and decodes the packed arrays."""
    num_steps = len(batch.steps)
    if num_steps > limits.max_batch_steps:
        raise _invalid(f"batch has {num_steps} steps; the limit is {limits.max_batch_steps}")
    width = num_replicas * num_variables
    arrays = {}
    for name, dtype in _ARRAYS:
        chunks = [getattr(step, name) for step in batch.steps]
        expected = width * np.dtype(dtype).itemsize
        for i, chunk in enumerate(chunks):
            if len(chunk) != expected:
                raise _invalid(f"steps[{i}].{name} has {len(chunk)} bytes; expected {expected} "
                               f"({num_replicas} replicas x {num_variables} variables)")
        flat = np.frombuffer(b"".join(chunks), dtype=dtype)
        arrays[name] = flat.reshape(num_steps, num_replicas, num_variables)
    for name in ("nan_count", "inf_count"):
        if (arrays[name] < 0).any() or np.isnan(arrays[name]).any():
            raise _invalid(f"steps[].{name} must be non-negative counts")
    steps = np.fromiter((s.step for s in batch.steps), np.int64, num_steps)
    if (steps < 0).any() or (np.diff(steps) < 0).any():
        raise _invalid("steps[].step must be non-negative and non-decreasing")
    return StepBatch(
        steps=steps,
        wall_time=np.fromiter((s.wall_time for s in batch.steps), np.float64, num_steps),
        present=arrays["present"] != 0,
        l2_norm=arrays["l2_norm"].astype(np.float32),
        max_abs=arrays["max_abs"].astype(np.float32),
        nan_count=arrays["nan_count"].astype(np.float32),
        inf_count=arrays["inf_count"].astype(np.float32),
        dropped_steps=batch.dropped_steps,
    )


def decode_diagnoses(batch: pb.ReportBatch, num_variables: int,
                     limits: Limits) -> dict[int, MissingCause]:
    """Checks a batch's diagnoses; returns them by session variable id."""
    causes = {}
    for i, diagnosis in enumerate(batch.diagnoses):
        if diagnosis.variable_id >= num_variables:
            raise _invalid(f"diagnoses[{i}].variable_id is {diagnosis.variable_id}; the session "
                           f"has {num_variables} variables")
        if diagnosis.cause not in pb.Diagnosis.Cause.values() or not diagnosis.cause:
            raise _invalid(f"diagnoses[{i}].cause {diagnosis.cause} is not a known cause")
        for name in ("op_name", "op_type", "source_file", "reason", "hint", "message"):
            value = getattr(diagnosis, name)
            if len(value) > limits.max_text_length:
                raise _invalid(f"diagnoses[{i}].{name} is {len(value)} characters; the limit is "
                               f"{limits.max_text_length}")
            if not _LABEL_VALUE.match(value):
                raise _invalid(f"diagnoses[{i}].{name} contains control characters")
        source = (f"{diagnosis.source_file}:{diagnosis.source_line}"
                  if diagnosis.source_file else "")
        causes[diagnosis.variable_id] = MissingCause(
            cause=pb.Diagnosis.Cause.Name(diagnosis.cause).lower(),
            op_name=diagnosis.op_name, op_type=diagnosis.op_type, source=source,
            explanation=diagnosis.message)
    return causes

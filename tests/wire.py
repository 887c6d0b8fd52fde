"""Hand-built wire messages for protocol tests (a minimal agent without TensorFlow)."""

from __future__ import annotations

import numpy as np

from gradwatch.proto.v1 import gradwatch_pb2 as pb


def registration(job: str = "job", num_variables: int = 3, num_replicas: int = 1,
                 task_index: int = 0, optimizer: str = "sgd") -> pb.RegisterRequest:
    return pb.RegisterRequest(
        training_job=job, task_type="worker", task_index=task_index,
        num_replicas=num_replicas, optimizer=optimizer, strategy="test",
        variables=[pb.Variable(name=f"dense/v{i}", shape=[2], dtype="float32")
                   for i in range(num_variables)])


def step(step: int, present, norm=None, nan=None, inf=None, max_abs=None) -> pb.StepReport:
    present = np.asarray(present, bool).reshape(-1)
    n = present.size
    zeros = np.zeros(n)

    def f32(values) -> bytes:
        return np.asarray(zeros if values is None else values, "<f4").reshape(-1).tobytes()

    return pb.StepReport(step=step, wall_time=0.0, present=present.astype(np.uint8).tobytes(),
                         l2_norm=f32(norm), max_abs=f32(max_abs), nan_count=f32(nan),
                         inf_count=f32(inf))


def batch(session_id: str, sequence: int, *steps: pb.StepReport) -> pb.ReportBatch:
    return pb.ReportBatch(session_id=session_id, sequence=sequence, steps=list(steps))


def diagnosis(variable_id: int, cause: str = "BROKEN_AT_OP", **fields) -> pb.Diagnosis:
    defaults = {"op_name": "model/Floor", "op_type": "Floor", "source_file": "/app/train.py",
                "source_line": 42, "reason": "has a gradient defined as None",
                "hint": "use a straight-through estimator",
                "message": "The path to the loss crosses Floor op 'model/Floor' at "
                           "/app/train.py:42. Fix: use a straight-through estimator."}
    return pb.Diagnosis(variable_id=variable_id, cause=pb.Diagnosis.Cause.Value(cause),
                        **{**defaults, **fields})

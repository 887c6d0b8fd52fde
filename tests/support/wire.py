"""Wire messages for protocol tests (a minimal agent without TensorFlow): hand-built ones,
and hypothesis strategies generating valid, edge and malformed ones."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from gradwatch.proto.layout import COLUMN, NUM_COLUMNS, STATISTICS, pack_step
from gradwatch.proto.v1 import gradwatch_pb2 as pb


def registration(job: str = "job", num_variables: int = 3, num_replicas: int = 1,
                 task_index: int = 0, optimizer: str = "sgd") -> pb.RegisterRequest:
    return pb.RegisterRequest(
        training_job=job, task_type="worker", task_index=task_index,
        num_replicas=num_replicas, optimizer=optimizer, strategy="test",
        variables=[pb.Variable(name=f"dense/v{i}", shape=[2], dtype="float32")
                   for i in range(num_variables)])


def step(step: int, present, norm=None, nan=None, inf=None) -> pb.StepReport:
    """A StepReport from flat ``[replicas x variables]`` values (missing ones are 0)."""
    present = np.asarray(present, np.float32).reshape(-1)
    stats = np.zeros((1, present.size, NUM_COLUMNS), np.float32)
    for name, values in (("present", present), ("l2_norm", norm), ("nan_count", nan),
                         ("inf_count", inf)):
        if values is not None:
            stats[0, :, COLUMN[name]] = np.asarray(values, np.float32).reshape(-1)
    return pack_step(step, stats, 0.0)


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


# -- generated messages ---------------------------------------------------------------------
# Sized for a session of VARIABLES x REPLICAS; right-sized most of the time, so that batches
# get past validation and exercise state and rules, with odd values and wrong sizes the rest.
# Steps and diagnoses are mostly picked from pools built once from special values (one draw
# each, so 10,000 examples take seconds), the rest built field by field from arbitrary values.

VARIABLES, REPLICAS = 3, 2
WIDTH = VARIABLES * REPLICAS
VARIABLE_NAMES = [f"dense/v{i}" for i in range(VARIABLES)]
_SPECIAL = np.array([0.0, -0.0, 1e-45, 1e-12, 1.0, 2.0**24, 3.4e38, np.nan, np.inf, -np.inf,
                     -1.0, -3.4e38])  # the non-negative ones, NaN and +Inf first
TEXTS = ["", "model/Floor", "Floor", "/app/train.py", "casts float32 to int32", "é✓ 漢字",
         "x" * 64, "x" * 65, "y" * 5000, "a\x00b", "line\nbreak", "tab\tin", "\x7f"]


def _f32_array(rng: np.random.Generator) -> bytes:
    """WIDTH float32 values: ordinary norms or counts, special values, or a wrong size."""
    kind = rng.integers(0, 10)
    if kind < 4:
        values = rng.uniform(0, 10, WIDTH)
    elif kind < 7:
        values = rng.integers(0, 5, WIDTH)
    elif kind < 8:
        values = rng.choice(_SPECIAL[:10], WIDTH)
    elif kind < 9:
        values = rng.choice(_SPECIAL, WIDTH)
    else:
        values = rng.uniform(0, 1, rng.integers(0, 2 * WIDTH))
    return np.asarray(values, "<f4").tobytes()


def _step_pool(size: int = 2048) -> list[pb.StepReport]:
    rng = np.random.default_rng(0)
    pool = []
    for i in range(size):
        present = rng.integers(0, 3, WIDTH if rng.random() < 0.9 else rng.integers(0, 9))
        pool.append(pb.StepReport(
            step=int(rng.choice([i, i // 2, 0, -1, 2**48, 2**62])),
            wall_time=float(rng.choice([1.7e9 + i, 0.0, -1.0, np.nan, np.inf]
                                       if rng.random() < 0.1 else [1.7e9 + i])),
            present=present.astype(np.uint8).tobytes(),
            **{s.name: _f32_array(rng) for s in STATISTICS if s.name != "present"}))
    return pool


def _diagnosis_pool(size: int = 256) -> list[pb.Diagnosis]:
    rng = np.random.default_rng(1)
    causes = [*pb.Diagnosis.Cause.values(), 99]

    def text() -> str:
        return TEXTS[rng.integers(0, 6)] if rng.random() < 0.9 else TEXTS[rng.integers(0, 13)]

    return [pb.Diagnosis(variable_id=int(rng.integers(0, VARIABLES + 2)),
                         cause=int(rng.choice(causes)), op_name=text(), op_type=text(),
                         source_file=text(), source_line=int(rng.integers(0, 2**31)),
                         reason=text(), hint=text(), message=text())
            for _ in range(size)]


_texts = st.one_of(st.sampled_from(TEXTS), st.text(max_size=10))
_f32_arrays = st.one_of(st.binary(min_size=4 * WIDTH, max_size=4 * WIDTH),
                        st.binary(max_size=4 * WIDTH + 8))
_pooled_steps = st.sampled_from(_step_pool())
steps = st.one_of(*[_pooled_steps] * 7, st.builds(
    pb.StepReport,
    step=st.integers(-2, 2**62), wall_time=st.floats(allow_nan=True),
    present=st.binary(max_size=WIDTH + 3),
    **{s.name: _f32_arrays for s in STATISTICS if s.name != "present"},
))
_pooled_diagnoses = st.sampled_from(_diagnosis_pool())
diagnoses = st.one_of(*[_pooled_diagnoses] * 3, st.builds(
    pb.Diagnosis,
    variable_id=st.integers(0, 2 * VARIABLES), cause=st.integers(0, 8), op_name=_texts,
    op_type=_texts, source_file=_texts, source_line=st.integers(0, 2**31), reason=_texts,
    hint=_texts, message=_texts,
))
batches = st.builds(
    pb.ReportBatch,
    sequence=st.integers(0, 2**40), steps=st.lists(steps, max_size=10),
    dropped_steps=st.integers(0, 2**63), final=st.booleans(),
    diagnoses=st.one_of(st.just([]), st.lists(diagnoses, max_size=4)),
)

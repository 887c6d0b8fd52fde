"""Property-based: 10,000 generated report batches, malformed and edge cases alike, go
through the collector's whole ingest path (validation, decoding, state, rules). Each is
either applied or rejected with INVALID_ARGUMENT; nothing else ever escapes, and state
stays bounded by the session's variable table."""

from __future__ import annotations

import grpc
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradwatch.collector.alerts import AlertTracker
from gradwatch.collector.ingest import InvalidReport, Limits, decode_batch, decode_diagnoses
from gradwatch.collector.rules import RuleEngine, RuleSettings
from gradwatch.collector.state import Registry
from gradwatch.proto.v1 import gradwatch_pb2 as pb

VARIABLES, REPLICAS = 3, 2
WIDTH = VARIABLES * REPLICAS
LIMITS = Limits(max_batch_steps=8, max_text_length=64)

# Right-sized arrays most of the time (so batches get past validation and exercise state and
# rules), wrong sizes and odd values the rest.
floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
f32_arrays = st.one_of(
    st.lists(floats, min_size=WIDTH, max_size=WIDTH).map(
        lambda v: np.asarray(v, "<f4").tobytes()),
    st.binary(max_size=4 * WIDTH + 8),
)
present = st.one_of(st.binary(min_size=WIDTH, max_size=WIDTH), st.binary(max_size=WIDTH + 3))
steps = st.builds(
    pb.StepReport,
    step=st.integers(-2, 2**62), wall_time=st.floats(allow_nan=True),
    present=present, l2_norm=f32_arrays, max_abs=f32_arrays, nan_count=f32_arrays,
    inf_count=f32_arrays,
)
text = st.text(max_size=80)
diagnoses = st.builds(
    pb.Diagnosis,
    variable_id=st.integers(0, 2 * VARIABLES), cause=st.integers(0, 8), op_name=text,
    op_type=text, source_file=text, source_line=st.integers(0, 2**31), reason=text,
    hint=text, message=text,
)
batches = st.builds(
    pb.ReportBatch,
    sequence=st.integers(0, 2**40), steps=st.lists(steps, max_size=10),
    dropped_steps=st.integers(0, 2**63), final=st.booleans(),
    diagnoses=st.lists(diagnoses, max_size=4),
)


class Collector:
    """The service's per-batch path (service.py) without the transport."""

    def __init__(self) -> None:
        self.registry = Registry()
        self.tracker = AlertTracker(lambda notification: None, 0.0)
        self.rules = RuleEngine(RuleSettings(), self.tracker)
        self.session = self.registry.register("job", "adam", "worker", 0, REPLICAS,
                                              [f"v{i}" for i in range(VARIABLES)])

    def ingest(self, batch: pb.ReportBatch) -> bool:
        decoded = decode_batch(batch, REPLICAS, VARIABLES, LIMITS)
        causes = decode_diagnoses(batch, VARIABLES, LIMITS)
        self.session.apply(self.session.last_sequence + 1, decoded)
        self.session.set_causes(causes)
        self.rules.on_batch(self.session, decoded)
        return True


COLLECTOR = Collector()
OUTCOMES = {"applied": 0, "rejected": 0}


@settings(max_examples=10_000, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(batches)
def test_any_batch_is_applied_or_rejected_precisely(batch):
    try:
        COLLECTOR.ingest(batch)
        OUTCOMES["applied"] += 1
    except InvalidReport as error:
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert error.message
        OUTCOMES["rejected"] += 1
    session = COLLECTOR.session
    assert session.present.shape == (REPLICAS, VARIABLES)
    assert len(session.group.names) == VARIABLES
    assert set(session.group.causes) <= set(range(VARIABLES))
    history = session.rule_state.get("GradientExploding", {}).get("variables")
    assert history is None or history.shape[0] <= 100


def test_both_outcomes_were_exercised():
    """Runs after the property (file order): the generator reached both branches."""
    assert OUTCOMES["applied"] > 100 and OUTCOMES["rejected"] > 100, OUTCOMES

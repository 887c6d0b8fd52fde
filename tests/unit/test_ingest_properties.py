"""Property-based: 5,000 generated report batches, malformed and edge cases alike, go
through the collector's whole ingest path (validation, decoding, state, rules) in-process.
Each is either applied or rejected with INVALID_ARGUMENT; nothing else ever escapes, and
state stays bounded by the session's variable table. (Over real gRPC, with registrations
and a healthy client alongside: tests/integration/test_bad_input.py.)"""

from __future__ import annotations

import grpc
from hypothesis import HealthCheck, given, settings

from gradwatch.collector.alerts import AlertTracker
from gradwatch.collector.ingest import InvalidReport, Limits, decode_batch, decode_diagnoses
from gradwatch.collector.rules import RuleEngine, RuleSettings
from gradwatch.collector.state import Registry
from gradwatch.proto.v1 import gradwatch_pb2 as pb
from tests.support.wire import REPLICAS, VARIABLES, batches

LIMITS = Limits(max_batch_steps=8, max_text_length=64)


class Collector:
    """The service's per-batch path (service.py) without the transport."""

    def __init__(self) -> None:
        self.registry = Registry()
        self.tracker = AlertTracker(lambda notification: None, 0.0)
        self.rules = RuleEngine(RuleSettings(), self.tracker)
        self.session = self.registry.register("job", "adam", "worker", 0, REPLICAS,
                                              [f"v{i}" for i in range(VARIABLES)])

    def ingest(self, batch: pb.ReportBatch) -> bool:
        decoded = decode_batch(batch, REPLICAS, VARIABLES, LIMITS, self.session.last_step)
        causes = decode_diagnoses(batch, VARIABLES, LIMITS)
        self.session.apply(self.session.last_sequence + 1, decoded)
        self.session.set_causes(causes)
        self.rules.on_batch(self.session, decoded)
        return True


COLLECTOR = Collector()
OUTCOMES = {"applied": 0, "rejected": 0}


@settings(deadline=None, database=None,
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
    history = COLLECTOR.rules.state("GradientExploding", session)
    assert history is None or history.variable_norms.shape[0] <= 100


def test_both_outcomes_were_exercised():
    """Runs after the property (file order): the generator reached both branches, each in at
    least 5 % of the examples (about 10 % are applied)."""
    total = sum(OUTCOMES.values())
    assert total and min(OUTCOMES.values()) > 0.05 * total, OUTCOMES

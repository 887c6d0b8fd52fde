"""Diagnoses on the wire: a newer agent's cause reaches an older collector as ``unknown``,
with its explanation intact, instead of getting the whole batch refused (its steps
dropped); a collector that registered a session again gets them with the first batch it
is sent."""

from __future__ import annotations

from gradwatch.agent.core.buffer import SessionBuffer
from gradwatch.agent.core.diagnosis import Cause, Diagnosis
from gradwatch.agent.core.identity import Identity
from gradwatch.agent.core.session import RecordedSteps, Session, Variable
from gradwatch.collector.ingest import Limits, decode_diagnoses
from gradwatch.proto.v1 import gradwatch_pb2 as pb


class NoSteps:
    num_replicas = 1

    def read_new(self) -> RecordedSteps:
        return RecordedSteps.none(1, 1)


def buffer_registered_with(response: pb.RegisterResponse) -> SessionBuffer:
    identity = Identity("job", "worker", 0, "host", 1)
    session = Session(identity, "SGD", [Variable("w", (2,), "float32", key=7)], NoSteps())
    session.add_diagnosis(7, "w", Diagnosis(
        "w", Cause.CLEARED, "backward", "backward", None,
        "zero_grad() between backward() and step()", "zero_grad() before backward()",
        framework="PyTorch"))
    buffer = SessionBuffer(session)
    buffer.registered("collector:8470", response)
    return buffer


def test_a_cause_the_collector_does_not_know_is_sent_as_unknown_with_its_message():
    older = buffer_registered_with(pb.RegisterResponse(session_id="s"))  # no max_cause
    batch = older.next_batch()
    (sent,) = batch.diagnoses
    assert sent.cause == pb.Diagnosis.UNKNOWN
    assert "cleared before the optimizer step" in sent.message
    # What a collector that knows causes up to NOT_TRACKED accepts:
    assert pb.Diagnosis.UNKNOWN <= pb.Diagnosis.NOT_TRACKED
    causes = decode_diagnoses(batch, 1, Limits())
    assert causes[0].cause == "unknown" and "zero_grad()" in causes[0].explanation
    assert older.session.diagnoses()[0].cause == pb.Diagnosis.CLEARED  # kept as it is


def test_a_collector_that_knows_the_cause_gets_it():
    newer = buffer_registered_with(pb.RegisterResponse(
        session_id="s", max_cause=max(pb.Diagnosis.Cause.values())))
    (sent,) = newer.next_batch().diagnoses
    assert sent.cause == pb.Diagnosis.CLEARED


def test_a_collector_that_registered_the_session_again_gets_the_diagnoses_first():
    """The collector restarted while batches were unacknowledged: the first batch
    replayed to it carries the diagnoses, so the alert its steps raise says why at once
    (sent after them, the cause would reach the alert one update interval later)."""
    buffer = buffer_registered_with(pb.RegisterResponse(session_id="s"))
    buffer.next_batch()
    buffer.acknowledge(1)  # the diagnosis went out, and was applied
    unacked = buffer.next_batch()
    assert list(unacked.diagnoses) == []
    buffer.forget("collector:8470")  # the collector restarted: registered again
    buffer.connect("collector:8470")
    buffer.registered("collector:8470", pb.RegisterResponse(session_id="t"))
    buffer.attach_diagnoses(unacked)  # as the stream does for each replayed batch
    assert [d.variable_id for d in unacked.diagnoses] == [0]
    buffer.attach_diagnoses(unacked)  # replayed again: not twice
    assert len(unacked.diagnoses) == 1
    assert list(buffer.next_batch().diagnoses) == []

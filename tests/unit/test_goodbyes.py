"""A session's goodbye (``ReportBatch.final``) on the connection it was meant for only."""

from __future__ import annotations

from gradwatch.agent.core.buffer import SessionBuffer
from gradwatch.agent.core.identity import Identity
from gradwatch.agent.core.session import RecordedSteps, Session, Variable
from gradwatch.proto.v1 import gradwatch_pb2 as pb


class NoSteps:
    num_replicas = 1

    def read_new(self) -> RecordedSteps:
        return RecordedSteps.none(1, 1)


def registered_buffer() -> SessionBuffer:
    session = Session(Identity("job", "worker", 0, "host", 1), "SGD",
                      [Variable("w", (2,), "float32", key=7)], NoSteps())
    buffer = SessionBuffer(session)
    buffer.registered("fallback:8470", pb.RegisterResponse(session_id="s"))
    return buffer


def test_a_moving_goodbye_left_unacked_is_not_replayed_to_the_next_collector():
    """The fallback's connection broke after the goodbye of a move was written: replayed
    to the preferred collector, it said that the live session there moved away, which
    forgot it at once (its alert state lost, the next batch refused as unknown)."""
    buffer = registered_buffer()
    buffer.next_batch()
    buffer.next_batch(final=True, moving=True)
    buffer.connect("preferred:8470")
    assert [b.final for b in buffer.unacked] == [False] and not buffer.final_sent


def test_a_closed_sessions_goodbye_is_replayed():
    buffer = registered_buffer()
    buffer.session.close()
    buffer.next_batch(final=True)
    buffer.connect("preferred:8470")
    assert [b.final for b in buffer.unacked] == [True] and buffer.final_sent

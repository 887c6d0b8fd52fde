"""Sessions that continue one another (a table that changes, `Session.predecessor`): at
most `MAX_WAITING` wait behind one another; a further one takes the place of the last."""

from __future__ import annotations

import numpy as np

from gradwatch.agent.core.buffer import MAX_WAITING, Buffer
from gradwatch.agent.core.identity import Identity
from gradwatch.agent.core.session import RecordedSteps, Session, Variable
from gradwatch.proto.layout import NUM_COLUMNS
from gradwatch.proto.v1 import gradwatch_pb2 as pb


class Steps:
    """``steps`` recorded steps, read at the first `read_new`."""

    num_replicas = 1

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def unread(self) -> int:
        return self.steps

    def read_new(self) -> RecordedSteps:
        steps, self.steps = self.steps, 0
        return RecordedSteps(np.arange(steps), np.zeros((steps, 1, 1, NUM_COLUMNS),
                                                        np.float32), 0)


def session(steps: int, predecessor: Session | None = None) -> Session:
    made = Session(Identity("job", "worker", 0, "host", 1), "SGD",
                   [Variable("w", (2,), "float32", key=7)], Steps(steps))
    made.predecessor = predecessor
    return made


def registered(buffer: Buffer, made: Session) -> None:
    buffer.add(made)
    buffer.drain()
    buffer.sessions[-1].registered("collector:8470", pb.RegisterResponse(session_id="s"))


def chain(buffer: Buffer, first: Session, count: int, *, drain: bool,
          steps: int = 10) -> list[Session]:
    """``count`` successors of ``first``, with ``steps``, ``steps + 1`` ... steps, each
    added (and drained)."""
    made = [first]
    for i in range(count):
        made.append(session(steps + i, made[-1]))
        buffer.add(made[-1])
        if drain:
            buffer.drain()
    return made


def test_successors_wait_in_turn_then_the_last_waiting_is_replaced():
    """A few quick changes (at start, or one every epoch) lose nothing; more than
    `MAX_WAITING` waiting skip the tables in between, their steps counted as dropped."""
    assert MAX_WAITING == 2
    buffer = Buffer(2**20)
    first = session(3)
    registered(buffer, first)
    made = chain(buffer, first, 2, drain=True)
    assert [b.session for b in buffer.sessions] == made  # first, 10 steps, 11 steps
    assert [b.dropped for b in buffer.sessions] == [0, 0, 0]
    made += chain(buffer, made[-1], 3, drain=True, steps=12)[1:]
    assert [b.session for b in buffer.sessions] == [made[0], made[1], made[-1]]
    assert [b.predecessor for b in buffer.sessions] == [None, *buffer.sessions[:2]]
    assert buffer.sessions[-1].dropped == 11 + 12 + 13  # (their steps read at their drain)
    assert len(buffer.sessions[-1].pending) == 14


def test_successors_not_read_yet_replace_one_another_at_once():
    """Tables changing faster than the sender reads keep a few sessions, not one each
    (each holds a ring buffer)."""
    buffer = Buffer(2**20)
    first = session(3)
    buffer.add(first)  # not read either: the first of its name keeps its steps
    made = chain(buffer, first, 10, drain=False)
    assert buffer._new == [first, made[1], made[-1]]
    assert made[-1].predecessor is made[1] and made[-1].dropped_before == sum(range(11, 19))
    assert all(s.predecessor is None for s in made[2:-1])
    buffer.drain()
    assert [len(b.pending) for b in buffer.sessions] == [3, 10, 19]
    assert [b.dropped for b in buffer.sessions] == [0, 0, sum(range(11, 19))]


def test_a_successor_of_a_registered_session_waits_for_it():
    buffer = Buffer(2**20)
    first = session(3)
    registered(buffer, first)
    second = session(4, first)
    buffer.add(second)
    buffer.drain()
    assert buffer.sessions[1].predecessor is buffer.sessions[0] and buffer.sessions[0].ending
    assert buffer.sessions[1].dropped == 0
    buffer.sessions[0].pending.clear()  # (as if delivered)
    buffer.remove_finished()
    assert [b.session for b in buffer.sessions] == [second]
    assert buffer.sessions[0].predecessor is None and buffer.sessions[0].follows

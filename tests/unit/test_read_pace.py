"""The sender reads a session's step buffer soon after each step, and not in between.

A fake clock and a fake step source: the source counts its reads and holds the steps
a simulated training loop has recorded by then."""

from __future__ import annotations

import functools

import numpy as np

from gradwatch.agent.core.buffer import Buffer
from gradwatch.agent.core.identity import Identity
from gradwatch.agent.core.pace import MAX_WAIT_S, ReadPace
from gradwatch.agent.core.record import to_statistics
from gradwatch.agent.core.session import RecordedSteps, Session, Variable

FLUSH_S = 0.1


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Steps:
    """A step source whose steps end at the given times."""

    num_replicas = 1

    def __init__(self, clock: Clock, ends: list[float]) -> None:
        self.clock, self.ends = clock, ends
        self.reads = 0
        self.delivered = 0

    def read_new(self) -> RecordedSteps:
        self.reads += 1
        done = sum(1 for end in self.ends if end <= self.clock.now)
        steps = np.arange(self.delivered, done, dtype=np.int64)
        self.delivered = done
        return RecordedSteps(steps, to_statistics(np.zeros((len(steps), 1, 3), np.float32), 1),
                             0)


def flush(clock: Clock, buffer: Buffer, source: Steps, until: float,
          everything: bool = False) -> dict[int, float]:
    """Drains every flush interval until ``until``: when each step was taken."""
    taken = {}
    while clock.now < until:
        clock.now = round(clock.now + FLUSH_S, 6)
        buffer.drain(everything=everything)
        for report in buffer.sessions[0].pending:
            taken.setdefault(report.step, clock.now)
    return taken


def paced(ends: list[float], monkeypatch) -> tuple[Clock, Buffer, Steps]:
    clock = Clock()
    monkeypatch.setattr("gradwatch.agent.core.buffer.ReadPace",
                        functools.partial(ReadPace, clock=clock))
    source = Steps(clock, ends)
    buffer = Buffer(max_bytes=2**20, flush_interval_s=FLUSH_S)
    identity = Identity("job", "worker", 0, "host", 1)
    buffer.add(Session(identity, "sgd", [Variable("w", (1,), "float32")], source))
    return clock, buffer, source


def test_steps_slower_than_the_flush_interval_are_read_three_times_a_step_not_seven(
        monkeypatch):
    ends = [0.7 * k + 0.05 for k in range(1, 30)]
    clock, buffer, source = paced(ends, monkeypatch)
    taken = flush(clock, buffer, source, until=ends[-1] + 0.2)
    assert sorted(taken) == list(range(len(ends)))
    latency = [taken[k] - end for k, end in enumerate(ends)]
    assert max(latency) <= FLUSH_S + 1e-9  # each step within a flush interval of its end
    assert source.reads <= 3.5 * len(ends)  # unpaced: 7 a step


def test_steps_faster_than_the_flush_interval_are_read_every_flush(monkeypatch):
    ends = [0.01 * k for k in range(1, 300)]
    clock, buffer, source = paced(ends, monkeypatch)
    flush(clock, buffer, source, until=3.2)
    assert source.reads == 32


def test_a_step_sooner_than_its_predecessors_is_late_by_at_most_the_wait(monkeypatch):
    ends = [3.0 * k for k in range(1, 6)] + [15.3]  # steps of 3 s, then one of 0.3 s
    clock, buffer, source = paced(ends, monkeypatch)
    taken = flush(clock, buffer, source, until=17)
    assert taken[5] - ends[5] <= MAX_WAIT_S + FLUSH_S + 1e-9
    assert taken[5] - ends[5] > FLUSH_S  # it was late: the case this bound is about


def test_closing_reads_everything_at_once(monkeypatch):
    ends = [0.7, 1.4, 2.1, 2.15]
    clock, buffer, source = paced(ends, monkeypatch)
    flush(clock, buffer, source, until=2.2)
    assert [r.step for r in buffer.sessions[0].pending] == [0, 1, 2]  # 3 is not due yet
    buffer.drain(everything=True)
    assert [r.step for r in buffer.sessions[0].pending] == [0, 1, 2, 3]

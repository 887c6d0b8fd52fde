"""Steps on their way to the collector: per session, bounded in bytes over all sessions.

Each session's steps wait in ``pending`` until they go out in a batch, then in
``unacked`` until the collector acknowledges that batch's sequence number. When the
whole buffer exceeds ``max_bytes``, the oldest steps of the largest sessions are
dropped and counted; the count reaches the collector with the next batch.

A session that continues another (`Session.predecessor`) registers once that one's
steps are all acknowledged. At most `MAX_WAITING` wait so, one behind the other; a
further one takes the place of the last (whose steps count as dropped), so a table that
changes faster than the collector takes it (a param group added every few steps) keeps
a few sessions, and ring buffers, not a growing queue.

`Buffer.add` may be called from any thread; everything else belongs to the sender
thread.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field

from gradwatch.agent.core.session import Session
from gradwatch.proto.layout import BYTES_PER_STATISTIC
from gradwatch.proto.v1 import gradwatch_pb2 as pb

log = logging.getLogger(__name__)

#: What a collector that does not say (`pb.RegisterResponse.max_cause` 0) knows.
OLDEST_MAX_CAUSE = pb.Diagnosis.NOT_TRACKED
#: Bytes of a buffered step besides its statistics (step, wall time, field headers).
BYTES_PER_STEP = 48
#: Sessions of one name that may wait for the one before to be delivered (see above).
MAX_WAITING = 2


def step_bytes(num_replicas: int, num_variables: int) -> int:
    """Host memory one buffered step of a session takes (an upper bound of its wire size)."""
    return num_replicas * num_variables * BYTES_PER_STATISTIC + BYTES_PER_STEP


@dataclass
class SessionBuffer:
    """One session's buffered steps and its place in the collector's sequence."""

    session: Session
    session_id: str = ""  # on the current connection's collector
    #: Session ids by collector address: a reconnect to the same collector resumes the
    #: session, so batches it applied but never acknowledged are recognised as duplicates.
    registrations: dict[str, str] = field(default_factory=dict)
    next_sequence: int = 1
    acked: int = 0  # the highest sequence acknowledged
    last_step: int = -1  # of the last step put in a batch
    dropped: int = 0
    max_batch_steps: int = 256
    #: The highest diagnosis cause the collector knows (`pb.RegisterResponse.max_cause`).
    max_cause: int = OLDEST_MAX_CAUSE
    final_sent: bool = False
    #: Reading its statistics failed once (a bug): it is not read again.
    broken: bool = False
    #: The collector of this connection refused to register it (asked again, it would
    #: refuse again): it is neither read nor sent until the next connection asks again.
    retired: bool = False
    #: Monotonic time before which it is not registered again, and why the collector
    #: could not take it the last time ("" if it could).
    register_after: float = 0.0
    not_registered_because: str = ""
    #: It continues the session of this buffer (see `Session.predecessor`): it is not
    #: registered until that one's steps are all acknowledged and it is gone.
    predecessor: SessionBuffer | None = None
    #: It continues a session of its name that was registered: its first registration
    #: is a hand-over, not news.
    follows: bool = False
    #: A successor took over: once its last steps are acknowledged, it goes.
    ending: bool = False
    #: Diagnoses sent since the session was (re-)registered, by variable id.
    diagnoses_sent: dict[int, pb.Diagnosis] = field(default_factory=dict)
    pending: collections.deque[pb.StepReport] = field(default_factory=collections.deque)
    unacked: collections.deque[pb.ReportBatch] = field(default_factory=collections.deque)

    def __post_init__(self) -> None:
        self.step_bytes = step_bytes(self.session.num_replicas, self.session.num_variables)

    @property
    def name(self) -> str:
        return self.session.optimizer

    def buffered_steps(self) -> int:
        return len(self.pending) + sum(len(b.steps) for b in self.unacked)

    def unsent_diagnoses(self) -> list[pb.Diagnosis]:
        return [d for i, d in self.session.diagnoses().items()
                if self.diagnoses_sent.get(i) is not d]

    def finished(self) -> bool:
        """Ended, with nothing left to send or to have acknowledged (a closed session's
        goodbye included, where it is registered)."""
        return self.ending and (self.retired or self.broken or not (
            self.pending or self.unacked or self.says_goodbye()))

    def says_goodbye(self) -> bool:
        """Its session closed and everything it recorded is acknowledged: time to tell
        the collector (`pb.ReportBatch.final`)."""
        return (self.ending and self.session.closed and bool(self.session_id)
                and not self.final_sent and not (self.pending or self.unacked))

    def has_news(self) -> bool:
        """Registered here, with steps or diagnoses to send."""
        return bool(self.session_id) and bool(self.pending or self.unsent_diagnoses())

    def connect(self, address: str) -> None:
        """A new connection to the collector at ``address``: resume its session, if any;
        a retired one is registered again (the collector may be another one now)."""
        self.session_id = self.registrations.get(address, "")
        if not self.session.closed:  # a goodbye to the connection before, left unacked (a
            # move): not for this one, where the session goes on; one at close is said again
            self.unacked = collections.deque(b for b in self.unacked if not b.final)
        self.final_sent = any(batch.final for batch in self.unacked)  # replayed, said again
        self.retired = False

    def registration(self) -> pb.RegisterRequest:
        """The session's registration, saying whether it sent steps before (to a collector
        that lost it, or another one): then it is past its first step."""
        request = self.session.registration()
        request.stepped = self.last_step >= 0
        return request

    def registered(self, address: str, response: pb.RegisterResponse) -> None:
        self.session_id = self.registrations[address] = response.session_id
        self.not_registered_because = ""
        self.diagnoses_sent = {}
        self.max_batch_steps = response.max_batch_steps or self.max_batch_steps
        self.max_cause = response.max_cause or OLDEST_MAX_CAUSE

    def retire(self) -> None:
        """Not to be sent on this connection: its buffered steps and batches go (not
        counted as dropped, since this collector will not hear of them)."""
        self.retired = True
        self.pending.clear()
        self.unacked.clear()

    def forget(self, address: str) -> None:
        """The collector at ``address`` lost our session: register again there."""
        self.registrations.pop(address, None)

    def next_batch(self, final: bool = False, moving: bool = False) -> pb.ReportBatch:
        """The next batch: the oldest pending steps (as many as a batch may hold) and the
        diagnoses not yet sent, kept in ``unacked`` until acknowledged. A step lower than
        the one before it (the optimizer's counter was set back) is marked ``rewound``."""
        steps = [] if final else [self.pending.popleft() for _ in
                                  range(min(len(self.pending), self.max_batch_steps))]
        for step in steps:
            step.rewound = step.step < self.last_step
            self.last_step = step.step
        batch = pb.ReportBatch(session_id=self.session_id, sequence=self.next_sequence,
                               dropped_steps=self.dropped, steps=steps, final=final,
                               moving=final and moving)
        self.attach_diagnoses(batch)
        self.next_sequence += 1
        self.unacked.append(batch)
        return batch

    def attach_diagnoses(self, batch: pb.ReportBatch) -> None:
        """Adds the diagnoses not sent since the session was (re-)registered to ``batch``
        (one it holds none of): a new batch, or the first one replayed to a collector that
        registered the session again, so that the rules see them with its steps."""
        carried = {d.variable_id for d in batch.diagnoses}
        diagnoses = [d for d in self.unsent_diagnoses() if d.variable_id not in carried]
        self.diagnoses_sent.update((d.variable_id, d) for d in diagnoses)
        batch.diagnoses.extend(diagnoses)
        for diagnosis in batch.diagnoses:  # copies: an older collector refuses newer causes
            if diagnosis.cause > self.max_cause:
                diagnosis.cause = pb.Diagnosis.UNKNOWN

    def acknowledge(self, sequence: int) -> None:
        self.acked = max(self.acked, sequence)
        while self.unacked and self.unacked[0].sequence <= sequence:
            self.unacked.popleft()

    def drop_batch(self, sequence: int) -> pb.ReportBatch | None:
        """Drops the unacknowledged batch ``sequence`` (refused by the collector), counting
        its steps as dropped; None if it is gone already."""
        batch = next((b for b in self.unacked if b.sequence == sequence), None)
        if batch is not None:
            self.unacked.remove(batch)
            self.dropped += len(batch.steps)
        return batch

    def drop_oldest(self, excess: int) -> int:
        """Drops the oldest steps until ``excess`` bytes are freed or none is left;
        returns the bytes still in excess."""
        while excess > 0 and self.unacked:
            steps = len(self.unacked.popleft().steps)
            self.dropped += steps
            excess -= steps * self.step_bytes
        while excess > 0 and self.pending:
            self.pending.popleft()
            self.dropped += 1
            excess -= self.step_bytes
        return excess


class Buffer:
    """Every session's `SessionBuffer`, bounded by ``max_bytes`` together."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.sessions: list[SessionBuffer] = []
        self._lock = threading.Lock()
        self._new: list[Session] = []
        #: When `drain` last ran (monotonic seconds).
        self.drained_at = 0.0
        self._said_too_small = False  # that max_bytes holds not one step (said once)

    def add(self, session: Session) -> None:
        """Takes a new session (any thread); it is read from the next `drain` on. One
        that continues a session not read yet, behind `MAX_WAITING` waiting ones in all,
        takes its place at once (as `drain` would)."""
        with self._lock:
            replaced = session.predecessor
            unread = {id(s) for s in self._new}
            if _waiting(replaced, lambda s: s.predecessor if id(s) in unread else None) \
                    >= MAX_WAITING:
                self._new = [s for s in self._new if s is not replaced]
                session.predecessor, replaced.predecessor = replaced.predecessor, None
                session.dropped_before += replaced.dropped_before + replaced.unread_steps()
            self._new.append(session)

    def drain(self) -> None:
        """Moves every session's new steps into the buffer, then enforces the limit."""
        self.drained_at = time.monotonic()
        with self._lock:
            new, self._new = self._new, []
        for session in new:
            buffer = SessionBuffer(session, dropped=session.dropped_before)
            predecessor = next(
                (b for b in self.sessions if b.session is session.predecessor), None)
            session.predecessor = None  # linked here now; a chain would keep them all
            if _waiting(predecessor, lambda b: b.predecessor) >= MAX_WAITING:
                # It never registered (it waits behind another), nor would its successor
                # soon: this one takes its place, so that tables changing faster than the
                # collector takes them keep a few sessions, not a growing queue.
                self._discard(predecessor, buffer)
                predecessor = predecessor.predecessor
            if predecessor is not None:
                # Its source gets no more steps: this drain reads its last ones.
                predecessor.ending = True
                buffer.predecessor = predecessor
            self.sessions.append(buffer)
        for buffer in self.sessions:
            if buffer.broken or buffer.retired:
                continue
            if buffer.session.closed:  # (read before: these are then its last steps)
                buffer.ending = True
            try:
                reports, dropped = buffer.session.drain()
            except Exception:  # a broken session must not stop the others, nor flood
                buffer.broken = True
                log.exception("gradwatch: reading statistics of %s failed; it is no longer "
                              "read", buffer.name)
                continue
            buffer.dropped += dropped
            buffer.pending.extend(reports)
        excess = self.bytes() - self.max_bytes
        for buffer in sorted(self.sessions, key=lambda b: -b.buffered_steps() * b.step_bytes):
            if excess <= 0:
                break
            excess = buffer.drop_oldest(excess)
            if buffer.step_bytes > self.max_bytes and not self._said_too_small:
                self._said_too_small = True
                log.warning("gradwatch: max_buffer_bytes (%d) holds not one step of %s (%d "
                            "bytes): every step is dropped; raise GRADWATCH_MAX_BUFFER_BYTES",
                            self.max_bytes, buffer.name, buffer.step_bytes)

    def _discard(self, replaced: SessionBuffer, successor: SessionBuffer) -> None:
        """Forgets ``replaced``, never registered, for ``successor``, which counts its steps
        as dropped (those still in its source too)."""
        self.sessions.remove(replaced)
        successor.dropped += replaced.dropped + replaced.buffered_steps()
        if not (replaced.broken or replaced.retired):
            try:
                reports, dropped = replaced.session.drain()
                successor.dropped += len(reports) + dropped
            except Exception:  # (counted as far as known)
                log.debug("gradwatch: reading %s failed", replaced.name, exc_info=True)

    def remove_finished(self) -> None:
        """Forgets the ended sessions whose steps are all acknowledged; their successors
        may register now."""
        finished = [b for b in self.sessions if b.finished()]
        if not finished:
            return
        self.sessions = [b for b in self.sessions if not b.finished()]
        for buffer in self.sessions:
            if buffer.predecessor in finished:
                buffer.follows = bool(buffer.predecessor.registrations)
                buffer.predecessor = None

    def bytes(self) -> int:
        """Host memory held by steps not yet acknowledged."""
        return sum(b.buffered_steps() * b.step_bytes for b in self.sessions)

    def release(self) -> None:
        """Forgets every session (once nothing more is sent: the sender stopped), and so
        the variables their statistics come from."""
        with self._lock:
            self.sessions, self._new = [], []

    def holds_nothing(self) -> bool:
        """No session was ever handed over: nothing to deliver (any thread)."""
        with self._lock:
            return not self.sessions and not self._new

    def any_unacked(self) -> bool:
        """Batches sent on this connection wait for acks (those of a session not
        registered here wait unsent)."""
        return any(b.unacked for b in self.sessions if b.session_id)

    def all_acked(self) -> bool:
        return all(not b.pending and not b.unacked for b in self.sessions)


def _waiting(last, before) -> int:
    """How many of ``last`` and those ``before`` it wait behind another (a chain of
    `SessionBuffer` or, not read yet, of `Session`)."""
    count = 0
    while last is not None and (last := before(last)) is not None:
        count += 1
    return count

"""Latest gradient state of every job, columnar: numpy arrays indexed by variable id.

Hierarchy: `Registry` → `Group` (one training job x optimizer: the unit that
rules and per-variable series aggregate over) → `SessionState` (one task's
stream). A group owns a column per variable *name*, so the tasks of one job
line up even though each registered its own variable table.

Not thread-safe: the collector's event loop is the only writer and reader.
"""

from __future__ import annotations

import functools
import time
import uuid
from dataclasses import dataclass, field

import numpy as np

from gradwatch.collector.history import History

#: Seconds over which a session's step rate is smoothed.
RATE_WINDOW_S = 10.0


@dataclass
class StepBatch:
    """A validated batch, decoded into ``[steps, replicas, variables]`` arrays (one per
    statistic of `gradwatch.proto.layout`)."""

    steps: np.ndarray  # int64 [S]
    wall_time: np.ndarray  # float64 [S]
    present: np.ndarray  # bool
    l2_norm: np.ndarray  # float32
    nan_count: np.ndarray  # float32
    inf_count: np.ndarray  # float32
    global_norm: np.ndarray  # float64 [S, R]: L2 norm of all present gradients together
    dropped_steps: int
    rewound_to: tuple[int, ...] = ()  # steps marked rewound (counter set back on purpose)

    @functools.cached_property
    def nonfinite(self) -> np.ndarray:
        """Where NaN or Inf elements were counted (bool ``[S, R, N]``)."""
        return (self.nan_count + self.inf_count) > 0

    @functools.cached_property
    def standing(self) -> np.ndarray:
        """Which steps stand (bool [S]): a step reported again later in the batch, or
        followed by a lower one (the counter set back), is superseded. The standing steps
        strictly increase."""
        if (self.steps[1:] > self.steps[:-1]).all():  # most batches
            return np.ones(len(self.steps), bool)
        later = np.minimum.accumulate(self.steps[::-1])[::-1]
        return self.steps < np.append(later[1:], np.iinfo(np.int64).max)


@dataclass(frozen=True)
class MissingCause:
    """An agent's diagnosis of why a variable gets no gradient."""

    cause: str  # "unused", "broken_at_op", ... (lower-case proto enum name)
    op_name: str
    op_type: str
    source: str  # "file:line", or "" when no op is involved
    explanation: str  # cause and fix, in plain sentences


@dataclass
class SessionState:
    """One registered stream: a task's optimizer, with its latest step and totals."""

    id: str
    group: Group
    task_type: str
    task_index: int
    num_replicas: int
    columns: np.ndarray  # int64 [N]: this session's variable ids → group columns
    strategy: str = ""
    hostname: str = ""
    pid: int = 0
    versions: dict[str, str] = field(default_factory=dict)
    registered_at: float = field(default_factory=time.time)
    #: It sent steps before this registration (to a collector that lost it, or another
    #: replica): past its first step, though none came here yet.
    stepped_before: bool = False
    last_sequence: int = 0
    last_report_time: float = 0.0
    last_step: int = -1
    steps_total: int = 0
    nonfinite_steps_total: int = 0
    dropped_steps: int = 0
    closed: bool = False  # the agent said it will send no more
    moved: bool = False  # ... and goes on with another collector: forgotten at once
    #: Report streams that carried a batch of this session and are still open (kept by
    #: the service): a task whose stream is open is alive, however long it stays quiet.
    open_streams: int = 0
    #: Dynamic loss scaling: steps with NaN/Inf are skipped by the optimizer, not applied.
    loss_scaled: bool = False
    skipped_steps_total: int = 0
    #: Steps per second, smoothed over the last `RATE_WINDOW_S` of reports (see `rate`).
    step_rate: float = 0.0

    def __post_init__(self) -> None:
        shape = (self.num_replicas, len(self.columns))
        # The latest step:
        self.present = np.ones(shape, bool)
        self.nonfinite = np.zeros(shape, bool)
        self.l2_norm = np.zeros(shape, np.float32)
        self.global_norm = np.zeros(self.num_replicas, np.float64)
        # Totals:
        self.missing_steps_total = np.zeros(len(self.columns), np.int64)
        self.nan_total = np.zeros(len(self.columns), np.float64)
        self.inf_total = np.zeros(len(self.columns), np.float64)

    @property
    def num_variables(self) -> int:
        return len(self.columns)

    @functools.cached_property
    def column_index(self) -> slice | np.ndarray:
        """This session's variables among its group's columns: a slice where they are the
        group's first ones, in order (indexing by it is ~10x faster), else `columns`
        (fixed at registration: decided once, not per batch)."""
        n = len(self.columns)
        return slice(0, n) if np.array_equal(self.columns, np.arange(n)) else self.columns

    @property
    def task(self) -> str:
        return f"{self.task_type}/{self.task_index}"

    def nonfinite_steps(self, batch: StepBatch) -> np.ndarray:
        """Where ``batch`` had NaN or Inf elements ([S, R, N]), except in steps a loss-scale
        optimizer skips (those are counted as skipped, not alarming)."""
        return np.zeros_like(batch.nonfinite) if self.loss_scaled else batch.nonfinite

    def rate(self, now: float) -> float:
        """Steps per second as of ``now``: the recent rate, or 0 once no report came for
        three of its step periods (and `RATE_WINDOW_S`): a task that died is not shown
        stepping on."""
        if self.step_rate and now - self.last_report_time > max(RATE_WINDOW_S,
                                                                  3 / self.step_rate):
            return 0.0
        return self.step_rate

    def apply(self, sequence: int, batch: StepBatch) -> None:
        """Folds a validated batch into the latest state and the totals."""
        now = time.time()
        if self.last_report_time and batch.steps.size:
            elapsed = max(now - self.last_report_time, 1e-3)
            weight = min(1.0, elapsed / RATE_WINDOW_S)
            self.step_rate += weight * (batch.steps.size / elapsed - self.step_rate)
        self.last_sequence = sequence
        self.last_report_time = now
        self.dropped_steps = max(self.dropped_steps, batch.dropped_steps)
        if batch.steps.size == 0:
            return
        self.steps_total += batch.steps.size
        self.last_step = int(batch.steps[-1])
        self.present = batch.present[-1]
        self.l2_norm = batch.l2_norm[-1]
        self.global_norm = batch.global_norm[-1]
        self.missing_steps_total += (~batch.present).sum(axis=(0, 1))
        self.nan_total += batch.nan_count.sum(axis=(0, 1))
        self.inf_total += batch.inf_count.sum(axis=(0, 1))
        if self.loss_scaled:
            self.skipped_steps_total += int(batch.nonfinite.any(axis=(1, 2)).sum())
        nonfinite = self.nonfinite_steps(batch)
        self.nonfinite = nonfinite[-1]
        self.nonfinite_steps_total += int(nonfinite.any(axis=(1, 2)).sum())
        kept = slice(None)
        if batch.rewound_to:  # the heat map continues from the step restored
            kept = batch.standing
            self.group.history.rewind(self.id, int(batch.steps[kept][0]))
        self.group.history.add(self.id, self.column_index, batch.steps[kept], batch.present[kept],
                               batch.l2_norm[kept], nonfinite[kept], batch.global_norm[kept],
                               len(self.group.names))

    def continue_totals(self, previous: SessionState) -> None:
        """Takes over the totals of ``previous``, an open session of the same process that
        this one replaces (the agent watches more of the optimizer's variables now): the
        task's counters go on, as they reset only when its process does. Per-variable
        totals follow the variables by name."""
        self.steps_total = previous.steps_total
        self.nonfinite_steps_total = previous.nonfinite_steps_total
        self.skipped_steps_total = previous.skipped_steps_total
        self.step_rate = previous.step_rate
        position = {int(c): i for i, c in enumerate(self.columns)}
        kept = [(position[int(c)], j) for j, c in enumerate(previous.columns)
                if int(c) in position]
        if kept:
            mine, theirs = (np.array(x) for x in zip(*kept, strict=True))
            self.missing_steps_total[mine] += previous.missing_steps_total[theirs]
            self.nan_total[mine] += previous.nan_total[theirs]
            self.inf_total[mine] += previous.inf_total[theirs]

    def set_causes(self, causes: dict[int, MissingCause]) -> None:
        """Records the agent's diagnoses, by this session's variable ids."""
        for variable_id, cause in causes.items():
            self.group.causes[int(self.columns[variable_id])] = cause


@dataclass
class Group:
    """All sessions of one training job and optimizer."""

    training_job: str
    optimizer: str
    names: list[str] = field(default_factory=list)  # column → variable name
    column_of: dict[str, int] = field(default_factory=dict)
    sessions: dict[str, SessionState] = field(default_factory=dict)
    #: Why a column gets no gradient, as the latest diagnosing task said.
    causes: dict[int, MissingCause] = field(default_factory=dict)
    #: Every task holds a shard of each variable (FSDP): per-variable norms combine the
    #: tasks' shard norms as sqrt(sum of squares), and tasks' global norms differ.
    sharded: bool = False
    #: The recent steps of every variable (the web UI's heat map).
    history: History = field(default_factory=History)
    #: Every group of the same training job, this one included (shared by them).
    job_groups: list[Group] = field(default_factory=list)

    def task_sessions(self, task_type: str, task_index: int) -> list[SessionState]:
        """The sessions of one task over all of the job's optimizers."""
        return [s for group in self.job_groups for s in group.sessions.values()
                if (s.task_type, s.task_index) == (task_type, task_index)]

    def drop_unheld_columns(self) -> None:
        """Forgets the variables no session holds any more (those of a run that another
        replaced, or of tasks forgotten): alerts, pages and the heat map count and list
        what the job's tasks watch now. Renumbers the columns left (sessions, causes and
        history follow)."""
        held = np.zeros(len(self.names), bool)
        for session in self.sessions.values():
            held[session.columns] = True
        if held.all():
            return
        renumbered = np.cumsum(held) - 1
        self.names = [name for name, kept in zip(self.names, held.tolist(), strict=True)
                      if kept]
        self.column_of = {name: i for i, name in enumerate(self.names)}
        self.causes = {int(renumbered[c]): cause for c, cause in self.causes.items()
                       if held[c]}
        for session in self.sessions.values():
            session.columns = renumbered[session.columns]
        self.history.keep_columns(held)

    def columns_for(self, names: list[str]) -> np.ndarray:
        for name in names:
            if name not in self.column_of:
                self.column_of[name] = len(self.names)
                self.names.append(name)
        return np.array([self.column_of[n] for n in names], np.int64)


class Registry:
    """All groups and sessions known to this collector."""

    def __init__(self) -> None:
        self.groups: dict[tuple[str, str], Group] = {}
        self.sessions: dict[str, SessionState] = {}
        #: Replicas x variables summed over sessions: what one step of each carries.
        self.statistics = 0

    def register(self, training_job: str, optimizer: str, task_type: str, task_index: int,
                 num_replicas: int, variable_names: list[str], sharded: bool = False,
                 **details) -> SessionState:
        group = self.groups.get((training_job, optimizer))
        if group is None:
            group = self.groups[(training_job, optimizer)] = Group(training_job, optimizer)
            siblings = next((g.job_groups for (job, _), g in self.groups.items()
                             if job == training_job and g is not group), [])
            siblings.append(group)
            group.job_groups = siblings
        group.sharded |= sharded
        group.history.sharded = group.sharded
        session = SessionState(
            id=uuid.uuid4().hex, group=group, task_type=task_type, task_index=task_index,
            num_replicas=num_replicas, columns=group.columns_for(variable_names), **details,
        )
        # A task that registers again (restarted, or reconnected to a collector that
        # lost it) replaces its previous session, so stale state cannot linger; one whose
        # open session grew continues its totals. A new run of the job (the same job name
        # again; PyTorch counts its steps from 0) starts a new history: the old run's
        # steps held the heat map's slots (or, met again, were merged with the new). It
        # is one when no session of another task started after this task's old one last
        # reported: those are the old run's (its other ranks), not the new run's.
        previous = self.find_task(training_job, optimizer, task_type, task_index)
        if previous is not None:
            continued = (not previous.closed and previous.pid
                         and previous.num_replicas == num_replicas
                         and (previous.hostname, previous.pid) == (session.hostname,
                                                                   session.pid))
            if continued:
                session.continue_totals(previous)
                group.history.hand_over(previous.id, session.id)
            self.remove(previous.id)
            ended = max(previous.registered_at, previous.last_report_time)
            if not continued and all(s.registered_at <= ended for s in group.sessions.values()):
                group.history = History(group.sharded)
        group.sessions[session.id] = session
        self.sessions[session.id] = session
        self.statistics += num_replicas * session.num_variables
        if previous is not None:
            group.drop_unheld_columns()
        return session

    def find_task(self, training_job: str, optimizer: str, task_type: str,
                  task_index: int) -> SessionState | None:
        """The session of this task and optimizer, if it has one."""
        group = self.groups.get((training_job, optimizer))
        if group is None:
            return None
        return next((s for s in group.sessions.values()
                     if (s.task_type, s.task_index) == (task_type, task_index)), None)

    def sessions_in_job(self, training_job: str) -> int:
        return sum(len(g.sessions) for (job, _), g in self.groups.items() if job == training_job)

    def remove(self, session_id: str) -> None:
        session = self.sessions.pop(session_id, None)
        if session is not None:
            session.group.sessions.pop(session_id, None)
            session.group.history.forget(session_id)
            self.statistics -= session.num_replicas * session.num_variables

    def expire_inactive(self, older_than: float) -> list[Group]:
        """Forgets sessions last heard of before ``older_than`` (Unix time) that said
        goodbye or have no open Report stream (their process crashed or lost the
        collector: a task that hangs keeps its stream, and its WorkerSilent alert), those
        that moved to another collector at once, and groups left empty. Returns the
        groups that lost sessions (for a last rule pass)."""
        touched = {}
        for session in list(self.sessions.values()):
            heard = session.last_report_time or session.registered_at
            if session.moved or (heard < older_than
                                 and (session.closed or not session.open_streams)):
                self.remove(session.id)
                touched[id(session.group)] = session.group
        for key, group in list(self.groups.items()):
            if not group.sessions:
                del self.groups[key]
                group.job_groups.remove(group)
            elif id(group) in touched:
                group.drop_unheld_columns()
        return list(touched.values())

    def jobs(self) -> set[str]:
        return {job for job, _ in self.groups}

"""ReplicaDivergence and WorkerSilent: how the tasks and replicas of one job compare,
and which stopped reporting."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from gradwatch.collector.alerts import Alert
from gradwatch.collector.rules.base import Params, Rule, above, alert, names
from gradwatch.collector.state import Group, SessionState, StepBatch


@dataclass(frozen=True)
class DivergenceParams(Params):
    norm_ratio: float = above(10.0, 1)


#: Steps a task may lag behind the group's newest step, and seconds its latest report may
#: lag behind the group's, before the other tasks' steps are compared without it (a task
#: that hangs with its stream open must not hold them back long, at any step rate).
LAG_STEPS = 256
LAG_SECONDS = 60.0
#: Bits of a variable's code at one step, OR-ed over the tasks compared: a gradient
#: present on some replica, absent on some, non-finite on some, finite on some.
PRESENT, ABSENT, NONFINITE, FINITE = (np.uint8(1 << i) for i in range(4))
MIXED_PRESENCE, MIXED_FINITENESS = PRESENT | ABSENT, NONFINITE | FINITE

Steps = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # steps, codes, odd, norms


class Unmatched:
    """A task's steps not yet compared with the other tasks', in increasing step order,
    kept as the batches' chunks (so a batch costs what its steps do). Per step: a code per
    variable (`PRESENT` ... bits), per replica whether it is odd (a gradient missing or
    non-finite) and its global norm."""

    def __init__(self) -> None:
        self.chunks: deque[Steps] = deque()
        #: The alerts of the latest comparison this task was part of (None: none yet).
        self.verdict: list[Alert] | None = None

    def add(self, chunk: Steps) -> None:
        """Appends a batch's standing steps; they supersede the task's earlier reports of
        the same or later steps (a repeat, or the counter set back)."""
        first = chunk[0][0]
        while self.chunks and self.chunks[-1][0][0] >= first:
            self.chunks.pop()
        if self.chunks and self.chunks[-1][0][-1] >= first:
            n = int(np.searchsorted(self.chunks[-1][0], first))
            self.chunks[-1] = tuple(a[:n] for a in self.chunks[-1])
        self.chunks.append(chunk)

    def take(self, upto: int) -> Steps | None:
        """Removes and returns the steps up to ``upto`` (None: none)."""
        taken = []
        while self.chunks and self.chunks[0][0][-1] <= upto:
            taken.append(self.chunks.popleft())
        if self.chunks and self.chunks[0][0][0] <= upto:
            n = int(np.searchsorted(self.chunks[0][0], upto, side="right"))
            taken.append(tuple(a[:n] for a in self.chunks[0]))
            self.chunks[0] = tuple(a[n:] for a in self.chunks[0])
        if not taken:
            return None
        return tuple(np.concatenate(arrays) for arrays in zip(*taken, strict=True))


class ReplicaDivergence(Rule[Unmatched]):
    """Replicas or workers of one job disagree at the same step: a gradient present on
    some and absent on others, finite on some and not on others, or global norms
    whose max/min ratio exceeds ``norm_ratio`` (sharded jobs: presence only). Every step
    is compared once every task that has not said goodbye has reported it or a later
    step (or once it is `LAG_STEPS` behind the group's newest step, or a task's latest
    report `LAG_SECONDS` behind the group's: then without the tasks that lag), among the
    tasks that reported it. The alert stands for the steps
    compared at the latest evaluation that compared any."""

    name = "ReplicaDivergence"
    Params = DivergenceParams

    def new_state(self, session: SessionState) -> Unmatched:
        return Unmatched()

    def observe(self, state: Unmatched, session: SessionState, batch: StepBatch,
                params: DivergenceParams) -> None:
        standing = batch.standing
        present, bad = batch.present[standing], session.nonfinite_steps(batch)[standing]
        codes = (present.any(axis=1) * PRESENT | ~present.all(axis=1) * ABSENT
                 | bad.any(axis=1) * NONFINITE | ~bad.all(axis=1) * FINITE)
        odd = ~present.all(axis=2) | bad.any(axis=2)
        state.add((batch.steps[standing], codes, odd, batch.global_norm[standing]))

    def evaluate(self, group: Group, states: Mapping[str, Unmatched],
                 params: DivergenceParams, now: float) -> list[Alert]:
        sessions = list(group.sessions.values())
        if not sessions:
            return []
        newest = max(s.last_step for s in sessions)
        latest = max(s.last_report_time or s.registered_at for s in sessions)
        awaited = [s.last_step for s in sessions if not s.closed
                   and latest - (s.last_report_time or s.registered_at) <= LAG_SECONDS]
        upto = max(min(awaited, default=newest), newest - LAG_STEPS)
        taken = {sid: steps for sid, state in states.items()
                 if (steps := state.take(upto)) is not None}
        if not taken:  # nothing new since: the latest comparison stands
            return next((s.verdict for s in states.values() if s.verdict is not None), [])
        # (steps of one replica alone, its peers gone or not waited for: nothing differs)
        verdict = self._compare(group, taken, params) or []
        for state in states.values():
            state.verdict = verdict
        return verdict

    def _compare(self, group: Group, taken: Mapping[str, Steps],
                 params: DivergenceParams) -> list[Alert] | None:
        """The alerts of these steps of these sessions (None: no step had 2 replicas)."""
        steps = np.unique(np.concatenate([t[0] for t in taken.values()]))
        width = sum(group.sessions[sid].num_replicas for sid in taken)
        codes = np.zeros((len(steps), len(group.names)), np.uint8)
        replicas = np.zeros(len(steps), np.int64)
        odd = np.zeros((len(steps), width), bool)
        norms = np.full((len(steps), width), np.nan)
        labels: list[str] = []
        for sid, (s_steps, s_codes, s_odd, s_norms) in taken.items():
            s = group.sessions[sid]
            rows = np.searchsorted(steps, s_steps)
            columns = s.column_index
            if isinstance(columns, slice):
                codes[rows, columns] |= s_codes
            else:
                codes[rows[:, None], columns] |= s_codes
            replicas[rows] += s.num_replicas
            own = slice(len(labels), len(labels) + s.num_replicas)
            odd[rows, own] = s_odd
            norms[rows, own] = np.where(np.isfinite(s_norms), s_norms, np.nan)
            labels += [f"{s.task} replica {r}" for r in range(s.num_replicas)]
        compared = replicas >= 2
        if not compared.any():
            return None
        steps, codes, odd, norms = steps[compared], codes[compared], odd[compared], norms[compared]
        presence = (codes & MIXED_PRESENCE) == MIXED_PRESENCE
        # Shards (FSDP, tensor parallel) hold different elements, so they differ in global
        # norm, and a NaN sits in the shard holding it (or a rank holds none of a
        # parameter): only presence is compared.
        finiteness = ((codes & MIXED_FINITENESS) == MIXED_FINITENESS) & (not group.sharded)
        high, low = np.fmax.reduce(norms, axis=1), np.fmin.reduce(norms, axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where((np.isfinite(norms).sum(axis=1) >= 2) & (low > 0)
                             & (not group.sharded), high / low, 1.0)
        skewed = ratio > params.norm_ratio
        differs = presence.any(axis=1) | finiteness.any(axis=1) | skewed
        if not differs.any():
            return []
        reasons = []
        if presence.any():
            reasons.append("gradient present on some replicas only")
        if finiteness.any():
            reasons.append("NaN/Inf on some replicas only")
        if skewed.any():
            reasons.append(f"global norms differ {ratio.max():.3g}x "
                           f"(limit {params.norm_ratio:g}x)")
        odd &= differs[:, None]
        for row in np.flatnonzero(skewed):
            odd[row, [np.nanargmax(norms[row]), np.nanargmin(norms[row])]] = True
        first, later = int(steps[differs][0]), int(differs.sum()) - 1
        return [alert(self.name, "warning", group,
                      f"Replicas of {group.training_job} ({group.optimizer}) disagree at "
                      f"step {first}" + (f" and {later} later steps" if later else ""),
                      "; ".join(reasons).capitalize() + ".",
                      names(group, (presence | finiteness).any(axis=0)),
                      [labels[i] for i in np.flatnonzero(odd.any(axis=0))])]


@dataclass(frozen=True)
class SilenceParams(Params):
    seconds: float = above(60.0, 0)
    #: Before a task's first step: tracing and compiling a first step can take minutes.
    first_step_seconds: float = above(600.0, 0)


class WorkerSilent(Rule[None]):
    """A task that has not said goodbye reported no step, with any of the job's optimizers,
    for ``seconds`` (``first_step_seconds`` before its first step, and a PyTorch task's
    second: its agent runs the first uncompiled, to explain any missing gradient, so a
    ``torch.compile``d model compiles in the second); a task that registers again past
    its first step (`pb.RegisterRequest.stepped`: with a collector that lost it, or
    another replica) is silent since it registered. An optimizer that is idle while
    another of the task trains (GANs, distillation, layer-wise schedules) is not a silent
    task; its ``gradwatch_last_report_timestamp_seconds`` shows it."""

    name = "WorkerSilent"
    Params = SilenceParams

    def evaluate(self, group: Group, states: Mapping[str, None], params: SilenceParams,
                 now: float) -> list[Alert]:
        def silent(session) -> bool:
            if session.closed:
                return False
            task = group.task_sessions(session.task_type, session.task_index) or [session]
            stepped = [s for s in task if s.steps_total or s.stepped_before]
            if stepped:
                # (its step 0: not the first step a restarted collector hears of)
                compiling = all(s.last_step == 0 and "torch" in s.versions for s in stepped)
                # (registered again after a collector lost it: silent since then)
                return now - max(s.last_report_time or s.registered_at for s in stepped) > (
                    params.first_step_seconds if compiling else params.seconds)
            return now - min(s.registered_at for s in task) > params.first_step_seconds

        silent = [s.task for s in group.sessions.values() if silent(s)]
        if not silent:
            return []
        return [alert(self.name, "warning", group,
                      f"{len(silent)} task(s) of {group.training_job} ({group.optimizer}) "
                      f"stopped reporting",
                      f"No report for more than {params.seconds:g} s: the process may be hung, "
                      "dead, or cut off from the collector.", [], sorted(silent))]

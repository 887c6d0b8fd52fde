"""Alert rules, vectorized over variables, evaluated after every applied batch.

Each rule has a ``Params`` dataclass (its YAML settings and documented
defaults), may keep per-session history in ``SessionState.rule_state`` when
it sees a batch (`Rule.observe`), and returns the alerts active now for one
group, a training job x optimizer (`Rule.evaluate`). `RuleEngine` runs them
and hands the result to `AlertTracker`, which owns firing, hysteresis and
resolution. Event-loop only.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from gradwatch.collector.alerts import Alert, AlertTracker
from gradwatch.collector.state import Group, SessionState, StepBatch

log = logging.getLogger(__name__)

#: Longest list of variables or tasks written into one annotation.
MAX_LISTED = 10
#: Default runbook location (inside the repository); ``runbook_url`` in the collector's
#: YAML points alerts at a page your on-call can open.
RUNBOOK = "docs/runbook.md"


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED])
    return shown + (f" (and {len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else "")


def _alert(name: str, severity: str, group: Group, summary: str, detail: str,
           variables: list[str], tasks: list[str], **extra: str) -> Alert:
    return Alert(
        labels={"alertname": name, "severity": severity,
                "training_job": group.training_job, "optimizer": group.optimizer},
        annotations={
            "summary": summary,
            "description": f"{summary}. {detail}" + (
                f" Variables: {_listing(variables)}." if variables else "") + (
                f" Tasks: {_listing(tasks)}." if tasks else ""),
            "variables": _listing(variables),
            "tasks": _listing(tasks),
            **extra,
        },
    )


def _reporting(group: Group) -> list[SessionState]:
    return [s for s in group.sessions.values() if s.steps_total]


def _names(group: Group, columns: np.ndarray) -> list[str]:
    return [group.names[i] for i in np.flatnonzero(columns)]


def _flagged(group: Group, flags: Callable[[SessionState], np.ndarray | None]
             ) -> tuple[np.ndarray, list[str]]:
    """Group columns flagged by any reporting session (``flags`` gives a bool per session
    variable, or None), and the tasks that flagged any."""
    flagged = np.zeros(len(group.names), bool)
    tasks = []
    for s in _reporting(group):
        mask = flags(s)
        if mask is not None and mask.any():
            flagged[s.columns[mask]] = True
            tasks.append(s.task)
    return flagged, tasks


def _causes(group: Group, columns: np.ndarray) -> str:
    """Agents' diagnoses of these columns, variables sharing a cause listed together."""
    by_explanation: dict[str, list[str]] = {}
    for column in np.flatnonzero(columns):
        cause = group.causes.get(int(column))
        if cause is not None:
            by_explanation.setdefault(cause.explanation, []).append(group.names[column])
    return " | ".join(f"{_listing(names)}: {explanation}"
                    for explanation, names in list(by_explanation.items())[:MAX_LISTED])


class Rule:
    name: ClassVar[str]

    @dataclass(frozen=True)
    class Params:
        enabled: bool = True

    def observe(self, session: SessionState, batch: StepBatch, params: Any) -> None:
        """Updates per-session history with a new batch (default: nothing to keep)."""

    def evaluate(self, group: Group, params: Any, now: float) -> list[Alert]:
        raise NotImplementedError


class GradientMissing(Rule):
    """A trainable variable got no gradient in the latest batch of some task or replica.
    Critical when a task had no gradient for any variable."""

    name = "GradientMissing"

    def evaluate(self, group: Group, params: Rule.Params, now: float) -> list[Alert]:
        missing, tasks = _flagged(group, lambda s: s.missing_in_last_batch)
        if not tasks:
            return []
        all_missing = any(s.missing_in_last_batch.all() for s in _reporting(group))
        names = _names(group, missing)
        causes = _causes(group, missing)
        return [_alert(
            self.name, "critical" if all_missing else "warning", group,
            f"{len(names)} of {len(group.names)} variables of {group.training_job} "
            f"({group.optimizer}) get no gradient",
            "These variables are not being trained." + (f" Why: {causes}" if causes else ""),
            names, tasks, causes=causes or "not diagnosed (gradwatch diagnoses "
            "GradientTape-based training; see docs/diagnosis.md)")]


class GradientNonFinite(Rule):
    """NaN or Inf in any gradient of the latest batch."""

    name = "GradientNonFinite"

    def evaluate(self, group: Group, params: Rule.Params, now: float) -> list[Alert]:
        bad, tasks = _flagged(group, lambda s: s.nonfinite_in_last_batch)
        if not tasks:
            return []
        names = _names(group, bad)
        return [_alert(self.name, "critical", group,
                       f"NaN or Inf in the gradients of {len(names)} variables of "
                       f"{group.training_job} ({group.optimizer})",
                       "Updates with these gradients corrupt the weights.", names, tasks)]


class GradientExploding(Rule):
    """A gradient norm (global, or a variable's) above ``max_norm``, or above
    ``median_factor`` x its median over the previous ``window_steps`` steps (once at
    least ``min_steps`` are known). Norms are maxima over replicas."""

    name = "GradientExploding"

    @dataclass(frozen=True)
    class Params:
        enabled: bool = True
        max_norm: float = 1e6
        median_factor: float = 100.0
        window_steps: int = 100
        min_steps: int = 10

    def observe(self, session: SessionState, batch: StepBatch, params: Params) -> None:
        norms = np.where(batch.present, batch.l2_norm, 0.0).astype(np.float64)  # [S, R, N]
        per_variable = norms.max(axis=1)  # [S, N]
        global_norm = np.sqrt(np.square(norms).sum(axis=2)).max(axis=1)  # [S]
        state = session.rule_state.setdefault(self.name, {
            "global": np.zeros(0), "variables": np.zeros((0, session.num_variables), np.float32)})
        history_g, history_v = state["global"], state["variables"]
        too_big_g = global_norm > params.max_norm
        too_big_v = (per_variable > params.max_norm).any(axis=0)
        if len(history_g) >= params.min_steps:
            too_big_g |= global_norm > params.median_factor * np.median(history_g)
            # The per-variable median over the window is the costly part: refreshed when a
            # quarter of the window is new, which a factor of 100 does not notice.
            if state.get("median_age", np.inf) >= max(1, params.window_steps // 4):
                state["median_v"], state["median_age"] = np.median(history_v, axis=0), 0
            median_v = state["median_v"]
            state["median_age"] += len(global_norm)
            too_big_v |= ((per_variable > params.median_factor * median_v) &
                          (median_v > 0)).any(axis=0)
        finite = np.isfinite(global_norm)
        state["global"] = np.concatenate([history_g, global_norm[finite]])[-params.window_steps:]
        state["variables"] = np.concatenate(
            [history_v, per_variable[finite].astype(np.float32)])[-params.window_steps:]
        state["global_exploded"] = bool((too_big_g & finite).any())
        state["variables_exploded"] = too_big_v & np.isfinite(per_variable).all(axis=0)
        state["latest_global"] = float(global_norm[-1])

    def evaluate(self, group: Group, params: Params, now: float) -> list[Alert]:
        exploded = np.zeros(len(group.names), bool)
        tasks, worst = [], 0.0
        for s in _reporting(group):
            state = s.rule_state.get(self.name)
            if state and (state["global_exploded"] or state["variables_exploded"].any()):
                exploded[s.columns[state["variables_exploded"]]] = True
                tasks.append(s.task)
                worst = max(worst, state["latest_global"])
        if not tasks:
            return []
        return [_alert(self.name, "warning", group,
                       f"Gradient norm of {group.training_job} ({group.optimizer}) exploded",
                       f"Latest global norm {worst:.4g}; limits: {params.max_norm:g} or "
                       f"{params.median_factor:g}x the median of the last "
                       f"{params.window_steps} steps.", _names(group, exploded), tasks)]


class GradientVanishing(Rule):
    """A variable's gradient norm at or below ``epsilon`` (default 1e-12: zero in
    practice) on every replica for ``steps`` consecutive steps. Absent gradients don't count
    (that is GradientMissing)."""

    name = "GradientVanishing"

    @dataclass(frozen=True)
    class Params:
        enabled: bool = True
        epsilon: float = 1e-12
        steps: int = 100

    def observe(self, session: SessionState, batch: StepBatch, params: Params) -> None:
        small = (batch.present & (batch.l2_norm <= params.epsilon)).all(axis=1)  # [S, N]
        streak = session.rule_state.get(self.name)
        if streak is None:
            streak = np.zeros(session.num_variables, np.int64)
        for step_small in small:  # a loop over steps (<= batch size), vectorized over variables
            streak = np.where(step_small, streak + 1, 0)
        session.rule_state[self.name] = streak

    def evaluate(self, group: Group, params: Params, now: float) -> list[Alert]:
        def long_streaks(s: SessionState) -> np.ndarray | None:
            streak = s.rule_state.get(self.name)
            return None if streak is None else streak >= params.steps

        vanished, tasks = _flagged(group, long_streaks)
        if not tasks:
            return []
        return [_alert(self.name, "warning", group,
                       f"Gradients of {int(vanished.sum())} variables of "
                       f"{group.training_job} ({group.optimizer}) vanished",
                       f"Norm <= {params.epsilon:g} for {params.steps} consecutive steps.",
                       _names(group, vanished), tasks)]


class ReplicaDivergence(Rule):
    """Replicas or workers of one job disagree at the same step: a gradient present on
    some and absent on others, finite on some and not on others, or global norms
    whose max/min ratio exceeds ``norm_ratio``. Compares the latest step of every
    task that has reached the group's newest step."""

    name = "ReplicaDivergence"

    @dataclass(frozen=True)
    class Params:
        enabled: bool = True
        norm_ratio: float = 10.0

    def evaluate(self, group: Group, params: Params, now: float) -> list[Alert]:
        sessions = _reporting(group)
        if not sessions:
            return []
        newest = max(s.last_step for s in sessions)
        peers = [s for s in sessions if s.last_step == newest]
        if sum(s.num_replicas for s in peers) < 2:
            return []
        n = len(group.names)
        present, nonfinite, norms, labels = [], [], [], []
        for s in peers:
            for r in range(s.num_replicas):
                row_present, row_bad = np.zeros(n, bool), np.zeros(n, bool)
                reported = np.zeros(n, bool)
                reported[s.columns] = True
                row_present[s.columns] = s.present[r]
                row_bad[s.columns] = s.nonfinite[r]
                present.append(np.where(reported, row_present, True))
                nonfinite.append(row_bad)
                norms.append(float(np.sqrt(np.square(
                    s.l2_norm[r][s.present[r]].astype(np.float64)).sum())))
                labels.append(f"{s.task} replica {r}")
        present, nonfinite, norms = np.array(present), np.array(nonfinite), np.array(norms)
        presence_differs = present.any(axis=0) & ~present.all(axis=0)
        finiteness_differs = nonfinite.any(axis=0) & ~nonfinite.all(axis=0)
        finite_norms = norms[np.isfinite(norms)]
        ratio = (finite_norms.max() / finite_norms.min()
                 if finite_norms.size >= 2 and finite_norms.min() > 0 else 1.0)
        reasons = []
        if presence_differs.any():
            reasons.append("gradient present on some replicas only")
        if finiteness_differs.any():
            reasons.append("NaN/Inf on some replicas only")
        if ratio > params.norm_ratio:
            reasons.append(f"global norms differ {ratio:.3g}x (limit {params.norm_ratio:g}x)")
        if not reasons:
            return []
        odd = np.flatnonzero(~present.all(axis=1) | nonfinite.any(axis=1))
        if ratio > params.norm_ratio:
            odd = np.union1d(odd, [int(np.nanargmax(norms)), int(np.nanargmin(norms))])
        return [_alert(self.name, "warning", group,
                       f"Replicas of {group.training_job} ({group.optimizer}) disagree at "
                       f"step {newest}", "; ".join(reasons).capitalize() + ".",
                       _names(group, presence_differs | finiteness_differs),
                       [labels[i] for i in odd])]


class WorkerSilent(Rule):
    """A registered task that has not closed its session sent nothing for ``seconds``."""

    name = "WorkerSilent"

    @dataclass(frozen=True)
    class Params:
        enabled: bool = True
        seconds: float = 60.0

    def evaluate(self, group: Group, params: Params, now: float) -> list[Alert]:
        silent = [s.task for s in group.sessions.values()
                  if not s.closed and now - (s.last_report_time or s.registered_at)
                  > params.seconds]
        if not silent:
            return []
        return [_alert(self.name, "warning", group,
                       f"{len(silent)} task(s) of {group.training_job} ({group.optimizer}) "
                       f"stopped reporting",
                       f"No report for more than {params.seconds:g} s: the process may be hung, "
                       "dead, or cut off from the collector.", [], sorted(silent))]


RULES: tuple[Rule, ...] = (GradientMissing(), GradientNonFinite(), GradientExploding(),
                           GradientVanishing(), ReplicaDivergence(), WorkerSilent())
RULE_NAMES = tuple(rule.name for rule in RULES)


@dataclass(frozen=True)
class RuleSettings:
    """Parameters of every rule, with per-job overrides (first matching glob wins)."""

    base: dict[str, Any] = field(default_factory=lambda: {r.name: r.Params() for r in RULES})
    jobs: tuple[tuple[str, dict[str, Any]], ...] = ()

    def for_job(self, training_job: str) -> dict[str, Any]:
        for pattern, overrides in self.jobs:
            if fnmatch.fnmatchcase(training_job, pattern):
                return {**self.base, **overrides}
        return self.base


@contextlib.contextmanager
def _contained(rule: Rule) -> Iterator[None]:
    """A failing rule is logged and skipped; ingest and the other rules go on."""
    try:
        yield
    except Exception:
        log.exception("rule %s failed", rule.name)


class RuleEngine:
    """Runs the rules after each batch (and on a timer, for silence and hysteresis).

    Every batch is observed at once. A group is evaluated after a batch unless it was
    evaluated less than ``min_interval_s`` ago; then it waits for `evaluate_pending`,
    which the server calls every ``min_interval_s``. So a job with many tasks costs one
    evaluation per interval, not one per task's batch.
    """

    def __init__(self, settings: RuleSettings, tracker: AlertTracker,
                 clock: Callable[[], float] = time.time, min_interval_s: float = 0.0,
                 runbook_url: str = RUNBOOK) -> None:
        self.settings = settings
        self.runbook_url = runbook_url
        self.tracker = tracker
        self.clock = clock
        self.min_interval_s = min_interval_s
        self._evaluated_at: dict[tuple[str, str], float] = {}
        self._pending: dict[tuple[str, str], Group] = {}

    def on_batch(self, session: SessionState, batch: StepBatch) -> None:
        group = session.group
        params = self.settings.for_job(group.training_job)
        if batch.steps.size:
            for rule in RULES:
                if params[rule.name].enabled:
                    with _contained(rule):
                        rule.observe(session, batch, params[rule.name])
        key = (group.training_job, group.optimizer)
        if self.clock() - self._evaluated_at.get(key, -np.inf) >= self.min_interval_s:
            self.evaluate(group)
        else:
            self._pending[key] = group

    def evaluate_pending(self) -> None:
        pending, self._pending = self._pending, {}
        for group in pending.values():
            self.evaluate(group)

    def evaluate(self, group: Group) -> None:
        now = self.clock()
        key = (group.training_job, group.optimizer)
        self._evaluated_at[key] = now
        self._pending.pop(key, None)
        params = self.settings.for_job(group.training_job)
        alerts: list[Alert] = []
        for rule in RULES:
            if params[rule.name].enabled:
                with _contained(rule):
                    alerts += rule.evaluate(group, params[rule.name], now)
        for session in group.sessions.values():
            session.rules_pending = False
        for alert in alerts:
            alert.annotations["runbook_url"] = f"{self.runbook_url}#{alert.name.lower()}"
        self.tracker.update((group.training_job, group.optimizer), alerts, now)

    def tick(self, groups: Iterable[Group]) -> None:
        """Periodic pass: silence is only visible on a clock, and pending
        resolutions complete on one."""
        groups = list(groups)
        for group in groups:
            self.evaluate(group)
        known = {(g.training_job, g.optimizer) for g in groups}
        self._evaluated_at = {k: t for k, t in self._evaluated_at.items() if k in known}
        self.tracker.expire(self.clock())

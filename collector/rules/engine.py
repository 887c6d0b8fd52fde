"""Runs the rules after each batch (and on a timer), and owns their per-session history.

Every batch is observed by every enabled rule at once. A group is evaluated after a
batch unless it was evaluated less than ``min_interval_s`` ago; then it waits for
`RuleEngine.evaluate_pending`, which the engine schedules (``call_later``) when the
first group starts waiting, so a job with many tasks costs one evaluation per interval,
not one per task's batch, and an idle collector runs no timer for it.
The active alerts go to `AlertTracker`, which owns firing, hysteresis and
resolution. Event-loop only.
"""

from __future__ import annotations

import fnmatch
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradwatch.collector.alerts import Alert, AlertTracker
from gradwatch.collector.links import dashboard_url
from gradwatch.collector.rules.base import Rule
from gradwatch.collector.rules.norms import GradientExploding, GradientVanishing
from gradwatch.collector.rules.presence import GradientMissing, GradientNonFinite
from gradwatch.collector.rules.replicas import ReplicaDivergence, WorkerSilent
from gradwatch.collector.state import Group, SessionState, StepBatch

log = logging.getLogger(__name__)

RULES: tuple[Rule, ...] = (GradientMissing(), GradientNonFinite(), GradientExploding(),
                           GradientVanishing(), ReplicaDivergence(), WorkerSilent())
RULE_NAMES = tuple(rule.name for rule in RULES)
#: Default runbook location (inside the repository); ``runbook_url`` in the collector's
#: settings points alerts at a page your on-call can open.
RUNBOOK = "docs/runbook.md"

GroupKey = tuple[str, str]  # (training_job, optimizer)


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


class _Contained:
    """A failing rule is logged and skipped; ingest and the other rules go on. (A class:
    a generator-based context manager cost more than some rules' work, per batch.)"""

    __slots__ = ("rule",)

    def __init__(self, rule: Rule) -> None:
        self.rule = rule

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, traceback) -> bool:
        if kind is None or not issubclass(kind, Exception):
            return False
        log.error("rule %s failed", self.rule.name, exc_info=(kind, error, traceback))
        return True


class RuleEngine:
    def __init__(self, settings: RuleSettings, tracker: AlertTracker,
                 clock: Callable[[], float] = time.time, min_interval_s: float = 0.0,
                 runbook_url: str = RUNBOOK, dashboard_base_url: str | None = None,
                 call_later: Callable[[float, Callable[[], None]], object] | None = None
                 ) -> None:
        """``call_later(delay_s, callback)`` (the event loop's) runs `evaluate_pending`
        once groups wait; without it the owner calls `evaluate_pending`."""
        self.settings = settings
        self.call_later = call_later
        self.runbook_url = runbook_url
        #: Grafana's root URL: alerts then link to their panel (``dashboard_url``).
        self.dashboard_base_url = dashboard_base_url
        self.tracker = tracker
        self.clock = clock
        self.min_interval_s = min_interval_s
        self._evaluated_at: dict[GroupKey, float] = {}
        self._pending: dict[GroupKey, Group] = {}
        self._pending_scheduled = False
        #: Rule history: group → session id → rule name → that rule's state.
        self._states: dict[GroupKey, dict[str, dict[str, Any]]] = {}

    @staticmethod
    def _key(group: Group) -> GroupKey:
        return (group.training_job, group.optimizer)

    def state(self, rule_name: str, session: SessionState) -> Any:
        """The history ``rule_name`` keeps for ``session`` (None if none yet)."""
        return self._states.get(self._key(session.group), {}).get(session.id, {}).get(
            rule_name)

    def on_batch(self, session: SessionState, batch: StepBatch) -> None:
        group = session.group
        params = self.settings.for_job(group.training_job)
        if batch.steps.size:
            states = self._states.setdefault(self._key(group), {}).setdefault(session.id, {})
            for rule in RULES:
                if params[rule.name].enabled:
                    with _Contained(rule):
                        if rule.name not in states:
                            states[rule.name] = rule.new_state(session)
                        if states[rule.name] is not None:
                            rule.observe(states[rule.name], session, batch, params[rule.name])
        key = self._key(group)
        since = self.clock() - self._evaluated_at.get(key, -np.inf)
        if since >= self.min_interval_s:
            self.evaluate(group)
            return
        self._pending[key] = group
        if self.call_later is not None and not self._pending_scheduled:
            self._pending_scheduled = True
            self.call_later(self.min_interval_s - since, self.evaluate_pending)

    def evaluate_pending(self) -> None:
        """Evaluates every group with batches not yet evaluated."""
        self._pending_scheduled = False
        pending, self._pending = self._pending, {}
        for group in pending.values():
            self.evaluate(group)

    def evaluate(self, group: Group) -> None:
        now = self.clock()
        key = self._key(group)
        self._evaluated_at[key] = now
        self._pending.pop(key, None)
        states = self._states.get(key, {})
        for gone in set(states) - set(group.sessions):  # expired or replaced sessions
            del states[gone]
        if not states:
            self._states.pop(key, None)
        params = self.settings.for_job(group.training_job)
        alerts: list[Alert] = []
        for rule in RULES:
            if params[rule.name].enabled:
                with _Contained(rule):
                    by_session = {sid: s[rule.name] for sid, s in states.items()
                                  if s.get(rule.name) is not None}
                    alerts += rule.evaluate(group, by_session, params[rule.name], now)
        for active in alerts:
            active.annotations["runbook_url"] = f"{self.runbook_url}#{active.name.lower()}"
            if self.dashboard_base_url:
                active.annotations["dashboard_url"] = dashboard_url(self.dashboard_base_url,
                                                                    active.labels)
        self.tracker.update(key, alerts, now)

    def tick(self, groups: Iterable[Group]) -> None:
        """Periodic pass: silence is only visible on a clock, and pending
        resolutions complete on one."""
        groups = list(groups)
        for group in groups:
            self.evaluate(group)
        known = {self._key(g) for g in groups}
        self._evaluated_at = {k: t for k, t in self._evaluated_at.items() if k in known}
        self.tracker.expire(self.clock())

"""What a rule is, and the helpers rules share to build their alerts.

A rule looks at one group (a training job x optimizer). It may keep typed
per-session history, created by `Rule.new_state` and owned by the engine, which
it updates from every batch (`Rule.observe`); `Rule.evaluate` returns the alerts
active now. Rules are vectorized over variables. Event-loop only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np

from gradwatch.collector.alerts import Alert
from gradwatch.collector.state import Group, SessionState, StepBatch

#: Longest list of variables or tasks written into one annotation.
MAX_LISTED = 10

State = TypeVar("State")


def above(default: float, bound: float) -> Any:
    """A threshold that must be greater than ``bound`` (checked when the config is read):
    ``steps: int = above(100, 0)``."""
    return field(default=default, metadata={"above": bound})


@dataclass(frozen=True)
class Params:
    """A rule's settings (YAML ``rules.NAME`` and ``jobs.PATTERN.NAME``); subclasses add
    their thresholds with documented defaults."""

    enabled: bool = True


class Rule(Generic[State]):
    """One alert. ``Params``: its settings; a rule with history overrides `new_state`."""

    name: ClassVar[str]
    Params: ClassVar[type[Params]] = Params

    def new_state(self, session: SessionState) -> State | None:
        """Per-session history, created at the session's first batch (None: none kept)."""
        return None

    def observe(self, state: State, session: SessionState, batch: StepBatch,
                params: Any) -> None:
        """Updates ``state`` (never None here) with a new batch of ``session``."""

    def evaluate(self, group: Group, states: Mapping[str, State], params: Any,
                 now: float) -> list[Alert]:
        """The alerts active now for ``group``; ``states`` by session id."""
        raise NotImplementedError


class SinceEvaluation:
    """Per-variable flags raised by any batch since the rule last looked (or by the
    latest batch, if none came since): evaluation is coalesced under load, so a bad
    batch followed at once by a good one must still alert."""

    def __init__(self, num_variables: int) -> None:
        self.flags = np.zeros(num_variables, bool)
        self._looked = False

    def raise_flags(self, flags: np.ndarray) -> None:
        self.flags = flags if self._looked else self.flags | flags
        self._looked = False

    def look(self) -> np.ndarray:
        self._looked = True
        return self.flags


def listing(items: list[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED])
    return shown + (f" (and {len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else "")


def alert(name: str, severity: str, group: Group, summary: str, detail: str,
          variables: list[str], tasks: list[str], **extra: str) -> Alert:
    return Alert(
        labels={"alertname": name, "severity": severity,
                "training_job": group.training_job, "optimizer": group.optimizer},
        annotations={
            "summary": summary,
            "description": f"{summary}. {detail}" + (
                f" Variables: {listing(variables)}." if variables else "") + (
                f" Tasks: {listing(tasks)}." if tasks else ""),
            "variables": listing(variables),
            "tasks": listing(tasks),
            **extra,
        },
    )


def reporting(group: Group) -> list[SessionState]:
    """Sessions that reported at least one step."""
    return [s for s in group.sessions.values() if s.steps_total]


def names(group: Group, columns: np.ndarray) -> list[str]:
    """Variable names of the group columns set in ``columns``."""
    return [group.names[i] for i in np.flatnonzero(columns)]


def flagged(group: Group, flags: Callable[[SessionState], np.ndarray | None]
            ) -> tuple[np.ndarray, list[str]]:
    """Group columns flagged by any reporting session (``flags`` gives a bool per session
    variable, or None), and the tasks that flagged any."""
    found = np.zeros(len(group.names), bool)
    tasks = []
    for s in reporting(group):
        mask = flags(s)
        if mask is not None and mask.any():
            found[s.columns[mask]] = True
            tasks.append(s.task)
    return found, tasks

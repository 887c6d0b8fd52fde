"""Alert rules, evaluated after every applied batch, vectorized over variables.

A rule reads a `Group` (one training job x optimizer) and returns the alerts
active now; `AlertTracker` turns that into notifications.
"""

from __future__ import annotations

import numpy as np

from gradwatch.collector.alerts import Alert
from gradwatch.collector.state import Group

#: Longest list of variables or tasks written into one annotation.
MAX_LISTED = 10
#: Runbook location inside the repository; prefix it with your docs host if you have one.
RUNBOOK = "docs/runbook.md"


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED])
    return shown + (f" (and {len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else "")


def gradient_missing(group: Group) -> list[Alert]:
    """GradientMissing: a trainable variable received no gradient in the latest batch
    of any task. Critical when a task had no gradient for any variable."""
    reporting = [s for s in group.sessions.values() if s.steps_total]
    if not reporting:
        return []
    missing = np.zeros(len(group.names), bool)
    tasks, all_missing = [], False
    for session in reporting:
        if session.missing_in_last_batch.any():
            missing[session.columns[session.missing_in_last_batch]] = True
            tasks.append(session.task)
            all_missing |= bool(session.missing_in_last_batch.all())
    if not missing.any():
        return []
    names = [group.names[i] for i in np.flatnonzero(missing)]
    total = len(group.names)
    summary = (f"{len(names)} of {total} variables of {group.training_job} "
               f"({group.optimizer}) get no gradient")
    return [Alert(
        labels={
            "alertname": "GradientMissing",
            "severity": "critical" if all_missing else "warning",
            "training_job": group.training_job,
            "optimizer": group.optimizer,
        },
        annotations={
            "summary": summary,
            "description": (f"{summary}: {_listing(names)}. Tasks affected: {_listing(tasks)}. "
                            "These variables are not being trained."),
            "variables": _listing(names),
            "tasks": _listing(tasks),
            "runbook_url": f"{RUNBOOK}#gradientmissing",
        },
    )]


RULES = (gradient_missing,)


def evaluate(group: Group) -> list[Alert]:
    return [alert for rule in RULES for alert in rule(group)]

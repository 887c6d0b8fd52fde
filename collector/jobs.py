"""What people look at: each training job summarised, and one job in detail.

Plain data (dicts and lists of JSON types), built from the collector's state on demand:
the web UI renders it as HTML, ``/api/v1/jobs`` and ``/api/v1/jobs/{training_job}``
serve it as JSON (docs/web.md documents the fields). Event loop only.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import numpy as np

from gradwatch.collector.alerts import AlertTracker, Notification
from gradwatch.collector.exporter import variable_aggregates
from gradwatch.collector.history import MISSING, NO_DATA
from gradwatch.collector.state import Group, Registry


def _jobs(registry: Registry) -> dict[str, list[Group]]:
    jobs: dict[str, list[Group]] = {}
    for group in registry.groups.values():
        jobs.setdefault(group.training_job, []).append(group)
    return jobs


def _alert(notification: Notification) -> dict:
    alert = notification.alert
    return {"alertname": alert.name, "severity": alert.labels.get("severity", ""),
            "optimizer": alert.labels.get("optimizer", ""), "status": notification.status,
            "starts_at": notification.starts_at, "ends_at": notification.ends_at,
            "annotations": dict(alert.annotations)}


def _alerts_of(tracker: AlertTracker, job: str) -> tuple[list[dict], list[dict]]:
    firing = [_alert(n) for n in tracker.firing() if n.alert.labels["training_job"] == job]
    resolved = [_alert(n) for n in reversed(tracker.resolved)
                if n.alert.labels["training_job"] == job]
    return firing, resolved


def summary(job: str, groups: Iterable[Group], tracker: AlertTracker,
            now: float | None = None) -> dict:
    """One row of the jobs table."""
    now = time.time() if now is None else now
    groups = list(groups)
    sessions = [s for g in groups for s in g.sessions.values()]
    tasks = {(s.task_type, s.task_index) for s in sessions}
    replicas = [s.num_replicas for s in sessions]
    reported = [s.last_report_time for s in sessions if s.last_report_time]
    without: set[str] = set()  # distinct names, over the job's optimizers
    for group in groups:
        agg = variable_aggregates(group)
        without.update(group.names[i] for i in np.flatnonzero(agg["reported"] & ~agg["present"]))
    firing, _ = _alerts_of(tracker, job)
    return {
        "training_job": job,
        "tasks": len(tasks),
        "replicas": max(replicas, default=0),  # per task (the most any task has)
        "optimizers": sorted(g.optimizer for g in groups),
        "last_step": max((s.last_step for s in sessions), default=-1),
        "steps_per_second": max((s.rate(now) for s in sessions if not s.closed), default=0.0),
        "last_report_age_seconds": now - max(reported) if reported else None,
        "variables": len({name for g in groups for name in g.names}),
        "variables_without_gradient": len(without),
        # Per optimizer the most any task counted (a step non-finite on every rank is
        # one step, not one per rank), summed over the optimizers.
        "nonfinite_steps": sum(max((s.nonfinite_steps_total for s in g.sessions.values()),
                                   default=0) for g in groups),
        "firing_alerts": sorted({a["alertname"] for a in firing}),
        "finished": bool(sessions) and all(s.closed for s in sessions),
    }


def summaries(registry: Registry, tracker: AlertTracker) -> list[dict]:
    """Every job, broken ones first (firing alerts, then missing or non-finite gradients),
    then by name."""
    now = time.time()
    rows = [summary(job, groups, tracker, now) for job, groups in _jobs(registry).items()]
    return sorted(rows, key=lambda r: (not r["firing_alerts"],
                                       not (r["variables_without_gradient"]
                                            or r["nonfinite_steps"]), r["training_job"]))


def _number(value: float) -> float | str:
    """JSON has no NaN or Infinity: those are said as "NaN", "Inf", "-Inf"."""
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "Inf" if value > 0 else "-Inf"
    return value


def _series(steps: np.ndarray, values: np.ndarray) -> list[list[float | str]]:
    """``[step, value]`` pairs; a step without report (`NO_REPORT`) is left out, a NaN or
    infinite value reads "NaN" or "Inf"."""
    return [[int(s), _number(v)] for s, v in zip(steps.tolist(), values.tolist(), strict=True)
            if not v < 0]


def detail(registry: Registry, tracker: AlertTracker, job: str) -> dict | None:
    """One job: alerts, causes, and per optimizer its variables, recent steps and global
    norms. None if the collector does not know the job."""
    groups = _jobs(registry).get(job)
    if not groups:
        return None
    firing, resolved = _alerts_of(tracker, job)
    optimizers = []
    for group in sorted(groups, key=lambda g: g.optimizer):
        agg = variable_aggregates(group)
        steps, cells, global_norms = group.history.window()
        missing_now = agg["reported"] & ~agg["present"]
        causes: dict[str, dict] = {}
        for column, cause in group.causes.items():
            if column < len(missing_now) and missing_now[column]:
                entry = causes.setdefault(cause.explanation, {
                    "cause": cause.cause, "op": cause.op_name, "op_type": cause.op_type,
                    "source": cause.source, "explanation": cause.explanation,
                    "variables": []})
                entry["variables"].append(group.names[column])
        # No norm where none was reported, or no replica had a gradient (not a norm of 0).
        normed = agg["reported"] & (agg["present"] | (agg["norm"] != 0))
        variables = [{
            "name": name, "norm": _number(float(agg["norm"][i])) if normed[i] else None,
            "present": bool(agg["present"][i]) if agg["reported"][i] else None,
            "nan_values": float(agg["nan"][i]), "inf_values": float(agg["inf"][i]),
            "missing_steps": float(agg["missing_steps"][i]),
            "cause": group.causes[i].cause if i in group.causes and missing_now[i] else "",
        } for i, name in enumerate(group.names)]
        tasks = {s.id: s for s in group.sessions.values()}
        optimizers.append({
            "optimizer": group.optimizer,
            "sharded": group.sharded,
            "variables": variables,
            "causes": list(causes.values()),
            "steps": steps.tolist(),
            "missing_cells": int((cells == MISSING).sum()),
            "nonfinite_cells": int(np.isnan(cells).sum()),
            "reported_cells": int((cells != NO_DATA).sum()),
            "global_norm": [{"task": tasks[sid].task, "replica": r,
                             "points": _series(steps, norms[:, r])}
                            for sid, norms in sorted(global_norms.items(),
                                                     key=lambda kv: tasks[kv[0]].task
                                                     if kv[0] in tasks else "")
                            if sid in tasks for r in range(norms.shape[1])],
        })
    return {**summary(job, groups, tracker), "alerts": {"firing": firing, "resolved": resolved},
            "groups": optimizers}

"""Prometheus exposition of the collector state, built at scrape time.

`Exporter` keeps no metric objects between scrapes: each scrape walks the
columnar state once and formats whole columns (`gradwatch.collector.exposition`).
Every metric is declared once below (`Metric`). Label contract (docs/design.md):
``training_job``, ``task_type``, ``task_index``, ``replica``, ``variable``,
``optimizer`` — never ``job`` or ``instance``.
Per-task and per-replica series carry job-level aggregates only; per-variable
series are aggregated over tasks and replicas and capped per group, with the
rest folded into ``variable="__other__"``; which variables keep a series of their own
is chosen by what matters (`kept_columns`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from gradwatch.collector.alerts import Alert
from gradwatch.collector.exposition import Family, escape, labels, render
from gradwatch.collector.state import Group, Registry
from gradwatch.collector.telemetry import Telemetry

TASK_LABELS = ["training_job", "task_type", "task_index", "optimizer"]
REPLICA_LABELS = [*TASK_LABELS, "replica"]
VARIABLE_LABELS = ["training_job", "optimizer", "variable"]
ALERT_LABELS = ["alertname", "severity", "training_job", "optimizer"]
INFO_LABELS = ["training_job", "task_type", "task_index", "hostname", "pid", "pod"]
OTHER_VARIABLES = "__other__"


def variable_aggregates(group: Group) -> dict[str, np.ndarray]:
    """Per-column aggregates over the group's sessions (columns nobody reports are dropped):
    a variable's norm is the max over tasks and replicas, or, for a sharded group, the
    norm of its shards together."""
    n = len(group.names)
    agg = {
        "reported": np.zeros(n, bool),
        "norm": np.zeros(n, np.float64),
        "present": np.ones(n, bool),
        "missing_steps": np.zeros(n, np.float64),
        "nan": np.zeros(n, np.float64),
        "inf": np.zeros(n, np.float64),
    }
    for s in group.sessions.values():
        if not s.steps_total:
            continue
        c = s.columns
        agg["reported"][c] = True
        if group.sharded:  # shards of one variable: sqrt(sum of squares), summed here
            agg["norm"][c] += np.square(s.l2_norm.astype(np.float64)).sum(axis=0)
        else:
            agg["norm"][c] = np.maximum(agg["norm"][c], s.l2_norm.max(axis=0))
        agg["present"][c] &= s.present.all(axis=0)
        agg["missing_steps"][c] += s.missing_steps_total
        agg["nan"][c] += s.nan_total
        agg["inf"][c] += s.inf_total
    if group.sharded:
        agg["norm"] = np.sqrt(agg["norm"])
    return agg


@functools.lru_cache(maxsize=64)
def _spread(count: int) -> np.ndarray:
    """Positions ``0..count-1`` coarse to fine: both ends, then the middle, then the
    quarters, ... (a van der Corput sequence): any prefix covers the whole range about
    evenly, and a prefix one shorter drops one position, so series do not churn when
    the cap's room shrinks. Cached: it depends on ``count`` only."""
    order = list(dict.fromkeys([0, max(count - 1, 0)]))[:count]
    seen = set(order)
    level = 1
    while len(order) < count:
        for odd in range(1, 2 ** level, 2):
            position = int(odd * (count - 1) / 2 ** level + 0.5)
            if position not in seen:
                seen.add(position)
                order.append(position)
        level += 1
    return np.array(order, np.int64)


def kept_columns(agg: dict[str, np.ndarray], keep: int) -> tuple[np.ndarray, np.ndarray]:
    """The reported columns that keep a series of their own under a cap of ``keep``, and
    those folded into `OTHER_VARIABLES`, both in model (registration) order. Never
    folded first: every variable that missed a gradient or had NaN/Inf since its task
    registered (a set that only grows, so series do not churn); the room left goes to
    healthy variables spread over the model from its first to its last (`_spread`), so
    the heat map covers every depth."""
    reported = np.flatnonzero(agg["reported"])
    if reported.size <= keep:
        return reported, reported[:0]
    bad = ((agg["missing_steps"] > 0) | (agg["nan"] > 0) | (agg["inf"] > 0)
           | ~agg["present"])[reported]
    urgent, healthy = reported[bad], reported[~bad]
    chosen = urgent[:keep]
    room = keep - chosen.size
    if room > 0:
        chosen = np.concatenate([chosen, healthy[_spread(healthy.size)[:room]]])
    kept = np.sort(chosen)
    return kept, np.setdiff1d(reported, kept, assume_unique=True)


def _fold(values: np.ndarray, kept: np.ndarray, folded: np.ndarray,
          how: Callable[[np.ndarray], float]) -> list[float]:
    head = values[kept].tolist()
    return [*head, float(how(values[folded]))] if folded.size else head


@dataclass(frozen=True)
class Metric:
    """A metric family as exported: name without suffix, kind (``counter``, ``gauge``,
    ``info``) and help. Documented in docs/metrics.md (a test checks)."""

    name: str
    kind: str
    help: str

    @property
    def sample_name(self) -> str:
        return self.name + {"counter": "_total", "info": "_info"}.get(self.kind, "")

    def family(self) -> Family:
        return Family(self.name, self.kind, self.help)


# -- per task and replica ------------------------------------------------------------------
STEPS = Metric("gradwatch_steps", "counter", "Training steps reported.")
NONFINITE_STEPS = Metric(
    "gradwatch_nonfinite_steps", "counter", "Steps with a NaN or Inf in any gradient "
    "(skipped steps of loss-scale optimizers not included).")
SKIPPED_STEPS = Metric(
    "gradwatch_skipped_steps", "counter", "Steps a loss-scale optimizer skipped (NaN/Inf "
    "gradients from loss-scale overflow).")
DROPPED_STEPS = Metric("gradwatch_dropped_steps", "counter",
                       "Steps the agent recorded but could not deliver.")
LAST_STEP = Metric("gradwatch_last_step", "gauge", "Latest reported step.")
LAST_REPORT = Metric("gradwatch_last_report_timestamp_seconds", "gauge",
                     "Unix time of the latest report from a task still running.")
VARIABLES = Metric("gradwatch_variables", "gauge", "Trainable variables the optimizer updates.")
WITHOUT_GRADIENT = Metric("gradwatch_variables_without_gradient", "gauge",
                          "Variables with no gradient at the latest step.")
GLOBAL_NORM = Metric("gradwatch_global_gradient_norm", "gauge",
                     "L2 norm of all gradients together at the latest step.")
TASK_INFO = Metric("gradwatch_task", "info",
                   "Where a task runs, as its agent registered: hostname, pid, and pod (the "
                   "hostname, which is the pod name in Kubernetes or POD_NAME when set).")
# -- per variable ----------------------------------------------------------------------------
NORM = Metric("gradwatch_gradient_norm", "gauge",
              "L2 norm of the variable's gradient at the latest step (max over tasks and "
              "replicas).")
PRESENT = Metric("gradwatch_gradient_present", "gauge",
                 "1 if every task and replica had a gradient for the variable at its latest "
                 "step.")
MISSING_STEPS = Metric("gradwatch_gradient_missing_steps", "counter",
                       "Task-replica steps in which the variable had no gradient.")
NAN_VALUES = Metric("gradwatch_gradient_nan_values", "counter",
                    "NaN elements seen in the variable's gradients.")
INF_VALUES = Metric("gradwatch_gradient_inf_values", "counter",
                    "Inf elements seen in the variable's gradients.")
FOLDED = Metric("gradwatch_variable_series_folded", "gauge",
                "Variables beyond the per-job series cap, folded into "
                f'variable="{OTHER_VARIABLES}".')
POSITIONS = Metric("gradwatch_variable", "info",
                   "A variable's position in the model (registration order, input to "
                   'output), zero-padded in label "position" so that series sort by depth.')
CAUSES = Metric("gradwatch_gradient_missing_cause", "info",
                "Why a variable without gradient gets none, as diagnosed by the agent: cause, "
                "and the op and source line that break the path to the loss.")
# -- the collector itself --------------------------------------------------------------------
SESSIONS = Metric("gradwatch_collector_sessions", "gauge", "Registered sessions.")
TRAINING_JOBS = Metric("gradwatch_collector_training_jobs", "gauge", "Known training jobs.")
REGISTRATIONS = Metric("gradwatch_collector_registrations", "counter", "Sessions registered.")
BATCHES = Metric("gradwatch_collector_batches", "counter", "Report batches applied.")
DUPLICATE_BATCHES = Metric("gradwatch_collector_duplicate_batches", "counter",
                           "Report batches ignored as already applied.")
STEP_REPORTS = Metric("gradwatch_collector_step_reports", "counter", "Step reports applied.")
VARIABLE_STATISTICS = Metric("gradwatch_collector_variable_statistics", "counter",
                             "Per-variable statistics applied.")
REJECTED = Metric("gradwatch_collector_rejected_messages", "counter",
                  "Messages rejected, by gRPC status code and reason.")
ALERTS_ACTIVE = Metric("gradwatch_alerts_active", "gauge",
                       "Alerts currently firing, by name, severity, job and optimizer.")
NOTIFICATIONS = Metric("gradwatch_collector_notifications", "counter",
                       "Alert notifications by sink and outcome.")


class Exporter:
    """Renders `Registry` and `Telemetry` as metric families on every scrape
    (event-loop thread, like all state access). Each section declares the metrics it
    builds, so a filtered scrape (``?name[]=``) builds only the sections it needs."""

    def __init__(self, registry: Registry, telemetry: Telemetry,
                 active_alerts: Callable[[], list[Alert]],
                 notification_outcomes: Callable[[], dict[tuple[str, str], int]],
                 max_variable_series: int = 500) -> None:
        self.registry = registry
        self.telemetry = telemetry
        self.active_alerts = active_alerts
        self.notification_outcomes = notification_outcomes
        self.max_variable_series = max_variable_series
        self.sections: tuple[tuple[tuple[Metric, ...], Callable[[], list[Family]]], ...] = (
            ((STEPS, NONFINITE_STEPS, SKIPPED_STEPS, DROPPED_STEPS, LAST_STEP, LAST_REPORT,
              VARIABLES, WITHOUT_GRADIENT, GLOBAL_NORM, TASK_INFO), self._task_metrics),
            ((NORM, PRESENT, MISSING_STEPS, NAN_VALUES, INF_VALUES, FOLDED, POSITIONS, CAUSES),
             self._variable_metrics),
            ((SESSIONS, TRAINING_JOBS, REGISTRATIONS, BATCHES, DUPLICATE_BATCHES, STEP_REPORTS,
              VARIABLE_STATISTICS, REJECTED, ALERTS_ACTIVE, NOTIFICATIONS),
             self._collector_metrics),
        )

    @property
    def metrics(self) -> list[Metric]:
        """Every metric this exporter can export."""
        return [metric for metrics, _ in self.sections for metric in metrics]

    def families(self, names: set[str] | None = None) -> list[Family]:
        """All families, or those whose sample name is in ``names``."""
        families = []
        for metrics, build in self.sections:
            if names is None or names & {m.sample_name for m in metrics}:
                families += build()
        return [f for f in families if names is None or f.sample_name in names]

    def _task_metrics(self) -> list[Family]:
        steps, nonfinite, skipped, dropped = (m.family() for m in (
            STEPS, NONFINITE_STEPS, SKIPPED_STEPS, DROPPED_STEPS))
        last_step, last_report, variables, without, global_norm = (m.family() for m in (
            LAST_STEP, LAST_REPORT, VARIABLES, WITHOUT_GRADIENT, GLOBAL_NORM))
        hosts: dict[tuple[str, str, int], tuple[float, str, int]] = {}
        for group in self.registry.groups.values():
            for s in group.sessions.values():
                task = [group.training_job, s.task_type, s.task_index, group.optimizer]
                task_labels = labels(TASK_LABELS, task)
                where = (group.training_job, s.task_type, s.task_index)
                if where not in hosts or hosts[where][0] < s.registered_at:
                    hosts[where] = (s.registered_at, s.hostname, s.pid)
                steps.add(task_labels, s.steps_total)
                nonfinite.add(task_labels, s.nonfinite_steps_total)
                skipped.add(task_labels, s.skipped_steps_total)
                dropped.add(task_labels, s.dropped_steps)
                variables.add(task_labels, s.num_variables)
                if not s.closed:  # a finished task is not "not reporting"
                    # (its registration, until a batch came: one hung before its first
                    # step ages on dashboards as WorkerSilent sees it)
                    last_report.add(task_labels, s.last_report_time or s.registered_at)
                if not s.steps_total:
                    continue
                last_step.add(task_labels, s.last_step)
                replicas = [labels(REPLICA_LABELS, [*task, r]) for r in range(s.num_replicas)]
                without.add_column(replicas, (~s.present).sum(axis=1))
                global_norm.add_column(replicas, s.global_norm)
        info = TASK_INFO.family()
        for (job, task_type, task_index), (_, hostname, pid) in sorted(hosts.items()):
            info.add(labels(INFO_LABELS, [job, task_type, task_index, hostname, pid, hostname]),
                     1)
        return [steps, nonfinite, skipped, dropped, last_step, last_report, variables, without,
                global_norm, info]

    def _variable_metrics(self) -> list[Family]:
        norm, present, missing, nan, inf, folded, positions, causes = (m.family() for m in (
            NORM, PRESENT, MISSING_STEPS, NAN_VALUES, INF_VALUES, FOLDED, POSITIONS, CAUSES))
        for group in self.registry.groups.values():
            agg = variable_aggregates(group)
            kept, rest = kept_columns(agg, self.max_variable_series)
            if kept.size + rest.size == 0:
                continue
            # Sorted label names, like every series: optimizer, training_job, variable.
            prefix = labels(VARIABLE_LABELS[:2], [group.training_job, group.optimizer])
            names = [group.names[i] for i in kept.tolist()]
            series = [f'{prefix},variable="{escape(name)}"' for name in names]
            # Sorted label names: optimizer, position, training_job, variable.
            optimizer = f'optimizer="{escape(group.optimizer)}"'
            job = f'training_job="{escape(group.training_job)}"'
            positions.add_column([
                f'{optimizer},position="{column:06d}",{job},variable="{escape(name)}"'
                for column, name in zip(kept.tolist(), names, strict=True)], np.ones(kept.size))
            if rest.size:
                series.append(f'{prefix},variable="{OTHER_VARIABLES}"')
            folded.add(prefix, rest.size)
            norm.add_column(series, _fold(agg["norm"], kept, rest, np.max))
            present.add_column(series, _fold(agg["present"].astype(np.float64), kept, rest,
                                             np.min))
            missing.add_column(series, _fold(agg["missing_steps"], kept, rest, np.sum))
            nan.add_column(series, _fold(agg["nan"], kept, rest, np.sum))
            inf.add_column(series, _fold(agg["inf"], kept, rest, np.sum))
            absent = [c for c in group.causes if c < agg["present"].size
                      and agg["reported"][c] and not agg["present"][c]]
            for column in absent[:self.max_variable_series]:
                cause = group.causes[column]
                causes.add(labels([*VARIABLE_LABELS, "cause", "op_type", "op", "source"], [
                    group.training_job, group.optimizer, group.names[column], cause.cause,
                    cause.op_type, cause.op_name, cause.source]), 1)
        return [norm, present, missing, nan, inf, folded, positions, causes]

    def _collector_metrics(self) -> list[Family]:
        t = self.telemetry
        families = []
        for metric, value in (
            (SESSIONS, len(self.registry.sessions)),
            (TRAINING_JOBS, len(self.registry.jobs())),
            (REGISTRATIONS, t.registrations),
            (BATCHES, t.batches),
            (DUPLICATE_BATCHES, t.duplicate_batches),
            (STEP_REPORTS, t.step_reports),
            (VARIABLE_STATISTICS, t.variable_statistics),
        ):
            family = metric.family()
            family.add("", value)
            families.append(family)
        rejected = REJECTED.family()
        for (code, reason), count in sorted(t.rejected.items()):
            rejected.add(labels(["code", "reason"], [code, reason]), count)
        alerts = ALERTS_ACTIVE.family()
        counts: dict[tuple[str, ...], int] = {}
        for alert in self.active_alerts():
            key = tuple(alert.labels.get(name, "") for name in ALERT_LABELS)
            counts[key] = counts.get(key, 0) + 1
        for key, count in sorted(counts.items()):
            alerts.add(labels(ALERT_LABELS, key), count)
        notifications = NOTIFICATIONS.family()
        for (sink, outcome), count in sorted(self.notification_outcomes().items()):
            notifications.add(labels(["sink", "outcome"], [sink, outcome]), count)
        return [*families, rejected, alerts, notifications]


def render_metrics(exporter: Exporter, names: Iterable[str] = ()) -> bytes:
    """The ``/metrics`` body (Prometheus text format 0.0.4) for ``exporter``; only the
    samples named in ``names`` if any (``/metrics?name[]=...``, as client_python does)."""
    return render(exporter.families(set(names) or None))

"""Prometheus exposition of the collector state, built at scrape time.

`StateCollector` is a custom ``prometheus_client`` collector: no metric
objects live between scrapes, each scrape walks the columnar state once.
Label contract (DESIGN.md): ``training_job``, ``task_type``, ``task_index``,
``replica``, ``variable``, ``optimizer`` — never ``job`` or ``instance``.
Per-task and per-replica series carry job-level aggregates only; per-variable
series are aggregated over tasks and replicas and capped per group, with the
rest folded into ``variable="__other__"``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from gradwatch.collector.alerts import Alert
from gradwatch.collector.state import Group, Registry
from gradwatch.collector.telemetry import Telemetry

TASK_LABELS = ["training_job", "task_type", "task_index", "optimizer"]
REPLICA_LABELS = [*TASK_LABELS, "replica"]
VARIABLE_LABELS = ["training_job", "optimizer", "variable"]
OTHER_VARIABLES = "__other__"


def _variable_aggregates(group: Group) -> dict[str, np.ndarray]:
    """Per-column aggregates over the group's sessions (columns nobody reports are dropped)."""
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
        agg["norm"][c] = np.maximum(agg["norm"][c], s.l2_norm.max(axis=0))
        agg["present"][c] &= s.present.all(axis=0)
        agg["missing_steps"][c] += s.missing_steps_total
        agg["nan"][c] += s.nan_total
        agg["inf"][c] += s.inf_total
    return agg


def _fold(values: np.ndarray, keep: int, how: Callable[[np.ndarray], float]) -> list[float]:
    head = values[:keep].tolist()
    return [*head, float(how(values[keep:]))] if values.size > keep else head


class StateCollector(Collector):
    """Renders `Registry` and `Telemetry` as metric families on every scrape."""

    def __init__(self, registry: Registry, telemetry: Telemetry,
                 active_alerts: Callable[[], list[Alert]],
                 notification_outcomes: Callable[[], dict[tuple[str, str], int]],
                 max_variable_series: int = 500) -> None:
        self.registry = registry
        self.telemetry = telemetry
        self.active_alerts = active_alerts
        self.notification_outcomes = notification_outcomes
        self.max_variable_series = max_variable_series

    def collect(self) -> Iterator[Metric]:
        yield from self._task_metrics()
        yield from self._variable_metrics()
        yield from self._collector_metrics()

    def _task_metrics(self) -> Iterator[Metric]:
        steps = CounterMetricFamily("gradwatch_steps", "Training steps reported.",
                                    labels=TASK_LABELS)
        nonfinite = CounterMetricFamily(
            "gradwatch_nonfinite_steps", "Steps with a NaN or Inf in any gradient (skipped "
            "steps of loss-scale optimizers not included).",
            labels=TASK_LABELS)
        skipped = CounterMetricFamily(
            "gradwatch_skipped_steps", "Steps a loss-scale optimizer skipped (NaN/Inf "
            "gradients from loss-scale overflow).", labels=TASK_LABELS)
        dropped = CounterMetricFamily(
            "gradwatch_dropped_steps", "Steps the agent recorded but could not deliver.",
            labels=TASK_LABELS)
        last_step = GaugeMetricFamily("gradwatch_last_step", "Latest reported step.",
                                      labels=TASK_LABELS)
        last_report = GaugeMetricFamily(
            "gradwatch_last_report_timestamp_seconds",
            "Unix time of the latest report from a task still running.", labels=TASK_LABELS)
        variables = GaugeMetricFamily("gradwatch_variables",
                                      "Trainable variables the optimizer updates.",
                                      labels=TASK_LABELS)
        without = GaugeMetricFamily(
            "gradwatch_variables_without_gradient",
            "Variables with no gradient at the latest step.", labels=REPLICA_LABELS)
        global_norm = GaugeMetricFamily(
            "gradwatch_global_gradient_norm",
            "L2 norm of all gradients together at the latest step.", labels=REPLICA_LABELS)
        for group in self.registry.groups.values():
            for s in group.sessions.values():
                task = [group.training_job, s.task_type, str(s.task_index), group.optimizer]
                steps.add_metric(task, s.steps_total)
                nonfinite.add_metric(task, s.nonfinite_steps_total)
                skipped.add_metric(task, s.skipped_steps_total)
                dropped.add_metric(task, s.dropped_steps)
                variables.add_metric(task, s.num_variables)
                if not s.steps_total:
                    continue
                last_step.add_metric(task, s.last_step)
                if not s.closed:  # a finished task is not "not reporting"
                    last_report.add_metric(task, s.last_report_time)
                missing = (~s.present).sum(axis=1)
                norms = np.sqrt(np.square(s.l2_norm.astype(np.float64)).sum(axis=1))
                for replica in range(s.num_replicas):
                    labels = [*task, str(replica)]
                    without.add_metric(labels, int(missing[replica]))
                    global_norm.add_metric(labels, float(norms[replica]))
        yield from (steps, nonfinite, skipped, dropped, last_step, last_report, variables, without,
                    global_norm)

    def _variable_metrics(self) -> Iterator[Metric]:
        norm = GaugeMetricFamily(
            "gradwatch_gradient_norm",
            "L2 norm of the variable's gradient at the latest step (max over tasks and "
            "replicas).", labels=VARIABLE_LABELS)
        present = GaugeMetricFamily(
            "gradwatch_gradient_present",
            "1 if every task and replica had a gradient for the variable at its latest step.",
            labels=VARIABLE_LABELS)
        missing = CounterMetricFamily(
            "gradwatch_gradient_missing_steps",
            "Task-replica steps in which the variable had no gradient.", labels=VARIABLE_LABELS)
        nan = CounterMetricFamily("gradwatch_gradient_nan_values",
                                  "NaN elements seen in the variable's gradients.",
                                  labels=VARIABLE_LABELS)
        inf = CounterMetricFamily("gradwatch_gradient_inf_values",
                                  "Inf elements seen in the variable's gradients.",
                                  labels=VARIABLE_LABELS)
        folded = GaugeMetricFamily(
            "gradwatch_variable_series_folded",
            f"Variables beyond the per-job series cap, folded into variable=\"{OTHER_VARIABLES}\".",
            labels=["training_job", "optimizer"])
        causes = InfoMetricFamily(
            "gradwatch_gradient_missing_cause",
            "Why a variable without gradient gets none, as diagnosed by the agent: cause, and "
            "the op and source line that break the path to the loss.", labels=VARIABLE_LABELS)
        keep = self.max_variable_series
        for group in self.registry.groups.values():
            agg = _variable_aggregates(group)
            reported = np.flatnonzero(agg["reported"])
            if reported.size == 0:
                continue
            names = [group.names[i] for i in reported[:keep]]
            if reported.size > keep:
                names.append(OTHER_VARIABLES)
            folded.add_metric([group.training_job, group.optimizer], max(0, reported.size - keep))
            columns = (
                (norm, _fold(agg["norm"][reported], keep, np.max)),
                (present, _fold(agg["present"][reported].astype(np.float64), keep, np.min)),
                (missing, _fold(agg["missing_steps"][reported], keep, np.sum)),
                (nan, _fold(agg["nan"][reported], keep, np.sum)),
                (inf, _fold(agg["inf"][reported], keep, np.sum)),
            )
            prefix = [group.training_job, group.optimizer]
            for family, values in columns:
                for name, value in zip(names, values, strict=True):
                    family.add_metric([*prefix, name], value)
            absent = [c for c in group.causes if c < agg["present"].size
                      and agg["reported"][c] and not agg["present"][c]]
            for column in absent[:keep]:
                cause = group.causes[column]
                causes.add_metric([*prefix, group.names[column]], {
                    "cause": cause.cause, "op_type": cause.op_type, "op": cause.op_name,
                    "source": cause.source})
        yield from (norm, present, missing, nan, inf, folded, causes)

    def _collector_metrics(self) -> Iterator[Metric]:
        t = self.telemetry
        yield GaugeMetricFamily("gradwatch_collector_sessions", "Registered sessions.",
                                value=len(self.registry.sessions))
        yield GaugeMetricFamily("gradwatch_collector_training_jobs", "Known training jobs.",
                                value=len(self.registry.jobs()))
        for name, doc, value in (
            ("registrations", "Sessions registered.", t.registrations),
            ("batches", "Report batches applied.", t.batches),
            ("duplicate_batches", "Report batches ignored as already applied.",
             t.duplicate_batches),
            ("step_reports", "Step reports applied.", t.step_reports),
            ("variable_statistics", "Per-variable statistics applied.", t.variable_statistics),
        ):
            yield CounterMetricFamily(f"gradwatch_collector_{name}", doc, value=value)
        rejected = CounterMetricFamily("gradwatch_collector_rejected_messages",
                                       "Messages rejected, by gRPC status code.",
                                       labels=["code"])
        for code, count in sorted(t.rejected.items()):
            rejected.add_metric([code], count)
        yield rejected
        alerts = GaugeMetricFamily("gradwatch_alerts_active", "Alerts currently firing.",
                                   labels=["alertname", "severity"])
        counts: dict[tuple[str, str], int] = {}
        for alert in self.active_alerts():
            key = (alert.name, alert.labels.get("severity", ""))
            counts[key] = counts.get(key, 0) + 1
        for key, count in sorted(counts.items()):
            alerts.add_metric(list(key), count)
        yield alerts
        notifications = CounterMetricFamily(
            "gradwatch_collector_notifications", "Alert notifications by sink and outcome.",
            labels=["sink", "outcome"])
        for (sink, outcome), count in sorted(self.notification_outcomes().items()):
            notifications.add_metric([sink, outcome], count)
        yield notifications

"""GradientMissing and the alert lifecycle, on collector state built by hand."""

import numpy as np

from gradwatch.collector import rules
from gradwatch.collector.alerts import AlertTracker
from gradwatch.collector.ingest import Limits, decode_batch
from gradwatch.collector.state import Registry

import wire


def apply(session, sequence, *present_per_step):
    steps = [wire.step(i, p) for i, p in enumerate(present_per_step)]
    batch = wire.batch(session.id, sequence, *steps)
    session.apply(sequence, decode_batch(batch, session.num_replicas, session.num_variables,
                                         Limits()))


def register(registry, task_index=0, replicas=1, names=("a", "b", "c")):
    return registry.register("job", "adam", "worker", task_index, replicas, list(names))


def test_healthy_group_raises_nothing():
    registry = Registry()
    session = register(registry)
    apply(session, 1, [1, 1, 1], [1, 1, 1])
    assert rules.gradient_missing(session.group) == []


def test_missing_variables_are_named_with_their_tasks():
    registry = Registry()
    w0, w1 = register(registry, 0), register(registry, 1)
    apply(w0, 1, [1, 0, 1])
    apply(w1, 1, [1, 1, 1])
    (alert,) = rules.gradient_missing(w0.group)
    assert alert.labels == {"alertname": "GradientMissing", "severity": "warning",
                            "training_job": "job", "optimizer": "adam"}
    assert alert.annotations["variables"] == "b"
    assert alert.annotations["tasks"] == "worker/0"
    assert "1 of 3 variables" in alert.annotations["summary"]


def test_one_replica_missing_counts():
    registry = Registry()
    session = register(registry, replicas=2)
    apply(session, 1, [[1, 1, 1], [1, 1, 0]])
    (alert,) = rules.gradient_missing(session.group)
    assert alert.annotations["variables"] == "c"
    assert session.missing_steps_total.tolist() == [0, 0, 1]


def test_all_missing_is_critical():
    registry = Registry()
    session = register(registry)
    apply(session, 1, [0, 0, 0])
    (alert,) = rules.gradient_missing(session.group)
    assert alert.labels["severity"] == "critical"


def test_long_lists_are_bounded():
    registry = Registry()
    names = [f"v{i}" for i in range(25)]
    session = register(registry, names=names)
    apply(session, 1, [0] * 24 + [1])
    (alert,) = rules.gradient_missing(session.group)
    assert alert.annotations["variables"].endswith("(and 14 more)")


def test_tracker_fires_once_updates_and_resolves():
    sent = []
    tracker = AlertTracker(sent.append)
    registry = Registry()
    session = register(registry)
    scope = ("job", "adam")

    apply(session, 1, [1, 0, 1])
    tracker.update(scope, rules.evaluate(session.group), now=10.0)
    tracker.update(scope, rules.evaluate(session.group), now=11.0)  # unchanged: silent
    assert [(n.status, n.starts_at) for n in sent] == [("firing", 10.0)]

    apply(session, 2, [1, 0, 0])  # more missing: same alert, new annotations
    tracker.update(scope, rules.evaluate(session.group), now=12.0)
    assert [(n.status, n.starts_at) for n in sent][-1] == ("firing", 10.0)
    assert sent[-1].alert.annotations["variables"] == "b, c"

    apply(session, 3, [1, 1, 1])  # gradients are back
    tracker.update(scope, rules.evaluate(session.group), now=13.0)
    assert (sent[-1].status, sent[-1].ends_at) == ("resolved", 13.0)
    assert tracker.active() == []
    body = sent[-1].to_alertmanager()
    assert body["startsAt"].startswith("1970-01-01T00:00:10")
    assert body["endsAt"].startswith("1970-01-01T00:00:13")


def test_reregistered_task_replaces_its_old_session():
    registry = Registry()
    old = register(registry, 0)
    apply(old, 1, [0, 0, 0])
    new = register(registry, 0)
    apply(new, 1, [1, 1, 1])
    assert list(new.group.sessions) == [new.id]
    assert rules.gradient_missing(new.group) == []
    assert np.array_equal(new.columns, old.columns)

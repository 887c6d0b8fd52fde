"""GradientMissing and GradientNonFinite.

On collector state built by hand (`tests.support.rules`)."""

from __future__ import annotations

import numpy as np

from tests.support.rules import Harness, healthy


def test_healthy_run_raises_nothing():
    h = Harness()
    s = h.register(replicas=2)
    for _ in range(20):
        h.feed(s, {"present": [[1, 1, 1], [1, 1, 1]], "norm": [[1, 2, 3], [1.1, 2.1, 2.9]]})
    h.clock.now += 30
    h.engine.tick(h.registry.groups.values())
    assert h.sent == [] and h.active() == []


def test_missing_variables_are_named_with_their_tasks():
    h = Harness()
    w0, w1 = h.register(0), h.register(1)
    h.feed(w0, [1, 0, 1])
    h.feed(w1, [1, 1, 1])
    (alert,) = h.active("GradientMissing")
    assert alert.labels == {"alertname": "GradientMissing", "severity": "warning",
                            "training_job": "job", "optimizer": "adam"}
    assert alert.annotations["variables"] == "b"
    assert alert.annotations["tasks"] == "worker/0"
    assert alert.annotations["summary"] == "1 of 3 variables of job (adam) get no gradient"
    assert alert.annotations["runbook_url"] == "docs/runbook.md#gradientmissing"


def test_one_replica_missing_counts():
    h = Harness()
    s = h.register(replicas=2)
    h.feed(s, [[1, 1, 1], [1, 1, 0]])
    (alert,) = h.active("GradientMissing")
    assert alert.annotations["variables"] == "c"
    assert s.missing_steps_total.tolist() == [0, 0, 1]


def test_all_missing_is_critical():
    h = Harness()
    h.feed(h.register(), [0, 0, 0])
    (alert,) = h.active("GradientMissing")
    assert alert.labels["severity"] == "critical"


def test_variables_missing_at_different_steps_are_a_warning():
    """Heads trained in turn by one optimizer: every step has half the gradients, and every
    variable is missing at some step. No step had none at all, so it is not critical (it
    said "critical, 4 of 4 variables get no gradient"); a step without any, on one replica,
    is."""
    h = Harness()
    s = h.register(replicas=2, names=("a", "b", "c", "d"))
    h.feed(s, [[1, 1, 0, 0]] * 2, [[0, 0, 1, 1]] * 2)
    (alert,) = h.active("GradientMissing")
    assert alert.labels["severity"] == "warning"
    assert alert.annotations["summary"] == "4 of 4 variables of job (adam) get no gradient"
    h.feed(s, [[1, 1, 0, 0], [0, 0, 0, 0]])
    (alert,) = h.active("GradientMissing")
    assert alert.labels["severity"] == "critical"


def test_long_lists_are_bounded():
    h = Harness()
    h.feed(h.register(names=[f"v{i}" for i in range(25)]), [0] * 24 + [1])
    (alert,) = h.active("GradientMissing")
    assert alert.annotations["variables"].endswith("(and 14 more)")


def test_reregistered_task_replaces_its_old_session():
    h = Harness()
    old = h.register(0)
    h.feed(old, [0, 0, 0])
    new = h.register(0)
    h.feed(new, [1, 1, 1])
    assert list(new.group.sessions) == [new.id]
    assert h.active("GradientMissing") == []
    assert np.array_equal(new.columns, old.columns)


def test_nonfinite_fires_for_the_variables_with_nan_or_inf_and_resolves():
    h = Harness()
    s = h.register()
    h.feed(s, {"present": [1, 1, 1], "nan": [0, 3, 0]}, {"present": [1, 1, 1], "inf": [1, 0, 0]})
    (alert,) = h.active("GradientNonFinite")
    assert alert.annotations["variables"] == "a, b"
    assert alert.labels["severity"] == "critical"
    h.feed(s, healthy())
    assert h.active("GradientNonFinite") == []


def test_missing_gradient_alert_explains_why_grouped_by_cause():
    from gradwatch.collector.state import MissingCause

    h = Harness()
    s = h.register(names=("trunk", "head/kernel", "head/bias", "unused/kernel"))
    floor = MissingCause("broken_at_op", "m/Floor", "Floor", "train.py:42",
                         "The path to the loss crosses Floor op 'm/Floor' at train.py:42.")
    unused = MissingCause("unused", "", "", "", "It is never read.")
    s.set_causes({1: floor, 2: floor, 3: unused})
    h.feed(s, [1, 0, 0, 0])
    (alert,) = h.active("GradientMissing")
    assert alert.annotations["causes"] == (
        "head/kernel, head/bias: The path to the loss crosses Floor op 'm/Floor' at "
        "train.py:42. | unused/kernel: It is never read.")
    assert "Why: head/kernel, head/bias: The path" in alert.annotations["description"]


def test_undiagnosed_missing_gradient_says_so():
    h = Harness()
    h.feed(h.register(), [1, 0, 1])
    (alert,) = h.active("GradientMissing")
    assert alert.annotations["causes"].startswith("not diagnosed")


def test_a_model_that_skips_parts_on_purpose_pages_past_steps_in_a_row():
    """LayerDrop, stochastic depth, experts routed away: a part skipped at random misses
    its gradient at some steps by design, and paged at each (warning, for as long as the
    job ran). With ``steps: 3`` a variable pages once it missed 3 steps in a row, on any
    replica, across batches; a step without any gradient still pages at once."""
    h = Harness(GradientMissing={"steps": 3})
    s = h.register(replicas=2)
    h.feed(s, [[1, 0, 1]] * 2, [[1, 1, 1], [1, 0, 1]], [[1, 1, 1]] * 2, [[1, 0, 1]] * 2)
    assert h.active("GradientMissing") == []
    assert s.missing_steps_total.tolist() == [0, 5, 0]  # counted all the same (per replica)
    h.feed(s, [[1, 0, 1]] * 2, [[1, 0, 1]] * 2)
    h.clock.now += 1
    h.engine.tick(h.registry.groups.values())
    (alert,) = h.active("GradientMissing")
    assert alert.annotations["variables"] == "b" and alert.labels["severity"] == "warning"
    h = Harness(GradientMissing={"steps": 3})
    h.feed(h.register(), [0, 0, 0])
    (alert,) = h.active("GradientMissing")
    assert alert.labels["severity"] == "critical"


def test_replicas_that_skip_a_part_by_turns_are_no_streak():
    """Per-replica LayerDrop: each replica skips the layer now and then, never twice in a
    row, but some replica skips it at every step: counted across replicas it was a
    streak, and paged."""
    h = Harness(GradientMissing={"steps": 2})
    s = h.register(replicas=2)
    h.feed(s, [[0, 1, 1], [1, 1, 1]], [[1, 1, 1], [0, 1, 1]], [[0, 1, 1], [1, 1, 1]])
    h.clock.now += 1
    h.engine.tick(h.registry.groups.values())
    assert h.active("GradientMissing") == []
    h.feed(s, [[0, 1, 1], [1, 1, 1]])  # replica 0: twice in a row
    h.clock.now += 1
    h.engine.tick(h.registry.groups.values())
    (alert,) = h.active("GradientMissing")
    assert alert.annotations["variables"] == "a"

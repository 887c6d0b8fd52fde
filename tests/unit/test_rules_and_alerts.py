"""Every rule's edge cases and the alert lifecycle, on collector state built by hand."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from gradwatch.collector.alerts import AlertTracker
from gradwatch.collector.ingest import Limits, decode_batch
from gradwatch.collector.rules import RULES, RuleEngine, RuleSettings
from gradwatch.collector.state import Registry

import wire


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Harness:
    """A registry, a rule engine with a fake clock, and the notifications it sent."""

    def __init__(self, resolve_after_s: float = 0.0, **overrides: dict) -> None:
        base = {r.name: r.Params() for r in RULES}
        for name, values in overrides.items():
            base[name] = dataclasses.replace(base[name], **values)
        self.clock = Clock()
        self.sent = []
        self.tracker = AlertTracker(self.sent.append, resolve_after_s)
        self.engine = RuleEngine(RuleSettings(base=base), self.tracker, self.clock)
        self.registry = Registry()

    def register(self, task_index=0, replicas=1, names=("a", "b", "c")):
        return self.registry.register("job", "adam", "worker", task_index, replicas, list(names))

    def feed(self, session, *steps, first_step=None):
        """Each step: present (per replica or flat), with optional norm=/nan= arrays."""
        start = session.last_step + 1 if first_step is None else first_step
        reports = []
        for i, step in enumerate(steps):
            present, extra = (step, {}) if not isinstance(step, dict) else (
                step["present"], {k: v for k, v in step.items() if k != "present"})
            reports.append(wire.step(start + i, present, **extra))
        batch = wire.batch(session.id, session.last_sequence + 1, *reports)
        decoded = decode_batch(batch, session.num_replicas, session.num_variables, Limits())
        session.apply(batch.sequence, decoded)
        self.engine.on_batch(session, decoded)

    def active(self, name: str | None = None):
        return [a for a in self.tracker.active() if name is None or a.name == name]


def healthy(n=3, norm=1.0):
    return {"present": [1] * n, "norm": [norm] * n}


# -- GradientMissing -----------------------------------------------------------------------

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


def test_long_lists_are_bounded():
    h = Harness()
    h.feed(h.register(names=[f"v{i}" for i in range(25)]), [0] * 24 + [1])
    (alert,) = h.active("GradientMissing")
    assert alert.annotations["variables"].endswith("(and 14 more)")


def test_tracker_fires_once_updates_and_resolves():
    h = Harness()
    s = h.register()
    h.feed(s, [1, 0, 1])
    h.feed(s, [1, 0, 1])  # unchanged: silent
    assert [(n.status, n.starts_at) for n in h.sent] == [("firing", 1000.0)]
    h.clock.now = 1002.0
    h.feed(s, [1, 0, 0])  # more missing: the same alert with new annotations
    assert (h.sent[-1].status, h.sent[-1].starts_at) == ("firing", 1000.0)
    assert h.sent[-1].alert.annotations["variables"] == "b, c"
    h.clock.now = 1003.0
    h.feed(s, [1, 1, 1])  # gradients are back
    assert (h.sent[-1].status, h.sent[-1].ends_at) == ("resolved", 1003.0)
    assert h.active() == []
    body = h.sent[-1].to_alertmanager()
    assert body["startsAt"].startswith("1970-01-01T00:16:40")
    assert body["endsAt"].startswith("1970-01-01T00:16:43")


def test_hysteresis_turns_flapping_into_one_alert():
    h = Harness(resolve_after_s=5.0)
    s = h.register()
    for i in range(10):  # the variable's gradient comes and goes every step
        h.clock.now += 1
        h.feed(s, [1, i % 2, 1])
    assert [n.status for n in h.sent] == ["firing"]
    h.clock.now += 4.9
    h.engine.tick(h.registry.groups.values())
    assert h.active("GradientMissing")  # still within the hysteresis window
    h.clock.now += 0.2
    h.engine.tick(h.registry.groups.values())
    assert [n.status for n in h.sent] == ["firing", "resolved"]


def test_firing_alerts_lease_ahead_for_alertmanager():
    h = Harness()
    h.feed(h.register(), [1, 0, 1])
    (notification,) = h.tracker.firing()
    body = notification.to_alertmanager(lease_end=2000.0)
    assert body["endsAt"].startswith("1970-01-01T00:33:20")


def test_reregistered_task_replaces_its_old_session():
    h = Harness()
    old = h.register(0)
    h.feed(old, [0, 0, 0])
    new = h.register(0)
    h.feed(new, [1, 1, 1])
    assert list(new.group.sessions) == [new.id]
    assert h.active("GradientMissing") == []
    assert np.array_equal(new.columns, old.columns)


# -- GradientNonFinite ---------------------------------------------------------------------

def test_nonfinite_fires_for_the_variables_with_nan_or_inf_and_resolves():
    h = Harness()
    s = h.register()
    h.feed(s, {"present": [1, 1, 1], "nan": [0, 3, 0]}, {"present": [1, 1, 1], "inf": [1, 0, 0]})
    (alert,) = h.active("GradientNonFinite")
    assert alert.annotations["variables"] == "a, b"
    assert alert.labels["severity"] == "critical"
    h.feed(s, healthy())
    assert h.active("GradientNonFinite") == []


# -- GradientExploding ---------------------------------------------------------------------

def test_exploding_absolute_limit():
    h = Harness(GradientExploding={"max_norm": 100.0})
    s = h.register()
    h.feed(s, {"present": [1, 1, 1], "norm": [1, 150, 1]})
    (alert,) = h.active("GradientExploding")
    assert alert.annotations["variables"] == "b"


def test_exploding_relative_to_rolling_median_needs_history():
    h = Harness(GradientExploding={"median_factor": 10.0, "min_steps": 5, "window_steps": 20})
    s = h.register()
    h.feed(s, {"present": [1, 1, 1], "norm": [1, 1, 50]})  # no history yet: quiet
    assert h.active("GradientExploding") == []
    for _ in range(6):
        h.feed(s, healthy())
    h.feed(s, healthy(norm=9.0))  # 9x the median: below the factor
    assert h.active("GradientExploding") == []
    h.feed(s, {"present": [1, 1, 1], "norm": [1, 1, 30]})
    (alert,) = h.active("GradientExploding")
    assert alert.annotations["variables"] == "c"
    h.feed(s, healthy())
    assert h.active("GradientExploding") == []


def test_nan_norms_are_nonfinite_not_exploding():
    h = Harness(GradientExploding={"min_steps": 1})
    s = h.register()
    h.feed(s, healthy(), {"present": [1, 1, 1], "norm": [np.nan, 1, 1], "nan": [1, 0, 0]})
    assert h.active("GradientExploding") == []
    assert h.active("GradientNonFinite")


# -- GradientVanishing ---------------------------------------------------------------------

def test_vanishing_needs_consecutive_steps_on_every_replica():
    h = Harness(GradientVanishing={"steps": 3, "epsilon": 1e-6})
    s = h.register(replicas=2)
    zero_b = {"present": [[1, 1, 1], [1, 1, 1]], "norm": [[1, 0, 1], [1, 0, 1]]}
    only_one_replica = {"present": [[1, 1, 1], [1, 1, 1]], "norm": [[1, 0, 1], [1, 1, 1]]}
    h.feed(s, zero_b, zero_b, only_one_replica, zero_b, zero_b)  # streak broken at step 3
    assert h.active("GradientVanishing") == []
    h.feed(s, zero_b)
    (alert,) = h.active("GradientVanishing")
    assert alert.annotations["variables"] == "b"
    h.feed(s, {"present": [[1, 1, 1], [1, 1, 1]], "norm": [[1, 1, 1], [1, 1, 1]]})
    assert h.active("GradientVanishing") == []


def test_missing_is_not_vanishing():
    h = Harness(GradientVanishing={"steps": 2})
    s = h.register()
    b_missing = {"present": [1, 0, 1], "norm": [1, 0, 1]}
    h.feed(s, b_missing, b_missing, b_missing)
    assert h.active("GradientVanishing") == []
    assert h.active("GradientMissing")


# -- ReplicaDivergence ---------------------------------------------------------------------

def test_divergence_presence_on_some_replicas_only():
    h = Harness()
    h.feed(h.register(replicas=2), {"present": [[1, 1, 1], [1, 0, 1]],
                                    "norm": [[1, 1, 1], [1, 0, 1]]})
    (alert,) = h.active("ReplicaDivergence")
    assert alert.annotations["variables"] == "b"
    assert alert.annotations["tasks"] == "worker/0 replica 1"


def test_divergence_norm_ratio_across_workers_at_the_same_step():
    h = Harness(ReplicaDivergence={"norm_ratio": 5.0})
    w0, w1 = h.register(0), h.register(1)
    h.feed(w0, healthy(norm=1.0), first_step=10)
    h.feed(w1, healthy(norm=4.0), first_step=10)
    assert h.active("ReplicaDivergence") == []
    h.feed(w0, healthy(norm=1.0))
    h.feed(w1, healthy(norm=6.0))
    (alert,) = h.active("ReplicaDivergence")
    assert "6x" in alert.annotations["description"]
    assert alert.annotations["tasks"] == "worker/0 replica 0, worker/1 replica 0"


def test_divergence_ignores_workers_at_other_steps():
    h = Harness(ReplicaDivergence={"norm_ratio": 5.0})
    w0, w1 = h.register(0), h.register(1)
    h.feed(w0, healthy(norm=1.0), first_step=10)
    h.feed(w1, healthy(norm=100.0), first_step=11)
    assert h.active("ReplicaDivergence") == []


# -- WorkerSilent ------------------------------------------------------------------------

def test_silent_worker_fires_on_the_clock_and_not_after_closing():
    h = Harness(WorkerSilent={"seconds": 30.0})
    w0, w1 = h.register(0), h.register(1)
    h.feed(w0, healthy())
    h.feed(w1, healthy())
    w0.last_report_time = w1.last_report_time = h.clock.now
    h.clock.now += 31
    w1.last_report_time = h.clock.now  # worker 1 keeps reporting
    h.engine.tick(h.registry.groups.values())
    (alert,) = h.active("WorkerSilent")
    assert alert.annotations["tasks"] == "worker/0"
    w0.closed = True  # the agent said goodbye: not silent, finished
    h.engine.tick(h.registry.groups.values())
    assert h.active("WorkerSilent") == []


# -- settings ------------------------------------------------------------------------------

def test_disabled_rule_raises_nothing():
    h = Harness(GradientMissing={"enabled": False})
    h.feed(h.register(), [0, 0, 0])
    assert h.active() == []


@pytest.mark.parametrize("job, expected", [("bert-large", 500), ("resnet", 100)])
def test_per_job_overrides_by_glob(job, expected):
    base = {r.name: r.Params() for r in RULES}
    override = {**base, "GradientVanishing": dataclasses.replace(
        base["GradientVanishing"], steps=500)}
    settings = RuleSettings(base=base, jobs=(("bert-*", override),))
    assert settings.for_job(job)["GradientVanishing"].steps == expected


def test_closed_sessions_expire_and_their_alerts_resolve():
    h = Harness()
    s = h.register()
    h.feed(s, [1, 0, 1])
    s.closed, s.last_report_time = True, h.clock.now
    assert h.registry.expire_inactive(older_than=h.clock.now - 1) == []  # still retained
    expired = h.registry.expire_inactive(older_than=h.clock.now + 1)
    assert [g.training_job for g in expired] == ["job"] and h.registry.groups == {}
    h.engine.tick(expired)
    assert h.active() == [] and h.sent[-1].status == "resolved"


def test_dispatcher_resends_only_to_sinks_that_want_them():
    import asyncio

    from gradwatch.collector.alerts import Alert, Notification
    from gradwatch.collector.sinks import Dispatcher

    class Recorder:
        def __init__(self, name, wants_resends):
            self.name, self.wants_resends, self.got = name, wants_resends, []

        async def send(self, notifications):
            self.got += notifications

    async def scenario():
        am, hook = Recorder("am", True), Recorder("hook", False)
        dispatcher = Dispatcher([am, hook])
        dispatcher.start()
        firing = Notification(Alert({"alertname": "GradientMissing"}), 1.0)
        dispatcher.submit(firing)
        dispatcher.submit(firing, resend=True)
        await dispatcher.flush(2.0)
        await dispatcher.close()
        return am.got, hook.got, dict(dispatcher.outcomes)

    am_got, hook_got, outcomes = asyncio.run(scenario())
    assert len(am_got) == 2 and len(hook_got) == 1
    assert outcomes == {("am", "sent"): 2, ("hook", "sent"): 1}


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


def test_batches_of_a_busy_job_are_evaluated_together():
    """Within min_interval_s of an evaluation, a batch is observed but the job's rules
    wait for evaluate_pending (the server's timer): one evaluation, not one per task."""
    h = Harness()
    h.engine.min_interval_s = 0.05
    w0, w1 = h.register(0), h.register(1)
    h.feed(w0, [1, 1, 1])  # evaluated at once: nothing wrong
    h.feed(w1, [1, 0, 1])  # same instant: deferred
    assert h.active("GradientMissing") == []
    h.engine.evaluate_pending()
    (alert,) = h.active("GradientMissing")
    assert alert.annotations["tasks"] == "worker/1"
    h.clock.now += 0.06
    h.feed(w1, [1, 1, 1])  # the interval has passed: evaluated at once
    assert h.active("GradientMissing") == []


def test_a_bad_batch_followed_at_once_by_a_good_one_still_alerts():
    """Deferred evaluation sees every batch since the last one, not only the latest."""
    h = Harness()
    h.engine.min_interval_s = 0.05
    w0 = h.register(0)
    h.feed(w0, [1, 1, 1])  # evaluated at once
    h.feed(w0, {"present": [1, 1, 1], "nan": [0, 4, 0]})  # deferred: a NaN gradient,
    h.feed(w0, [1, 0, 1])  # a missing one,
    h.feed(w0, [1, 1, 1])  # and a healthy batch last
    h.engine.evaluate_pending()
    assert sorted(a.name for a in h.active()) == ["GradientMissing", "GradientNonFinite"]
    h.clock.now += 0.06
    h.feed(w0, [1, 1, 1])  # evaluated alone: the flags start afresh
    assert w0.missing_in_last_batch.sum() == 0 and w0.nonfinite_in_last_batch.sum() == 0

"""The engine: settings and per-job overrides, expiry, coalesced evaluation and the
history it keeps per rule.

On collector state built by hand (`tests.support.rules`)."""

from __future__ import annotations

import dataclasses

import pytest

from gradwatch.collector.rules import RULES, RuleSettings
from tests.support.rules import Harness


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
    assert not h.engine.state("GradientMissing", w0).flags.any()
    assert not h.engine.state("GradientNonFinite", w0).flags.any()


def test_a_waiting_batch_schedules_one_evaluation_when_its_interval_ends():
    """With the event loop's call_later, the engine runs evaluate_pending itself: once for
    all groups waiting, when the interval since the last evaluation ends."""
    h = Harness()
    scheduled = []
    h.engine.min_interval_s = 0.05
    h.engine.call_later = lambda delay, callback: scheduled.append((delay, callback))
    w0, w1 = h.register(0), h.register(1)
    h.feed(w0, [1, 1, 1])  # evaluated at once: nothing to schedule
    assert scheduled == []
    h.clock.now += 0.02
    h.feed(w1, [1, 0, 1])  # waits
    h.feed(w0, [1, 1, 1])  # waits too: no second evaluation scheduled
    ((delay, callback),) = scheduled
    assert delay == pytest.approx(0.03) and h.active("GradientMissing") == []
    callback()
    assert [a.annotations["tasks"] for a in h.active("GradientMissing")] == ["worker/1"]
    h.feed(w1, [1, 1, 1])  # the next wait schedules again
    assert len(scheduled) == 2


def test_a_failing_rule_is_logged_and_the_others_go_on(monkeypatch, caplog):
    """A rule that raises (a bug, or input it did not foresee) costs its own verdict: the
    batch is still applied and the other rules still observe and alert."""
    from gradwatch.collector.rules.norms import GradientVanishing

    def broken(*args):
        raise ValueError("boom")

    monkeypatch.setattr(GradientVanishing, "observe", broken)
    monkeypatch.setattr(GradientVanishing, "evaluate", broken)
    h = Harness()
    s = h.register()
    with caplog.at_level("ERROR", logger="gradwatch.collector.rules.engine"):
        h.feed(s, [1, 0, 1])
    assert s.last_step == 0
    assert [a.name for a in h.active()] == ["GradientMissing"]
    failed = [r for r in caplog.records if r.getMessage() == "rule GradientVanishing failed"]
    assert len(failed) == 2 and all(r.exc_info[0] is ValueError for r in failed)

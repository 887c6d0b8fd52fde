"""The alert lifecycle: firing, updates, hysteresis, leases, and delivery to sinks.

On collector state built by hand (`tests.support.rules`)."""

from __future__ import annotations

from tests.support.rules import Harness


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


def test_changed_annotations_are_sent_at_most_once_per_interval():
    """A cause whose source line moves between fits must not page three times in 0.5 s
    (seen on keras.io's forwardforward example): the latest text goes out once the
    interval since the previous notice has passed."""
    from gradwatch.collector.alerts import Alert, AlertTracker

    sent = []
    tracker = AlertTracker(sent.append, update_interval_s=30.0)
    labels = {"alertname": "GradientMissing", "training_job": "j"}

    def evaluate(now, line):
        tracker.update(("j", "adam"), [Alert(labels, {"causes": f"train.py:{line}"})], now)

    evaluate(100.0, 10)
    evaluate(100.2, 11)
    evaluate(100.4, 12)
    assert [n.alert.annotations["causes"] for n in sent] == ["train.py:10"]
    tracker.expire(129.9)
    assert len(sent) == 1
    tracker.expire(130.0)  # due: the latest text, same start
    assert [(n.alert.annotations["causes"], n.starts_at) for n in sent] == [
        ("train.py:10", 100.0), ("train.py:12", 100.0)]
    evaluate(131.0, 12)  # unchanged since: silent
    tracker.expire(200.0)
    assert len(sent) == 2


def test_the_first_cause_is_sent_at_once():
    """An eager step is diagnosed a step later: the page went out saying "not diagnosed",
    and the cause reached Alertmanager only at the next resend, 30 s on. The first cause
    goes at once; later moves of its text wait for the interval."""
    from gradwatch.collector.alerts import UNDIAGNOSED, Alert, AlertTracker

    sent = []
    tracker = AlertTracker(sent.append, update_interval_s=30.0)
    labels = {"alertname": "GradientMissing", "training_job": "j"}

    def evaluate(now, causes):
        tracker.update(("j", "adam"), [Alert(labels, {"causes": causes})], now)

    evaluate(100.0, f"{UNDIAGNOSED} (yet)")
    evaluate(100.1, "w: Floor at train.py:10")
    evaluate(100.2, "w: Floor at train.py:11")
    assert [(n.alert.annotations["causes"], n.starts_at) for n in sent] == [
        (f"{UNDIAGNOSED} (yet)", 100.0), ("w: Floor at train.py:10", 100.0)]


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


def test_notifications_a_hung_sink_never_took_are_counted_and_said_at_shutdown(caplog):
    """SIGTERM while a webhook hangs: the shutdown's flush runs out of time and the last
    alert is lost. It was lost without a word (rc 0, nothing counted); it is now counted
    as dropped and one warning names the sink."""
    import asyncio

    from gradwatch.collector.alerts import Alert, Notification
    from gradwatch.collector.sinks import Dispatcher

    class Hung:
        name, wants_resends = "webhook:http://hung", False

        async def send(self, notifications):
            await asyncio.sleep(3600)

    async def scenario():
        dispatcher = Dispatcher([Hung()])
        dispatcher.start()
        for name in ("GradientNonFinite", "GradientMissing"):
            dispatcher.submit(Notification(Alert({"alertname": name}), 1.0))
            await asyncio.sleep(0.05)  # the first is being sent, the second queued
        await dispatcher.flush(0.2)
        await dispatcher.close()
        return dict(dispatcher.outcomes)

    outcomes = asyncio.run(scenario())
    assert outcomes[("webhook:http://hung", "dropped")] == 2
    assert "2 alert notifications to webhook:http://hung not delivered before shutdown" \
        in caplog.text


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
        return am.got, hook.got, {k: n for k, n in dispatcher.outcomes.items() if n}

    am_got, hook_got, outcomes = asyncio.run(scenario())
    assert len(am_got) == 2 and len(hook_got) == 1
    assert outcomes == {("am", "sent"): 2, ("hook", "sent"): 1}


def test_resolutions_are_resent_for_a_while_unless_the_alert_fires_again():
    """An Alertmanager restarted while a resolution was sent would keep the page open: the
    collector re-sends resolutions of the last 15 minutes with its firing alerts (as
    Prometheus does), the latest per alert, and not once the alert fires again."""
    h = Harness()
    s = h.register()
    h.feed(s, [1, 0, 1])
    h.clock.now = 1010.0
    h.feed(s, [1, 1, 1])
    (resolution,) = h.tracker.resolved_within(900.0, now=1020.0)
    assert (resolution.status, resolution.ends_at) == ("resolved", 1010.0)
    assert h.tracker.resolved_within(900.0, now=1010.0 + 900.0) == []
    h.clock.now = 1030.0
    h.feed(s, [1, 0, 1])  # the same alert fires again
    assert h.tracker.resolved_within(900.0, now=1040.0) == []

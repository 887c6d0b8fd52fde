"""ReplicaDivergence and WorkerSilent.

On collector state built by hand (`tests.support.rules`)."""

from __future__ import annotations

import pytest

from gradwatch.collector.rules.replicas import LAG_SECONDS, LAG_STEPS
from tests.support.rules import Harness, healthy


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


def test_shards_differ_in_norm_by_design_but_not_in_presence():
    """FSDP: each task's norms are of its shards; only presence and finiteness compare."""
    h = Harness(ReplicaDivergence={"norm_ratio": 5.0})
    w0, w1 = h.register(0, sharded=True), h.register(1, sharded=True)
    h.feed(w0, healthy(norm=1.0), first_step=10)
    h.feed(w1, healthy(norm=100.0), first_step=10)
    assert h.active("ReplicaDivergence") == []
    h.feed(w0, healthy(norm=1.0))
    h.feed(w1, {"present": [1, 0, 1], "norm": [1, 0, 1]})
    (alert,) = h.active("ReplicaDivergence")
    assert alert.annotations["variables"] == "b"


def test_a_nan_in_one_shard_is_no_divergence():
    """A NaN sits in the shard holding it, and a rank may hold none of a parameter (FSDP1,
    a replicated tensor-parallel bias reported by one rank): it paged as "NaN/Inf on some
    replicas only" while every rank's gradients were NaN."""
    h = Harness()
    w0, w1 = h.register(0, sharded=True), h.register(1, sharded=True)
    h.feed(w0, {"present": [1, 1, 1], "norm": [1, 0, 1], "nan": [0, 0, 0]}, first_step=3)
    h.feed(w1, {"present": [1, 1, 1], "norm": [1, 1, 1], "nan": [0, 4, 0]}, first_step=3)
    assert h.active("ReplicaDivergence") == []
    assert h.active("GradientNonFinite") != []


def test_divergence_ignores_workers_at_other_steps():
    h = Harness(ReplicaDivergence={"norm_ratio": 5.0})
    w0, w1 = h.register(0), h.register(1)
    h.feed(w0, healthy(norm=1.0), first_step=10)
    h.feed(w1, healthy(norm=100.0), first_step=11)
    assert h.active("ReplicaDivergence") == []


def test_a_nan_on_one_rank_for_one_step_inside_a_batch_is_divergence():
    """DDP, NaN input on rank 1 from step 20: only at step 20 is rank 1 alone NaN (the
    all-reduce spreads it at 21). That step was not the newest of its batch, and only
    GradientNonFinite fired; the ranks' batches need not end at the same steps."""
    h = Harness()
    w0, w1 = h.register(0), h.register(1)
    nan = {"present": [1, 1, 1], "norm": [1, 1, 1], "nan": [0, 2, 0]}
    h.feed(w0, *[healthy()] * 8, first_step=15)  # 15..22
    h.feed(w1, *[healthy()] * 5, first_step=15)  # 15..19
    assert h.active("ReplicaDivergence") == []
    h.feed(w1, nan, nan, nan, nan)  # 20..23: step 20 now has both ranks' records
    (alert,) = h.active("ReplicaDivergence")
    assert "disagree at step 20" in alert.annotations["summary"]
    assert alert.annotations["variables"] == "b"
    assert alert.annotations["tasks"] == "worker/1 replica 0"
    h.feed(w0, nan, nan, nan)  # 23..25: both NaN, nothing new disagrees
    assert h.active("ReplicaDivergence") == []


def test_every_step_of_a_batch_of_replicas_is_compared():
    h = Harness()
    mirrored = h.register(replicas=2)
    odd = {"present": [[1, 1, 1], [1, 0, 1]], "norm": [[1, 1, 1], [1, 0, 1]]}
    h.feed(mirrored, healthy(6), odd, healthy(6), healthy(6))
    (alert,) = h.active("ReplicaDivergence")
    assert "disagree at step 1" in alert.annotations["summary"]
    h.engine.tick(h.registry.groups.values())  # nothing new compared: the verdict stands
    assert len(h.active("ReplicaDivergence")) == 1


def test_a_task_that_hangs_holds_the_comparison_back_for_a_while_only():
    h = Harness(ReplicaDivergence={"norm_ratio": 5.0})
    w0, w1, hung = h.register(0), h.register(1), h.register(2)
    for session in (w0, w1, hung):
        h.feed(session, healthy(), first_step=0)
    h.feed(w0, healthy(norm=1.0), first_step=1)
    h.feed(w1, healthy(norm=9.0), first_step=1)
    assert h.active("ReplicaDivergence") == []  # step 1 waits for worker/2
    h.feed(w0, *[healthy()] * LAG_STEPS)
    h.feed(w1, *[healthy()] * LAG_STEPS)
    (alert,) = h.active("ReplicaDivergence")
    assert "disagree at step 1" in alert.annotations["summary"]


def test_a_task_silent_for_a_minute_holds_the_comparison_back_no_longer():
    """At 10 s a step, 256 steps are 43 minutes: a hung task is not waited for once the
    others have reported for LAG_SECONDS without it."""
    h = Harness(ReplicaDivergence={"norm_ratio": 5.0})
    w0, w1, hung = h.register(0), h.register(1), h.register(2)
    for session in (w0, w1, hung):
        h.feed(session, healthy(), first_step=0)
    h.feed(w0, healthy(norm=1.0))
    h.feed(w1, healthy(norm=9.0))
    assert h.active("ReplicaDivergence") == []  # step 1 waits for worker/2
    hung.last_report_time -= LAG_SECONDS + 1
    h.feed(w0, healthy())
    (alert,) = h.active("ReplicaDivergence")
    assert "disagree at step 1" in alert.annotations["summary"]


def test_divergence_resolves_once_the_other_task_is_gone():
    """Rank 1 NaN at step 0, then it said goodbye and rank 0 trained on alone: its steps,
    compared with nobody, kept the old verdict, and the alert (naming a task long
    forgotten) stood for ever."""
    h = Harness()
    w0, w1 = h.register(0), h.register(1)
    h.feed(w0, healthy(), first_step=0)
    h.feed(w1, {"present": [1, 1, 1], "norm": [1, 1, 1], "nan": [0, 2, 0]}, first_step=0)
    assert h.active("ReplicaDivergence")
    w1.closed = True
    h.feed(w0, *[healthy()] * 10)
    assert h.active("ReplicaDivergence") == []


def test_a_step_reported_again_replaces_the_tasks_earlier_report():
    """A checkpoint restored sets the counter back: the steps reported before it, from
    the one restored on, did not happen as reported and are not compared."""
    h = Harness()
    w0, w1 = h.register(0), h.register(1)
    missing = {"present": [1, 0, 1], "norm": [1, 0, 1]}
    h.feed(w0, healthy(), healthy(), missing, first_step=0)  # its step 2 is then rewound
    h.feed(w1, healthy(), healthy(), first_step=0)
    h.feed(w0, healthy(), first_step=2)  # (the harness marks nothing; equal is a repeat)
    h.feed(w1, healthy(), first_step=2)
    assert h.active("ReplicaDivergence") == []


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


def test_an_idle_optimizer_is_not_a_silent_task():
    """Distillation, GANs, layer-wise schedules: one optimizer stops while the task trains
    on with another; the task is alive."""
    h = Harness(WorkerSilent={"seconds": 30.0})
    teacher = h.register(0)
    student = h.registry.register("job", "student", "worker", 0, 1, ["s"])
    h.feed(teacher, healthy())
    h.feed(student, {"present": [1], "norm": [1.0]})
    teacher.last_report_time = h.clock.now
    h.clock.now += 31
    student.last_report_time = h.clock.now  # only the student still steps
    h.engine.tick(h.registry.groups.values())
    assert h.active("WorkerSilent") == []
    h.clock.now += 31  # now nothing of the task has stepped for 31 s
    h.engine.tick(h.registry.groups.values())
    assert sorted(a.labels["optimizer"] for a in h.active("WorkerSilent")) == [
        "adam", "student"]


def test_a_long_first_step_is_not_silence():
    h = Harness(WorkerSilent={"seconds": 30.0, "first_step_seconds": 300.0})
    session = h.register(0)
    session.registered_at = h.clock.now  # registered while tracing its first step
    h.clock.now += 120
    h.engine.tick(h.registry.groups.values())
    assert h.active("WorkerSilent") == []
    h.clock.now += 200  # 320 s without a first step
    h.engine.tick(h.registry.groups.values())
    (alert,) = h.active("WorkerSilent")
    assert alert.annotations["tasks"] == "worker/0"


def test_a_task_registered_again_past_its_first_step_is_silent_since_then():
    """A hung task registers with a collector that restarted (it stepped before, there):
    no step comes, and ``seconds`` after the registration it pages, not
    ``first_step_seconds`` after."""
    h = Harness(WorkerSilent={"seconds": 30.0, "first_step_seconds": 300.0})
    session = h.registry.register("job", "adam", "worker", 0, 1, ["a"], stepped_before=True)
    session.registered_at = h.clock.now
    h.clock.now += 29
    h.engine.tick(h.registry.groups.values())
    assert h.active("WorkerSilent") == []
    h.clock.now += 2
    h.engine.tick(h.registry.groups.values())
    assert [a.annotations["tasks"] for a in h.active("WorkerSilent")] == ["worker/0"]


@pytest.mark.parametrize("framework", ["torch", "tensorflow"])
def test_a_pytorch_tasks_second_step_may_take_as_long_as_a_first(framework):
    """The PyTorch agent runs the first step uncompiled (to record it for the diagnosis),
    so a ``torch.compile``d model compiles in the second: a compile of over a minute paged
    WorkerSilent at the start of every such job. Its third step has no such allowance; a
    TensorFlow task's second step neither (its first step traced)."""
    h = Harness(WorkerSilent={"seconds": 30.0, "first_step_seconds": 300.0})
    session = h.register(0)
    session.versions = {framework: "2.x", "gradwatch": "0.2"}
    h.feed(session, healthy(), first_step=0)
    session.last_report_time = h.clock.now
    h.clock.now += 120
    h.engine.tick(h.registry.groups.values())
    assert (h.active("WorkerSilent") == []) is (framework == "torch")
    if framework == "torch":
        h.feed(session, healthy())
        session.last_report_time = h.clock.now
        h.clock.now += 31
        h.engine.tick(h.registry.groups.values())
        assert [a.annotations["tasks"] for a in h.active("WorkerSilent")] == ["worker/0"]
        # A collector restarted under a long run hears first of its step 500: no allowance.
        h = Harness(WorkerSilent={"seconds": 30.0, "first_step_seconds": 300.0})
        session = h.register(0)
        session.versions = {framework: "2.x"}
        h.feed(session, healthy(), first_step=500)
        session.last_report_time = h.clock.now
        h.clock.now += 31
        h.engine.tick(h.registry.groups.values())
        assert [a.annotations["tasks"] for a in h.active("WorkerSilent")] == ["worker/0"]

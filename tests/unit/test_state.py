"""Registry bookkeeping: which sessions are forgotten, and when."""

import numpy as np
import pytest

from gradwatch.collector.ingest import InvalidReport, Limits, admit_registration
from gradwatch.collector.state import Registry
from tests.support import wire


def register(registry: Registry, job: str, task_index: int = 0):
    session = registry.register(job, "sgd", "worker", task_index, 1, ["a"])
    session.registered_at = 50.0
    return session


def test_silent_sessions_without_an_open_stream_expire_like_closed_ones():
    registry = Registry()
    closed = register(registry, "done")
    closed.closed, closed.last_report_time = True, 100.0
    crashed = register(registry, "crashed")
    crashed.last_report_time = 100.0  # its process died: no goodbye, no open stream
    hung = register(registry, "hung")
    hung.last_report_time, hung.open_streams = 100.0, 1  # quiet, but still connected
    never = register(registry, "never")
    never.registered_at = 100.0  # registered, then nothing at all
    recent = register(registry, "recent")
    recent.last_report_time = 300.0

    touched = registry.expire_inactive(older_than=200.0)

    assert sorted(g.training_job for g in touched) == ["crashed", "done", "never"]
    assert list(registry.sessions) == [hung.id, recent.id]
    assert registry.jobs() == {"hung", "recent"}  # groups left empty are gone


def test_crashed_tasks_stop_counting_against_the_session_limit():
    registry, limits = Registry(), Limits(max_sessions=3)
    for index in range(3):  # three tasks that crashed an hour ago
        register(registry, "flaky", index).last_report_time = 60.0
    request = wire.registration(job="next-run")
    with pytest.raises(InvalidReport, match="max_sessions"):
        admit_registration(request, ["dense/v0"], registry, limits)
    registry.expire_inactive(older_than=70.0)
    assert not registry.sessions and not registry.groups
    admit_registration(request, ["dense/v0"], registry, limits)


@pytest.mark.parametrize("previous", ["open, same process", "closed", "another process"])
def test_a_session_replaced_by_its_own_process_continues_its_totals(previous):
    """An agent that watches more of an optimizer's variables (they thawed) registers a
    larger session in their place: the task's counters go on, per variable by name. A
    session that said goodbye, or another process's, is a new start."""
    registry = Registry()
    first = registry.register("job", "sgd", "worker", 0, 1, ["a", "b"], hostname="h", pid=7)
    first.steps_total, first.nonfinite_steps_total = 100, 3
    first.missing_steps_total[:] = [0, 4]
    first.nan_total[:] = [1, 2]
    first.closed = previous == "closed"
    pid = 8 if previous == "another process" else 7
    grown = registry.register("job", "sgd", "worker", 0, 1, ["c", "b", "a"], hostname="h",
                              pid=pid)
    assert list(registry.sessions) == [grown.id]
    if previous == "open, same process":
        assert (grown.steps_total, grown.nonfinite_steps_total) == (100, 3)
        assert grown.missing_steps_total.tolist() == [0, 4, 0]
        assert grown.nan_total.tolist() == [0, 2, 1]
    else:
        assert (grown.steps_total, grown.nonfinite_steps_total) == (0, 0)
        assert grown.missing_steps_total.tolist() == [0, 0, 0]


@pytest.mark.parametrize("sharded", [False, True])
def test_a_continued_session_keeps_its_global_norms_in_the_history(sharded):
    """A session that grew (LoRA's base added with add_param_group at step 4): the heat map
    kept steps 0-3 but the global-norm chart lost them with the old session's id."""
    from tests.support.rules import Harness, healthy

    h = Harness()
    first = h.registry.register("job", "adam", "worker", 0, 1, ["a", "b"], sharded=sharded,
                                hostname="h", pid=7)
    h.feed(first, *[healthy(2, norm=0.5)] * 4)
    grown = h.registry.register("job", "adam", "worker", 0, 1, ["a", "b", "c"],
                                sharded=sharded, hostname="h", pid=7)
    h.feed(grown, *[healthy(norm=0.5)] * 4, first_step=4)
    steps, _, norms = grown.group.history.window()
    assert steps.tolist() == list(range(8))
    assert list(norms) == [grown.id]
    assert (norms[grown.id] > 0).all()  # every step's global norm, none NO_REPORT
    if sharded:  # the old session's steps are the new one's: a repeat is not added again
        h.feed(grown, healthy(3, norm=0.5), first_step=3)
        assert np.allclose(10.0 ** grown.group.history.window()[1][3, :2].astype(float), 0.5,
                           rtol=1e-2)


def test_a_task_that_stopped_reporting_is_not_shown_stepping_on():
    """A crashed agent's last rate (3.47 steps/s) was shown for as long as its session
    was kept; it is 0 once no report came for three step periods (and 10 s)."""
    from gradwatch.collector.alerts import AlertTracker
    from gradwatch.collector.jobs import summary

    fast, slow = register(Registry(), "fast"), register(Registry(), "slow")
    fast.step_rate, fast.last_report_time = 3.47, 100.0
    slow.step_rate, slow.last_report_time = 1 / 30, 100.0  # a step every 30 s

    def rate(session, now):
        return summary(session.group.training_job, [session.group], AlertTracker(print),
                       now)["steps_per_second"]

    assert rate(fast, 105.0) == 3.47 and rate(fast, 111.0) == 0.0
    assert rate(slow, 180.0) == pytest.approx(1 / 30) and rate(slow, 191.0) == 0.0


def test_a_new_run_of_the_same_job_starts_a_new_history():
    """The same job name run again (PyTorch counts steps from 0): the old run's steps kept
    the heat map's slots, refused the new run's lower steps, and the page showed the old
    run's norms beside the new run's gauges. A process that only reconnected keeps it."""
    from tests.support.rules import Harness, healthy

    h = Harness()
    first = h.register()
    for _ in range(3):
        h.feed(first, *[healthy(norm=5.0)] * 50)
    assert first.group.history.window()[0].tolist() == list(range(22, 150))
    second = h.register()  # another process: a new run
    h.feed(second, *[healthy(norm=0.5)] * 20, first_step=0)
    steps, _, norms = second.group.history.window()
    assert steps.tolist() == list(range(20)) and list(norms) == [second.id]


def test_a_new_run_of_a_job_of_two_tasks_starts_a_new_history():
    """Each rank of the new run registers while the other rank's old session is still
    there: the history was never reset, and the new run's cells were merged with the old
    run's at equal steps (√2 too large for shards, the max for replicas)."""
    import time

    from tests.support.rules import Harness, healthy

    h = Harness()
    old = [h.register(task_index=t, sharded=True) for t in (0, 1)]
    for session in old:
        h.feed(session, *[healthy(norm=5.0)] * 6)
    time.sleep(0.01)
    new = []
    for t in (0, 1):  # the new run's ranks, one after the other
        new.append(h.register(task_index=t, sharded=True))
        time.sleep(0.01)
    for session in new:
        h.feed(session, *[healthy(norm=0.3)] * 3, first_step=0)
    steps, cells, _ = new[0].group.history.window()
    assert steps.tolist() == [0, 1, 2]
    # Two shards of 0.3 each: 0.3 * sqrt(2) whole, nothing of the old run's 5.0.
    assert np.allclose(10.0 ** cells.astype(np.float64), 0.3 * 2 ** 0.5, rtol=1e-2)


def test_a_step_counter_set_back_continues_the_history_from_the_step_restored():
    """``optimizer.iterations.assign(20)`` after 300 steps (a checkpoint restored): the
    heat map and global-norm chart kept steps 172-299 and refused the new ones until the
    count passed 299."""
    from tests.support.rules import Harness, healthy

    h = Harness()
    task = h.register()
    for _ in range(6):
        h.feed(task, *[healthy(norm=5.0)] * 50)  # steps 0..299
    h.feed(task, healthy(norm=0.5), healthy(norm=0.5), healthy(norm=0.5), first_step=20,
           rewound=True)
    steps, cells, norms = task.group.history.window()
    assert steps.tolist() == [20, 21, 22]
    assert np.allclose(10.0 ** cells.astype(np.float64), 0.5, rtol=1e-2)
    assert norms[task.id][:, 0] == pytest.approx([0.5 * 3 ** 0.5] * 3, rel=1e-3)


def test_ranks_set_back_one_after_the_other_keep_each_others_new_steps():
    """Each rank's restore clears the steps it reported; the second rank's does not clear
    the first rank's new steps, which it had not reported."""
    from tests.support.rules import Harness, healthy

    h = Harness()
    ranks = [h.register(task_index=t) for t in (0, 1)]
    for rank in ranks:
        h.feed(rank, *[healthy(norm=5.0)] * 40)  # steps 0..39
    h.feed(ranks[0], healthy(norm=0.5), healthy(norm=0.5), first_step=10, rewound=True)
    h.feed(ranks[1], healthy(norm=0.5), first_step=10, rewound=True)
    steps, cells, norms = ranks[0].group.history.window()
    assert steps.tolist() == list(range(12))  # 0..9 from before the restore point
    assert np.allclose(10.0 ** cells[10:].astype(np.float64), 0.5, rtol=1e-2)
    assert (norms[ranks[0].id][10:, 0] > 0).tolist() == [True, True]
    assert (norms[ranks[1].id][10:, 0] > 0).tolist() == [True, False]


def test_the_job_summary_counts_replicas_per_task_and_each_nonfinite_step_once():
    """Two ranks of one replica each read "2 tasks x 2 replicas"; a step NaN on both
    ranks counted twice."""
    from gradwatch.collector import jobs
    from tests.support.rules import Harness

    h = Harness()
    ranks = [h.register(task_index=t) for t in (0, 1)]
    for session in ranks:
        h.feed(session, {"present": [1, 1, 1], "norm": [1, 1, 1], "nan": [0, 2, 0]})
    row = jobs.summary("job", h.registry.groups.values(), h.tracker)
    assert (row["tasks"], row["replicas"], row["nonfinite_steps"]) == (2, 1, 1)


def test_shards_of_equal_norm_combine_and_a_repeat_does_not():
    """Two shards of one step with the same norm were taken for one report sent twice
    (the heat map read 1/sqrt(2) of the norm); a session's own repeat of a step is the
    one not to add again."""
    from gradwatch.collector.history import History

    history = History(sharded=True)
    one = dict(columns=np.array([0]), steps=np.array([7]), present=np.ones((1, 1, 1), bool),
               norms=np.full((1, 1, 1), 3.0, np.float32), nonfinite=np.zeros((1, 1, 1), bool),
               global_norm=np.full((1, 1), 3.0, np.float32), width=1)
    for session in ("rank0", "rank1", "rank1"):
        history.add(session, **one)
    steps, cells, _ = history.window()
    assert steps.tolist() == [7]
    assert 10.0 ** float(cells[0, 0]) == pytest.approx(3.0 * 2 ** 0.5, rel=1e-2)


@pytest.mark.parametrize("tasks", [1, 2])
def test_a_new_run_with_other_variables_lists_only_its_own(tasks):
    """The same job name run again with a layer removed: the old run's variables stayed
    in the group, counted on the jobs page ("variables: 6" for 4 watched), listed with
    empty rows in the table and heat map, and in GradientMissing's "2 of 8 variables"."""
    import time

    from gradwatch.collector.alerts import AlertTracker
    from gradwatch.collector.jobs import detail, summary
    from tests.support.rules import Harness, healthy

    h = Harness()
    old_names = ("trunk", "unused", "head")
    old = [h.register(task_index=t, names=old_names) for t in range(tasks)]
    for session in old:
        h.feed(session, {"present": [1, 0, 1], "norm": [1.0, 0.0, 2.0]})
    time.sleep(0.01)
    new = [h.register(task_index=t, names=("trunk", "head")) for t in range(tasks)]
    for session in new:
        h.feed(session, *[healthy(n=2, norm=3.0)] * 4, first_step=0)
    group = new[0].group
    assert group.names == ["trunk", "head"]
    assert summary("job", [group], AlertTracker(print))["variables"] == 2
    (optimizer,) = detail(h.registry, AlertTracker(print), "job")["groups"]
    assert [v["name"] for v in optimizer["variables"]] == ["trunk", "head"]
    assert [v["norm"] for v in optimizer["variables"]] == [3.0, 3.0]
    _, cells, _ = group.history.window()
    assert cells.shape == (4, 2) and np.allclose(10.0 ** cells.astype(np.float64), 3.0,
                                                 rtol=1e-2)


def test_variables_of_forgotten_tasks_leave_the_group():
    """A task forgotten (crashed an hour ago) takes the variables only it watched along."""
    registry = Registry()
    kept = registry.register("job", "sgd", "worker", 0, 1, ["shared", "mine"])
    gone = registry.register("job", "sgd", "worker", 1, 1, ["theirs", "shared"])
    kept.last_report_time, gone.last_report_time = 300.0, 60.0
    registry.expire_inactive(older_than=200.0)
    assert kept.group.names == ["shared", "mine"]
    assert kept.columns.tolist() == [0, 1]


def test_a_missing_gradient_has_no_norm_on_the_job_page():
    """A variable without gradient read "norm 0" in the table, like a zero gradient."""
    from gradwatch.collector.alerts import AlertTracker
    from gradwatch.collector.jobs import detail
    from tests.support.rules import Harness

    h = Harness()
    session = h.register(names=("trained", "missing", "zero"))
    h.feed(session, {"present": [1, 0, 1], "norm": [2.0, 0.0, 0.0]})
    (group,) = detail(h.registry, AlertTracker(print), "job")["groups"]
    assert [(v["norm"], v["present"]) for v in group["variables"]] == [
        (2.0, True), (None, False), (0.0, True)]


@pytest.mark.parametrize("sharded", [False, True])
def test_history_cells_rank_nonfinite_over_missing_over_norms(sharded):
    """Reports of one step combine over replicas and tasks: non-finite anywhere wins, then
    a gradient missing anywhere, then the larger norm (shards: the norm of both); a
    variable nobody reported reads no data."""
    from gradwatch.collector.history import MISSING, NO_DATA, History

    history = History(sharded=sharded)

    def report(session, present, norms, nonfinite, columns=(0, 1, 2, 3)):
        shape = (1, len(present), len(columns))  # one step, replicas x variables
        history.add(session, columns=np.array(columns), steps=np.array([5]),
                    present=np.array(present, bool).reshape(shape),
                    norms=np.array(norms, np.float32).reshape(shape),
                    nonfinite=np.array(nonfinite, bool).reshape(shape),
                    global_norm=np.ones((1, len(present)), np.float32), width=5)

    # two replicas: variable 1 missing on one, variable 2 NaN on one
    report("a", [[1, 1, 1, 1], [1, 0, 1, 1]], [[10, 1, 1, 100], [1000, 0, np.nan, 100]],
           [[0, 0, 0, 0], [0, 0, 1, 0]])
    report("b", [[1, 1, 1, 1]], [[1, 1, 1, 100]], [[0, 0, 0, 0]])
    steps, cells, _ = history.window()
    assert steps.tolist() == [5]
    row = cells[0].astype(np.float64)
    assert row[0] == pytest.approx(3.0, abs=1e-3)  # the max over replicas and tasks
    assert row[1] == float(MISSING)
    assert np.isnan(row[2])
    # shards: the norm of both (sqrt(100² + 100²)); replicas of one task: their max
    assert 10 ** row[3] == pytest.approx(100 * 2 ** 0.5 if sharded else 100, rel=1e-2)
    assert row[4] == float(NO_DATA)

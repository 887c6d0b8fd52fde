"""The metric contract rendered at scrape time."""


from gradwatch.collector.exporter import OTHER_VARIABLES, Exporter, render_metrics
from gradwatch.collector.ingest import Limits, decode_batch
from gradwatch.collector.state import Registry
from gradwatch.collector.telemetry import Telemetry
from tests.support import wire
from tests.support.metrics import parse_metrics, select


def render(registry: Registry, cap: int = 500) -> dict:
    text = render_metrics(Exporter(registry, Telemetry(), list, dict, cap)).decode()
    return parse_metrics(text)


def feed(session, present, norm, nan=None):
    b = wire.batch(session.id, session.last_sequence + 1,
                   wire.step(session.steps_total, present, norm=norm, nan=nan))
    session.apply(b.sequence, decode_batch(b, session.num_replicas, session.num_variables,
                                           Limits()))


def test_per_variable_series_aggregate_tasks_and_replicas():
    registry = Registry()
    w0 = registry.register("job", "adam", "worker", 0, 2, ["a", "b"])
    w1 = registry.register("job", "adam", "worker", 1, 1, ["a", "b"])
    feed(w0, [[1, 1], [1, 0]], [[1.0, 2.0], [3.0, 0.0]], nan=[[0, 2], [0, 0]])
    feed(w1, [1, 1], [0.5, 7.0])
    samples = render(registry)
    assert select(samples, "gradwatch_gradient_norm") == {"a": 3.0, "b": 7.0}
    assert select(samples, "gradwatch_gradient_present") == {"a": 1.0, "b": 0.0}
    assert select(samples, "gradwatch_gradient_missing_steps_total") == {"a": 0.0, "b": 1.0}
    assert select(samples, "gradwatch_gradient_nan_values_total") == {"a": 0.0, "b": 2.0}
    without = select(samples, "gradwatch_variables_without_gradient", task_index="0")
    assert sorted(without.values()) == [0.0, 1.0]
    assert select(samples, "gradwatch_steps_total", task_index="1") == {
        "optimizer=adam,task_index=1,task_type=worker,training_job=job": 1.0}


def test_no_label_named_job_or_instance():
    registry = Registry()
    feed(registry.register("job", "adam", "worker", 0, 1, ["a"]), [1], [1.0])
    for samples in render(registry).values():
        for labels, _ in samples:
            assert "job" not in labels and "instance" not in labels


def test_variable_series_are_capped_and_folded():
    registry = Registry()
    names = [f"v{i}" for i in range(10)]
    session = registry.register("job", "adam", "worker", 0, 1, names)
    feed(session, [1] * 10, [float(i) for i in range(10)])
    samples = render(registry, cap=4)
    norms = select(samples, "gradwatch_gradient_norm")
    # Healthy variables spread over the model: first, last, then the middle ones.
    assert list(norms) == ["v0", "v2", "v5", "v9", OTHER_VARIABLES]
    assert norms[OTHER_VARIABLES] == 8.0  # max of the folded ones
    assert select(samples, "gradwatch_gradient_present")[OTHER_VARIABLES] == 1.0
    assert select(samples, "gradwatch_variable_series_folded") == {
        "optimizer=adam,training_job=job": 6.0}


def test_the_cap_never_folds_a_variable_that_missed_or_went_non_finite():
    """Victims are chosen by what matters: v3 (missing once, present again), v6 (NaN) and
    v7 (missing now) keep their series whatever their place in the model; the one slot
    left goes to the model's first variable."""
    registry = Registry()
    session = registry.register("job", "adam", "worker", 0, 1, [f"v{i}" for i in range(10)])
    feed(session, [1, 1, 1, 0, 1, 1, 1, 1, 1, 1], [1.0] * 10)
    nan = [0] * 10
    nan[6] = 3
    feed(session, [1] * 7 + [0] + [1] * 2, [1.0] * 10, nan=nan)
    samples = render(registry, cap=4)
    assert list(select(samples, "gradwatch_gradient_norm")) == [
        "v0", "v3", "v6", "v7", OTHER_VARIABLES]
    assert select(samples, "gradwatch_gradient_present")["v7"] == 0.0
    assert select(samples, "gradwatch_gradient_present")[OTHER_VARIABLES] == 1.0
    assert select(samples, "gradwatch_gradient_nan_values_total")["v6"] == 3.0
    # More bad variables than room: the first ones in model order, none healthy.
    feed(session, [0] * 10, [0.0] * 10)
    assert list(select(render(registry, cap=4), "gradwatch_gradient_norm")) == [
        "v0", "v1", "v2", "v3", OTHER_VARIABLES]


def test_variable_positions_sort_series_by_depth():
    registry = Registry()
    session = registry.register("job", "adam", "worker", 0, 1, ["out/b", "dense/w", "emb"])
    feed(session, [1, 1, 1], [1.0, 2.0, 3.0])
    info = render(registry)["gradwatch_variable_info"]
    assert sorted((labels["position"], labels["variable"]) for labels, _ in info) == [
        ("000000", "out/b"), ("000001", "dense/w"), ("000002", "emb")]


def test_task_info_names_host_pid_and_pod_once_per_task():
    registry = Registry()
    for optimizer in ("gen", "disc"):
        feed(registry.register("job", optimizer, "worker", 3, 1, ["a"], hostname="pod-3",
                               pid=41), [1], [1.0])
    assert render(registry)["gradwatch_task_info"] == [
        ({"training_job": "job", "task_type": "worker", "task_index": "3",
          "hostname": "pod-3", "pid": "41", "pod": "pod-3"}, 1.0)]


def test_active_alerts_carry_job_and_optimizer():
    from gradwatch.collector.alerts import Alert

    def alert(job: str) -> Alert:
        return Alert({"alertname": "GradientMissing", "severity": "warning",
                      "training_job": job, "optimizer": "adam"})

    exporter = Exporter(Registry(), Telemetry(), lambda: [alert("a"), alert("b"), alert("b")],
                        dict)
    assert parse_metrics(render_metrics(exporter).decode())["gradwatch_alerts_active"] == [
        ({"alertname": "GradientMissing", "severity": "warning", "training_job": "a",
          "optimizer": "adam"}, 1.0),
        ({"alertname": "GradientMissing", "severity": "warning", "training_job": "b",
          "optimizer": "adam"}, 2.0)]


def test_missing_cause_info_for_variables_without_gradient():
    from gradwatch.collector.state import MissingCause

    registry = Registry()
    w0 = registry.register("job", "adam", "worker", 0, 1, ["a", "b", "c"])
    floor = MissingCause("broken_at_op", "model/Floor", "Floor", "/app/train.py:42", "...")
    w0.set_causes({1: floor, 2: MissingCause("unused", "", "", "", "...")})
    feed(w0, [1, 0, 1], [1.0, 0.0, 2.0])  # c has a gradient again: its cause is stale
    info = render(registry)["gradwatch_gradient_missing_cause_info"]
    assert info == [({"training_job": "job", "optimizer": "adam", "variable": "b",
                      "cause": "broken_at_op", "op_type": "Floor", "op": "model/Floor",
                      "source": "/app/train.py:42"}, 1.0)]


def test_text_matches_client_python_and_escapes_label_values():
    """The column writer's output parses as client_python's own, odd names included."""
    registry = Registry()
    odd = 'scope/"quoted"\\back\nslash'
    w0 = registry.register('job "x"', "adam", "worker", 0, 1, [odd, "b"])
    feed(w0, [0, 1], [float("nan"), float("inf")])
    samples = render(registry)
    assert select(samples, "gradwatch_gradient_present") == {odd: 0.0, "b": 1.0}
    norms = select(samples, "gradwatch_gradient_norm")
    assert norms["b"] == float("inf") and norms[odd] != norms[odd]  # +Inf and NaN


def test_filtered_scrape_renders_only_the_named_samples():
    registry = Registry()
    feed(registry.register("job", "adam", "worker", 0, 1, ["a"]), [1], [1.0])
    collector = Exporter(registry, Telemetry(), list, dict)
    text = render_metrics(collector, ["gradwatch_last_step", "gradwatch_steps_total"]).decode()
    assert set(parse_metrics(text)) == {"gradwatch_last_step", "gradwatch_steps_total"}


def test_rejected_messages_carry_code_and_reason():
    telemetry = Telemetry()
    telemetry.rejected[("INVALID_ARGUMENT", "array_length")] += 2
    telemetry.rejected[("RESOURCE_EXHAUSTED", "jobs")] += 1
    text = render_metrics(Exporter(Registry(), telemetry, list, dict)).decode()
    assert select(parse_metrics(text), "gradwatch_collector_rejected_messages_total") == {
        "code=INVALID_ARGUMENT,reason=array_length": 2.0,
        "code=RESOURCE_EXHAUSTED,reason=jobs": 1.0}


def test_each_section_builds_exactly_the_metrics_it_declares():
    """The ``?name[]=`` filter trusts the declarations: a family built by a section that
    does not declare it would vanish from filtered scrapes."""
    registry = Registry()
    feed(registry.register("job", "adam", "worker", 0, 1, ["a", "b"]), [1, 0], [1.0, 0.0])
    exporter = Exporter(registry, Telemetry(), list, dict)
    for metrics, build in exporter.sections:
        assert [f.sample_name for f in build()] == [m.sample_name for m in metrics]
    for metric in exporter.metrics:  # and each one alone
        (family,) = exporter.families({metric.sample_name})
        assert family.sample_name == metric.sample_name


def test_shards_of_a_variable_combine_into_its_norm():
    """FSDP: tasks report shard norms 3 and 4 of one variable; its norm is 5."""
    registry = Registry()
    w0 = registry.register("job", "adam", "worker", 0, 1, ["a", "b"], sharded=True)
    w1 = registry.register("job", "adam", "worker", 1, 1, ["a", "b"], sharded=True)
    feed(w0, [1, 1], [3.0, 1.0])
    feed(w1, [1, 1], [4.0, 0.0])
    assert select(render(registry), "gradwatch_gradient_norm") == {"a": 5.0, "b": 1.0}


def test_a_task_hung_before_its_first_step_has_a_report_age():
    """A task that registered and never stepped (a data pipeline or a collective hung at
    start) had no `gradwatch_last_report_timestamp_seconds`: dashboards neither counted it
    as running nor showed its report age grow, though WorkerSilent pages it."""
    registry = Registry()
    hung = registry.register("job", "adam", "worker", 0, 1, ["a"])
    stepping = registry.register("job", "adam", "worker", 1, 1, ["a"])
    feed(stepping, [1], [1.0])
    reported = select(render(registry), "gradwatch_last_report_timestamp_seconds")
    assert reported == {
        "optimizer=adam,task_index=0,task_type=worker,training_job=job": hung.registered_at,
        "optimizer=adam,task_index=1,task_type=worker,training_job=job":
            stepping.last_report_time}
    assert "task_index=0" not in str(select(render(registry), "gradwatch_last_step"))
    hung.closed = True
    assert len(select(render(registry), "gradwatch_last_report_timestamp_seconds")) == 1

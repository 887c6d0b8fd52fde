"""Validation of registrations and batches: precise errors, nothing half-applied."""

import grpc
import numpy as np
import pytest

from gradwatch.collector.ingest import (
    InvalidReport,
    Limits,
    Reason,
    admit_registration,
    decode_batch,
    validate_registration,
)
from gradwatch.collector.state import Registry
from gradwatch.proto.layout import BYTES_PER_STATISTIC
from tests.support import wire

LIMITS = Limits(max_variables=10, max_replicas=4, max_label_length=20, max_batch_steps=8,
                max_versions=3)


def test_valid_registration_returns_names():
    assert validate_registration(wire.registration(num_variables=2), LIMITS) == [
        "dense/v0", "dense/v1"]


@pytest.mark.parametrize("mutate, code, message, reason", [
    (lambda r: setattr(r, "training_job", ""), "INVALID_ARGUMENT", "training_job must not",
     "empty"),
    (lambda r: setattr(r, "training_job", "x" * 21), "INVALID_ARGUMENT", "limit is 20",
     "label_length"),
    (lambda r: setattr(r, "optimizer", "a\nb"), "INVALID_ARGUMENT", "control characters",
     "control_characters"),
    (lambda r: setattr(r, "num_replicas", 0), "INVALID_ARGUMENT", "num_replicas", "replicas"),
    (lambda r: setattr(r, "num_replicas", 5), "INVALID_ARGUMENT", "num_replicas", "replicas"),
    (lambda r: r.variables.add(name="dense/v0"), "INVALID_ARGUMENT", "unique",
     "duplicate_variable"),
    (lambda r: r.variables.add(name=""), "INVALID_ARGUMENT", "variables[3].name", "empty"),
    (lambda r: [r.variables.add(name=f"x{i}") for i in range(8)], "RESOURCE_EXHAUSTED",
     "11 variables", "variables_per_session"),
    (lambda r: r.ClearField("variables"), "INVALID_ARGUMENT", "variables must not be empty",
     "empty"),
    (lambda r: setattr(r, "hostname", "h" * 21), "INVALID_ARGUMENT", "hostname is 21",
     "label_length"),
    (lambda r: setattr(r, "strategy", "Mirrored\x00"), "INVALID_ARGUMENT",
     "strategy contains control", "control_characters"),
    (lambda r: r.versions.update({f"lib{i}": "1.0" for i in range(4)}), "INVALID_ARGUMENT",
     "versions has 4 entries; the limit is 3", "versions"),
    (lambda r: r.versions.update({"keras": "3" * 21}), "INVALID_ARGUMENT",
     "versions['keras'] is 21 characters", "label_length"),
])
def test_invalid_registrations(mutate, code, message, reason):
    request = wire.registration()
    mutate(request)
    with pytest.raises(InvalidReport) as raised:
        validate_registration(request, LIMITS)
    assert raised.value.code == getattr(grpc.StatusCode, code)
    assert message in raised.value.message
    assert raised.value.reason == Reason(reason)


def register(registry: Registry, request, limits: Limits = LIMITS):
    """What the service does: validate, admit, register."""
    names = validate_registration(request, limits)
    admit_registration(request, names, registry, limits)
    return registry.register(request.training_job, request.optimizer, request.task_type,
                             request.task_index, request.num_replicas, names,
                             hostname=request.hostname, pid=request.pid)


def refused(registry: Registry, request, limits: Limits = LIMITS) -> InvalidReport:
    with pytest.raises(InvalidReport) as raised:
        register(registry, request, limits)
    return raised.value


def test_training_jobs_are_limited_and_a_known_job_still_registers():
    registry, limits = Registry(), Limits(max_jobs=2)
    register(registry, wire.registration(job="a"), limits)
    register(registry, wire.registration(job="b"), limits)
    error = refused(registry, wire.registration(job="c"), limits)
    assert (error.code, error.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.JOBS)
    assert error.message == ("collector serves 2 training jobs, its limit (max_jobs); "
                             "job 'c' would be one more")
    assert set(registry.groups) == {("a", "sgd"), ("b", "sgd")}  # nothing left behind
    register(registry, wire.registration(job="b", task_index=1), limits)


def test_sessions_per_job_are_limited_over_optimizers_and_a_restart_still_registers():
    registry, limits = Registry(), Limits(max_sessions_per_job=2)
    register(registry, wire.registration(job="j", optimizer="gen"), limits)
    register(registry, wire.registration(job="j", optimizer="disc"), limits)
    error = refused(registry, wire.registration(job="j", task_index=1), limits)
    assert (error.code, error.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                          Reason.SESSIONS_PER_JOB)
    assert error.message == "job 'j' has 2 sessions, the limit per job (max_sessions_per_job)"
    register(registry, wire.registration(job="other"), limits)
    register(registry, wire.registration(job="j", optimizer="gen"), limits)  # replaces
    assert len(registry.sessions) == 3


def test_sessions_are_limited_but_a_task_registering_again_replaces_its_own():
    registry, limits = Registry(), Limits(max_sessions=2)
    register(registry, wire.registration(job="a"), limits)
    register(registry, wire.registration(job="b"), limits)
    error = refused(registry, wire.registration(job="a", task_index=1), limits)
    assert (error.code, error.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.SESSIONS)
    assert error.message == "collector holds 2 sessions, its limit (max_sessions)"
    register(registry, wire.registration(job="a"), limits)  # a restart at the limit
    assert len(registry.sessions) == 2


def test_statistics_over_all_sessions_are_limited_and_expiry_or_replacement_frees_them():
    """max_statistics bounds the collector's memory: replicas x variables over sessions."""
    registry, limits = Registry(), Limits(max_statistics=20)
    register(registry, wire.registration(job="a", num_variables=3, num_replicas=4), limits)
    register(registry, wire.registration(job="b", num_variables=2, num_replicas=2), limits)
    assert registry.statistics == 16
    error = refused(registry, wire.registration(job="c", num_variables=5), limits)
    assert (error.code, error.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.STATISTICS)
    assert error.message == ("this session's 1 replicas x 5 variables would bring the "
                             "collector to 21 statistics per step over its sessions; the limit "
                             "is 20 (max_statistics)")
    assert registry.statistics == 16 and registry.jobs() == {"a", "b"}
    # Task a/0 restarting with 4 x 4 replaces its 4 x 3: 16 + 4 = 20, admitted.
    register(registry, wire.registration(job="a", num_variables=4, num_replicas=4), limits)
    assert registry.statistics == 20
    registry.remove(next(s.id for s in registry.sessions.values()
                         if s.group.training_job == "b"))
    assert registry.statistics == 16
    register(registry, wire.registration(job="c", num_variables=4), limits)
    assert registry.statistics == 20


def test_variables_per_job_count_the_union_of_tables_and_a_refusal_adds_no_column():
    registry, limits = Registry(), Limits(max_variables_per_job=5)
    register(registry, wire.registration(job="j", num_variables=3), limits)
    same_table = wire.registration(job="j", num_variables=3, task_index=1)
    register(registry, same_table, limits)
    wider = wire.registration(job="j", num_variables=3, task_index=2)
    for i in range(3):
        wider.variables.add(name=f"extra/{i}")
    error = refused(registry, wider, limits)
    assert (error.code, error.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                          Reason.VARIABLES_PER_JOB)
    assert error.message == ("job 'j' (optimizer 'sgd') would have 6 distinct variables over "
                             "its tasks; the limit is 5 (max_variables_per_job)")
    group = registry.groups[("j", "sgd")]
    assert group.names == ["dense/v0", "dense/v1", "dense/v2"]
    assert len(group.sessions) == 2 and len(registry.sessions) == 2
    register(registry, wire.registration(job="j", num_variables=5, task_index=2), limits)


def identified(request, hostname: str, pid: int):
    request.hostname, request.pid = hostname, pid
    return request


def test_a_task_streaming_from_another_process_is_not_replaced():
    registry = Registry()
    first = register(registry, identified(wire.registration(job="j"), "host-a", 10))
    first.open_streams = 1  # its Report stream is open
    error = refused(registry, identified(wire.registration(job="j"), "host-b", 20))
    assert (error.code, error.reason) == (grpc.StatusCode.ALREADY_EXISTS,
                                          Reason.ALREADY_REPORTING)
    assert error.message == ("task worker/0 of job 'j' (optimizer 'sgd') is already reporting "
                             "from host-a:10")
    assert list(registry.sessions) == [first.id]
    # The same process reconnecting replaces its session ...
    again = register(registry, identified(wire.registration(job="j"), "host-a", 10))
    assert list(registry.sessions) == [again.id]
    # ... and so does another process once no stream is open (the old one crashed).
    replacement = register(registry, identified(wire.registration(job="j"), "host-b", 20))
    assert list(registry.sessions) == [replacement.id]


def test_decode_batch_shapes_replica_major():
    present = [[1, 0, 1], [1, 1, 0]]  # 2 replicas x 3 variables
    norm = [[1, 0, 2], [3, 4, 0]]
    b = wire.batch("s", 1, wire.step(5, present, norm=norm), wire.step(6, present, norm=norm))
    decoded = decode_batch(b, num_replicas=2, num_variables=3, limits=LIMITS)
    assert decoded.present.shape == (2, 2, 3)
    assert decoded.present[0].tolist() == [[True, False, True], [True, True, False]]
    np.testing.assert_array_equal(decoded.l2_norm[1], norm)
    assert decoded.steps.tolist() == [5, 6]


def with_wall_time(step, wall_time: float):
    step.wall_time = wall_time
    return step


@pytest.mark.parametrize("build, message, reason", [
    (lambda: wire.batch("s", 1, wire.step(1, [1, 1])),
     "steps[0].present has 2 bytes; expected 3", "array_length"),
    (lambda: wire.batch("s", 1, *[wire.step(i, [1, 1, 1]) for i in range(9)]), "limit is 8",
     "batch_steps"),
    (lambda: wire.batch("s", 1, wire.step(1, [1, 1, 1], nan=[0, -1, 0])),
     "steps[0].nan_count must hold finite, non-negative counts", "count"),
    (lambda: wire.batch("s", 1, wire.step(1, [1, 1, 1]),
                        wire.step(1, [1, 1, 1], nan=[0, np.nan, 0])),
     "steps[1].nan_count must hold finite", "count"),
    (lambda: wire.batch("s", 1, wire.step(1, [1, 1, 1], inf=[0, 0, np.inf])),
     "steps[0].inf_count must hold finite", "count"),
    (lambda: wire.batch("s", 1, wire.step(-1, [1, 1, 1])),
     "steps[0].step is -1; steps are non-negative", "step"),
    (lambda: wire.batch("s", 1, wire.step(1, [1, 1, 1]), wire.step(2, [1, 1, 1], norm=[1, -2, 0])),
     "steps[1].l2_norm has a negative value", "statistic"),
    (lambda: wire.batch("s", 1, wire.step(1, [1, 1, 1], norm=[0, 0, -np.inf])),
     "steps[0].l2_norm has a negative value", "statistic"),
    (lambda: wire.batch("s", 1, with_wall_time(wire.step(1, [1, 1, 1]), np.nan)),
     "steps[0].wall_time is nan; expected seconds since the epoch", "wall_time"),
    (lambda: wire.batch("s", 1, with_wall_time(wire.step(1, [1, 1, 1]), -1.0)),
     "steps[0].wall_time is -1.0", "wall_time"),
])
def test_invalid_batches(build, message, reason):
    with pytest.raises(InvalidReport) as raised:
        decode_batch(build(), num_replicas=1, num_variables=3, limits=LIMITS)
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert message in raised.value.message
    assert raised.value.reason == Reason(reason)


def batch_of_steps(steps: list[int], rewound: tuple[int, ...] = ()):
    reports = [wire.step(n, [1, 1, 1]) for n in steps]
    for i in rewound:
        reports[i].rewound = True
    return wire.batch("s", 1, *reports)


@pytest.mark.parametrize("steps, last_step, message", [
    ([4, 5, 6, 7, 4, 5], -1, "steps[4].step is 4, lower than the step before it (7)"),
    ([3, 4], 7, "steps[0].step is 3, lower than the step before it (7)"),
])
def test_a_step_lower_than_the_one_before_it_is_refused(steps, last_step, message):
    with pytest.raises(InvalidReport) as raised:
        decode_batch(batch_of_steps(steps), num_replicas=1, num_variables=3,
                     limits=Limits(max_batch_steps=8), last_step=last_step)
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert message in raised.value.message and "rewound" in raised.value.message
    assert raised.value.reason == Reason.STEP_ORDER


@pytest.mark.parametrize("steps, last_step, rewound", [
    ([4, 5, 6, 7, 4, 5, 6, 7], -1, (4,)),  # a checkpoint restored within one flush
    ([3, 4], 7, (0,)),  # ... between two batches
    ([7, 7, 8], 7, ()),  # a step repeated (nothing applied in between) is not lower
])
def test_steps_marked_rewound_or_repeated_are_accepted(steps, last_step, rewound):
    decoded = decode_batch(batch_of_steps(steps, rewound), num_replicas=1, num_variables=3,
                           limits=Limits(max_batch_steps=8), last_step=last_step)
    assert decoded.steps.tolist() == steps
    assert decoded.rewound_to == tuple(steps[i] for i in rewound)


def test_non_finite_norms_are_what_a_non_finite_gradient_gives_and_are_accepted():
    """The agents' statistics turn a NaN gradient into a NaN norm and an Inf one into
    +Inf. Negative values never come from an agent."""
    b = wire.batch("s", 1, wire.step(1, [1, 1, 1], norm=[np.nan, np.inf, -0.0],
                                     nan=[4, 0, 0], inf=[0, 1, 0]))
    decoded = decode_batch(b, num_replicas=1, num_variables=3, limits=LIMITS)
    assert np.isnan(decoded.l2_norm[0, 0, 0]) and np.isinf(decoded.l2_norm[0, 0, 1])


def test_batch_steps_fit_the_message_limit():
    limits = Limits(max_message_bytes=1_000_000, max_batch_steps=256)
    steps = limits.batch_steps_for(10_000)
    assert 1 <= steps < 256
    assert 2 * steps * (10_000 * BYTES_PER_STATISTIC + 64) <= 1_000_000
    assert 2 * (steps + 1) * (10_000 * BYTES_PER_STATISTIC + 64) > 1_000_000


def test_a_step_larger_than_half_the_message_limit_is_refused_at_registration():
    limits = Limits(max_message_bytes=1_000_000)
    request = wire.registration(num_variables=10_000, num_replicas=4)
    with pytest.raises(InvalidReport) as raised:
        validate_registration(request, limits)
    assert raised.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "message limit is 1000000" in raised.value.message


def test_diagnoses_decode_by_variable_id():
    from gradwatch.collector.ingest import decode_diagnoses

    batch = wire.batch("s", 1, wire.step(0, [1, 0, 0]))
    batch.diagnoses.extend([wire.diagnosis(1), wire.diagnosis(2, "UNUSED", op_name="",
                                                               op_type="", source_file="")])
    causes = decode_diagnoses(batch, 3, LIMITS)
    assert causes[1].cause == "broken_at_op" and causes[1].source == "/app/train.py:42"
    assert causes[1].op_type == "Floor" and "straight-through" in causes[1].explanation
    assert causes[2].cause == "unused" and causes[2].source == ""


@pytest.mark.parametrize("diagnosis, message, reason", [
    (wire.diagnosis(3), "diagnoses[0].variable_id is 3; the session has 3 variables",
     "diagnosis"),
    (wire.diagnosis(0, "CAUSE_UNSPECIFIED"), "diagnoses[0].cause 0 is not a known cause",
     "diagnosis"),
    (wire.diagnosis(0), None, "diagnosis"),
    (wire.diagnosis(0, message="x" * 5000), "diagnoses[0].message is 5000 characters",
     "text_length"),
    (wire.diagnosis(0, op_name="a\x00b"), "diagnoses[0].op_name contains control",
     "control_characters"),
])
def test_invalid_diagnoses_are_rejected(diagnosis, message, reason):
    from gradwatch.collector.ingest import decode_diagnoses

    batch = wire.batch("s", 1)
    if message is None:  # an unknown enum number (a newer agent): rejected, not guessed
        diagnosis.cause = 99
        message = "diagnoses[0].cause 99 is not a known cause"
    batch.diagnoses.append(diagnosis)
    with pytest.raises(InvalidReport) as raised:
        decode_diagnoses(batch, 3, LIMITS)
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert message in raised.value.message
    assert raised.value.reason == Reason(reason)

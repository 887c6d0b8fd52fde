"""Validation of registrations and batches: precise errors, nothing half-applied."""

import grpc
import numpy as np
import pytest

from gradwatch.collector.ingest import InvalidReport, Limits, decode_batch, validate_registration

import wire

LIMITS = Limits(max_variables=10, max_replicas=4, max_label_length=20, max_batch_steps=8)


def test_valid_registration_returns_names():
    assert validate_registration(wire.registration(num_variables=2), LIMITS) == [
        "dense/v0", "dense/v1"]


@pytest.mark.parametrize("mutate, code, message", [
    (lambda r: setattr(r, "training_job", ""), "INVALID_ARGUMENT", "training_job must not"),
    (lambda r: setattr(r, "training_job", "x" * 21), "INVALID_ARGUMENT", "limit is 20"),
    (lambda r: setattr(r, "optimizer", "a\nb"), "INVALID_ARGUMENT", "control characters"),
    (lambda r: setattr(r, "num_replicas", 0), "INVALID_ARGUMENT", "num_replicas"),
    (lambda r: setattr(r, "num_replicas", 5), "INVALID_ARGUMENT", "num_replicas"),
    (lambda r: r.variables.add(name="dense/v0"), "INVALID_ARGUMENT", "unique"),
    (lambda r: r.variables.add(name=""), "INVALID_ARGUMENT", "variables[3].name"),
    (lambda r: [r.variables.add(name=f"x{i}") for i in range(8)], "RESOURCE_EXHAUSTED",
     "11 variables"),
    (lambda r: r.ClearField("variables"), "INVALID_ARGUMENT", "variables must not be empty"),
])
def test_invalid_registrations(mutate, code, message):
    request = wire.registration()
    mutate(request)
    with pytest.raises(InvalidReport) as raised:
        validate_registration(request, LIMITS)
    assert raised.value.code == getattr(grpc.StatusCode, code)
    assert message in raised.value.message


def test_decode_batch_shapes_replica_major():
    present = [[1, 0, 1], [1, 1, 0]]  # 2 replicas x 3 variables
    norm = [[1, 0, 2], [3, 4, 0]]
    b = wire.batch("s", 1, wire.step(5, present, norm=norm), wire.step(6, present, norm=norm))
    decoded = decode_batch(b, num_replicas=2, num_variables=3, limits=LIMITS)
    assert decoded.present.shape == (2, 2, 3)
    assert decoded.present[0].tolist() == [[True, False, True], [True, True, False]]
    np.testing.assert_array_equal(decoded.l2_norm[1], norm)
    assert decoded.steps.tolist() == [5, 6]


@pytest.mark.parametrize("build, message", [
    (lambda: wire.batch("s", 1, wire.step(1, [1, 1])), "steps[0].present has 2 bytes; expected 3"),
    (lambda: wire.batch("s", 1, *[wire.step(i, [1, 1, 1]) for i in range(9)]), "limit is 8"),
    (lambda: wire.batch("s", 1, wire.step(1, [1, 1, 1], nan=[0, -1, 0])), "non-negative"),
    (lambda: wire.batch("s", 1, wire.step(2, [1, 1, 1]), wire.step(1, [1, 1, 1])),
     "non-decreasing"),
    (lambda: wire.batch("s", 1, wire.step(-1, [1, 1, 1])), "non-negative"),
])
def test_invalid_batches(build, message):
    with pytest.raises(InvalidReport) as raised:
        decode_batch(build(), num_replicas=1, num_variables=3, limits=LIMITS)
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert message in raised.value.message


def test_batch_steps_fit_the_message_limit():
    limits = Limits(max_message_bytes=1_000_000, max_batch_steps=256)
    steps = limits.batch_steps_for(10_000)
    assert 1 <= steps < 256
    assert 2 * steps * (10_000 * 17 + 64) <= 1_000_000


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


@pytest.mark.parametrize("diagnosis, message", [
    (wire.diagnosis(3), "diagnoses[0].variable_id is 3; the session has 3 variables"),
    (wire.diagnosis(0, "CAUSE_UNSPECIFIED"), "diagnoses[0].cause 0 is not a known cause"),
    (wire.diagnosis(0), None),
    (wire.diagnosis(0, message="x" * 5000), "diagnoses[0].message is 5000 characters"),
    (wire.diagnosis(0, op_name="a\x00b"), "diagnoses[0].op_name contains control"),
])
def test_invalid_diagnoses_are_rejected(diagnosis, message):
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

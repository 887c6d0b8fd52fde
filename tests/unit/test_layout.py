"""The statistics layout and the wire contract agree, and packing round-trips."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf.descriptor import FieldDescriptor

from gradwatch.proto.layout import (
    BYTES_PER_STATISTIC,
    COLUMN,
    COLUMNS,
    NUM_COLUMNS,
    STATISTICS,
    Kind,
    LayoutError,
    field_number,
    pack_step,
    unpack_steps,
)
from gradwatch.proto.v1 import gradwatch_pb2 as pb


def test_every_packed_field_of_a_step_report_is_a_statistic_and_back():
    packed = {f.name for f in pb.StepReport.DESCRIPTOR.fields
              if f.type == FieldDescriptor.TYPE_BYTES}
    assert packed == set(COLUMNS)
    assert NUM_COLUMNS == len(STATISTICS) and COLUMN["present"] == 0
    assert BYTES_PER_STATISTIC == sum(s.wire_dtype.itemsize for s in STATISTICS)
    assert field_number(pb.StepReport, "step") == 1


def test_pack_then_unpack_gives_the_statistics_back():
    rng = np.random.default_rng(0)
    replicas, variables = 2, 5
    stats = rng.uniform(0, 10, (3, replicas, variables, NUM_COLUMNS)).astype(np.float32)
    stats[..., COLUMN["present"]] = rng.integers(0, 2, (3, replicas, variables))
    reports = [pack_step(i, stats[i], 1.5) for i in range(3)]
    arrays = unpack_steps(reports, replicas, variables)
    for statistic in STATISTICS:
        expected = stats[..., COLUMN[statistic.name]]
        if statistic.kind is Kind.FLAG:
            expected = expected > 0
        np.testing.assert_array_equal(arrays[statistic.name], expected.astype(
            statistic.wire_dtype))
    assert [r.step for r in reports] == [0, 1, 2] and reports[0].wall_time == 1.5


def test_a_wrong_length_names_the_array():
    report = pack_step(0, np.zeros((1, 4, NUM_COLUMNS), np.float32), 0.0)
    with pytest.raises(LayoutError, match=r"steps\[0\].present has 4 bytes; expected 5 "
                                          r"\(1 replicas x 5 variables\)"):
        unpack_steps([report], 1, 5)
    with pytest.raises(ValueError, match="columns"):
        pack_step(0, np.zeros((1, 4, NUM_COLUMNS + 1)), 0.0)


def test_packing_many_steps_at_once_equals_packing_each():
    from gradwatch.proto.layout import pack_steps

    stats = np.random.default_rng(2).normal(size=(5, 2, 3, NUM_COLUMNS)).astype(np.float32)
    stats[..., 0] = stats[..., 0] > 0  # present flags
    many = pack_steps([10, 11, 12, 13, 14], stats, 2.5)
    assert many == [pack_step(10 + k, stats[k], 2.5) for k in range(5)]
    assert pack_steps([], stats[:0], 2.5) == []

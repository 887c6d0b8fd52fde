"""PyTorch statistics against NumPy references: norms, NaN/Inf counts, overflow, sparse
and half-precision gradients, and the record's layout (absent ones included)."""

import numpy as np
import pytest
import torch

from gradwatch.agent.core.record import ABSENT, from_norms, to_statistics
from gradwatch.agent.torch import stats
from gradwatch.agent.torch.recorder import HostRing
from gradwatch.agent.torch.stats import RecordBuilder, measure
from gradwatch.proto.layout import COLUMN

CPU = torch.device("cpu")


@pytest.fixture
def norms_alone(monkeypatch):
    """What a device that is not the CPU measures (norms alone), on CPU tensors: no
    accelerator runs here."""
    monkeypatch.setattr(stats, "counts_exactly", lambda device: False)


@pytest.mark.parametrize("dtypes", [
    [torch.float32, torch.bfloat16],
    [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.complex64,
     torch.complex128],
    [torch.float64],
], ids=["float32 and bfloat16", "every dtype", "float64 (a model.double())"])
def test_norms_match_numpy_for_every_dtype_and_shape(dtypes):
    """float16, bfloat16 and float32 accumulate in float32 in one kernel; float64 and
    complex gradients (which cannot narrow to float32 there) in their own precision."""
    rng = np.random.default_rng(0)
    arrays = [rng.normal(size=s) + (1j * rng.normal(size=s) if dtype.is_complex else 0)
              for s in [(3,), (4, 5), (2, 3, 4), ()] for dtype in dtypes]
    tensors = [torch.from_numpy(np.asarray(a)).to(dtype)
               for a, dtype in zip(arrays, [d for _ in range(4) for d in dtypes], strict=True)]
    norms, nan, inf = measure(tensors, CPU).numpy()
    expected = [np.linalg.norm(t.to(torch.complex128 if t.is_complex() else torch.float64))
                for t in tensors]  # of the values as rounded to each dtype
    np.testing.assert_allclose(norms, expected, rtol=1e-5)
    assert nan.tolist() == inf.tolist() == [0.0] * len(tensors)


def test_nan_and_inf_of_float64_and_complex_gradients_are_counted():
    z = torch.tensor([complex(float("nan"), 0.0), 1j, 2.0], dtype=torch.complex64)
    d = torch.tensor([float("inf"), 1.0], dtype=torch.float64)
    norms, nan, inf = measure([z, d, torch.tensor([3.0, 4.0], dtype=torch.float64)],
                              CPU).numpy()
    assert (nan.tolist(), inf.tolist()) == ([1.0, 0.0, 0.0], [0.0, 1.0, 0.0])
    assert np.isnan(norms[0]) and np.isinf(norms[1]) and norms[2] == pytest.approx(5.0)


def test_nan_and_inf_are_counted_exactly_on_the_cpu_and_only_where_they_are():
    g = torch.tensor([[float("nan"), 1.0, float("inf")], [-float("inf"), float("nan"), 2.0]])
    norms, nan, inf = measure([g, torch.tensor([3.0, 4.0])], CPU).numpy()
    assert (nan.tolist(), inf.tolist()) == ([2.0, 0.0], [2.0, 0.0])
    assert np.isnan(norms[0]) and norms[1] == pytest.approx(5.0)


@pytest.mark.parametrize("counted_together", [1 << 24, 7], ids=["at once", "in parts"])
def test_every_gradient_of_a_diverged_model_is_counted(monkeypatch, counted_together):
    """A model gone NaN has every gradient non-finite at every step: they are counted
    together, a few ops per part (one by one, 5,000 small parameters took 100 ms a step),
    each count exact, with mixed dtypes and an overflowed finite one among them."""
    monkeypatch.setattr(stats, "_COUNTED_TOGETHER", counted_together)
    rng = np.random.default_rng(1)
    tensors, expected_nan, expected_inf = [], [], []
    for k in range(40):
        a = rng.normal(size=rng.integers(1, 9))
        marks = rng.integers(0, 3, size=a.size)  # 0: finite, 1: NaN, 2: Inf
        a[marks == 1], a[marks == 2] = np.nan, -np.inf
        dtype = (torch.float32, torch.float16, torch.float64, torch.bfloat16)[k % 4]
        tensors.append(torch.from_numpy(a).to(dtype))
        expected_nan.append(float((marks == 1).sum()))
        expected_inf.append(float((marks == 2).sum()))
    tensors.append(torch.tensor([3e20, 4e20]))
    norms, nan, inf = measure(tensors, CPU).numpy()
    assert nan.tolist() == [*expected_nan, 0.0]
    assert inf.tolist() == [*expected_inf, 0.0]
    assert norms[-1] == pytest.approx(5e20, rel=1e-6)


def test_overflowing_float32_norm_is_recomputed_in_float64():
    norms, nan, inf = measure([torch.tensor([3e20, 4e20])], CPU).numpy()
    assert norms[0] == pytest.approx(5e20, rel=1e-6) and nan[0] == inf[0] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparse_gradient_of_an_embedding(dtype):
    embedding = torch.nn.Embedding(1000, 8, sparse=True, dtype=dtype)
    embedding(torch.tensor([1, 7, 7, 30])).pow(2).sum().backward()
    assert embedding.weight.grad.is_sparse
    (norm,), _, _ = measure([embedding.weight.grad], CPU).numpy()
    assert norm == pytest.approx(float(embedding.weight.grad.to_dense().norm()), rel=1e-6)


def test_an_accelerator_measures_the_norms_alone_and_the_host_marks_what_is_not_finite(
        norms_alone):
    g = torch.tensor([[float("nan"), 1.0, float("inf")], [-float("inf"), float("nan"), 2.0]])
    measures = measure([torch.tensor([3.0, 4.0]), g, torch.tensor([float("inf")])], CPU)
    assert measures.shape == (1, 3) and measures.dtype == torch.float32
    record = from_norms(np.append(measures[0].numpy(), ABSENT))
    assert record.dtype == np.float32
    assert record[4:].tolist() == [0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert record[0] == pytest.approx(5.0) and np.isnan(record[1]) and record[3] == ABSENT


def test_a_ring_of_norms_alone_reads_as_marked_records(norms_alone):
    ring = HostRing(3, 4, CPU, width=1)
    build = RecordBuilder(3, CPU)
    ring.write(build([([0, 2], torch.tensor([[3.0, float("nan")]]))]), 7)
    ring.write(build([([0, 1, 2], torch.tensor([[1.0, 2.0, float("inf")]]))]), 8)
    read = ring.read_new()
    assert read.steps.tolist() == [7, 8] and read.dropped == 0
    steps = read.stats[:, 0]  # one replica
    assert steps[..., COLUMN["present"]].tolist() == [[1, 0, 1], [1, 1, 1]]
    assert steps[1, :, COLUMN["l2_norm"]].tolist() == [1.0, 2.0, float("inf")]
    assert steps[..., COLUMN["nan_count"]].tolist() == [[0, 0, 1], [0, 0, 0]]
    assert steps[..., COLUMN["inf_count"]].tolist() == [[0, 0, 0], [0, 0, 1]]


def test_dense_gradients_beside_a_sparse_one_keep_their_order():
    embedding = torch.nn.Embedding(50, 4, sparse=True)
    embedding(torch.tensor([2, 3])).sum().backward()
    dense = [torch.full((3,), 2.0), torch.full((2, 2), 1.0, dtype=torch.float16)]
    norms, _, _ = measure([dense[0], embedding.weight.grad, dense[1]], CPU).numpy()
    np.testing.assert_allclose(norms, [np.sqrt(12.0), np.sqrt(8.0), 2.0], rtol=1e-6)


def test_record_puts_variables_in_order_and_marks_the_absent():
    build = RecordBuilder(5, CPU)
    parts = [([3, 0], torch.tensor([[3.0, 1.0], [0.0, 2.0], [0.0, 0.0]])),
             ([4], torch.tensor([[5.0], [0.0], [1.0]]))]
    columns = to_statistics(build(parts, absent=frozenset({4})).numpy().reshape(-1), 5)
    assert columns[:, COLUMN["present"]].tolist() == [1, 0, 0, 1, 0]
    assert columns[:, COLUMN["l2_norm"]].tolist() == [1.0, 0, 0, 3.0, 0]
    assert columns[:, COLUMN["nan_count"]].tolist() == [2.0, 0, 0, 0, 0]
    assert build([]).tolist() == [[ABSENT] * 5, [0.0] * 5, [0.0] * 5]


def test_a_record_of_every_variable_in_order_is_the_measures_themselves():
    build = RecordBuilder(3, CPU)
    measures = torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
    assert build([([0, 1, 2], measures)]) is measures
    shuffled = build([([2, 0, 1], measures)])  # another order goes through the index
    assert shuffled[0].tolist() == [2.0, 3.0, 1.0] and shuffled[2].tolist() == [0.0, 2.0, 0.0]

"""PyTorch statistics against NumPy references: norms, NaN/Inf counts, overflow, sparse
and half-precision gradients, and the record's layout (absent ones included)."""

import numpy as np
import pytest
import torch

from gradwatch.agent.core.record import ABSENT, to_statistics
from gradwatch.agent.torch.stats import RecordBuilder, marked, measure
from gradwatch.proto.layout import COLUMN

CPU = torch.device("cpu")


def test_norms_match_numpy_for_every_dtype_and_shape():
    rng = np.random.default_rng(0)
    arrays = [rng.normal(size=s).astype(np.float32) for s in [(3,), (4, 5), (2, 3, 4), ()]]
    tensors = [torch.from_numpy(a) for a in arrays] + [torch.tensor([0.5, -2.0, 1.5],
                                                                    dtype=torch.bfloat16)]
    norms, nan, inf = measure(tensors, CPU).numpy()
    expected = [np.linalg.norm(a.astype(np.float64)) for a in arrays] + [np.sqrt(6.5)]
    np.testing.assert_allclose(norms, expected, rtol=1e-5)
    assert nan.tolist() == inf.tolist() == [0.0] * 5


def test_nan_and_inf_are_counted_exactly_on_the_cpu_and_only_where_they_are():
    g = torch.tensor([[float("nan"), 1.0, float("inf")], [-float("inf"), float("nan"), 2.0]])
    norms, nan, inf = measure([g, torch.tensor([3.0, 4.0])], CPU).numpy()
    assert (nan.tolist(), inf.tolist()) == ([2.0, 0.0], [2.0, 0.0])
    assert np.isnan(norms[0]) and norms[1] == pytest.approx(5.0)


def test_overflowing_float32_norm_is_recomputed_in_float64():
    norms, nan, inf = measure([torch.tensor([3e20, 4e20])], CPU).numpy()
    assert norms[0] == pytest.approx(5e20, rel=1e-6) and nan[0] == inf[0] == 0


def test_sparse_gradient_of_an_embedding():
    embedding = torch.nn.Embedding(1000, 8, sparse=True)
    embedding(torch.tensor([1, 7, 7, 30])).pow(2).sum().backward()
    assert embedding.weight.grad.is_sparse
    (norm,), _, _ = measure([embedding.weight.grad], CPU).numpy()
    assert norm == pytest.approx(float(embedding.weight.grad.to_dense().norm()), rel=1e-6)


def test_an_accelerator_marks_the_variables_whose_norm_is_not_finite():
    norms = torch.tensor([2.0, float("nan"), float("inf"), 0.0])
    assert marked(norms).tolist() == [[2.0, pytest.approx(float("nan"), nan_ok=True),
                                       float("inf"), 0.0],
                                      [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]
    assert marked(norms).dtype == torch.float32


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
    stats = to_statistics(build(parts, absent=frozenset({4})).numpy(), 5)
    assert stats[:, COLUMN["present"]].tolist() == [1, 0, 0, 1, 0]
    assert stats[:, COLUMN["l2_norm"]].tolist() == [1.0, 0, 0, 3.0, 0]
    assert stats[:, COLUMN["nan_count"]].tolist() == [2.0, 0, 0, 0, 0]
    assert build([]).tolist() == [ABSENT] * 5 + [0.0] * 10


def test_a_record_of_every_variable_in_order_is_the_measures_themselves():
    build = RecordBuilder(3, CPU)
    measures = torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
    record = build([([0, 1, 2], measures)])
    assert record.tolist() == measures.reshape(-1).tolist()
    shuffled = build([([2, 0, 1], measures)])  # another order goes through the index
    assert shuffled[:3].tolist() == [2.0, 3.0, 1.0]

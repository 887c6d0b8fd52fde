"""In-graph gradient statistics: one read of each gradient per step, on its device.

Everything here is plain TensorFlow (no Python callbacks), so it runs eagerly,
inside ``tf.function`` and under XLA. `gradient_record` returns what a step writes
to the on-device ring buffer (`gradwatch.agent.core.record`).

The hot path reads each present gradient once: its sum of squares (``l2_loss``: one
kernel, no temporary; small gradients are concatenated and reduced together when
there are many). Presence is known at trace time and costs nothing. Non-finite
gradients show in the sums (NaN or Inf), so a single ``tf.cond`` per step decides
whether the rare branch runs: it counts NaN and Inf elements and recomputes
overflowed norms with scaling, from O(1) ops over all gradients concatenated.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from gradwatch.agent.core.record import ABSENT, RECORD_WIDTH

#: Gradients of at most this many elements (statically known) are reduced together
#: (concatenated, squared, one segment sum) once there are more than `BATCH_FROM` of them;
#: for small tensors the cost of running an op dominates.
SMALL_GRADIENT_ELEMENTS = 4096
BATCH_FROM = 4


def _dense_values(grad: tf.Tensor | tf.IndexedSlices) -> tf.Tensor:
    """The gradient's non-zero part, as float32, without densifying IndexedSlices.

    Rows of an ``IndexedSlices`` that share an index are summed first, so the
    statistics equal those of the dense gradient.
    """
    if isinstance(grad, tf.IndexedSlices):
        unique_indices, positions = tf.unique(grad.indices)
        values = tf.math.unsorted_segment_sum(
            grad.values, positions, tf.size(unique_indices, out_type=positions.dtype))
    else:
        values = grad
    if values.dtype != tf.float32:
        values = tf.cast(values, tf.float32)
    return values


def _flat(value: tf.Tensor) -> tf.Tensor:
    return value if value.shape.rank == 1 else tf.reshape(value, [-1])


def _computation_order(values: list[tf.Tensor], sparse: set[int]
                       ) -> tuple[list[int], list[int]]:
    """Positions of the gradients reduced together (small) and one by one (large). The
    rows of an IndexedSlices are never batched: under XLA their inferred shape is a bound,
    not their size."""
    sizes = [None if k in sparse or not v.shape.is_fully_defined() else v.shape.num_elements()
             for k, v in enumerate(values)]
    small = [k for k, n in enumerate(sizes) if n is not None and n <= SMALL_GRADIENT_ELEMENTS]
    if len(small) <= BATCH_FROM:
        small = []
    large = [k for k in range(len(values)) if k not in set(small)]
    return small, large


def _sums_of_squares(values: list[tf.Tensor], batched: int
                     ) -> tuple[tf.Tensor, tf.Tensor | None]:
    """Sum of squares of each gradient (the first ``batched`` ones reduced together), and
    those first ones flattened and concatenated (None if none)."""
    parts, flat = [], None
    if batched:
        sizes = [v.shape.num_elements() for v in values[:batched]]
        flat = tf.concat([_flat(v) for v in values[:batched]], 0)
        segments = tf.constant(np.repeat(np.arange(batched, dtype=np.int32), sizes))
        parts.append(tf.math.unsorted_segment_sum(tf.square(flat), segments, batched))
    if batched < len(values):
        parts.append(2.0 * tf.stack([tf.nn.l2_loss(v) for v in values[batched:]]))
    return (parts[0] if len(parts) == 1 else tf.concat(parts, 0)), flat


def _count_and_rescale(flat: tf.Tensor, segments: tf.Tensor, count: int
                       ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """NaN counts, Inf counts and overflow-safe norms of ``count`` segments of ``flat``."""
    def segment_sum(x: tf.Tensor) -> tf.Tensor:
        return tf.math.unsorted_segment_sum(x, segments, count)

    nan = segment_sum(tf.cast(tf.math.is_nan(flat), tf.float32))
    inf = segment_sum(tf.cast(tf.math.is_inf(flat), tf.float32))
    finite = tf.where(tf.math.is_finite(flat), tf.abs(flat), 0.0)
    scale = tf.maximum(tf.math.unsorted_segment_max(finite, segments, count), 1e-30)
    norms = scale * tf.sqrt(segment_sum(tf.square(finite / tf.gather(scale, segments))))
    return nan, inf, norms


def _non_finite(values: list[tf.Tensor], sums: tf.Tensor, batched: int,
                batched_flat: tf.Tensor | None, sparse: set[int]
                ) -> tuple[tf.Tensor, tf.Tensor]:
    """The rare branch: NaN and Inf counts, and norms that survive overflow
    (``||g|| = m * ||g / m||`` with m = max |g| over finite elements). Gradients of static
    shape are concatenated and reduced by segments (constant ids); the others one by one:
    the deduplicated rows of an IndexedSlices (``sparse``), whose shape under XLA is a bound
    and not their size, and any of unknown shape."""
    dynamic = [k for k, v in enumerate(values)
               if k in sparse or not v.shape.is_fully_defined()]
    static = [k for k in range(len(values)) if k not in set(dynamic)]
    nans, infs, norms = [], [], []
    if static:  # the batched ones (the first ``batched``) are all static
        pieces = [] if batched_flat is None else [batched_flat]
        flat = tf.concat(pieces + [_flat(values[k]) for k in static if k >= batched], 0)
        sizes = [values[k].shape.num_elements() for k in static]
        segments = tf.constant(np.repeat(np.arange(len(static), dtype=np.int32), sizes))
        nan, inf, norm = _count_and_rescale(flat, segments, len(static))
        nans.append(nan)
        infs.append(inf)
        norms.append(norm)
    for k in dynamic:  # plain reductions: no segment ids to size
        value = values[k]
        finite = tf.where(tf.math.is_finite(value), tf.abs(value), 0.0)
        scale = tf.maximum(tf.reduce_max(finite), 1e-30)
        nans.append(tf.reduce_sum(tf.cast(tf.math.is_nan(value), tf.float32))[None])
        infs.append(tf.reduce_sum(tf.cast(tf.math.is_inf(value), tf.float32))[None])
        norms.append((scale * tf.sqrt(tf.reduce_sum(tf.square(finite / scale))))[None])
    inverse = tf.constant(np.argsort(static + dynamic), tf.int32)
    nan, inf, scaled = (tf.gather(tf.concat(parts, 0), inverse) for parts in (nans, infs, norms))
    norms = tf.where(tf.equal(nan + inf, 0.0), scaled, tf.sqrt(sums))
    return norms, tf.concat([nan, inf], 0)


def gradient_record(grads: Sequence[tf.Tensor | tf.IndexedSlices | None]) -> tf.Tensor:
    """The float32 ``[RECORD_WIDTH * len(grads)]`` record of one step.

    Works in replica and cross-replica context alike: it only reads ``grads``.
    """
    n = len(grads)
    present = [i for i, g in enumerate(grads) if g is not None]
    if not present:
        return tf.constant([ABSENT] * n + [0.0] * (2 * n))
    values = [_dense_values(grads[i]) for i in present]
    sparse = {k for k, i in enumerate(present) if isinstance(grads[i], tf.IndexedSlices)}
    small, large = _computation_order(values, sparse)
    order = small + large  # position in the computation -> index into values
    values = [values[k] for k in order]
    sparse = {position for position, k in enumerate(order) if k in sparse}
    sums, batched_flat = _sums_of_squares(values, len(small))
    p = len(present)
    norms, counts = tf.cond(
        tf.reduce_all(tf.math.is_finite(sums)),
        lambda: (tf.sqrt(sums), tf.zeros([2 * p])),
        lambda: _non_finite(values, sums, len(small), batched_flat, sparse))
    # One gather puts the variables in order and fills in the absent ones.
    where = {present[order[k]]: k for k in range(p)}
    index = np.empty(RECORD_WIDTH * n, np.int32)
    for i in range(n):
        k = where.get(i)
        index[i], index[n + i], index[2 * n + i] = (
            (3 * p, 3 * p + 1, 3 * p + 1) if k is None else (k, p + k, 2 * p + k))
    record = tf.concat([norms, counts], 0)
    if np.array_equal(index, np.arange(RECORD_WIDTH * n)):
        return record
    return tf.gather(tf.concat([record, [ABSENT, 0.0]], 0), tf.constant(index))


def scale_record(record: tf.Tensor, num_variables: int, factor: tf.Tensor) -> tf.Tensor:
    """The record with its norms multiplied by ``factor`` (absent ones stay absent):
    what the optimizer applies when the loss was scaled (mixed precision)."""
    values, counts = record[:num_variables], record[num_variables:]
    values = tf.where(values == ABSENT, values, values * tf.cast(factor, tf.float32))
    return tf.concat([values, counts], 0)

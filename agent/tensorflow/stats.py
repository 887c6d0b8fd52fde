"""In-graph gradient statistics: a few numbers per gradient, computed on its device.

Everything here is plain TensorFlow (no Python callbacks), so it runs eagerly,
inside ``tf.function`` and under XLA. Absent (``None``) gradients are known at
trace time and cost nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from gradwatch.proto.layout import COLUMNS, NUM_COLUMNS

#: Gradients of at most this many elements (statically known) are reduced together:
#: concatenated, then three segment reductions, because for small tensors the cost of
#: running an op dominates. Larger ones get three read-only reductions each.
SMALL_GRADIENT_ELEMENTS = 4096


def _dense_values(grad: tf.Tensor | tf.IndexedSlices) -> tf.Tensor:
    """The gradient's non-zero part, as float32, without densifying IndexedSlices.

    Rows of an ``IndexedSlices`` that share an index are summed first, so the
    statistics equal those of the dense gradient.
    """
    if isinstance(grad, tf.IndexedSlices):
        unique_indices, positions = tf.unique(grad.indices)
        values = tf.math.unsorted_segment_sum(
            grad.values, positions, tf.size(unique_indices, out_type=positions.dtype)
        )
    else:
        values = grad
    if values.dtype != tf.float32:
        values = tf.cast(values, tf.float32)
    return values


def _reductions(values: list[tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
    """Sum of squares and max |g| of each tensor, as two vectors in ``values`` order.

    Large tensors: ``l2_loss``, max and min, each reading the tensor once and writing no
    temporary (max |g| is max(max g, -min g)). Small tensors: one concatenation and one
    segment reduction per statistic for all of them, so a model with hundreds of biases
    and norm scales adds a handful of ops, not hundreds.
    """
    sizes = [v.shape.num_elements() if v.shape.is_fully_defined() else None for v in values]
    small = [k for k, n in enumerate(sizes) if n is not None and n <= SMALL_GRADIENT_ELEMENTS]
    large = [k for k, n in enumerate(sizes) if n is None or n > SMALL_GRADIENT_ELEMENTS]
    squares, maxima, minima = [], [], []
    if small:
        flat = tf.concat([tf.reshape(values[k], [-1]) for k in small], 0)
        segments = tf.constant(np.repeat(np.arange(len(small), dtype=np.int32),
                                         [sizes[k] for k in small]))
        squares.append(tf.math.unsorted_segment_sum(tf.square(flat), segments, len(small)))
        maxima.append(tf.math.unsorted_segment_max(flat, segments, len(small)))
        minima.append(tf.math.unsorted_segment_min(flat, segments, len(small)))
    if large:
        squares.append(2.0 * tf.stack([tf.nn.l2_loss(values[k]) for k in large]))
        maxima.append(tf.stack([tf.reduce_max(values[k]) for k in large]))
        minima.append(tf.stack([tf.reduce_min(values[k]) for k in large]))
    # Back to ``values`` order; tf.maximum(., 0) turns the -inf (or lowest float) of an
    # empty gradient into 0.
    inverse = np.argsort(small + large)
    sum_squares = tf.gather(tf.concat(squares, 0), inverse)
    max_abs = tf.maximum(tf.maximum(tf.gather(tf.concat(maxima, 0), inverse),
                                    -tf.gather(tf.concat(minima, 0), inverse)), 0.0)
    return sum_squares, max_abs


def gradient_stats(grads: Sequence[tf.Tensor | tf.IndexedSlices | None]) -> tf.Tensor:
    """Returns a float32 ``[len(grads), NUM_COLUMNS]`` matrix of statistics, columns as
    `gradwatch.proto.layout` orders them.

    Sum of squares and max |g| per present gradient (see `_reductions`); NaN and
    Inf elements are counted only when some sum of squares is non-finite (a
    single ``tf.cond`` per call), which also recomputes overflowed norms with
    scaling. Absent gradients get a row of zeros with ``present == 0``.
    Works in replica and cross-replica context alike: it only reads ``grads``.
    """
    present_ids = [i for i, g in enumerate(grads) if g is not None]
    rows = tf.zeros([len(grads), NUM_COLUMNS], tf.float32)
    if not present_ids:
        return rows
    values = [_dense_values(grads[i]) for i in present_ids]
    sum_squares, max_abs = _reductions(values)

    def finite_case():
        zeros = tf.zeros_like(sum_squares)
        return tf.sqrt(sum_squares), max_abs, zeros, zeros

    def non_finite_case():
        # Rare path, built from O(1) ops over all gradients concatenated, so its
        # (untaken) branch adds no per-variable nodes to every step's graph.
        flat = tf.concat([tf.reshape(v, [-1]) for v in values], 0)
        sizes = tf.stack([tf.size(v) for v in values]) if not all(
            v.shape.is_fully_defined() for v in values) else [v.shape.num_elements()
                                                             for v in values]
        segments = tf.repeat(tf.range(len(values)), sizes)

        def count(mask):
            return tf.math.unsorted_segment_sum(tf.cast(mask, tf.float32), segments,
                                                len(values))

        nan, inf = count(tf.math.is_nan(flat)), count(tf.math.is_inf(flat))
        # Finite gradients whose squares overflowed: ||g|| = m * ||g / m||.
        scale = tf.gather(tf.maximum(max_abs, 1e-30), segments)
        scaled = max_abs * tf.sqrt(tf.math.unsorted_segment_sum(
            tf.square(flat / scale), segments, len(values)))
        norm = tf.where(tf.equal(nan + inf, 0.0), scaled, tf.sqrt(sum_squares))
        return norm, max_abs, nan, inf

    all_finite = tf.reduce_all(tf.math.is_finite(sum_squares))
    norm, max_abs, nan, inf = tf.cond(all_finite, finite_case, non_finite_case)
    columns = {"present": tf.ones_like(norm), "l2_norm": norm, "max_abs": max_abs,
               "nan_count": nan, "inf_count": inf}
    computed = tf.stack([columns[name] for name in COLUMNS], axis=1)
    return tf.tensor_scatter_nd_update(rows, [[i] for i in present_ids], computed)

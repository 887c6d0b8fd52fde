"""In-graph gradient statistics: one read of each gradient per step, on its device.

Everything here is plain TensorFlow (no Python callbacks), so it runs eagerly,
inside ``tf.function`` and under XLA. `gradient_record` returns what a step writes
to the on-device ring buffer (`gradwatch.agent.tensorflow.recorder`); `to_norms`
turns such records into the framework-neutral ones of `gradwatch.agent.core.record`
on the host.

A device record is float32 ``[value (N), nan_count (N), inf_count (N)]``, where a
variable's value is

- ``½‖g‖²``, what ``tf.nn.l2_loss`` returns: the hot path's only per-gradient work
  (one kernel, no temporary; with a GPU or TPU, small gradients are concatenated and
  reduced together when there are many), with no square root or scaling on the device;
- `ABSENT` when the variable got no gradient (known at trace time: free);
- ``-‖g‖`` when a finite gradient's ``½‖g‖²`` overflowed float32, from the rare
  branch, which rescales (``‖g‖ = m·‖g/m‖``, m = max |g|).

Non-finite gradients show in the values (NaN or +Inf), so one ``tf.cond`` per step
decides whether the rare branch runs: it counts NaN and Inf elements and rescales
overflowed norms. The cond stays one ``If`` op (`branch`), so a finite step runs a
fixed handful of ops besides the reductions: one pack of all values, the finiteness
check (2 ops) and the ``If``.

Compiled by XLA in a process with a GPU or TPU there is no branch: a conditional
there waits on the host for its predicate (a sync per update), while the NaN and Inf
counts, reductions of the same gradient, fuse with the sum of squares into one read.
The counts are exact; a finite gradient whose ``½‖g‖²`` overflows float32 (‖g‖ above
about 1.8e19) reads +Inf. On a CPU the cond is cheaper, even under XLA
(``bench/xla_statistics.py``), so it stays.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import attr_value_pb2

from gradwatch.agent.core.record import ABSENT, RECORD_WIDTH

#: With a GPU or TPU, gradients of at most this many elements (statically known) are
#: reduced together (concatenated, squared, one segment sum) once there are more than
#: `BATCH_FROM` of them: a few kernels in place of one launch each. On a CPU one
#: ``l2_loss`` each is faster (a segment sum there costs more than the ops it replaces).
SMALL_GRADIENT_ELEMENTS = 4096
BATCH_FROM = 5


def _dense_values(grad: tf.Tensor | tf.IndexedSlices) -> tf.Tensor:
    """The gradient's non-zero part, as float32 or float64 (of a complex one, its moduli),
    without densifying IndexedSlices. A float64 gradient is measured in float64: cast,
    a finite value beyond float32's range would count as Inf.

    Rows of an ``IndexedSlices`` that share an index are summed first, so the
    statistics equal those of the dense gradient.
    """
    if isinstance(grad, tf.IndexedSlices):
        unique_indices, positions = tf.unique(grad.indices)
        values = tf.math.unsorted_segment_sum(
            grad.values, positions, tf.size(unique_indices, out_type=positions.dtype))
    else:
        values = grad
    if values.dtype.is_complex:  # the norm of the moduli; NaN and Inf parts stay
        values = tf.abs(values)
    if values.dtype not in (tf.float32, tf.float64):
        values = tf.cast(values, tf.float32)
    return values


def _float32(value: tf.Tensor) -> tf.Tensor:
    """A statistic of a float64 gradient as the record's float32 (+Inf beyond its range)."""
    return value if value.dtype == tf.float32 else tf.cast(value, tf.float32)


def _flat(value: tf.Tensor) -> tf.Tensor:
    return value if value.shape.rank == 1 else tf.reshape(value, [-1])


def _static_size(value: tf.Tensor, sparse: bool) -> int | None:
    """Elements of a float32 gradient whose size is known at trace time, which may be
    reduced together with others. Not the deduplicated rows of an IndexedSlices: under XLA
    their inferred shape is a bound, not their size."""
    if sparse or value.dtype != tf.float32 or not value.shape.is_fully_defined():
        return None
    return value.shape.num_elements()


def _segments(sizes: list[int]) -> tf.Tensor:
    return tf.constant(np.repeat(np.arange(len(sizes), dtype=np.int32), sizes))


def _half_squares(values: list[tf.Tensor], sparse: set[int], batch_small: bool
                  ) -> list[tf.Tensor]:
    """``½‖g‖²`` of each gradient, as scalars in the order of ``values``: one ``l2_loss``
    each, or with ``batch_small`` the small ones through one concatenation and segment sum
    (when there are more than `BATCH_FROM`)."""
    sizes = [_static_size(v, k in sparse) for k, v in enumerate(values)]
    small = [k for k, n in enumerate(sizes) if n is not None and n <= SMALL_GRADIENT_ELEMENTS]
    if not batch_small or len(small) <= BATCH_FROM:
        small = []
    halves: dict[int, tf.Tensor] = {}
    if small:
        flat = tf.concat([_flat(values[k]) for k in small], 0)
        sums = tf.math.unsorted_segment_sum(
            tf.square(flat), _segments([sizes[k] for k in small]), len(small))
        halves.update(zip(small, tf.unstack(0.5 * sums), strict=True))
    for k, value in enumerate(values):
        if k not in halves:
            halves[k] = _float32(tf.nn.l2_loss(value))
    return [halves[k] for k in range(len(values))]


def _counts_and_norms(values: list[tf.Tensor], sparse: set[int]
                      ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """NaN counts, Inf counts and overflow-safe norms (``m·‖g/m‖``, m = max |g| over the
    finite elements) of each gradient, as vectors in the order of ``values``. Gradients
    of static size are concatenated and reduced by segments; the others one by one."""
    sizes = [_static_size(v, k in sparse) for k, v in enumerate(values)]
    static = [k for k, n in enumerate(sizes) if n is not None]
    dynamic = [k for k, n in enumerate(sizes) if n is None]
    nans, infs, norms = [], [], []
    if static:
        flat = tf.concat([_flat(values[k]) for k in static], 0)
        segments = _segments([sizes[k] for k in static])

        def segment_sum(x: tf.Tensor) -> tf.Tensor:
            return tf.math.unsorted_segment_sum(x, segments, len(static))

        nans.append(segment_sum(tf.cast(tf.math.is_nan(flat), tf.float32)))
        infs.append(segment_sum(tf.cast(tf.math.is_inf(flat), tf.float32)))
        finite = tf.where(tf.math.is_finite(flat), tf.abs(flat), 0.0)
        scale = tf.maximum(tf.math.unsorted_segment_max(finite, segments, len(static)), 1e-30)
        norms.append(scale * tf.sqrt(segment_sum(tf.square(finite / tf.gather(scale,
                                                                            segments)))))
    for k in dynamic:
        value = values[k]
        finite = tf.where(tf.math.is_finite(value), tf.abs(value), 0.0)
        scale = tf.maximum(tf.reduce_max(finite), 1e-30)
        nans.append(tf.reduce_sum(tf.cast(tf.math.is_nan(value), tf.float32))[None])
        infs.append(tf.reduce_sum(tf.cast(tf.math.is_inf(value), tf.float32))[None])
        norms.append(_float32(scale * tf.sqrt(tf.reduce_sum(tf.square(finite / scale))))[None])
    inverse = tf.constant(np.argsort(static + dynamic), tf.int32)
    return tuple(tf.gather(tf.concat(parts, 0), inverse) for parts in (nans, infs, norms))


def _rare_branch(record: tf.Tensor, present: list[int], values: list[tf.Tensor],
                 sparse: set[int]) -> tf.Tensor:
    """The record of a step with a non-finite value: NaN and Inf counts, and ``-‖g‖``
    in place of an overflowed ``½‖g‖²`` of a gradient with neither."""
    n = record.shape[0] // RECORD_WIDTH
    nan, inf, norms = _counts_and_norms(values, sparse)
    where = tf.constant(present, tf.int32)[:, None]
    old = tf.gather(record, present)
    overflowed = tf.math.is_inf(old) & tf.equal(nan + inf, 0.0)
    new = tf.where(overflowed, -norms, old)
    return tf.concat([tf.tensor_scatter_nd_update(record[:n], where, new),
                      tf.scatter_nd(where, nan, [n]), tf.scatter_nd(where, inf, [n])], 0)


def _unchecked_record(grads: Sequence[tf.Tensor | tf.IndexedSlices], batch_small: bool
                      ) -> tuple[tf.Tensor, list[int], list[tf.Tensor], set[int]]:
    """The hot path: the record as if every gradient were finite (zero counts), and what
    the rare branch needs (the present positions, their dense values, which are sparse).
    At least one gradient is present."""
    n = len(grads)
    present = [i for i, g in enumerate(grads) if g is not None]
    values = [_dense_values(grads[i]) for i in present]
    sparse = {k for k, i in enumerate(present) if isinstance(grads[i], tf.IndexedSlices)}
    half = dict(zip(present, _half_squares(values, sparse, batch_small), strict=True))
    absent, zero = tf.constant(ABSENT), tf.constant(0.0)
    # One pack puts the values in order, absent ones and zero counts included.
    record = tf.stack([half.get(i, absent) for i in range(n)] + [zero] * (2 * n))
    return record, present, values, sparse


def _branch_free_record(grads: Sequence[tf.Tensor | tf.IndexedSlices | None]) -> tf.Tensor:
    """The record with NaN and Inf counts reduced beside each sum of squares, no branch
    (for XLA on accelerators, which fuses the three into one read)."""
    def count(mask: tf.Tensor) -> tf.Tensor:
        return tf.reduce_sum(tf.cast(mask, tf.float32))

    absent, zero = tf.constant(ABSENT), tf.constant(0.0)
    values = [None if g is None else _dense_values(g) for g in grads]
    return tf.stack([absent if v is None else _float32(tf.nn.l2_loss(v)) for v in values]
                    + [zero if v is None else count(tf.math.is_nan(v)) for v in values]
                    + [zero if v is None else count(tf.math.is_inf(v)) for v in values])


def branch(pred: tf.Tensor, true_fn, false_fn) -> tf.Tensor:
    """``tf.cond`` kept as one ``If`` op, not lowered to switches and merges: a lowered
    cond sends "dead" tensors through every op of the branch not taken, and a switch
    for each tensor it captures, each step; an ``If`` runs only the branch taken.
    (TensorFlow lowers by default; XLA never does.) Same arguments as ``tf.cond``."""
    out = tf.cond(pred, true_fn, false_fn)
    if not tf.inside_function():
        return out
    if_op = out.op.inputs[0].op if out.op.type == "Identity" and out.op.inputs else out.op
    if if_op.type in ("If", "StatelessIf"):
        try:
            if_op._set_attr("_lower_using_switch_merge", attr_value_pb2.AttrValue(b=False))
        except Exception:  # another TensorFlow's internals: a lowered cond is correct too
            pass
    return out


def _accelerators() -> bool:
    return bool(tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU"))


def _compiled_for_an_accelerator() -> bool:
    """Being traced for XLA (``jit_compile``, TPU replication) in a process with a GPU or
    TPU. XLA's context is internal to TensorFlow: where it cannot be read, False (the
    branch is correct everywhere)."""
    try:
        from tensorflow.python.ops.control_flow_util import GraphOrParentsInXlaContext

        in_xla = GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())
    except Exception:  # another TensorFlow's internals
        return False
    return bool(in_xla) and _accelerators()


def gradient_record(grads: Sequence[tf.Tensor | tf.IndexedSlices | None], *,
                    branch_free: bool | None = None,
                    batch_small: bool | None = None) -> tf.Tensor:
    """The float32 ``[3 * len(grads)]`` device record of one step (see the module).

    Works in replica and cross-replica context alike: it only reads ``grads``.
    ``branch_free``: counts without a ``tf.cond`` (default: when compiled by XLA for an
    accelerator). ``batch_small``: small gradients reduced together (default: in a
    process with a GPU or TPU; see `SMALL_GRADIENT_ELEMENTS`).
    """
    if all(g is None for g in grads):
        return tf.constant([ABSENT] * len(grads) + [0.0] * (2 * len(grads)))
    if branch_free is None:
        branch_free = _compiled_for_an_accelerator()
    if branch_free:
        return _branch_free_record(grads)
    if batch_small is None:
        batch_small = _accelerators()
    record, present, values, sparse = _unchecked_record(grads, batch_small)
    return branch(tf.reduce_all(tf.math.is_finite(record)), lambda: record,
                  lambda: _rare_branch(record, present, values, sparse))


def unscale_record(record: tf.Tensor, num_variables: int, scale: tf.Tensor) -> tf.Tensor:
    """The record of the gradients divided by ``scale`` (absent ones stay absent): what
    the optimizer applies when the loss was scaled (mixed precision). Divided, twice for
    a sum of squares: ``1 / scale`` (and its square) underflows to 0 in float32 for the
    scales a long run's dynamic loss scaling reaches (from about 1e19; 1e38 gave 0)."""
    values, counts = record[:num_variables], record[num_variables:]
    scale = tf.cast(scale, tf.float32)
    unscaled = tf.where(values < 0, values / scale, values / scale / scale)
    return tf.concat([tf.where(values == ABSENT, values, unscaled), counts], 0)


def to_norms(records: np.ndarray, num_variables: int) -> np.ndarray:
    """Device records ``[..., 3 * N]`` as `gradwatch.agent.core.record` records (values
    as L2 norms), on the host."""
    values = records[..., :num_variables].astype(np.float64)
    # abs: only the non-negative values take the square root (no warning for the others)
    norms = np.where(values >= 0, np.sqrt(np.abs(2 * values)),
                     np.where(values == ABSENT, ABSENT, -values))
    return np.concatenate([norms.astype(np.float32), records[..., num_variables:]], axis=-1)

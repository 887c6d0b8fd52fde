"""The in-graph statistics against independent NumPy references, and their cost in ops."""

import numpy as np
import pytest
import tensorflow as tf

from gradwatch.agent.core.record import to_statistics
from gradwatch.agent.tensorflow.stats import gradient_record, to_norms
from gradwatch.proto.layout import COLUMN, COLUMNS

PRESENT, NORM, NAN, INF = (COLUMN[name] for name in
                           ("present", "l2_norm", "nan_count", "inf_count"))
assert len(COLUMNS) == 4


def gradient_stats(grads, record=gradient_record):
    """``[len(grads), NUM_COLUMNS]`` statistics as the host sees them."""
    return to_statistics(to_norms(np.asarray(record(grads)), len(grads)), len(grads))


def reference(g: np.ndarray) -> list[float]:
    g = np.asarray(g, np.float64)
    nan, inf = int(np.isnan(g).sum()), int(np.isinf(g).sum())
    if nan or inf:
        return [1.0, np.nan, nan, inf]
    return [1.0, float(np.linalg.norm(g)), 0, 0]


@pytest.mark.parametrize("mode", ["eager", "function", "xla"])
def test_dense_gradients_match_numpy(mode):
    rng = np.random.default_rng(1)
    grads = [rng.normal(size=s).astype(np.float32) for s in [(3,), (4, 5), (2, 3, 4), ()]]
    record = {"eager": gradient_record,
              "function": tf.function(gradient_record),
              "xla": tf.function(gradient_record, jit_compile=True)}[mode]
    stats = gradient_stats([tf.constant(g) for g in grads], record)
    for row, g in zip(stats, grads, strict=True):
        np.testing.assert_allclose(row, reference(g), rtol=1e-5)


def test_absent_gradients_are_zero_rows():
    stats = gradient_stats([None, tf.constant([3.0, 4.0]), None])
    assert stats[:, PRESENT].tolist() == [0, 1, 0]
    assert stats[0].tolist() == [0] * len(COLUMNS)
    assert stats[1, NORM] == pytest.approx(5.0)


def test_all_absent():
    assert gradient_stats([None, None]).tolist() == [[0.0] * len(COLUMNS)] * 2


def test_nan_and_inf_are_counted_only_where_they_are():
    g = np.array([[np.nan, 1.0, np.inf], [-np.inf, np.nan, np.nan]], np.float32)
    stats = gradient_stats([tf.constant(g), tf.constant([3.0, 4.0])])
    assert stats[0, NAN] == 3 and stats[0, INF] == 2
    assert stats[1, NAN] == 0 and stats[1, INF] == 0
    assert stats[1, NORM] == pytest.approx(5.0)  # the finite neighbour keeps its norm


def test_overflowing_sum_of_squares_is_rescaled():
    g = np.array([3e20, 4e20], np.float32)  # squares overflow float32
    stats = gradient_stats([tf.constant(g)])
    assert stats[0, NAN] == 0 and stats[0, INF] == 0
    assert stats[0, NORM] == pytest.approx(5e20, rel=1e-5)


def test_half_precision_float64_and_complex():
    g16 = np.array([0.5, -2.0, 1.5], np.float16)
    g64 = np.array([1e-3, 2e-3], np.float64)
    z = np.array([1 + 2j, -0.5j, 3.0], np.complex64)
    stats = gradient_stats([tf.constant(g16), tf.constant(g64), tf.constant(z),
                            tf.constant(z.astype(np.complex128) * 1e3)])
    assert stats[0, NORM] == pytest.approx(np.linalg.norm(g16.astype(np.float64)), rel=1e-3)
    assert stats[1, NORM] == pytest.approx(np.linalg.norm(g64), rel=1e-5)
    assert stats[2, NORM] == pytest.approx(np.linalg.norm(z), rel=1e-6)
    assert stats[3, NORM] == pytest.approx(np.linalg.norm(z) * 1e3, rel=1e-6)
    poisoned = gradient_stats([tf.constant(np.array([complex(np.nan, 1), 1j, np.inf],
                                                    np.complex64))])
    assert poisoned[0, NAN] == 1 and poisoned[0, INF] == 1


@pytest.mark.parametrize("mode", ["eager", "function", "xla"])
def test_a_float64_gradient_beyond_float32s_range_is_finite(mode):
    """Cast to float32 first, a finite float64 gradient of 1e39s counted as 3 Infs (a step
    paged as non-finite, critical); beside a float32 one, batched with it on an
    accelerator. Its norm, 1.7e39, is beyond the record's float32: +Inf with no Inf counted
    (exploding, not non-finite); NaN and Inf are still counted in float64."""
    record = {"eager": gradient_record,
              "function": tf.function(gradient_record),
              "xla": tf.function(gradient_record, jit_compile=True)}[mode]
    huge = np.full(3, 1e39)
    stats = gradient_stats([tf.constant(huge), tf.constant([3.0, 4.0]),
                            tf.constant(np.array([1e300, np.inf, np.nan]))], record)
    assert stats[0, NAN] == stats[0, INF] == 0 and stats[0, NORM] == np.inf
    assert stats[1].tolist() == [1.0, 5.0, 0.0, 0.0]
    assert (stats[2, NAN], stats[2, INF]) == (1, 1)


def test_empty_gradient():
    stats = gradient_stats([tf.zeros([0, 4])])
    assert stats[0].tolist() == [1, 0, 0, 0]


def test_indexed_slices_with_duplicate_indices_equal_the_dense_gradient():
    values = np.array([[1.0, 2.0], [3.0, -4.0], [0.5, 0.5]], np.float32)
    indices = np.array([4, 1, 4], np.int64)
    dense = np.zeros((6, 2), np.float32)
    np.add.at(dense, indices, values)
    sparse = tf.IndexedSlices(tf.constant(values), tf.constant(indices), tf.constant([6, 2]))
    stats = gradient_stats([sparse])
    np.testing.assert_allclose(stats[0], reference(dense), rtol=1e-6)


def test_embedding_gradient_from_a_tape():
    table = tf.Variable(tf.random.normal([50, 8], seed=3))
    ids = tf.constant([1, 7, 7, 30])
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.square(tf.nn.embedding_lookup(table, ids)))
    (grad,) = tape.gradient(loss, [table])
    assert isinstance(grad, tf.IndexedSlices)
    stats = gradient_stats([grad])
    np.testing.assert_allclose(stats[0], reference(tf.convert_to_tensor(grad).numpy()),
                               rtol=1e-5)


def test_sparse_gradient_of_a_large_embedding_matches_dense_and_is_never_densified():
    table = tf.Variable(tf.zeros([1_000_000, 64]))
    ids = tf.constant([3, 999_999, 3, 123_456])
    with tf.GradientTape() as tape:
        rows = tf.nn.embedding_lookup(table, ids)
        loss = tf.reduce_sum(rows * tf.range(64, dtype=tf.float32))
    (grad,) = tape.gradient(loss, [table])
    assert isinstance(grad, tf.IndexedSlices)
    dense_norm = float(tf.norm(tf.convert_to_tensor(grad)))  # reference: 256 MB, once
    stats = gradient_stats([grad], tf.function(gradient_record))
    assert stats[0, NORM] == pytest.approx(dense_norm, rel=1e-6)

    # The same rows under a 10^9-row dense shape: densifying would need 256 GB.
    huge = tf.IndexedSlices(grad.values, grad.indices, tf.constant([10**9, 64], tf.int64))
    assert gradient_stats([huge], tf.function(gradient_record))[0, NORM] == pytest.approx(
        dense_norm, rel=1e-6)


@pytest.mark.parametrize("batch_small", [False, True], ids=["cpu", "accelerator"])
@pytest.mark.parametrize("poisoned", [False, True])
def test_small_and_large_gradients_keep_their_order(batch_small, poisoned):
    """With an accelerator many small tensors are reduced together (concat + one segment
    sum), large ones one by one; on a CPU each alone. The rows must line up with the
    gradients either way, empty ones included, and so must the rare branch's counts."""
    from gradwatch.agent.tensorflow.stats import SMALL_GRADIENT_ELEMENTS

    rng = np.random.default_rng(3)
    shapes = [(0,), (SMALL_GRADIENT_ELEMENTS + 1,), (3,), None, (SMALL_GRADIENT_ELEMENTS,),
              (400, 300), (7, 5), (1,), (2, 2), None, (6,)]
    arrays = [None if s is None else rng.normal(size=s).astype("float32") * (i + 1)
              for i, s in enumerate(shapes)]
    if poisoned:
        arrays[6][1, 2] = arrays[8][0, 0] = np.nan
    grads = [None if a is None else tf.constant(a) for a in arrays]
    rows = gradient_stats(grads, tf.function(
        lambda grads: gradient_record(grads, batch_small=batch_small)))
    for row, values in zip(rows, arrays, strict=True):
        if values is None:
            assert row.tolist() == [0, 0, 0, 0]
        else:
            np.testing.assert_allclose(row, reference(values), rtol=1e-5)


UNCOUNTED_OPS = ("Const", "NoOp", "Placeholder", "_Arg", "_Retval")


def graph_ops(function, *args, branches: str = "both") -> int:
    """Ops of ``function``'s traced graph, constants aside, with the ops of the conds'
    branches: ``both``, or ``then`` (what a step with finite gradients runs)."""
    graph = tf.function(function).get_concrete_function(*args).graph
    library = {f.signature.name: f for f in graph.as_graph_def().library.function}

    def count(nodes) -> int:
        total = 0
        for node in nodes:
            if node.op in UNCOUNTED_OPS:
                continue
            total += 1
            if node.op in ("If", "StatelessIf"):
                taken = ["then_branch"] + (["else_branch"] if branches == "both" else [])
                total += sum(count(library[node.attr[b].func.name].node_def) for b in taken)
        return total

    return count(graph.as_graph_def().node)


def executed_ops(function, *args) -> int:
    """Ops of the graph TensorFlow's executor runs for one call of ``function`` (after
    its rewrites, such as lowering a cond to switches and merges), constants aside."""
    from tensorflow.python.eager import context

    concrete = tf.function(function).get_concrete_function(*args)
    context.enable_run_metadata()  # before the first call: graphs are reported when made
    try:
        concrete(*args)
        metadata = context.export_run_metadata()
    finally:
        context.disable_run_metadata()
    return sum(node.op not in UNCOUNTED_OPS for function_graph in metadata.function_graphs
               for graph in function_graph.partition_graphs for node in graph.node)


def small_gradients(variables: int) -> list[tf.Tensor]:
    return [tf.zeros((4, 4) if i % 2 == 0 else (4,)) for i in range(variables)]


@pytest.mark.parametrize("batch_small", [False, True], ids=["cpu", "accelerator"])
@pytest.mark.parametrize("variables", [2, 20, 200])
def test_ops_per_update_stay_few(variables, batch_small):
    """What one wrapped update adds to a traced step (statistics and the ring-buffer
    write); each op costs about a microsecond on a CPU, which is what a millisecond step
    pays. A finite step runs 13 / 31 / 211 ops for 2 / 20 / 200 variables on a CPU (one
    ``l2_loss`` each, faster there than batching), 13 / 26 / 116 where small gradients are
    batched (a GPU or TPU). Traced, the rare branch included: 52 / 79 / 349 and
    52 / 74 / 254."""
    from gradwatch.agent.tensorflow.recorder import StepRecorder

    grads = small_gradients(variables)
    recorder = StepRecorder(variables, capacity=4)

    def update(grads):
        recorder.record(gradient_record(grads, batch_small=batch_small),
                        step=tf.constant(1, tf.int64))

    def nothing(grads):
        pass

    run = graph_ops(update, grads, branches="then") - graph_ops(nothing, grads, branches="then")
    traced = graph_ops(update, grads) - graph_ops(nothing, grads)
    per_variable = 0.55 if batch_small else 1.05
    assert run <= 15 + per_variable * variables, f"{run} ops run"
    assert traced <= 60 + (per_variable + 0.7) * variables, f"{traced} ops traced"


def test_a_finite_step_runs_nothing_of_the_rare_branch():
    """The finiteness check's cond stays one ``If`` op: lowered to switches and merges
    (TensorFlow's default), the executor would send dead tensors through every op of the
    rare branch and a switch per gradient, each step: 751 ops run instead of 209 for
    200 variables."""
    from gradwatch.agent.tensorflow.recorder import StepRecorder

    grads = small_gradients(200)
    recorder = StepRecorder(200, capacity=4)

    def update(grads):
        recorder.record(gradient_record(grads, batch_small=False),
                        step=tf.constant(1, tf.int64))

    def nothing(grads):
        pass

    hot_path = (graph_ops(update, grads, branches="then")
                - graph_ops(nothing, grads, branches="then"))
    run = executed_ops(update, grads) - executed_ops(nothing, grads)
    assert hot_path - 5 <= run <= hot_path + 5, (run, hot_path)


def test_a_step_between_recorded_ones_runs_a_handful_of_ops():
    """Under ``statistics_every`` a step that is not recorded computes nothing: the
    step-number test is one ``If`` op, so none of the statistics' ops runs, dead or
    alive (lowered to switches and merges: 825 ops for 200 variables)."""
    from gradwatch.agent.core.identity import Identity
    from gradwatch.agent.tensorflow.session import TensorFlowSession

    grads = small_gradients(200)
    session = TensorFlowSession(Identity("job", "worker", 0, "host", 1), "adam",
                                [tf.Variable(g) for g in grads], capacity=4,
                                strategy=tf.distribute.get_strategy(), every=10)

    def update(grads, step):
        session.record(grads, step=step)

    assert executed_ops(update, grads, tf.constant(3, tf.int64)) <= 12


@pytest.mark.parametrize("branch_free", [None, True])
def test_sparse_gradients_under_xla_in_both_branches(branch_free):
    """XLA compiles both branches of the cond, and pads the deduplicated rows of an
    IndexedSlices to a bound: the rare branch must not assume their size (it crashed a
    transformer with an embedding under jit_compile). The same without a branch."""
    table = tf.Variable(tf.random.normal([100, 8], seed=1))
    dense = tf.Variable(tf.random.normal([8, 4], seed=2))
    ids = tf.constant([3, 7, 7, 42, 99])

    @tf.function(jit_compile=True)
    def record(poison):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.nn.embedding_lookup(table, ids) @ dense) * poison
        return gradient_record(tape.gradient(loss, [table, dense]), branch_free=branch_free)

    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.nn.embedding_lookup(table, ids) @ dense)
    reference = [float(tf.norm(tf.convert_to_tensor(g))) for g in tape.gradient(loss, [table,
                                                                                       dense])]
    finite = to_statistics(to_norms(record(tf.constant(1.0)).numpy(), 2), 2)
    np.testing.assert_allclose(finite[:, NORM], reference, rtol=1e-5)
    poisoned = to_statistics(to_norms(record(tf.constant(float("nan"))).numpy(), 2), 2)
    assert poisoned[0, NAN] == 4 * 8  # the 4 unique rows looked up, 8 columns each
    assert poisoned[1, NAN] == 8 * 4


def branch_free_under_xla(grads):
    return gradient_record(grads, branch_free=True)


def test_without_a_branch_under_xla_the_statistics_are_the_same():
    """What runs where XLA compiles for a GPU or TPU (no tf.cond), checked on this CPU:
    norms and exact NaN and Inf counts, absent, sparse and half-precision gradients."""
    rng = np.random.default_rng(5)
    dense = rng.normal(size=(40, 30)).astype(np.float32)
    broken = np.array([[np.nan, 1.0, np.inf], [-np.inf, np.nan, np.nan]], np.float32)
    half = rng.normal(size=(7,)).astype(np.float16)
    values = np.array([[1.0, 2.0], [3.0, -4.0], [0.5, 0.5]], np.float32)
    indices = np.array([4, 1, 4], np.int64)
    summed = np.zeros((6, 2), np.float32)
    np.add.at(summed, indices, values)
    sparse = tf.IndexedSlices(tf.constant(values), tf.constant(indices), tf.constant([6, 2]))
    grads = [tf.constant(dense), None, tf.constant(broken), tf.constant(half), sparse,
             tf.zeros([0, 3])]
    stats = gradient_stats(grads, tf.function(branch_free_under_xla, jit_compile=True))
    np.testing.assert_allclose(stats[0], reference(dense), rtol=1e-5)
    assert stats[1].tolist() == [0] * len(COLUMNS)
    assert stats[2, NAN] == 3 and stats[2, INF] == 2 and np.isnan(stats[2, NORM])
    np.testing.assert_allclose(stats[3], reference(half), rtol=1e-3)
    np.testing.assert_allclose(stats[4], reference(summed), rtol=1e-6)
    assert stats[5].tolist() == [1, 0, 0, 0]

    overflowing = gradient_stats([tf.constant([3e20, 4e20])],
                                 tf.function(branch_free_under_xla, jit_compile=True))
    assert overflowing[0].tolist() == [1, np.inf, 0, 0], "+Inf, not counted as non-finite"


def branch_ops(function, grads) -> set[str]:
    graph = function.get_concrete_function(grads).graph
    library = graph.as_graph_def().library.function
    types = {op.type for op in graph.get_operations()}
    types |= {node.op for f in library for node in f.node_def}
    return types & {"If", "StatelessIf", "Switch", "Merge"}


def test_the_statistics_branch_except_where_xla_compiles_for_an_accelerator(monkeypatch):
    from gradwatch.agent.tensorflow import stats

    grads = [tf.constant([1.0, 2.0]), tf.constant([[3.0]])]
    assert branch_ops(tf.function(gradient_record, jit_compile=True), grads), "CPU: the cond"
    monkeypatch.setattr(stats, "_accelerators", lambda: True)
    assert branch_ops(tf.function(gradient_record), grads), "not compiled: the cond"
    assert not branch_ops(tf.function(gradient_record, jit_compile=True), grads)
    # A step compiled as a whole, calling the statistics as their own function (a session).
    statistics = tf.function(gradient_record)

    @tf.function(jit_compile=True)
    def step(grads):
        return statistics(grads)

    assert not branch_ops(step, grads)


def test_a_step_with_many_updates_traces_the_statistics_once():
    """A traced step holding many updates of one optimizer (keras.io forwardforward: 100
    per step) adds one call of the session's statistics function per update, plus the
    ring write: measured 24 ops per further update (about 90 when each update inlined
    its own statistics and rare branch)."""
    import keras

    from gradwatch.agent import GradientMonitor

    def traced_ops(updates: int, wrap) -> int:
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4), keras.layers.Dense(1)])
        optimizer = keras.optimizers.SGD(0.1)
        optimizer = wrap(optimizer) if wrap else optimizer
        optimizer.build(model.trainable_variables)

        @tf.function
        def step(x):
            for _ in range(updates):
                with tf.GradientTape() as tape:
                    loss = tf.reduce_sum(model(x))
                optimizer.apply(tape.gradient(loss, model.trainable_variables),
                                model.trainable_variables)

        graph = step.get_concrete_function(tf.zeros((2, 4))).graph
        library = graph.as_graph_def().library.function
        return len(graph.get_operations()) + sum(len(f.node_def) for f in library)

    with GradientMonitor(collector="127.0.0.1:9", training_job="ops", diagnose=False) as m:
        one, five = (traced_ops(k, m.wrap) - traced_ops(k, None) for k in (1, 5))
    assert (five - one) / 4 <= 40, f"{(five - one) / 4} ops per further update (measured 24)"

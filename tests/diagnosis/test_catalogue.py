"""The catalogue of broken gradients: each pattern's verdict, op type and source line,
in eager custom loops, ``tf.function`` custom loops and Keras 3 ``model.fit``.

The patterns come from public bug reports (the docstrings name them where one
report stands for the class) and are reproduced on the installed TensorFlow/Keras.

Every pattern model computes ``healthy(trunk(x)) + broken(trunk(x))``: only the
``head`` layer (used by the broken part) loses its gradient, the rest trains, as
in the silent failures gradwatch exists for. ``# line:NAME`` comments mark the
source line each diagnosis must point at.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf

from gradwatch.agent import diagnose_missing_gradients
from gradwatch.agent.core.diagnosis import Cause, Diagnosis

pytestmark = pytest.mark.timeout(120)

_SOURCE = Path(__file__).read_text().splitlines()


def lines(marker: str) -> set[int]:
    """The lines of this file carrying ``# line:marker``."""
    pattern = re.compile(rf"# line:{marker}\b")
    return {i for i, text in enumerate(_SOURCE, 1) if pattern.search(text)}


@tf.custom_gradient
def quantize(t):
    def grad(dy):
        return None  # "quantization has no gradient": the classic custom-gradient bug

    return tf.identity(t), grad


class Pattern(keras.Model):
    """A trunk, a healthy head, and ``broken(h)`` using the ``head`` layer."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.trunk = keras.layers.Dense(8, activation="tanh", name="trunk")
        self.healthy = keras.layers.Dense(1, name="healthy")
        self.head = keras.layers.Dense(1, name="head")

    def build(self, input_shape):
        self.trunk.build(input_shape)
        for layer in (self.healthy, self.head):
            layer.build((None, 8))

    def call(self, x):
        h = self.trunk(x)
        return self.healthy(h) + self.broken(h, x)

    def broken(self, h, x):
        raise NotImplementedError


class Floor(Pattern):
    def broken(self, h, x):
        return tf.math.floor(self.head(h))  # line:floor


class Round(Pattern):
    def broken(self, h, x):
        return tf.round(self.head(h))  # line:round


class ArgMax(Pattern):
    def broken(self, h, x):
        scores = tf.concat([self.head(h), -self.head(h)], axis=1)
        return tf.cast(tf.argmax(scores, axis=1), tf.float32)[:, None]  # line:argmax


class KerasArgMax(Pattern):
    """Keras's argmax guards against -0.0 with a ``tf.where`` whose condition compares the
    scores (a sign bit's bitcast, ``Equal``): that guard was blamed, with the fix for
    comparisons, not the argmax."""

    def broken(self, h, x):
        scores = keras.ops.concatenate([self.head(h), -self.head(h)], axis=1)
        return keras.ops.cast(keras.ops.argmax(scores, axis=1), "float32")[:, None]  # line:kargmax


class IntegerCast(Pattern):
    def broken(self, h, x):
        return tf.cast(tf.cast(self.head(h) * 10, tf.int32), tf.float32)  # line:cast


class StopGradient(Pattern):
    def broken(self, h, x):
        return tf.stop_gradient(self.head(h))  # line:stop


class Comparison(Pattern):
    def broken(self, h, x):
        return tf.cast(self.head(h) > 0, tf.float32)  # line:compare


class CondBothBranchesBroken(Pattern):
    def broken(self, h, x):
        return tf.cond(tf.reduce_mean(x) > 0,
                       lambda: tf.math.floor(self.head(h)),  # line:cond
                       lambda: tf.math.floor(self.head(h) * 2))  # line:cond


class IntegerEmbeddingIds(Pattern):
    def build(self, input_shape):
        super().build(input_shape)
        self.embedding = keras.layers.Embedding(16, 1, name="embedding")
        self.embedding.build((None,))

    def broken(self, h, x):
        ids = tf.cast(tf.abs(self.head(h)[:, 0]) * 4, tf.int32) % 16  # line:ids
        return self.embedding(ids)  # the embedding itself trains


class CustomGradientNone(Pattern):
    def broken(self, h, x):
        return quantize(self.head(h))  # line:custom


@tf.function
def scaled(t):
    return t * 2.0


class FloorAfterAFunction(Pattern):
    """A ``tf.function`` helper between the layer and the break: inlined, its inputs'
    placeholders were taken for where their values came from, so the way back from the
    loss stopped inside it (tf-keras's LSTM, a function, then a floor: "unknown")."""

    def broken(self, h, x):
        return tf.math.floor(scaled(self.head(h)))  # line:afterfn


class FunctionSharedWithTheHealthyPart(Pattern):
    """One ``tf.function`` helper called by the healthy part and the broken one: its two
    calls were merged into one computation, the broken part's path taken through the
    healthy call ("unknown")."""

    def call(self, x):
        h = self.trunk(x)
        return scaled(self.healthy(h)) + tf.math.floor(scaled(self.head(h)))  # line:shared


class UnusedLayer(Pattern):
    def broken(self, h, x):
        return 0.0 * tf.reduce_mean(h, axis=1, keepdims=True)  # ``head`` is never called


class MetricOnly(Pattern):
    def broken(self, h, x):
        self.last_confidence = tf.reduce_mean(self.head(h))  # line:metric
        return 0.0 * tf.reduce_mean(h, axis=1, keepdims=True)


class PythonIf(Pattern):
    """A Python ``if`` on a tensor picks one layer per step; eagerly the other one is
    never read in that step. (Inside a traced Keras ``call`` TensorFlow refuses the
    ``if`` with OperatorNotAllowedInGraphError: loud, nothing to diagnose.)"""

    def build(self, input_shape):
        super().build(input_shape)
        self.other = keras.layers.Dense(1, name="other")
        self.other.build((None, 8))

    def broken(self, h, x):
        if tf.reduce_mean(x) > 100.0:  # never true for this data
            return self.head(h)
        return self.other(h)


class LeftTensorFlow(Pattern):
    """Only meaningful eagerly (inside tf.function .numpy() raises)."""

    def broken(self, h, x):
        host = np.floor(self.head(h))  # line:numpy
        return tf.constant(host)


class DotNumpy(Pattern):
    def broken(self, h, x):
        return tf.constant(self.head(h).numpy() ** 2)  # line:dotnumpy


class FloorDivOperator(Pattern):
    """``//`` on floats (bucketing a prediction) is FloorDiv, whose gradient is None."""

    def broken(self, h, x):
        return self.head(h) // 0.25  # line:floordiv


class HistogramCounts(Pattern):
    """A loss on bin counts (matching a target distribution): HistogramFixedWidth has no
    registered gradient."""

    def broken(self, h, x):
        counts = tf.histogram_fixed_width(self.head(h), [-1.0, 1.0], nbins=4)  # line:hist
        return tf.reduce_sum(tf.cast(counts, tf.float32)) * tf.ones_like(h[:, :1])


class OneHotPrediction(Pattern):
    """Predictions turned into one-hot labels before the loss."""

    def broken(self, h, x):
        scores = tf.concat([self.head(h), -self.head(h)], axis=1)
        return tf.one_hot(tf.argmax(scores, axis=1), 2)[:, :1]  # line:onehot


class NumpyFunction(Pattern):
    """tensorflow/tensorflow#35713: a loss through ``tf.numpy_function`` (PyFunc has no
    registered gradient)."""

    def broken(self, h, x):
        ranked = tf.numpy_function(np.sort, [self.head(h)], tf.float32)  # line:pyfunc
        return tf.ensure_shape(ranked, (None, 1))


class SampledAction(Pattern):
    """Policy gradients written with the sampled action instead of its log-probability:
    ``tf.random.categorical`` outputs int64 indices."""

    def broken(self, h, x):
        logits = tf.concat([self.head(h), -self.head(h)], axis=1)
        action = tf.random.categorical(logits, 1)  # line:sample
        return tf.cast(action, tf.float32)


class IntegerVariable(Pattern):
    """keras-team/keras#20058: ``add_variable(..., dtype="int32")`` is trainable but can
    never get a gradient."""

    def build(self, input_shape):
        super().build(input_shape)
        self.scale = self.add_weight(shape=(), dtype="int32", initializer="ones",
                                     name="scale")

    def broken(self, h, x):
        return self.head(h) * tf.cast(self.scale, tf.float32)  # line:intvar


class NoisyHead(keras.layers.Layer):
    """tensorflow/tensorflow#32729: a noisy-net layer that computes its kernel from its
    variables once, in ``build()``, and multiplies by that stored tensor in ``call()``."""

    def build(self, input_shape):
        self.mu = self.add_weight(shape=(input_shape[-1], 1), name="mu")
        self.sigma = self.add_weight(shape=(input_shape[-1], 1), initializer="ones",
                                     name="sigma")
        self.kernel = self.mu + self.sigma * tf.random.normal((input_shape[-1], 1))

    def call(self, h):
        return tf.matmul(h, self.kernel)  # line:stored


class BuildTimeKernel(Pattern):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.head = NoisyHead(name="head")

    def broken(self, h, x):
        return self.head(h)


class PositionalHead(keras.layers.Layer):
    """A layer keeping a constant (a positional encoding) next to a weight it uses only
    at inference: the constant is on the loss path, the weight unused in training."""

    def build(self, input_shape):
        self.pos = tf.constant(np.linspace(0, 1, input_shape[-1], dtype="float32"))
        self.infer_scale = self.add_weight(shape=(), initializer="ones", name="infer_scale")

    def call(self, h, training=True):
        return h + self.pos if training else (h + self.pos) * self.infer_scale


class ConstantBesideAnUnusedWeight(Pattern):
    """The stored-tensor check blamed any tensor kept next to an unused variable (here
    ``pos``; in a script, the input data in the module's globals next to a loop's
    variable): only tensors of the variable's size are suspects."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.head = PositionalHead(name="head")

    def broken(self, h, x):
        return self.head(h)[:, :1]


class MetricAsLoss(Pattern):
    """keras-team/keras#19150: a ``keras.metrics`` object used as (part of) the loss; its
    value is accumulated into state variables and read back."""

    def build(self, input_shape):
        super().build(input_shape)
        self.metric = keras.metrics.Mean(name="penalty")

    def broken(self, h, x):
        self.metric.update_state(tf.square(self.head(h)))  # line:metricloss
        return self.metric.result() * tf.ones_like(h[:, :1])


class AssignedState(Pattern):
    """A statistic written into a ``tf.Variable`` during the step and read back into the
    loss (a running mean used as a penalty)."""

    def build(self, input_shape):
        super().build(input_shape)
        self.running = tf.Variable(0.0, trainable=False)

    def broken(self, h, x):
        self.running.assign(tf.reduce_mean(self.head(h)))  # line:assign
        return self.running * tf.ones_like(h[:, :1])


# Healthy-looking patterns that must *not* be diagnosed.

class WhereIsFine(Pattern):
    def broken(self, h, x):
        value = self.head(h)
        return tf.where(value > 0, value, 0.1 * value)


class FrozenHead(Pattern):
    def build(self, input_shape):
        super().build(input_shape)
        self.head.trainable = False

    def broken(self, h, x):
        return tf.stop_gradient(self.head(h))  # frozen on purpose: not trainable, not flagged


ANY = "*"  # an op type that depends on the framework's internals


@dataclass(frozen=True)
class Expected:
    cause: Cause
    op_type: str | tuple[str, ...] = ""
    marker: str = ""
    variables: tuple[str, ...] = ("/head/kernel", "/head/bias")


CATALOGUE = {
    Floor: Expected(Cause.BROKEN_AT_OP, "Floor", "floor"),
    Round: Expected(Cause.BROKEN_AT_OP, "Round", "round"),
    ArgMax: Expected(Cause.BROKEN_AT_OP, "ArgMax", "argmax"),
    KerasArgMax: Expected(Cause.BROKEN_AT_OP, "ArgMax", "kargmax"),
    IntegerCast: Expected(Cause.BROKEN_AT_OP, "Cast", "cast"),
    StopGradient: Expected(Cause.BROKEN_AT_OP, "StopGradient", "stop"),
    Comparison: Expected(Cause.BROKEN_AT_OP, "Greater", "compare"),
    CondBothBranchesBroken: Expected(Cause.BROKEN_AT_OP, "Floor", "cond"),
    IntegerEmbeddingIds: Expected(Cause.BROKEN_AT_OP, "Cast", "ids"),
    CustomGradientNone: Expected(Cause.BROKEN_AT_OP, ("IdentityN", "Identity"), "custom"),
    UnusedLayer: Expected(Cause.UNUSED),
    MetricOnly: Expected(Cause.NOT_ON_LOSS_PATH, "ReadVariableOp", "metric"),
    FloorDivOperator: Expected(Cause.BROKEN_AT_OP, "FloorDiv", "floordiv"),
    SampledAction: Expected(Cause.BROKEN_AT_OP, "Multinomial", "sample"),
    IntegerVariable: Expected(Cause.NOT_TRACKED, "ReadVariableOp", "intvar", ("/scale",)),
    BuildTimeKernel: Expected(Cause.OUTSIDE_TAPE, "MatMul", "stored",
                              ("/head/mu", "/head/sigma")),
    ConstantBesideAnUnusedWeight: Expected(Cause.UNUSED, variables=("/head/infer_scale",)),
    MetricAsLoss: Expected(Cause.BROKEN_AT_OP, ("AssignVariableOp", "AssignAddVariableOp"),
                           "metricloss"),
    AssignedState: Expected(Cause.BROKEN_AT_OP, "AssignVariableOp", "assign"),
    HistogramCounts: Expected(Cause.BROKEN_AT_OP, "HistogramFixedWidth", "hist"),
    OneHotPrediction: Expected(Cause.BROKEN_AT_OP, "ArgMax", "onehot"),
    FloorAfterAFunction: Expected(Cause.BROKEN_AT_OP, "Floor", "afterfn"),
    FunctionSharedWithTheHealthyPart: Expected(Cause.BROKEN_AT_OP, "Floor", "shared"),
}
MODES = ("eager", "function", "fit")
EAGER_ONLY = {
    PythonIf: Expected(Cause.UNUSED),
    LeftTensorFlow: Expected(Cause.LEFT_TENSORFLOW, "AddV2", "numpy"),
    DotNumpy: Expected(Cause.LEFT_TENSORFLOW, "AddV2", "dotnumpy"),
    NumpyFunction: Expected(Cause.LEFT_TENSORFLOW, "AddV2", "pyfunc"),  # runs NumPy at once
}
TRACED_ONLY = {  # the same programs as traced graphs
    NumpyFunction: Expected(Cause.BROKEN_AT_OP, "PyFunc", "pyfunc"),
}
HEALTHY = (WhereIsFine, FrozenHead)


def _data():
    rng = np.random.default_rng(0)
    return (rng.normal(size=(32, 4)).astype("float32"),
            rng.normal(size=(32, 1)).astype("float32"))


def fresh(model_class: type[Pattern]) -> tuple[Pattern, np.ndarray, np.ndarray, Any]:
    """A built model, the data and an SGD optimizer, seeded alike for every case."""
    keras.utils.set_random_seed(0)
    model = model_class()
    model.build((None, 4))
    return (model, *_data(), keras.optimizers.SGD(0.01))


def train(model_class: type[Pattern], mode: str, steps: int = 2) -> dict:
    """Trains a fresh model for ``steps`` steps in ``mode``; returns the diagnoses."""
    model, x, y, optimizer = fresh(model_class)
    with diagnose_missing_gradients() as report:
        if mode == "fit":
            model.compile(optimizer=optimizer, loss="mse")
            model.fit(x, y, batch_size=16, epochs=1, verbose=0)
        else:
            def step(x, y):
                with tf.GradientTape() as tape:
                    loss = tf.reduce_mean(tf.square(model(x) - y))
                grads = tape.gradient(loss, model.trainable_variables)
                optimizer.apply(grads, model.trainable_variables)

            step = tf.function(step) if mode == "function" else step
            for i in range(steps):
                step(x[i * 16:(i + 1) * 16], y[i * 16:(i + 1) * 16])
    return report.diagnoses


def check(diagnoses: dict, expected: Expected) -> None:
    found = sorted(suffix for suffix in expected.variables for v in diagnoses
                   if v.endswith(suffix))
    assert found == sorted(expected.variables) and len(diagnoses) == len(found), \
        f"exactly {expected.variables} are diagnosed: {diagnoses}"
    for name in diagnoses:
        d = diagnoses[name]
        assert d.cause is expected.cause, d.message()
        op_types = (expected.op_type,) if isinstance(expected.op_type, str) else expected.op_type
        assert ANY in op_types or d.op_type in op_types, d.message()
        if expected.marker:
            assert d.source is not None and d.source.file == __file__, d.message()
            assert d.source.line in lines(expected.marker), d.message()
        else:
            assert d.source is None
        assert d.hint, d.message()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("model_class", list(CATALOGUE), ids=lambda c: c.__name__)
def test_catalogue(model_class, mode):
    check(train(model_class, mode), CATALOGUE[model_class])


@pytest.mark.parametrize("model_class", list(EAGER_ONLY), ids=lambda c: c.__name__)
def test_eager_only_patterns(model_class):
    check(train(model_class, "eager"), EAGER_ONLY[model_class])


@pytest.mark.parametrize("mode", ("function", "fit"))
@pytest.mark.parametrize("model_class", list(TRACED_ONLY), ids=lambda c: c.__name__)
def test_traced_only_patterns(model_class, mode):
    check(train(model_class, mode), TRACED_ONLY[model_class])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("model_class", HEALTHY, ids=lambda c: c.__name__)
def test_healthy_patterns_are_not_flagged(model_class, mode):
    assert train(model_class, mode) == {}


def test_forward_pass_outside_the_tape():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, name="late")])
    x, y = _data()
    for compiled in (False, True):
        def step(x, y):
            prediction = model(x)  # line:outside
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(prediction - y))
            return tape.gradient(loss, model.trainable_variables)

        with diagnose_missing_gradients() as report:
            (tf.function(step) if compiled else step)(x, y)
        assert {d.cause for d in report.diagnoses.values()} == {Cause.OUTSIDE_TAPE}, report
        assert {d.source.line for d in report.diagnoses.values()} == lines("outside")


# Programs whose tape, not their model, loses the gradient: each step function takes a
# built `Pattern` and returns (tape, loss, sources).

def objective_negated_after_the_tape(model, x, y):
    """The GAN generator step written with its objective flipped after the ``with``
    block: the tape never saw the op that made the loss."""
    with tf.GradientTape() as tape:
        score = tf.reduce_mean(model.head(model.trunk(x)))
    loss = -score  # line:negated
    return tape, loss, model.trunk.trainable_variables + model.head.trainable_variables


def penalty_while_not_recording(model, x, y):
    """A regulariser computed inside ``tape.stop_recording()`` (meant for logging,
    then added to the loss)."""
    with tf.GradientTape() as tape:
        h = model.trunk(x)
        loss = tf.reduce_mean(tf.square(model.healthy(h) - y))
        with tape.stop_recording():
            penalty = tf.reduce_mean(tf.square(model.head(h)))  # line:paused
        loss += 0.1 * penalty
    return tape, loss, model.trainable_variables


def between_two_with_blocks(model, x, y):
    """One tape entered twice, with part of the forward pass between the blocks."""
    tape = tf.GradientTape()
    with tape:
        h = model.trunk(x)
        fit = tf.reduce_mean(tf.square(model.healthy(h) - y))
    penalty = tf.reduce_mean(tf.square(model.head(h)))  # line:between
    with tape:
        loss = fit + 0.1 * penalty
    return tape, loss, model.trainable_variables


def predict_inside_the_tape(model, x, y):
    """tensorflow/tensorflow#50111 and many like it: ``model.predict`` returns NumPy."""
    with tf.GradientTape() as tape:
        prediction = model.predict(x, verbose=0)  # line:predict
        loss = tf.reduce_mean(tf.square(tf.constant(prediction) - y))
    return tape, loss, model.trainable_variables


def watching_only_some(model, x, y):
    """``watch_accessed_variables=False`` (to save memory) with ``tape.watch`` on all but
    one layer."""
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch([v.value for v in model.trunk.weights + model.healthy.weights])
        h = model.trunk(x)
        loss = tf.reduce_mean(tf.square(model.healthy(h) + model.head(h) - y))  # line:watch
    return tape, loss, model.trainable_variables


TAPE_PATTERNS = {
    objective_negated_after_the_tape: Expected(
        Cause.OUTSIDE_TAPE, "Neg", "negated",
        ("/trunk/kernel", "/trunk/bias", "/head/kernel", "/head/bias")),
    penalty_while_not_recording: Expected(Cause.OUTSIDE_TAPE, ("ReadVariableOp", "MatMul"),
                                          "paused"),
    watching_only_some: Expected(Cause.NOT_TRACKED, "ReadVariableOp", "watch"),
    between_two_with_blocks: Expected(Cause.OUTSIDE_TAPE, ("ReadVariableOp", "MatMul"),
                                      "between"),
    predict_inside_the_tape: Expected(  # the op is Keras' predict function
        Cause.LEFT_TENSORFLOW, ANY, "predict",
        tuple(f"/{layer}/{v}" for layer in ("trunk", "healthy", "head")
              for v in ("kernel", "bias"))),
}
TAPE_MODES = [(step, mode) for step in TAPE_PATTERNS for mode in ("eager", "function")
              if not (step is predict_inside_the_tape and mode == "function")]
WHY_OUTSIDE = {objective_negated_after_the_tape: "after the GradientTape stopped recording",
               penalty_while_not_recording: "while the GradientTape was not recording",
               between_two_with_blocks: "while the GradientTape was not recording"}


class TapePattern(Pattern):
    def broken(self, h, x):
        return self.head(h)


@pytest.mark.parametrize(("step", "mode"), TAPE_MODES,
                         ids=[f"{step.__name__}-{mode}" for step, mode in TAPE_MODES])
def test_tape_patterns(step, mode):
    model, x, y, optimizer = fresh(TapePattern)

    def train_step():
        tape, loss, sources = step(model, x, y)
        grads = tape.gradient(loss, sources)
        if any(g is not None for g in grads):
            optimizer.apply(grads, sources)

    with diagnose_missing_gradients() as report:
        for _ in range(2):
            (tf.function(train_step) if mode == "function" else train_step)()
    check(report.diagnoses, TAPE_PATTERNS[step])
    for diagnosis in report.diagnoses.values():
        assert WHY_OUTSIDE.get(step, "") in diagnosis.explanation(), diagnosis.message()


@pytest.mark.parametrize("mode", ["eager", "function"])
def test_weights_checked_after_the_update_are_not_read_by_the_loss(mode):
    """A loop that checks every weight after the update (``check_numerics``, a histogram
    for TensorBoard) around a layer it never calls: those reads happen while no tape
    records, and do not make the layer "read, but not on the loss path" at the check's
    line: it is unused."""
    model, x, y, optimizer = fresh(UnusedLayer)

    def train_step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x) - y))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        for variable in model.trainable_variables:
            tf.debugging.check_numerics(variable, "weight")

    from gradwatch.agent.tensorflow import tape

    verdicts: dict[str, Diagnosis] = {}  # as a monitor listens: the next eager step recorded
    stop = tape.listen(lambda variable, verdict: verdicts.setdefault(verdict.variable, verdict),
                       tells=False)
    try:
        for _ in range(3):
            (tf.function(train_step) if mode == "function" else train_step)()
    finally:
        stop()
    check(verdicts, CATALOGUE[UnusedLayer])


def test_weights_logged_before_the_tape_did_not_leave_tensorflow():
    """An eager loop that logs every weight before its tape (``float(np.mean(v.numpy()))``,
    as weight-logging callbacks do) around a layer it never calls: the layer was said to
    have left TensorFlow (the batch made from NumPy later looked like the value coming
    back); it is unused."""
    model, x, y, optimizer = fresh(UnusedLayer)
    from gradwatch.agent.tensorflow import tape

    verdicts: dict[str, Diagnosis] = {}
    stop = tape.listen(lambda variable, verdict: verdicts.setdefault(verdict.variable, verdict),
                       tells=False)
    try:
        for _ in range(3):
            logged = [float(np.mean(v.numpy())) for v in model.trainable_variables]
            batch = tf.constant(np.asarray(x))  # made from NumPy after the reads
            with tf.GradientTape() as gradient_tape:
                loss = tf.reduce_mean(tf.square(model(batch) - y))
            grads = gradient_tape.gradient(loss, model.trainable_variables)
            optimizer.apply([g for g in grads if g is not None],
                            [v for g, v in zip(grads, model.trainable_variables, strict=True)
                             if g is not None])
    finally:
        stop()
    assert logged
    check(verdicts, CATALOGUE[UnusedLayer])


def cnn() -> keras.Model:
    return keras.Sequential([
        keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, activation="relu"),
        keras.layers.BatchNormalization(), keras.layers.MaxPooling2D(),
        keras.layers.Flatten(), keras.layers.Dropout(0.1), keras.layers.Dense(1)])


def transformer_block() -> keras.Model:
    inputs = keras.Input((6, 8))
    attended = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)(inputs, inputs)
    h = keras.layers.LayerNormalization()(inputs + attended)
    h = keras.layers.LayerNormalization()(h + keras.layers.Dense(8)(
        keras.layers.Dense(16, activation="gelu")(h)))
    return keras.Model(inputs, keras.layers.Dense(1)(keras.layers.GlobalAveragePooling1D()(h)))


def embedding_model() -> keras.Model:
    ids = keras.Input((5,), dtype="int32")
    h = keras.layers.Embedding(50, 8)(ids)
    return keras.Model(ids, keras.layers.Dense(1)(keras.layers.GlobalAveragePooling1D()(h)))


HEALTHY_MODELS = {
    cnn: lambda rng: rng.normal(size=(16, 8, 8, 1)).astype("float32"),
    transformer_block: lambda rng: rng.normal(size=(16, 6, 8)).astype("float32"),
    embedding_model: lambda rng: rng.integers(0, 50, size=(16, 5)).astype("int32"),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("make_model", list(HEALTHY_MODELS), ids=lambda f: f.__name__)
def test_healthy_models_get_no_diagnosis(make_model, mode):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    model, x = make_model(), HEALTHY_MODELS[make_model](rng)
    y = rng.normal(size=(16, 1)).astype("float32")
    optimizer = keras.optimizers.Adam(1e-3)
    with diagnose_missing_gradients() as report:
        if mode == "fit":
            model.compile(optimizer=optimizer, loss="mse")
            model.fit(x, y, batch_size=8, epochs=1, verbose=0)
        else:
            def step():
                with tf.GradientTape() as tape:
                    loss = tf.reduce_mean(tf.square(model(x, training=True) - y))
                grads = tape.gradient(loss, model.trainable_variables)
                assert all(g is not None for g in grads)
                optimizer.apply(grads, model.trainable_variables)

            for _ in range(2):
                (tf.function(step) if mode == "function" else step)()
    assert report.diagnoses == {}


@pytest.mark.parametrize("mode", ("eager", "function"))
def test_the_break_is_the_op_on_the_path_not_a_side_branch(mode):
    """Batch norm's moments go through StopGradient on a side branch; the break that
    matters is the floor every path crosses."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8),
                              keras.layers.BatchNormalization(), keras.layers.Dense(1)])
    x, y = _data()

    def step():
        with tf.GradientTape() as tape:
            prediction = tf.math.floor(model(x, training=True))  # line:bn
            loss = tf.reduce_mean(tf.square(prediction - y))
        return tape.gradient(loss, model.trainable_variables)

    with diagnose_missing_gradients() as report:
        for _ in range(2):
            (tf.function(step) if mode == "function" else step)()
    assert len(report.diagnoses) == len(model.trainable_variables) == 6
    assert {(d.op_type, d.source.line) for d in report.diagnoses.values()} == {
        ("Floor", min(lines("bn")))}


def test_a_variable_reusing_a_dead_ones_id_is_not_taken_for_it():
    """CPython hands a freed object's id() to the next object of its size; a rebuilt
    model's variables must still be diagnosed (this made the catalogue flaky once)."""
    import gc

    from gradwatch.agent.tensorflow.tape import _Seen

    class Variable:
        pass

    seen, old = _Seen(), Variable()
    seen.add(None, old)
    assert (None, old) in seen
    old_id = id(old)
    del old
    gc.collect()
    new = Variable()
    assert (None, new) not in seen, f"id reused: {id(new) == old_id}"


def test_an_op_inside_keras_under_model_fit_does_not_point_at_the_fit_line():
    """Built-in layers only: the innermost user frame is ``model.fit(...)``, which says
    nothing (and moved the alert's text between fits); the op's name says the layer."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    floored = keras.layers.Lambda(tf.math.floor)(keras.layers.Dense(1, name="binned")(inputs))
    model = keras.Model(inputs, floored + keras.layers.Dense(1, name="linear")(inputs))
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    x, y = _data()
    with diagnose_missing_gradients() as report:
        model.fit(x, y, batch_size=16, epochs=1, verbose=0)  # the only user frame
    assert sorted(report.diagnoses) == ["binned/bias", "binned/kernel"]
    for diagnosis in report.diagnoses.values():
        assert (diagnosis.cause, diagnosis.op_type) == (Cause.BROKEN_AT_OP, "Floor")
        assert diagnosis.source is None, diagnosis.message()
        assert "lambda" in diagnosis.op_name, diagnosis.op_name


class RawVariables(tf.Module):
    """A ``tf.Module`` model as TensorFlow's "basic training loops" guide writes one:
    plain tf.Variables handed straight to ops. Eagerly TensorFlow's C++ fast path reads
    them (``x * v``, ``tf.nn.bias_add``; tf-keras layers do the same) with no op a
    callback sees."""

    def __init__(self) -> None:
        super().__init__()
        self.kernel = tf.Variable(tf.ones([4, 1]), name="kernel")
        self.scale = tf.Variable(tf.ones([1]), name="scale")
        self.offset = tf.Variable(tf.zeros([1]), name="offset")
        self.spare = tf.Variable(tf.ones([1]), name="spare")

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        binned = tf.math.floor(tf.nn.bias_add(x[:, :1] * self.scale, self.offset))  # line:raw
        return tf.matmul(x, self.kernel) + binned


@pytest.mark.parametrize("mode", ["eager", "function"])
def test_raw_variables_read_by_the_fast_path_are_followed_to_the_break(mode):
    """``scale`` and ``offset`` reach the loss through ``floor``: eagerly too, where
    their reads are no ops the recording sees, they were "never read" (and a tf-keras
    Dense's bias was, beside its correctly diagnosed kernel). A variable only read
    into a tensor before training (``spare``, whose snapshot the loss uses) stays
    unused: that read was not the step's."""
    module = RawVariables()
    snapshot = tf.convert_to_tensor(module.spare)
    x, y = _data()
    variables = [module.kernel, module.scale, module.offset, module.spare]

    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(module(x) * snapshot - y))
        return tape.gradient(loss, variables)

    with diagnose_missing_gradients() as report:
        for _ in range(2):
            (tf.function(step) if mode == "function" else step)()
    verdicts = {name: (d.cause, d.op_type) for name, d in report.diagnoses.items()}
    assert verdicts == {"scale": (Cause.BROKEN_AT_OP, "Floor"),
                        "offset": (Cause.BROKEN_AT_OP, "Floor"),
                        "spare": (Cause.UNUSED, "")}, report.diagnoses
    assert {report.diagnoses[name].source.line for name in ("scale", "offset")} == lines("raw")


@pytest.mark.parametrize("listening", ["doctor", "monitor"])
@pytest.mark.parametrize("mode", ["eager", "function"])
def test_a_persistent_tapes_second_gradient_call_sees_the_forward_pass(mode, listening):
    """One persistent tape for two losses, two gradient calls (TensorFlow's CycleGAN and
    DCGAN-style tutorials): the floored second loss's head was "never read" eagerly,
    because each gradient call ended the recording. ``doctor`` records from the first
    step; a ``monitor`` records the step after the one that missed a gradient."""
    from gradwatch.agent.tensorflow import tape as tape_module

    keras.utils.set_random_seed(0)
    first, second = keras.layers.Dense(1, name="first"), keras.layers.Dense(1, name="second")
    x, _ = _data()
    first.build((None, 4))
    second.build((None, 4))

    def step():
        with tf.GradientTape(persistent=True) as tape:
            healthy = tf.reduce_mean(first(x))
            floored = tf.reduce_mean(tf.math.floor(second(x)))  # line:persistent
        return [tape.gradient(loss, layer.trainable_variables)
                for loss, layer in ((healthy, first), (floored, second))]

    step = tf.function(step) if mode == "function" else step
    verdicts: dict[str, Diagnosis] = {}
    if listening == "doctor":
        with diagnose_missing_gradients() as report:
            for _ in range(2):
                step()
        verdicts = report.diagnoses
    else:
        stop = tape_module.listen(lambda v, verdict: verdicts.setdefault(verdict.variable,
                                                                         verdict), tells=False)
        try:
            for _ in range(3):
                step()
            # Nothing awaits a diagnosis: the recording kept for the tape has ended.
            assert not tape_module._CALLS._recorder.active
        finally:
            stop()
    assert {name: (d.cause, d.op_type) for name, d in verdicts.items()} == {
        "second/kernel": (Cause.BROKEN_AT_OP, "Floor"),
        "second/bias": (Cause.BROKEN_AT_OP, "Floor")}, verdicts
    assert {d.source.line for d in verdicts.values()} == lines("persistent")


def test_a_recording_left_running_is_bounded_and_released():
    """A Ctrl-C in the step being recorded (a notebook), or training that ends before the
    next gradient call, left the recording running: every later eager tensor was kept
    alive (3.5 GB after 300 ops on 4 MB tensors) and NumPy's functions stayed stand-ins.
    Past its bound the recording lets go of everything and stops intercepting; the step's
    gradient call, if it ever comes, says that the step was not diagnosed."""
    import gc
    import weakref

    from gradwatch.agent.tensorflow.forward_graph import EagerRecorder

    floor = np.floor
    recorder = EagerRecorder(max_bytes=4 << 20)
    recorder.start()
    try:
        assert np.floor is not floor
        first = tf.random.normal((256, 256))  # 256 KiB, kept by the recording
        kept = weakref.ref(recorder.graph)
        for _ in range(20):  # 5 MiB more: past the bound
            tf.random.normal((256, 256))
        assert recorder.overflowed and recorder.active
        assert np.floor is floor
        del first
        gc.collect()
        assert kept() is None, "the recorded graph (and its tensors) is released"
    finally:
        recorder.stop()
    assert not recorder.active and np.floor is floor

"""tf-keras (Keras 2) optimizers: apply_gradients is hooked, None gradients included."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow as tf

from gradwatch.agent import GradientMonitor
from tests.support.metrics import parse_metrics, select

try:
    import tf_keras
except ImportError:  # scripts/bootstrap.sh installs it; CI must not skip silently
    if os.environ.get("CI"):
        raise
    pytest.skip("tf-keras not installed (make test installs it)", allow_module_level=True)
pytestmark = pytest.mark.integration

X = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
Y = X.sum(axis=1, keepdims=True)


def model_with_unused_layer() -> tf_keras.Model:
    inputs = tf_keras.Input((4,))
    hidden = tf_keras.layers.Dense(8, activation="relu", name="hidden")(inputs)
    model = tf_keras.Model(inputs, tf_keras.layers.Dense(1, name="out")(hidden))
    model.unused = tf_keras.layers.Dense(3, name="unused")
    model.unused.build((None, 8))  # tracked, trainable, never called
    return model


def test_tf_keras_fit_reports_missing_gradients(collector, webhook, job_name):
    model = model_with_unused_layer()
    with GradientMonitor(collector=collector.grpc_target, training_job=job_name) as monitor:
        optimizer = monitor.wrap(tf_keras.optimizers.Adam(0.01))
        model.compile(optimizer=optimizer, loss="mse")
        model.fit(X, Y, batch_size=8, epochs=1, verbose=0)
    alert = webhook.wait_for(lambda a: a["labels"]["training_job"] == job_name, 10)
    assert alert["labels"]["alertname"] == "GradientMissing"
    assert alert["annotations"]["variables"] == "kernel, bias"  # tf.Variable names, as TF has them
    assert alert["annotations"]["causes"].startswith("kernel, bias: It is never read")
    samples = parse_metrics(collector.scrape())
    assert list(select(samples, "gradwatch_steps_total", training_job=job_name).values()) == [4]


def test_tf_keras_custom_loop_norms(collector, job_name):
    model = tf_keras.Sequential([tf_keras.layers.Dense(2, input_shape=(4,), name="dense")])
    with GradientMonitor(collector=collector.grpc_target, training_job=job_name) as monitor:
        optimizer = monitor.wrap(tf_keras.optimizers.SGD(0.0))

        @tf.function
        def step():
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(model(X) - 1.0))
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
            return grads

        for _ in range(2):
            grads = step()
    samples = parse_metrics(collector.scrape())
    exported = select(samples, "gradwatch_gradient_norm", training_job=job_name)
    assert exported == pytest.approx({v.name.removesuffix(":0"): float(np.linalg.norm(g))
                                      for v, g in zip(model.trainable_variables, grads,
                                                      strict=True)}, rel=1e-5)


def test_tf_keras_loss_scale_optimizer_reports_the_gradients_applied(collector, job_name):
    """tf-keras's ``LossScaleOptimizer`` is given unscaled gradients (its
    ``get_unscaled_gradients``, which ``minimize`` calls under ``model.fit``): their norms
    are reported as they are, and a step it skips for an overflow is counted as skipped."""
    model = tf_keras.Sequential([tf_keras.layers.Dense(2, input_shape=(4,), name="dense")])
    variables = model.trainable_variables
    optimizer = tf_keras.mixed_precision.LossScaleOptimizer(tf_keras.optimizers.SGD(0.0),
                                                            initial_scale=1024.0)
    with GradientMonitor(collector=collector.grpc_target, training_job=job_name) as monitor:
        monitor.wrap(optimizer)
        for step in range(4):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(model(X) - 1.0))
                scaled_loss = optimizer.get_scaled_loss(loss)
            grads = optimizer.get_unscaled_gradients(tape.gradient(scaled_loss, variables))
            if step == 1:  # float16-style overflow: the optimizer skips this step
                grads[0] = grads[0] + np.inf
            optimizer.apply_gradients(zip(grads, variables, strict=True))
            if step == 0:
                applied = [float(np.linalg.norm(g)) for g in grads]
    assert float(optimizer.loss_scale) == 512.0  # it did skip and halve the scale
    samples = parse_metrics(collector.scrape())
    exported = select(samples, "gradwatch_gradient_norm", training_job=job_name)
    assert exported == pytest.approx(
        {v.name.removesuffix(":0"): norm for v, norm in zip(variables, applied, strict=True)},
        rel=1e-5)
    assert list(select(samples, "gradwatch_skipped_steps_total",
                       training_job=job_name).values()) == [1.0]
    assert list(select(samples, "gradwatch_nonfinite_steps_total",
                       training_job=job_name).values()) == [0.0]


def test_legacy_optimizers_are_reported_under_the_names_given(collector, job_name):
    """A GAN's two ``tf_keras.optimizers.legacy.Adam(name=...)``: legacy optimizers keep
    the name as ``_name``; both were reported as ``Adam`` and ``Adam_2``, in the order
    they first stepped."""
    critic, generator = (tf_keras.layers.Dense(1) for _ in range(2))
    for layer in (critic, generator):
        layer.build((None, 4))
    with GradientMonitor(collector=collector.grpc_target, training_job=job_name) as monitor:
        d_opt = monitor.wrap(tf_keras.optimizers.legacy.Adam(name="d_adam"))
        g_opt = monitor.wrap(tf_keras.optimizers.legacy.Adam(name="g_adam"))
        for layer, optimizer in ((generator, g_opt), (critic, d_opt)):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(layer(X) ** 2)
            optimizer.apply_gradients(zip(tape.gradient(loss, layer.trainable_variables),
                                          layer.trainable_variables, strict=True))
    steps = select(parse_metrics(collector.scrape()), "gradwatch_steps_total",
                   training_job=job_name)
    assert {key.split(",")[0] for key in steps} == {"optimizer=d_adam", "optimizer=g_adam"}


@pytest.mark.parametrize("mode", ["eager", "function"])
def test_a_tf_keras_eager_loop_diagnoses_a_floored_head_at_the_users_line(mode):
    """A tf-keras functional model whose head goes through ``tf.floor``, trained in a custom
    loop. Eagerly its Dense reads kernel and bias by TensorFlow's C++ fast path (the bias
    was "never read"); and tf-keras defines ``Model.__call__`` in its training.py, which
    was taken for the training loop, so no line was named (the one calling the model is)."""
    from gradwatch.agent import diagnose_missing_gradients

    inputs = tf_keras.Input((4,))
    head = tf_keras.layers.Dense(1, name="head")(inputs)
    model = tf_keras.Model(inputs, tf.floor(head) + tf_keras.layers.Dense(1, name="ok")(inputs))
    optimizer = tf_keras.optimizers.SGD(0.01)

    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(X) - Y))  # the line named
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))

    with diagnose_missing_gradients() as report:
        for _ in range(2):
            (tf.function(step) if mode == "function" else step)()
    line = next(n for n, text in enumerate(open(__file__), 1) if "# the line named" in text)
    assert {name: (d.cause.value, d.op_type, d.source and d.source.line)
            for name, d in report.diagnoses.items()} == {
        "head/kernel": ("broken_at_op", "Floor", line),
        "head/bias": ("broken_at_op", "Floor", line)}

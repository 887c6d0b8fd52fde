"""Real TensorFlow training (in this process) reporting to a real collector subprocess.

Every test waits for ``monitor.close()`` (all batches acknowledged), then
asserts on the scraped ``/metrics`` and on alerts the webhook received.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from gradwatch.agent import GradientMonitor
from gradwatch.agent.tensorflow import monitor as tf_monitor
from gradwatch.agent.tensorflow.session import MAX_EAGER_TRACES
from tests.support.logs import gradwatch_warnings
from tests.support.metrics import parse_metrics, select
from tests.support.models import ModelWithUnusedLayer, X, Y, mse_gradients, small_model

pytestmark = pytest.mark.integration

def monitor_for(collector, job: str) -> GradientMonitor:
    return GradientMonitor(collector=collector.grpc_target, training_job=job,
                           flush_interval_s=0.05)


def scrape(collector, job: str) -> dict:
    samples = parse_metrics(collector.scrape())
    return {name: [(labels, value) for labels, value in values
                   if labels.get("training_job") == job]
            for name, values in samples.items()}


def alerts_for(webhook, job: str) -> list[dict]:
    return [a for a in webhook.alerts if a["labels"].get("training_job") == job]


def wait_for_alert(webhook, job: str, *, resolved: bool = False, timeout_s: float = 10.0):
    alert = webhook.wait_for(
        lambda a: a["labels"].get("training_job") == job and ("endsAt" in a) == resolved,
        timeout_s)
    assert alert is not None, f"no {'resolved' if resolved else 'firing'} alert for {job}"
    return alert


def wait_for_steps(collector, job: str, steps: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while sum(v for _, v in scrape(collector, job).get("gradwatch_steps_total", [])) < steps:
        assert time.monotonic() < deadline, f"{job} did not deliver {steps} steps"
        time.sleep(0.02)


def assert_norms(samples, variables, grads) -> None:
    exported = select(samples, "gradwatch_gradient_norm")
    expected = {v.path: float(np.linalg.norm(np.asarray(g, np.float64)))
                for v, g in zip(variables, grads, strict=True)}
    assert exported.keys() == expected.keys()
    for name, value in expected.items():
        assert exported[name] == pytest.approx(value, rel=1e-5), name


# -- healthy runs: no alert, norms equal a reference computed here --------------------------

def test_eager_custom_loop(collector, webhook, job_name):
    model, optimizer = small_model(), keras.optimizers.SGD(0.01)
    with monitor_for(collector, job_name) as monitor:
        for _ in range(3):
            grads = mse_gradients(model)
            monitor.observe(grads, model.trainable_variables)
            optimizer.apply(grads, model.trainable_variables)
    assert monitor.close()
    samples = scrape(collector, job_name)
    assert_norms(samples, model.trainable_variables, [g.numpy() for g in grads])
    assert select(samples, "gradwatch_steps_total") and list(
        select(samples, "gradwatch_steps_total").values()) == [3.0]
    assert set(select(samples, "gradwatch_gradient_present").values()) == {1.0}
    assert alerts_for(webhook, job_name) == []


def test_tf_function_loop(collector, webhook, job_name):
    model, optimizer = small_model(), keras.optimizers.Adam(0.01)
    monitor = monitor_for(collector, job_name)

    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x) - y))
        grads = tape.gradient(loss, model.trainable_variables)
        monitor.observe(grads, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        return grads

    for _ in range(4):
        grads = train_step(X, Y)
    assert monitor.close()
    samples = scrape(collector, job_name)
    assert_norms(samples, model.trainable_variables, [g.numpy() for g in grads])
    assert list(select(samples, "gradwatch_last_step").values()) == [3.0]
    assert alerts_for(webhook, job_name) == []


def traces_of_a_first_training_step(monitor: GradientMonitor, make_optimizer, via: str
                                    ) -> tuple[int, keras.Model, list]:
    """How many times a user's tf.function traces on its first call (two calls), with the
    optimizer built inside that first trace; and the model and its last gradients."""
    model, optimizer = small_model(), make_optimizer()
    if via == "optimizer":
        optimizer = monitor.wrap(optimizer)
    traces = [0]

    @tf.function
    def train_step(x, y):
        traces[0] += 1
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x) - y))
        grads = tape.gradient(loss, model.trainable_variables)
        if via == "observe":
            monitor.observe(grads, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        return grads

    grads = train_step(X, Y)
    grads = train_step(X, Y)
    assert train_step.experimental_get_tracing_count() == traces[0]
    return traces[0], model, grads


@pytest.mark.parametrize("via", ["optimizer", "observe"])
@pytest.mark.parametrize("make_optimizer", [lambda: keras.optimizers.SGD(0.01),
                                            lambda: keras.optimizers.Adam(0.01)],
                         ids=["SGD", "Adam"])
def test_gradwatch_adds_no_trace_to_a_tf_function(collector, job_name, make_optimizer, via):
    """gradwatch's ring buffer, created inside the first trace, is no variable TensorFlow
    lifts: the function traces as often as without gradwatch (SGD: once; Adam, whose slots
    Keras creates in that trace: twice). Retracing a 400-variable model cost +16 s."""
    without, _, _ = traces_of_a_first_training_step(
        GradientMonitor(enabled=False), make_optimizer, via)
    monitor = monitor_for(collector, job_name)
    traces, model, grads = traces_of_a_first_training_step(monitor, make_optimizer, via)
    assert traces == without
    assert monitor.close()
    samples = scrape(collector, job_name)
    assert_norms(samples, model.trainable_variables, [g.numpy() for g in grads])
    assert list(select(samples, "gradwatch_steps_total").values()) == [2.0]


def test_model_fit_with_wrapped_optimizer(collector, webhook, job_name):
    model, optimizer = small_model(), keras.optimizers.SGD(0.0)
    with monitor_for(collector, job_name) as monitor:
        # Learning rate 0 keeps the weights, so every step's gradient equals the reference.
        model.compile(optimizer=monitor.wrap(optimizer), loss="mse")
        model.fit(X, Y, batch_size=len(X), epochs=3, verbose=0)
    assert monitor.close()
    with tf.GradientTape() as tape:
        loss = keras.losses.MeanSquaredError()(Y, model(X))
    reference = tape.gradient(loss, model.trainable_variables)
    samples = scrape(collector, job_name)
    assert_norms(samples, model.trainable_variables, [g.numpy() for g in reference])
    assert list(select(samples, "gradwatch_steps_total").values()) == [3.0]
    assert select(samples, "gradwatch_steps_total", optimizer=optimizer.name)
    assert alerts_for(webhook, job_name) == []


@pytest.mark.parametrize("via", ["fit", "observe"])
def test_float8_scales_overwritten_with_their_new_values_are_no_gradients(collector, webhook,
                                                                          job_name, via):
    """keras.io's float8 training: Keras hands each float8 layer's scales and amax histories
    their new values in place of gradients (``overwrite_with_gradient``). They were
    reported as gradients: 12 of 16 rows, and a global norm 41 times the true one."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.Dense(1)])
    model.quantize("float8")
    overwritten = {v.path for v in model.trainable_variables if v.overwrite_with_gradient}
    gradients = [v for v in model.trainable_variables if v.path not in overwritten]
    assert overwritten and len(gradients) == 4
    with monitor_for(collector, job_name) as monitor:
        if via == "fit":
            model.compile(optimizer=monitor.wrap(keras.optimizers.SGD(0.01)), loss="mse")
            model.fit(X, Y, batch_size=len(X) // 2, epochs=2, verbose=0)
        else:  # (traced: Keras's float8 gradients fail eagerly, without gradwatch too)
            @tf.function
            def step():
                with tf.GradientTape() as tape:
                    loss = tf.reduce_mean(tf.square(model(X, training=True) - Y))
                monitor.observe(tape.gradient(loss, model.trainable_variables),
                                model.trainable_variables)

            for _ in range(4):
                step()
    assert monitor.close()
    samples = scrape(collector, job_name)
    assert select(samples, "gradwatch_gradient_norm").keys() == {v.path for v in gradients}
    assert list(select(samples, "gradwatch_steps_total").values()) == [4.0]
    assert list(select(samples, "gradwatch_variables").values()) == [4.0]
    assert alerts_for(webhook, job_name) == []


def test_a_session_that_cannot_record_says_goodbye_at_once(collector, job_name, caplog,
                                                            monkeypatch):
    """A failure while recording leaves the optimizer unwatched (one log line, training goes
    on); its session, registered already, stayed open at the collector with no steps,
    until WorkerSilent paged for a task that was training on."""
    import json
    import urllib.request

    from gradwatch.agent.tensorflow.recorder import StepRecorder

    def broken(self, record, step=None):
        raise RuntimeError("no ring buffer here")

    monkeypatch.setattr(StepRecorder, "record", broken)
    model = small_model()
    url = f"{collector.metrics_url.removesuffix('/metrics')}/api/v1/jobs/{job_name}"
    with monitor_for(collector, job_name) as monitor:
        model.compile(optimizer=monitor.wrap(keras.optimizers.SGD(0.01, name="unrecorded")),
                      loss="mse")
        model.fit(X, Y, batch_size=len(X), epochs=2, verbose=0)
        deadline = time.monotonic() + 10
        while True:  # (before close(), which says goodbye for every session)
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if json.load(response)["finished"]:
                        break
            except OSError:  # not registered yet
                pass
            assert time.monotonic() < deadline, "the session is still open"
            time.sleep(0.1)
    said = [r.getMessage() for r in caplog.records if "cannot record" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("gradwatch: cannot record gradients of "
                                                 "unrecorded"), said


# -- broken runs ------------------------------------------------------------------------------

@pytest.mark.parametrize("toggled", [False, True])
def test_a_discriminator_frozen_for_good_is_said_not_to_train(collector, job_name, caplog,
                                                              toggled):
    """The classic Keras GAN: ``discriminator.trainable = False`` before compiling the
    combined model. Keras 3 traces the discriminator's own train_on_batch without its update
    (one UserWarning at most), so it never trains; gradwatch said nothing. Set trainable
    around its own train_on_batch (``toggled``), it trains and nothing is said."""
    keras.utils.set_random_seed(0)
    generator = keras.Sequential([keras.Input((4,)), keras.layers.Dense(6)])
    discriminator = keras.Sequential([keras.Input((6,)), keras.layers.Dense(1)])
    with monitor_for(collector, job_name) as monitor:
        discriminator.compile(monitor.wrap(keras.optimizers.Adam(name="critic")), "mse")
        discriminator.trainable = False
        noise = keras.Input((4,))
        combined = keras.Model(noise, discriminator(generator(noise)))
        combined.compile(monitor.wrap(keras.optimizers.Adam(name="combined")), "mse")
        for _ in range(2):
            discriminator.trainable = toggled
            discriminator.train_on_batch(np.ones((4, 6), "float32"), np.ones((4, 1), "float32"))
            discriminator.trainable = False
            combined.train_on_batch(np.ones((4, 4), "float32"), np.ones((4, 1), "float32"))
    said = [r.getMessage() for r in caplog.records if "took no step" in r.getMessage()]
    if toggled:
        assert said == []
    else:
        assert said == ["gradwatch: critic took no step while combined trained: its model's "
                        "updates never ran (Keras 3 leaves out the update of a model whose "
                        "trainable was False when its training function was traced: a GAN's "
                        "discriminator frozen before compiling the combined model, and never "
                        "set trainable again around its own train_on_batch)"]


def test_unused_layer_alerts_for_exactly_its_variables(collector, webhook, job_name):
    model = ModelWithUnusedLayer()
    model.build((None, 4))
    with monitor_for(collector, job_name) as monitor:
        model.compile(optimizer=monitor.wrap(keras.optimizers.Adam(0.01)), loss="mse")
        with pytest.warns(UserWarning, match="Gradients do not exist"):
            model.fit(X, Y, batch_size=8, epochs=1, verbose=0)
    alert = wait_for_alert(webhook, job_name)
    unused = {"partly_unused/unused/kernel", "partly_unused/unused/bias"}
    assert set(alert["annotations"]["variables"].split(", ")) == unused
    assert alert["labels"]["severity"] == "warning"
    assert alert["annotations"]["tasks"] == "worker/0"
    samples = scrape(collector, job_name)
    present = select(samples, "gradwatch_gradient_present")
    assert {name for name, value in present.items() if value == 0.0} == unused
    assert len(present) == 6
    missing_steps = select(samples, "gradwatch_gradient_missing_steps_total")
    assert {name: missing_steps[name] for name in unused} == dict.fromkeys(unused, 4.0)


def floor_loss(model, x, y):
    return tf.reduce_mean(tf.math.floor(tf.square(model(x) - y)))


def argmax_loss(model, x, y):
    return tf.reduce_mean(tf.cast(tf.argmax(tf.concat([model(x), y], 1), axis=1), tf.float32))


def numpy_loss(model, x, y):
    return tf.constant(np.mean((model(x).numpy() - y) ** 2))


@pytest.mark.parametrize("loss_fn, compiled, cause, op_type", [
    (floor_loss, True, "broken_at_op", "Floor"), (argmax_loss, True, "broken_at_op", "ArgMax"),
    (numpy_loss, False, "left_tensorflow", "AddV2")])
def test_broken_loss_leaves_every_variable_without_gradient(collector, webhook, job_name,
                                                            loss_fn, compiled, cause, op_type):
    model = small_model()

    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(model, x, y)
        grads = tape.gradient(loss, model.trainable_variables)
        monitor.observe(grads, model.trainable_variables)
        return grads

    with monitor_for(collector, job_name) as monitor:
        run = tf.function(step) if compiled else step
        for _ in range(2):
            grads = run(X, Y)
    assert grads == [None] * 4
    alert = wait_for_alert(webhook, job_name)
    assert alert["labels"]["severity"] == "critical"
    assert alert["annotations"]["summary"].startswith("4 of 4 variables")
    samples = scrape(collector, job_name)
    assert set(select(samples, "gradwatch_gradient_present").values()) == {0.0}
    assert list(select(samples, "gradwatch_variables_without_gradient").values()) == [4.0]
    # Why, down to the line of the loss function (eagerly: diagnosed on the second step).
    line = inspect.getsourcelines(loss_fn)[1] + 1
    causes = samples["gradwatch_gradient_missing_cause_info"]
    assert len(causes) == 4
    assert {(c["cause"], c["op_type"], c["source"]) for c, _ in causes} == {
        (cause, op_type, f"{__file__}:{line}")}


def test_model_fit_that_keras_rejects_still_reports(collector, webhook, job_name):
    """With no gradient at all Keras raises while tracing; the alert must still go out."""
    model = small_model()
    monitor = monitor_for(collector, job_name)
    model.compile(optimizer=monitor.wrap(keras.optimizers.Adam()),
                  loss=lambda y, p: tf.reduce_mean(tf.math.floor(tf.square(p - y))))
    with pytest.raises(ValueError, match="No gradients provided"):
        model.fit(X, Y, epochs=1, verbose=0)
    assert monitor.close()
    alert = wait_for_alert(webhook, job_name)
    assert alert["labels"]["severity"] == "critical"
    assert alert["annotations"]["causes"].startswith(
        "model/hidden/kernel, model/hidden/bias, model/out/kernel, model/out/bias: The path to "
        "the loss crosses Floor op")


def test_keras_says_why_an_unbuilt_optimizer_given_no_variables_refuses(collector, job_name):
    """``optimizer.apply(grads)`` without variables before the optimizer is built: Keras's
    own message (call ``optimizer.build`` first), not gradwatch's "2 gradients for 0
    variables"."""
    with monitor_for(collector, job_name) as monitor:
        optimizer = monitor.wrap(keras.optimizers.SGD())
        with pytest.raises(ValueError, match="must already be built"):
            optimizer.apply([tf.ones(2), tf.ones(1)])


def test_an_update_keras_refuses_with_every_gradient_there_is_no_step(collector, job_name):
    """keras.io's fine-tuning guide, recompiled with the same Keras 3 optimizer after the
    base was unfrozen: Keras refuses ("Unknown variable"), no update runs, yet a step with
    every gradient "present" at norm 0 was reported."""
    base = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="b1")], name="base")
    base.trainable = False
    model = keras.Sequential([keras.Input((4,)), base, keras.layers.Dense(1, name="head")])
    with monitor_for(collector, job_name) as monitor:
        optimizer = monitor.wrap(keras.optimizers.Adam(name="adam"))
        model.compile(optimizer=optimizer, loss="mse")
        model.fit(X, Y, batch_size=8, verbose=0)
        steps = int(optimizer.iterations)
        base.trainable = True
        model.compile(optimizer=optimizer, loss="mse")
        with pytest.raises(ValueError, match="Unknown variable"):
            model.fit(X, Y, batch_size=8, verbose=0)
    assert monitor.close()
    reported = steps_by_optimizer(scrape(collector, job_name))
    assert reported["adam"] == steps and reported.get("adam_2", 0.0) == 0.0, reported


def test_a_diagnosed_model_dropped_is_freed_under_one_monitor(collector, job_name):
    """A notebook cell run again under one monitor: the model of the first run had an
    unused layer, diagnosed. The monitor kept that layer's variables (keyed by id(), "so
    that the id is not reused") until it closed: a leak per run, and a stale verdict for
    whatever took the id next."""
    import gc
    import weakref

    kept = []
    with monitor_for(collector, job_name) as monitor:
        for _ in range(2):
            model = ModelWithUnusedLayer()
            model.compile(optimizer=monitor.wrap(keras.optimizers.SGD()), loss="mse")
            model.fit(X, Y, epochs=1, batch_size=16, verbose=0)
            kept.append(weakref.ref(model.unused.kernel))
            del model
            gc.collect()
            assert kept[-1]() is None
    assert monitor.close()
    causes = {labels["variable"]: labels["cause"]
              for labels, _ in scrape(collector, job_name)["gradwatch_gradient_missing_cause_info"]}
    assert causes == {"partly_unused/unused/kernel": "unused",
                      "partly_unused/unused/bias": "unused"}, causes


def test_gradients_applied_outside_the_replicas_are_recorded(collector, job_name):
    """tf.distribute's custom loop with the update outside ``strategy.run``: gradients
    computed per replica, reduced with ``strategy.reduce``, applied in cross-replica
    context. Recording there raised ("Could not convert from tf.VariableAggregation
    NONE"): the optimizer went unwatched for the rest of the run, no step reported and
    its unused layer never paged. Every replica now records the reduced gradients."""
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        model = ModelWithUnusedLayer()
        model.build((None, 4))
        variables = model.trainable_variables
        monitor = monitor_for(collector, job_name)
        optimizer = monitor.wrap(keras.optimizers.SGD(0.01, name="sgd"))
        optimizer.build(variables)

    def gradients(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x) - y))
        return tape.gradient(loss, variables)

    @tf.function
    def step(x, y):
        per_replica = strategy.run(gradients, args=(x, y))
        reduced = [None if g is None else strategy.reduce("SUM", g, axis=None)
                   for g in per_replica]
        optimizer.apply_gradients(zip(reduced, variables, strict=True))

    for _ in range(3):
        step(X, Y)
    assert monitor.close()
    samples = scrape(collector, job_name)
    assert steps_by_optimizer(samples) == {"sgd": 3.0}
    missing = {labels["variable"] for labels, value in
               samples["gradwatch_gradient_missing_steps_total"] if value}
    assert missing == {"partly_unused/unused/kernel", "partly_unused/unused/bias"}


def test_nan_in_one_gradient_is_counted(collector, webhook, job_name):
    model = small_model()
    variables = model.trainable_variables
    with monitor_for(collector, job_name) as monitor:
        for _ in range(3):
            grads = mse_gradients(model)
            poisoned = grads[0].numpy()
            poisoned[0, :2] = np.nan
            poisoned[1, 0] = np.inf
            monitor.observe([tf.constant(poisoned), *grads[1:]], variables)
    assert monitor.close()
    samples = scrape(collector, job_name)
    nan = select(samples, "gradwatch_gradient_nan_values_total")
    inf = select(samples, "gradwatch_gradient_inf_values_total")
    assert nan == {v.path: (6.0 if i == 0 else 0.0) for i, v in enumerate(variables)}
    assert inf[variables[0].path] == 3.0
    assert list(select(samples, "gradwatch_nonfinite_steps_total").values()) == [3.0]


def test_alert_resolves_when_gradients_return(collector, webhook, job_name):
    model = small_model()
    variables = model.trainable_variables
    with monitor_for(collector, job_name) as monitor:
        for step in range(6):
            grads = mse_gradients(model)
            if step < 3:
                grads[-1] = None  # the output bias "forgot" its gradient
            monitor.observe(grads, variables)
            if step == 2:
                wait_for_alert(webhook, job_name)
                # The alert may come from steps 0-1 alone; a batch holding step 2 and the
                # healthy steps after it would keep it firing (any missing step counts).
                wait_for_steps(collector, job_name, 3)
    resolved = wait_for_alert(webhook, job_name, resolved=True)
    assert resolved["annotations"]["variables"] == variables[-1].path
    assert resolved["endsAt"] >= resolved["startsAt"]


def test_training_goes_on_without_a_collector(job_name):
    model, optimizer = small_model(), keras.optimizers.SGD(0.01)
    monitor = GradientMonitor(collector="127.0.0.1:1", training_job=job_name,
                              flush_interval_s=0.05)
    for _ in range(3):
        grads = mse_gradients(model)
        monitor.observe(grads, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
    assert monitor.close(timeout_s=1.0) is False  # nothing acknowledged, nothing raised
    assert monitor.close() is False  # asked again (as a `with` block's exit does): the same


def test_disabled_monitor_is_a_no_op(monkeypatch, job_name):
    monkeypatch.setenv("GRADWATCH_DISABLED", "1")
    monitor = GradientMonitor(training_job=job_name)
    optimizer = keras.optimizers.SGD()
    assert monitor.wrap(optimizer) is optimizer and "apply" not in vars(optimizer)
    monitor.observe([None], [tf.Variable(1.0)])
    assert monitor.close()


def test_reports_wait_for_a_collector_that_starts_late(job_name):
    from tests.support.services import CollectorProcess, free_port

    port = free_port()
    model = small_model()
    monitor = GradientMonitor(collector=f"127.0.0.1:{port}", training_job=job_name,
                              flush_interval_s=0.05)

    def train(steps: int) -> None:
        for _ in range(steps):
            monitor.observe(mse_gradients(model), model.trainable_variables)

    train(3)  # nobody listening yet
    with CollectorProcess("--grpc-address", f"127.0.0.1:{port}") as collector:
        train(2)
        assert monitor.close(timeout_s=20)
        samples = parse_metrics(collector.scrape())
    assert list(select(samples, "gradwatch_steps_total", training_job=job_name).values()) == [5]


def test_loss_scale_optimizer_reports_unscaled_norms_and_skipped_steps(collector, webhook,
                                                                       job_name):
    model = small_model()
    variables = model.trainable_variables
    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.0),
                                                    initial_scale=1024.0)
    with monitor_for(collector, job_name) as monitor:
        monitor.wrap(optimizer)
        for step in range(4):
            with tf.GradientTape() as tape:
                scaled_loss = optimizer.scale_loss(tf.reduce_mean(tf.square(model(X) - Y)))
            grads = tape.gradient(scaled_loss, variables)
            if step == 1:  # float16-style overflow: the optimizer skips this step
                grads[0] = grads[0] + np.inf
            optimizer.apply(grads, variables)
    assert float(optimizer.dynamic_scale) == 512.0  # it did skip and halve the scale
    samples = scrape(collector, job_name)
    assert_norms(samples, variables, [g.numpy() for g in mse_gradients(model)])
    assert list(select(samples, "gradwatch_skipped_steps_total").values()) == [1.0]
    assert list(select(samples, "gradwatch_nonfinite_steps_total").values()) == [0.0]
    assert alerts_for(webhook, job_name) == []


@pytest.mark.parametrize("mode", ["eager", "tf.function"])
def test_accumulated_gradients_are_reported_once_per_update(collector, job_name, mode):
    """Keras 3's ``gradient_accumulation_steps=4``: each update applies the mean of four
    micro-batches' gradients; that mean is reported, once per update, numbered as
    ``optimizer.iterations`` counts updates (as the PyTorch agent reports
    ``optimizer.step()``). With a zero learning rate the mean of the four quarters of X
    is X's own gradient."""
    model = small_model()
    variables = model.trainable_variables
    with monitor_for(collector, job_name) as monitor:
        optimizer = monitor.wrap(keras.optimizers.SGD(0.0, gradient_accumulation_steps=4))

        def step(x, y):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(model(x) - y))
            optimizer.apply(tape.gradient(loss, variables), variables)

        step = tf.function(step) if mode == "tf.function" else step
        for micro in range(12):
            quarter = slice(8 * (micro % 4), 8 * (micro % 4 + 1))
            step(X[quarter], Y[quarter])
    assert int(optimizer.iterations) == 3
    samples = scrape(collector, job_name)
    assert list(select(samples, "gradwatch_steps_total").values()) == [3.0]
    assert list(select(samples, "gradwatch_last_step").values()) == [2.0]
    assert_norms(samples, variables, mse_gradients(model))


@pytest.mark.parametrize("make, accumulation", [
    (lambda: keras.optimizers.SGD(0.0, loss_scale_factor=1024.0), 1),
    (lambda: keras.optimizers.SGD(0.0, loss_scale_factor=1024.0, gradient_accumulation_steps=4),
     4),
    (lambda: keras.optimizers.LossScaleOptimizer(
        keras.optimizers.SGD(0.0, gradient_accumulation_steps=4), initial_scale=1024.0), 4),
], ids=["loss_scale_factor", "loss_scale_factor accumulating", "LossScaleOptimizer accumulating"])
def test_scaled_losses_report_the_gradients_applied(collector, job_name, make, accumulation):
    """``model.fit`` multiplies the loss by the optimizer's ``loss_scale_factor`` (or a
    ``LossScaleOptimizer``'s scale) and ``apply`` divides the gradients by it, before
    they are accumulated; what is reported is the gradient applied, once per update."""
    model = small_model()
    with monitor_for(collector, job_name) as monitor:
        model.compile(optimizer=monitor.wrap(make()), loss="mse")
        model.fit(X, Y, batch_size=len(X) // accumulation, epochs=1, shuffle=False, verbose=0)
    samples = scrape(collector, job_name)
    assert list(select(samples, "gradwatch_steps_total").values()) == [1.0]
    assert_norms(samples, model.trainable_variables, mse_gradients(model))


@pytest.mark.parametrize("clipping", [{"clipnorm": 1e-3}, {"clipvalue": 1e-4},
                                      {"global_clipnorm": 1e-3}], ids=lambda c: next(iter(c)))
def test_norms_are_taken_before_keras_clips(collector, job_name, clipping):
    """A Keras optimizer's ``clipnorm``, ``clipvalue`` or ``global_clipnorm`` clips inside
    ``apply``: what is reported is the gradient the step computed, so an explosion shows
    even where clipping contains it (as for PyTorch's ``clip_grad_norm_``)."""
    model = small_model()
    with monitor_for(collector, job_name) as monitor:
        model.compile(optimizer=monitor.wrap(keras.optimizers.SGD(0.0, **clipping)), loss="mse")
        model.fit(X, Y, batch_size=len(X), epochs=1, shuffle=False, verbose=0)
    assert_norms(scrape(collector, job_name), model.trainable_variables, mse_gradients(model))


def test_a_loss_scale_near_the_float32_maximum_leaves_the_norms_right(collector, job_name):
    """A Keras 3 ``LossScaleOptimizer`` in a custom train step (keras.io: ``scale_loss``,
    then ``apply``) whose dynamic scale grew to 1e38, as a long run's does where nothing
    overflows: the norms were multiplied by 1 / 1e38, which float32 flushes to 0, and
    every norm read 0. They are divided by the scale now."""
    variable = keras.Variable(np.array([1.0, 2.0], "float32"))
    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.0),
                                                    initial_scale=1e38)
    with monitor_for(collector, job_name) as monitor:
        monitor.wrap(optimizer)

        @tf.function
        def step():
            with tf.GradientTape() as tape:
                loss = 1e-3 * tf.reduce_sum(tf.square(variable))
                scaled = optimizer.scale_loss(loss)  # 5e35: finite
            grads = tape.gradient(scaled, [variable])
            optimizer.apply(grads, [variable])

        for _ in range(2):
            step()
    samples = scrape(collector, job_name)
    assert list(select(samples, "gradwatch_skipped_steps_total").values()) == [0]
    (norm,) = select(samples, "gradwatch_gradient_norm").values()
    assert norm == pytest.approx(2e-3 * np.sqrt(5.0), rel=1e-5)


def test_an_optimizer_wrapped_before_a_mixed_precision_compile_counts_skipped_steps(
        collector, job_name, caplog):
    """Under a ``mixed_float16`` policy ``compile`` puts the optimizer it is given inside a
    ``LossScaleOptimizer``, which calls it only for steps without overflow. Wrapped before
    ``compile`` (the README's order) it reported 19 of 24 steps and no skipped one (none
    at all where every step overflows). The ``LossScaleOptimizer`` is now watched in its
    place from its first step: every step, the skipped ones counted."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(0)
        rng = np.random.default_rng(0)
        x = (rng.random((32, 5)) * 3).astype("float32")
        y = (rng.random((32, 1)) * 30).astype("float32")
        model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4),
                                  keras.layers.Dense(1, dtype="float32")])
        inner = keras.optimizers.SGD(1e-7)
        with monitor_for(collector, job_name) as monitor:
            model.compile(optimizer=monitor.wrap(inner), loss="mse")
            model.fit(x, y, batch_size=8, epochs=6, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    samples = scrape(collector, job_name)
    skipped = 24 - int(inner.iterations)
    assert skipped > 0
    assert list(select(samples, "gradwatch_steps_total").values()) == [24.0]
    assert list(select(samples, "gradwatch_skipped_steps_total").values()) == [skipped]
    assert list(select(samples, "gradwatch_nonfinite_steps_total").values()) == [0.0]
    assert gradwatch_warnings(caplog) == []


@pytest.mark.parametrize("head_b", ["floored", "healthy"])
def test_per_loss_gradients_summed_before_the_update(collector, job_name, caplog, head_b):
    """Multi-task training taking each loss's gradients in its own call (per-task gradient
    norms, PCGrad) and summing them for one update: each call's None for the other head
    is not the update's. A floored head was said to be "not on the loss path" (the first
    call's verdict), and with healthy heads two warnings named gradients the update had."""
    keras.utils.set_random_seed(0)
    trunk, head_a, head_b_layer = (keras.layers.Dense(units, name=name) for units, name in
                                   ((4, "trunk"), (1, "head_a"), (1, "head_b")))
    x, ya, yb = (tf.random.normal(shape) for shape in ((8, 3), (8, 1), (8, 1)))
    for layer, inputs in ((trunk, x), (head_a, trunk(x)), (head_b_layer, trunk(x))):
        layer(inputs)
    variables = [v for layer in (trunk, head_a, head_b_layer) for v in layer.trainable_variables]
    cut = tf.math.floor if head_b == "floored" else tf.identity
    with monitor_for(collector, job_name) as monitor:
        optimizer = monitor.wrap(keras.optimizers.SGD(0.01))

        @tf.function
        def step():
            with tf.GradientTape(persistent=True) as tape:
                h = trunk(x)
                loss_a = tf.reduce_mean((head_a(h) - ya) ** 2)
                loss_b = tf.reduce_mean((cut(head_b_layer(h)) - yb) ** 2)
            grads_a, grads_b = tape.gradient(loss_a, variables), tape.gradient(loss_b, variables)
            optimizer.apply([a if b is None else b if a is None else a + b
                             for a, b in zip(grads_a, grads_b, strict=True)], variables)

        for _ in range(3):
            step()
    samples = scrape(collector, job_name)
    causes = {labels["variable"]: (labels["cause"], labels["op_type"])
              for labels, _ in samples.get("gradwatch_gradient_missing_cause_info", [])}
    if head_b == "floored":
        assert causes == {"head_b/kernel": ("broken_at_op", "Floor"),
                          "head_b/bias": ("broken_at_op", "Floor")}, causes
        warnings = gradwatch_warnings(caplog)  # one per variable
        assert len(warnings) == 2 and all("Floor" in w for w in warnings), warnings
    else:
        assert list(select(samples, "gradwatch_variables_without_gradient").values()) == [0]
        assert gradwatch_warnings(caplog) == []


def gan() -> tuple[keras.Model, keras.Model]:
    generator = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4, name="g")],
                                 name="generator")
    discriminator = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, name="d")],
                                     name="discriminator")
    return generator, discriminator


def train_gan(generator: keras.Model, discriminator: keras.Model, steps: int,
              update: Callable[[keras.Model, list], None]) -> None:
    """GAN steps (one ``tf.function``): ``update(model, gradients)`` for the discriminator,
    then for the generator."""

    @tf.function
    def step(x):
        with tf.GradientTape() as g_tape, tf.GradientTape() as d_tape:
            fake = generator(x)
            d_loss = tf.reduce_mean(discriminator(fake)) - tf.reduce_mean(discriminator(x))
            g_loss = -tf.reduce_mean(discriminator(fake))
        update(discriminator, d_tape.gradient(d_loss, discriminator.trainable_variables))
        update(generator, g_tape.gradient(g_loss, generator.trainable_variables))

    for _ in range(steps):
        step(X)


def test_two_optimizers_in_one_job_are_reported_separately(collector, job_name):
    """A GAN-style step: generator and discriminator, each with its own optimizer."""
    generator, discriminator = gan()
    with monitor_for(collector, job_name) as monitor:
        optimizers = {model: monitor.wrap(keras.optimizers.Adam(1e-3, name=f"{model}_adam"))
                      for model in ("generator", "discriminator")}
        train_gan(generator, discriminator, 3, lambda model, grads: optimizers[
            model.name].apply(grads, model.trainable_variables))
    samples = scrape(collector, job_name)
    assert variables_by_optimizer(samples) == {
        "discriminator_adam": {"discriminator/d/kernel", "discriminator/d/bias"},
        "generator_adam": {"generator/g/kernel", "generator/g/bias"}}
    assert steps_by_optimizer(samples) == {"discriminator_adam": 3.0, "generator_adam": 3.0}


def variables_by_optimizer(samples: dict) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for labels, _ in samples["gradwatch_gradient_norm"]:
        found.setdefault(labels["optimizer"], set()).add(labels["variable"])
    return found


def steps_by_optimizer(samples: dict) -> dict[str, float]:
    return {labels["optimizer"]: value for labels, value in samples["gradwatch_steps_total"]}


def assert_no_session_was_replaced(caplog) -> None:
    """Two sessions of one process under one optimizer name replace each other at the
    collector: each batch of the other one is refused (NOT_FOUND) and registers again."""
    assert not gradwatch_warnings(caplog)


def test_observe_called_for_two_models_reports_each_under_its_own_name(
        collector, job_name, caplog):
    """A GAN loop calling ``monitor.observe`` for each model, with no names: each call
    site is its own session, named ``observe`` and ``observe_2``."""
    generator, discriminator = gan()
    with monitor_for(collector, job_name) as monitor:
        train_gan(generator, discriminator, 3,
                  lambda model, grads: monitor.observe(grads, model.trainable_variables))
        time.sleep(0.5)  # several flushes, each a chance for the two to collide
        assert monitor.close()
    samples = scrape(collector, job_name)
    assert variables_by_optimizer(samples) == {
        "observe": {"discriminator/d/kernel", "discriminator/d/bias"},
        "observe_2": {"generator/g/kernel", "generator/g/bias"}}
    assert steps_by_optimizer(samples) == {"observe": 3.0, "observe_2": 3.0}
    assert_no_session_was_replaced(caplog)


def test_observe_given_step_numbers_in_an_eager_loop_traces_once(collector, job_name):
    """``monitor.observe(grads, variables, step=epoch * steps + i)`` eagerly: the number was
    part of the statistics' trace key, so every step traced them again (16 → 187 ms steps
    after 300, and TensorFlow's "triggered tf.function retracing" warning)."""
    model, optimizer = small_model(), keras.optimizers.SGD(0.01)
    with monitor_for(collector, job_name) as monitor:
        for i in range(6):
            grads = mse_gradients(model)
            monitor.observe(grads, model.trainable_variables, step=10 + i)
            optimizer.apply(grads, model.trainable_variables)
        (session,) = monitor._sessions.values()
        traces = session._record.experimental_get_tracing_count()
        assert monitor.close()
    assert traces == 1
    samples = scrape(collector, job_name)
    assert steps_by_optimizer(samples) == {"observe": 6.0}
    assert list(select(samples, "gradwatch_last_step").values()) == [15.0]


def test_observe_with_a_new_name_each_step_is_bounded_and_said_once(
        collector, job_name, caplog, monkeypatch):
    """``name=f"step{i}"`` (a user's mistake) would make a session, a trace and a ring
    buffer per step (11x the step time after 60 steps): past MAX_OBSERVE_NAMES names new
    ones are ignored, with one warning; the names before it go on, and so does training."""
    monkeypatch.setattr(tf_monitor, "MAX_OBSERVE_NAMES", 3, raising=False)
    model, optimizer = small_model(), keras.optimizers.SGD(0.01)
    with monitor_for(collector, job_name) as monitor:
        for i in range(8):
            grads = mse_gradients(model)
            monitor.observe(grads, model.trainable_variables, name=f"step{i}")
            monitor.observe(grads, model.trainable_variables, name="step0")  # a known one
            optimizer.apply(grads, model.trainable_variables)
        assert len(monitor._sessions) == 3
        assert monitor.close()
    assert int(optimizer.iterations) == 8
    warnings = [w for w in gradwatch_warnings(caplog) if "distinct names" in w]
    assert len(warnings) == 1 and "'step3'" in warnings[0] and "step=" in warnings[0]
    assert steps_by_optimizer(scrape(collector, job_name)) == {
        "step0": 9.0, "step1": 1.0, "step2": 1.0}


def test_one_optimizer_updating_parts_of_a_model_in_turn(collector, job_name, caplog):
    """The remedy Keras's "can only be called for the variables it was originally built
    with" suggests: build the optimizer with every variable, then update each part on its
    own. Each part is reported as its own optimizer, with every step."""
    generator, discriminator = gan()
    with monitor_for(collector, job_name) as monitor:
        optimizer = monitor.wrap(keras.optimizers.Adam(1e-3, name="shared_adam"))
        optimizer.build(generator.trainable_variables + discriminator.trainable_variables)
        train_gan(generator, discriminator, 3,
                  lambda model, grads: optimizer.apply(grads, model.trainable_variables))
        time.sleep(0.5)
        assert monitor.close()
    samples = scrape(collector, job_name)
    assert variables_by_optimizer(samples) == {
        "shared_adam": {"discriminator/d/kernel", "discriminator/d/bias"},
        "shared_adam_2": {"generator/g/kernel", "generator/g/bias"}}
    assert steps_by_optimizer(samples) == {"shared_adam": 3.0, "shared_adam_2": 3.0}
    assert_no_session_was_replaced(caplog)


class FlooredHead(keras.Model):
    """A trunk, a head that trains, and one behind ``tf.math.floor`` (no gradient)."""

    def __init__(self) -> None:
        super().__init__(name="floored_head")
        self.trunk = keras.layers.Dense(8, activation="relu", name="trunk")
        self.ok = keras.layers.Dense(1, name="ok")
        self.head = keras.layers.Dense(1, name="head")

    def call(self, x):
        h = self.trunk(x)
        return self.ok(h) + tf.math.floor(self.head(h))


@pytest.mark.parametrize("built", [True, False], ids=["built", "built_by_the_update"])
@pytest.mark.parametrize("traced", [False, True], ids=["eager", "tf_function"])
def test_none_gradients_filtered_out_of_the_update_are_reported_missing(
        collector, job_name, caplog, traced, built):
    """The usual way to quiet Keras's "Gradients do not exist for variables" warning,
    ``apply_gradients((g, v) for g, v in pairs if g is not None)``, leaves the broken
    head out of the update: it was reported by nobody (a session of the other four
    variables, all present). It is reported missing, with its cause, in the optimizer's
    one session; also where the optimizer is not built before (as keras.io's loops leave
    it: Keras builds it at the first update, for the filtered variables alone)."""
    model = FlooredHead()
    model(X[:1])  # builds it
    variables = model.trainable_variables
    with monitor_for(collector, job_name) as monitor:
        optimizer = monitor.wrap(keras.optimizers.Adam(1e-3, name="adam"))
        if built:
            optimizer.build(variables)

        def step():
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean((model(X) - Y) ** 2)
            grads = tape.gradient(loss, variables)
            optimizer.apply_gradients((g, v) for g, v in zip(grads, variables, strict=True)
                                      if g is not None)

        step = tf.function(step) if traced else step
        for _ in range(4):
            step()
        assert monitor.close()
    samples = scrape(collector, job_name)
    head = {v.path for v in model.head.trainable_variables}
    assert steps_by_optimizer(samples) == {"adam": 4.0}
    present = select(samples, "gradwatch_gradient_present")
    assert present == {v.path: float(v.path not in head) for v in variables}
    causes = {labels["variable"]: labels["op_type"]
              for labels, _ in samples["gradwatch_gradient_missing_cause_info"]}
    assert causes == dict.fromkeys(head, "Floor")
    # the verdicts, nothing else (no session replaced by another)
    assert all("gets no gradient" in line for line in gradwatch_warnings(caplog))


@pytest.mark.parametrize("traced", [False, True], ids=["eager", "tf_function"])
def test_zeros_asked_for_unconnected_variables_are_missing_gradients(collector, job_name,
                                                                     traced):
    """``tape.gradient(..., unconnected_gradients=ZERO)`` (so that no None reaches the
    update): a variable never read and one read through ``floor`` got zeros, read present
    with norm 0, never paged and were never explained. The zeros are still what the loop
    gets; gradwatch reports them missing, with their causes."""
    x, y = tf.constant(X), tf.constant(Y[:, :1])
    tf.random.set_seed(1)
    used, unused, floored = (tf.Variable(tf.random.normal((4, 1)), name=n)
                             for n in ("used", "unused", "floored"))
    variables = [used, unused, floored]
    with monitor_for(collector, job_name) as monitor:
        def step():
            with tf.GradientTape() as tape:
                loss = (tf.reduce_mean(tf.square(x @ used - y))
                        + tf.reduce_mean(tf.floor(x @ floored)))
            grads = tape.gradient(loss, variables,
                                  unconnected_gradients=tf.UnconnectedGradients.ZERO)
            monitor.observe(grads, variables)
            for grad, variable in zip(grads, variables, strict=True):
                variable.assign_sub(0.01 * grad)
            return grads

        step = tf.function(step) if traced else step
        for _ in range(3):
            grads = step()
        assert monitor.close()
    assert [g.shape for g in grads] == [(4, 1)] * 3
    assert float(tf.norm(grads[1])) == float(tf.norm(grads[2])) == 0.0
    samples = scrape(collector, job_name)
    assert select(samples, "gradwatch_gradient_present") == {
        "used": 1.0, "unused": 0.0, "floored": 0.0}
    causes = {labels["variable"]: labels["cause"]
              for labels, _ in samples["gradwatch_gradient_missing_cause_info"]}
    assert causes == {"unused": "unused", "floored": "broken_at_op"}


def test_layers_dropped_at_random_in_an_eager_loop_stay_one_session(collector, job_name):
    """Stochastic depth in an eager loop, dropped blocks' None gradients filtered out: a
    new session (optimizer ``sgd_2`` ... ``sgd_131``) for every subset of blocks, and a
    trace of the statistics for every pattern of missing gradients (11x the plain loop's
    time). One session; the traces stay few."""
    rng = np.random.default_rng(0)
    blocks = [keras.layers.Dense(4, activation="relu", name=f"block{i}") for i in range(8)]
    for block in blocks:
        block.build((None, 4))
    variables = [v for block in blocks for v in block.trainable_variables]
    steps = 40
    with monitor_for(collector, job_name) as monitor:
        optimizer = monitor.wrap(keras.optimizers.SGD(1e-2, name="sgd"))
        optimizer.build(variables)
        for _ in range(steps):
            kept = [block for block in blocks if rng.random() < 0.5] or blocks[:1]
            with tf.GradientTape() as tape:
                h = tf.constant(X)
                for block in kept:
                    h = h + block(h)
                loss = tf.reduce_mean(h ** 2)
            grads = tape.gradient(loss, variables)
            optimizer.apply_gradients([(g, v) for g, v in zip(grads, variables, strict=True)
                                       if g is not None])
        (session,) = monitor._sessions.values()
        traces = (session._record.experimental_get_tracing_count()
                  + session._statistics.experimental_get_tracing_count())
        assert monitor.close()
    assert traces <= 2 * MAX_EAGER_TRACES
    samples = scrape(collector, job_name)
    assert steps_by_optimizer(samples) == {"sgd": float(steps)}
    assert set(select(samples, "gradwatch_gradient_present")) == {v.path for v in variables}


def test_a_notebook_cell_run_again_reports_through_the_new_monitor(collector, job_name,
                                                                      caplog):
    """The cell that makes a monitor, compiles with the wrapped optimizer (the same object)
    and fits, run twice without closing the first monitor: the optimizer reports through
    the second (once the first wrap made wrapping again a no-op: it kept reporting to the
    first), which closed the first."""
    model = small_model()
    optimizer = keras.optimizers.Adam(0.01, name="adam")
    monitors = []
    for _ in range(2):
        monitors.append(monitor_for(collector, job_name))
        model.compile(optimizer=monitors[-1].wrap(optimizer), loss="mse")
        model.fit(X, Y, batch_size=4, epochs=1, verbose=0)
        time.sleep(0.3)  # a few flushes
    assert monitors[1].close()
    monitors[0].close()  # what its exit hook does
    samples = scrape(collector, job_name)
    assert steps_by_optimizer(samples) == {"adam": 8.0}
    assert list(select(samples, "gradwatch_last_step").values()) == [15.0]
    warnings = gradwatch_warnings(caplog)
    assert len(warnings) == 1 and "replaces the one open in this process" in warnings[0]


@pytest.mark.parametrize("strategy", ["none", "mirrored"])
def test_steps_of_a_function_traced_before_wrap_are_said_to_be_unseen(collector, job_name,
                                                                        caplog, strategy):
    """``wrap(model.optimizer)`` after a first ``fit`` (or by the monitor of a notebook cell
    run again): Keras's train function, traced before, runs on without gradwatch. Close says
    so (under a strategy too: the step count, a MirroredVariable, was unreadable, and close
    said nothing); compiling again after wrapping reports every step."""
    import contextlib

    scope = (tf.distribute.MirroredStrategy(["/cpu:0"]).scope() if strategy == "mirrored"
             else contextlib.nullcontext())
    with scope:
        model = small_model()
        model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    model.fit(X, Y, batch_size=8, epochs=1, verbose=0)
    with monitor_for(collector, job_name) as monitor:
        monitor.wrap(model.optimizer)
        model.fit(X, Y, batch_size=8, epochs=1, verbose=0)  # the function traced before
    warnings = gradwatch_warnings(caplog)
    assert len(warnings) == 1 and " took 4 steps after wrap() and none reached" in \
        warnings[0], warnings
    with monitor_for(collector, job_name) as monitor:
        model.compile(optimizer=monitor.wrap(model.optimizer), loss="mse")
        model.fit(X, Y, batch_size=8, epochs=1, verbose=0)
    assert gradwatch_warnings(caplog) == warnings
    samples = scrape(collector, job_name)
    assert list(select(samples, "gradwatch_steps_total").values()) == [4.0]
    assert list(select(samples, "gradwatch_last_step").values()) == [11.0]


def test_model_fit_under_xla_keeps_every_step(collector, webhook, job_name):
    """jit_compile and steps_per_execution: several steps per host call, each reported."""
    model = small_model()
    with monitor_for(collector, job_name) as monitor:
        model.compile(optimizer=monitor.wrap(keras.optimizers.Adam(0.01)), loss="mse",
                      jit_compile=True, steps_per_execution=4)
        model.fit(X, Y, batch_size=4, epochs=2, verbose=0)
    samples = scrape(collector, job_name)
    assert list(select(samples, "gradwatch_steps_total").values()) == [16.0]
    assert list(select(samples, "gradwatch_last_step").values()) == [15.0]
    assert list(select(samples, "gradwatch_dropped_steps_total").values()) == [0.0]
    assert alerts_for(webhook, job_name) == []


def test_diagnoses_are_sent_again_to_a_restarted_collector(job_name):
    """A collector that restarts lost everything: the agent registers again and re-sends
    the diagnoses with its next batch (there will be no new trace to re-diagnose)."""
    from tests.support.services import CollectorProcess, free_port

    port = free_port()
    model = ModelWithUnusedLayer()
    model.build((None, 4))
    monitor = GradientMonitor(collector=f"127.0.0.1:{port}", training_job=job_name,
                              flush_interval_s=0.05)
    step = tf.function(lambda: monitor.observe(mse_gradients(model), model.trainable_variables))
    for collector_run in range(2):
        with CollectorProcess("--grpc-address", f"127.0.0.1:{port}") as collector:
            for _ in range(3):
                step()
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                causes = scrape(collector, job_name).get("gradwatch_gradient_missing_cause_info")
                if causes:
                    break
                time.sleep(0.1)
            assert {(c["variable"], c["cause"]) for c, _ in causes or []} == {
                ("partly_unused/unused/kernel", "unused"), ("partly_unused/unused/bias", "unused")
            }, f"collector run {collector_run}: {scrape(collector, job_name)}\n{collector.log()}"
    monitor.close(timeout_s=1)


def test_checkpoint_restored_mid_run_reports_every_step(collector, job_name, tmp_path):
    """Restoring a checkpoint sets the optimizer's step counter back (6 -> 3). The agent
    marks the lower step ``rewound``; the collector, which refuses an unmarked step lower
    than the one before it, applies all 10 steps in the order trained."""
    model, monitor = small_model(), monitor_for(collector, job_name)
    optimizer = monitor.wrap(keras.optimizers.SGD(0.01))

    def train(steps: int) -> None:
        for _ in range(steps):
            optimizer.apply(mse_gradients(model), model.trainable_variables)

    def last_step() -> float | None:
        values = select(parse_metrics(collector.scrape()), "gradwatch_last_step",
                        training_job=job_name)
        return next(iter(values.values()), None)

    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer)
    train(3)  # steps 0-2
    saved = checkpoint.save(str(tmp_path / "ckpt"))
    train(3)  # steps 3-5
    deadline = time.monotonic() + 20
    while last_step() != 5.0:  # delivered: the rewind crosses batches
        assert time.monotonic() < deadline, "steps 0-5 not delivered"
        time.sleep(0.05)
    checkpoint.restore(saved)
    assert int(optimizer.iterations) == 3
    train(4)  # steps 3-6 again
    assert monitor.close()
    samples = scrape(collector, job_name)
    assert [v for _, v in samples["gradwatch_steps_total"]] == [10.0]
    assert [v for _, v in samples["gradwatch_last_step"]] == [6.0]
    assert [v for _, v in samples["gradwatch_dropped_steps_total"]] == [0.0]
    assert not select(parse_metrics(collector.scrape()),
                      "gradwatch_collector_rejected_messages_total", reason="step_order")
    assert "step counter set back to 3 (a checkpoint restored?)" in collector.log()


@pytest.mark.parametrize("via", ["optimizer", "observe", "traced observe"])
def test_statistics_every_nth_step_keep_presence_from_the_first(collector, webhook, job_name,
                                                                via):
    """``statistics_every=4``: steps 0, 4 and 8 of 10 are recorded; the unused layer's
    missing gradient is reported (and pages) from step 0 on. ``observe`` without ``step``
    counts its calls, from 0 as an optimizer does (it counted recorded steps, so under
    ``statistics_every`` it stopped at 1 and recorded nothing after step 0)."""
    model = ModelWithUnusedLayer()
    model.build((None, 4))
    with GradientMonitor(collector=collector.grpc_target, training_job=job_name,
                         flush_interval_s=0.05, statistics_every=4) as monitor:
        optimizer = monitor.wrap(keras.optimizers.SGD(0.01, name="sgd"))

        def step():
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(model(X) - Y))
            grads = tape.gradient(loss, model.trainable_variables)
            if via == "optimizer":
                optimizer.apply(grads, model.trainable_variables)
            else:
                monitor.observe(grads, model.trainable_variables)

        step = step if via == "observe" else tf.function(step)
        for _ in range(10):
            step()
    assert monitor.close()
    samples = scrape(collector, job_name)
    assert list(select(samples, "gradwatch_steps_total").values()) == [3.0]
    assert list(select(samples, "gradwatch_last_step").values()) == [8.0]
    missing = select(samples, "gradwatch_gradient_missing_steps_total")
    assert {variable: v for variable, v in missing.items() if v} == {
        "partly_unused/unused/kernel": 3.0, "partly_unused/unused/bias": 3.0}
    assert wait_for_alert(webhook, job_name)["labels"]["alertname"] == "GradientMissing"


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", ["observe", "wrap"])
def test_autograph_runs_gradwatch_as_written(collector, job_name, mode):
    """A ``@tf.function`` step, AutoGraph on, calling gradwatch first inside its trace:
    AutoGraph converted gradwatch's code too, and where it could not (an assignment
    expression) TensorFlow printed "AutoGraph could not transform ... Please report this to
    the TensorFlow team" on the guide's own loop."""
    script = Path(__file__).with_name("autograph_job.py")
    env = {**os.environ, "GRADWATCH_COLLECTOR": collector.grpc_target}
    result = subprocess.run([sys.executable, str(script), mode, job_name], env=env,
                            capture_output=True, text=True, timeout=150)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "AutoGraph" not in result.stderr, result.stderr[-3000:]
    steps = select(parse_metrics(collector.scrape()), "gradwatch_steps_total",
                   training_job=job_name)
    assert list(steps.values()) == [3.0]


def test_a_wrapped_optimizer_given_an_iterator_of_variables_updates_them(collector,
                                                                          job_name):
    """Keras 3's ``apply`` takes any iterable of variables (it makes a list of it). The
    wrapper read an iterator (``itertools.chain`` of two models' variables) and handed
    Keras the exhausted one: nothing was updated, silently, at every step."""
    import itertools

    def train(optimizer) -> list[np.ndarray]:
        keras.utils.set_random_seed(0)
        a, b = small_model(), small_model()
        for _ in range(3):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(a(X) + b(X) - Y))
            variables = a.trainable_variables + b.trainable_variables
            grads = tape.gradient(loss, variables)
            optimizer.apply(grads, itertools.chain(a.trainable_variables,
                                                   b.trainable_variables))
        return [v.numpy() for v in variables]

    expected = train(keras.optimizers.SGD(0.1))
    with monitor_for(collector, job_name) as monitor:
        trained = train(monitor.wrap(keras.optimizers.SGD(0.1)))
    assert monitor.close()
    for got, want in zip(trained, expected, strict=True):
        np.testing.assert_array_equal(got, want)
    steps = select(parse_metrics(collector.scrape()), "gradwatch_steps_total",
                   training_job=job_name)
    assert list(steps.values()) == [3.0]


@pytest.mark.timeout(180)
def test_keras_on_the_torch_backend_is_watched_through_a_host_copy(collector, job_name):
    """Keras 3 is multi-backend: on torch, the TensorFlow agent's hook gets torch tensors.
    On the CPU their norms are right (TensorFlow reads a host copy); one line says what
    that costs, and that an accelerator's tensors stop the watching (never training)."""
    script = Path(__file__).with_name("keras_torch_backend_job.py")
    env = {**os.environ, "KERAS_BACKEND": "torch", "GRADWATCH_COLLECTOR": collector.grpc_target}
    result = subprocess.run([sys.executable, str(script), job_name], env=env,
                            capture_output=True, text=True, timeout=150)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Keras runs on the 'torch' backend" in result.stderr
    norms = select(parse_metrics(collector.scrape()), "gradwatch_gradient_norm",
                   training_job=job_name)
    assert norms == pytest.approx({"sequential/dense/kernel": 3 * np.sqrt(32),
                                   "sequential/dense/bias": 3 * np.sqrt(8),
                                   "sequential/dense_1/kernel": 3 * np.sqrt(8),
                                   "sequential/dense_1/bias": 3.0}, rel=1e-5)

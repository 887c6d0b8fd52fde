"""What explaining missing gradients costs.

1. Eager custom loop, healthy: median step time with the ``GradientTape`` hook
   installed / without, interleaved blocks (the hook only inspects results).
2. Eager, the one recorded step after a ``None``: recorded / plain step time.
3. Trace time: building the forward graph of a ResNet-50 ``tf.function`` train
   step (head through ``tf.math.floor``, so *every* variable is missing) and
   diagnosing all of its variables, against the time TensorFlow takes to
   trace the same step.

    .venv/bin/python -m bench.diagnosis_cost [--rounds 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import tensorflow as tf

from gradwatch.agent.tensorflow import tape
from gradwatch.agent.tensorflow.diagnosis import Diagnoser
from gradwatch.agent.tensorflow.forward_graph import (
    RECORDED_ALL,
    EagerRecorder,
    from_func_graph,
    graph_position,
)


def mlp_step():
    model = keras.Sequential([keras.Input((64,))] + [keras.layers.Dense(64) for _ in range(8)]
                             + [keras.layers.Dense(1)])
    x, y = tf.random.normal((32, 64)), tf.random.normal((32, 1))

    def step():
        with tf.GradientTape() as t:
            loss = tf.reduce_mean((model(x) - y) ** 2)
        return t.gradient(loss, model.trainable_variables)

    return step


def timed(step, n: int) -> list[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def eager_hook(rounds: int) -> None:
    step = mlp_step()
    timed(step, 30)
    plain, hooked = [], []
    for _ in range(rounds):
        plain += timed(step, 50)
        stop = tape.listen(lambda variable, diagnosis: None)
        hooked += timed(step, 50)
        stop()
    a, b = statistics.median(plain), statistics.median(hooked)
    print(f"eager step, hook installed / not:   {b * 1e3:7.2f} ms / {a * 1e3:7.2f} ms"
          f" = {b / a:.4f}")
    recorder, recorded = EagerRecorder(), []
    for _ in range(rounds):
        recorder.start()
        recorded += timed(step, 1)
        ops = len(recorder.stop().nodes)
    r = statistics.median(recorded)
    print(f"eager step while recorded / plain:  {r * 1e3:7.2f} ms / {a * 1e3:7.2f} ms"
          f" = {r / a:.2f} ({ops} ops, {(r - a) / ops * 1e6:.0f} us per op)")


def resnet50_trace() -> None:
    model = keras.applications.ResNet50(weights=None, input_shape=(64, 64, 3), classes=10)
    x, y = tf.random.normal((2, 64, 64, 3)), tf.random.normal((2, 10))
    captured = {}

    @tf.function
    def train_step():
        with tf.GradientTape() as t:
            loss = tf.reduce_mean((tf.math.floor(model(x, training=True)) - y) ** 2)
        graph = tf.compat.v1.get_default_graph()
        captured["position"] = graph_position(graph)
        captured["graph"], captured["loss"] = graph, loss
        return t.gradient(loss, model.trainable_variables)

    start = time.perf_counter()
    train_step.get_concrete_function()
    trace = time.perf_counter() - start
    variables = model.trainable_variables
    start = time.perf_counter()
    forward = from_func_graph(captured["graph"], captured["position"], RECORDED_ALL)
    built = time.perf_counter() - start
    diagnoser = Diagnoser(forward, [id(captured["loss"])])
    verdicts = diagnoser.diagnose_all(variables)
    total = time.perf_counter() - start
    causes = {(d.cause.value, d.op_type) for d in verdicts}
    print(f"ResNet-50 trace (TensorFlow):        {trace:7.2f} s")
    print(f"  forward graph of {len(forward.nodes)} nodes:  {built:7.2f} s")
    print(f"  + diagnosing all {len(variables)} variables: {total:7.2f} s"
          f" = {total / trace:.2f} x the trace; verdicts {sorted(causes)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    eager_hook(args.rounds)
    resnet50_trace()


if __name__ == "__main__":
    main()

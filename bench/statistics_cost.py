"""What the in-graph statistics cost on a real model's gradients, alone.

A step of a large model is too long to see its statistics' cost in wall time (the
noise of a step is larger). Here each trainable variable of the model gets a random
"gradient" of its shape, held in a variable, and two traced functions run side by side in
interleaved rounds:

- read: reads the gradients (what a step has in hand anyway) and reduces one element;
- record: reads them, computes `gradient_record` and writes it to a `StepRecorder`, as
  a wrapped optimizer does every step.

Prints each function's median time and the difference (the statistics' cost per step),
with the spread of the per-round differences.

    .venv/bin/python -m bench.statistics_cost [--cases cnn,resnet50] [--rounds 200]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import tensorflow as tf

from bench.models import cnn_case
from gradwatch.agent.tensorflow.recorder import StepRecorder
from gradwatch.agent.tensorflow.stats import gradient_record


def variables_of(case: str) -> list[tf.Variable]:
    if case == "cnn":
        return cnn_case()[0].trainable_variables
    if case == "resnet50":
        return keras.applications.ResNet50(weights=None, input_shape=(64, 64, 3),
                                           classes=10).trainable_variables
    raise SystemExit(f"unknown case {case!r}: cnn or resnet50")


def measure(case: str, rounds: int, calls: int) -> None:
    shapes = [v.shape for v in variables_of(case)]
    grads = [tf.Variable(tf.random.normal(shape)) for shape in shapes]
    recorder = StepRecorder(len(grads), 64, name=f"bench_{case}")

    @tf.function(autograph=False)
    def read():
        return grads[0].read_value()[(0,) * grads[0].shape.rank]

    @tf.function(autograph=False)
    def record():
        read()  # the same work as `read`, then the statistics
        return recorder.record(gradient_record([g.read_value() for g in grads]))

    functions = {"read": read, "record": record}
    times = {name: [] for name in functions}
    for function in functions.values():
        for _ in range(5):
            function()
    for r in range(rounds):
        for name in (list(functions) if r % 2 else list(functions)[::-1]):
            start = time.perf_counter()
            for _ in range(calls):
                functions[name]()
            times[name].append((time.perf_counter() - start) / calls)
    cost = np.subtract(times["record"], times["read"]) * 1e6
    elements = sum(int(np.prod(shape)) for shape in shapes)
    print(f"{case:<10} {len(shapes)} variables, {elements / 1e6:.2f} M elements: read "
          f"{statistics.median(times['read']) * 1e6:8.1f} us, record "
          f"{statistics.median(times['record']) * 1e6:8.1f} us; the statistics cost "
          f"{np.median(cost):8.1f} us a step (interquartile {np.percentile(cost, 25):.1f}"
          f"-{np.percentile(cost, 75):.1f})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="cnn,resnet50")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--calls", type=int, default=10, help="calls per block")
    args = parser.parse_args()
    print(f"tensorflow {tf.__version__}, {os.cpu_count()} CPUs; {args.rounds} rounds x "
          f"{args.calls} calls per function, interleaved")
    for case in args.cases.split(","):
        measure(case, args.rounds, args.calls)


if __name__ == "__main__":
    main()

"""A program with many optimizer updates per traced step, with gradwatch and without.

The shape of keras.io's Forward-Forward example (``examples/vision/forwardforward.py``),
written here from its description: each dense layer trains itself with ``local_updates``
steps of its own ``GradientTape`` and its own Adam optimizer inside the model's
``train_step`` (``tf.function(jit_compile=True)``), so one traced step holds
``layers x local_updates`` optimizer updates; the optimizer given to ``compile()``
never applies one. Synthetic MNIST-sized images (64 of them, batch 8, two epochs).

Every run is a fresh process (tracing is what this program pays most for), the
variants alternate, and each reports: the first step (trace and XLA compile), the
median of the later steps, the whole ``fit`` and the graph ops of the traced step.

    .venv/bin/python -m bench.many_updates [--runs 2] [--local-updates 50] [--statistics-every N]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

VARIANTS = ("plain", "gradwatch")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2, help="processes per variant")
    parser.add_argument("--local-updates", type=int, default=50,
                        help="updates each layer makes per step")
    parser.add_argument("--units", type=int, default=500)
    parser.add_argument("--statistics-every", type=int, default=1,
                        help="gradwatch's statistics_every (1: every update)")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--collector", help=argparse.SUPPRESS)
    return parser.parse_args()


def train(args: argparse.Namespace) -> dict:
    """One run of the program (in this process); returns its timings."""
    import keras
    import numpy as np
    import tensorflow as tf

    monitor = None
    if args.variant == "gradwatch":
        from gradwatch.agent import GradientMonitor

        monitor = GradientMonitor(collector=args.collector, training_job="many-updates",
                                  statistics_every=args.statistics_every)

    def watched(optimizer):
        return monitor.wrap(optimizer) if monitor is not None else optimizer

    class LocalDense(keras.layers.Layer):
        """A dense layer on normalised inputs that trains itself on a goodness loss."""

        def __init__(self, units: int, optimizer, updates: int, **kwargs) -> None:
            super().__init__(**kwargs)
            self.dense = keras.layers.Dense(units, activation="relu")
            self.optimizer, self.updates, self.threshold = optimizer, updates, 1.5

        def call(self, x):
            return self.dense(x / (tf.norm(x, axis=1, keepdims=True) + 1e-4))

        def train_locally(self, positive, negative):
            for _ in range(self.updates):  # unrolled while tracing, like the example
                with tf.GradientTape() as tape:
                    good = tf.reduce_mean(tf.square(self(positive)), 1)
                    bad = tf.reduce_mean(tf.square(self(negative)), 1)
                    loss = tf.reduce_mean(tf.math.softplus(
                        tf.concat([self.threshold - good, bad - self.threshold], 0)))
                weights = self.dense.trainable_weights
                self.optimizer.apply_gradients(zip(tape.gradient(loss, weights), weights,
                                                   strict=True))
            return tf.stop_gradient(self(positive)), tf.stop_gradient(self(negative)), loss

    class LocalNetwork(keras.Model):
        def __init__(self, units: int, updates: int) -> None:
            super().__init__()
            self.stack = [LocalDense(units, watched(keras.optimizers.Adam(0.03)), updates)
                          for _ in range(2)]

        def call(self, x):
            for layer in self.stack:
                x = layer(x)
            return x

        @tf.function(jit_compile=True)
        def train_step(self, data):
            x, y = data
            x = tf.reshape(x, (-1, 784))
            labels = tf.one_hot(y, 10)
            positive = tf.concat([labels, x[:, 10:]], 1)  # the label written into the image
            negative = tf.concat([tf.random.shuffle(labels), x[:, 10:]], 1)
            loss = 0.0
            for layer in self.stack:
                positive, negative, layer_loss = layer.train_locally(positive, negative)
                loss += layer_loss
            return {"loss": loss / len(self.stack)}

    rng = np.random.default_rng(0)
    x = rng.random((64, 28, 28)).astype("float32")
    y = rng.integers(0, 10, 64).astype("int32")
    keras.utils.set_random_seed(0)
    model = LocalNetwork(args.units, args.local_updates)
    model(np.zeros((1, 784), "float32"))  # builds the layers
    model.compile(optimizer=watched(keras.optimizers.Adam(0.03)), loss="mse")

    ends: list[float] = []

    class Clock(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            ends.append(time.perf_counter())

    start = time.perf_counter()
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[Clock()])
    total = time.perf_counter() - start
    ops = _traced_ops(model)
    if monitor is not None:
        monitor.close()
    later = [b - a for a, b in itertools.pairwise(ends)]
    return {"first_s": ends[0] - start, "later_s": statistics.median(later), "fit_s": total,
            "ops": ops}


def _traced_ops(model) -> int:
    """Graph ops of the traced train_step (nested functions included), or -1."""
    try:
        function = model.train_step
        concrete = function._list_all_concrete_functions_for_serialization()
        graph = concrete[0].graph
        names = {op.name for op in graph.get_operations()}
        library = graph.as_graph_def().library.function
        return len(names) + sum(len(f.node_def) for f in library)
    except Exception:
        return -1


def main() -> None:
    args = parse_args()
    if args.variant:
        print(json.dumps(train(args)))
        return
    from tests.support.services import CollectorProcess

    results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    with CollectorProcess() as collector:
        for run in range(args.runs):
            for variant in VARIANTS:
                out = subprocess.run(
                    [sys.executable, "-m", "bench.many_updates", "--variant", variant,
                     "--collector", collector.grpc_target,
                     "--local-updates", str(args.local_updates), "--units", str(args.units),
                     "--statistics-every", str(args.statistics_every)],
                    capture_output=True, text=True, timeout=1800, check=True)
                results[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
                found = results[variant][-1]
                print(f"run {run + 1} {variant:9s}: first step {found['first_s']:6.1f} s, "
                      f"later steps {found['later_s'] * 1e3:6.0f} ms, fit {found['fit_s']:6.1f} s, "
                      f"traced ops {found['ops']}", flush=True)
    for key, unit, scale in (("first_s", "s", 1), ("later_s", "ms", 1e3), ("fit_s", "s", 1)):
        ratios = [g[key] / p[key] for g, p in zip(results["gradwatch"], results["plain"],
                                                   strict=True)]
        print(f"{key[:-2]:6s} gradwatch / plain: " + ", ".join(f"{r:.3f}" for r in ratios) +
              f"  (plain {', '.join(f'{p[key] * scale:.1f}' for p in results['plain'])} {unit})")


if __name__ == "__main__":
    main()

"""Agent overhead: median training-step time with the agent / without, interleaved.

Two identical models train side by side in one process; blocks of steps
alternate A (plain optimizer) and B (optimizer wrapped by GradientMonitor,
every variable reported every step), so machine noise hits both alike. The
collector is a real subprocess on loopback. Prints one line per case and the
ratio of medians (budget: <= 1.02).

    .venv/bin/python bench/agent_overhead.py [--rounds 15] [--steps 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="A/B block pairs")
    parser.add_argument("--steps", type=int, default=20, help="steps per block")
    parser.add_argument("--replicas", type=int, default=2,
                        help="logical CPUs for the MirroredStrategy case")
    parser.add_argument("--image-size", type=int, default=64,
                        help="ResNet-50 input height and width (224 is the standard)")
    parser.add_argument("--batch", type=int, default=8, help="ResNet-50 batch size")
    parser.add_argument("--cases", default="demo,demo-mirrored,cnn",
                        help="comma-separated: demo, demo-mirrored, cnn, resnet50, "
                             "resnet50-mirrored")
    return parser.parse_args()


ARGS = parse_args()

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * ARGS.replicas)

from gradwatch.agent import GradientMonitor  # noqa: E402
from gradwatch.demo.training import BrokenModel, make_data  # noqa: E402
from gradwatch.testing import CollectorProcess  # noqa: E402


def demo_case():
    model = BrokenModel()
    model.build((None, 16))
    x, (category, price) = make_data(64)
    loss_c = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    loss_p = keras.losses.MeanSquaredError()

    def loss_fn(outputs):
        return loss_c(category, outputs[0]) + loss_p(price, outputs[1])

    return model, x, loss_fn


def cnn_case():
    keras.utils.set_random_seed(0)
    layers = [keras.Input((32, 32, 3))]
    for width in (32, 32, 64, 64, 128, 128):
        layers += [keras.layers.Conv2D(width, 3, padding="same", activation="relu"),
                   keras.layers.BatchNormalization()]
    layers += [keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10)]
    model = keras.Sequential(layers)
    x = np.random.default_rng(0).normal(size=(32, 32, 32, 3)).astype("float32")
    y = np.arange(32) % 10
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    return model, x, lambda logits: loss(y, logits)


def resnet50_case():
    """ResNet-50 as in keras.applications (25.6M parameters, 214 trainable variables);
    ``--image-size`` and ``--batch`` set the input (default 64x64, batch 8, so a CPU step
    takes a fraction of a second)."""
    keras.utils.set_random_seed(0)
    size, batch = ARGS.image_size, ARGS.batch
    model = keras.applications.ResNet50(weights=None, input_shape=(size, size, 3), classes=10)
    x = np.random.default_rng(0).normal(size=(batch, size, size, 3)).astype("float32")
    y = np.arange(batch) % 10
    loss = keras.losses.SparseCategoricalCrossentropy()
    return model, x, lambda probabilities: loss(y, probabilities)


def make_step(model, loss_fn, optimizer, strategy):
    def replica_step(x):
        with tf.GradientTape() as tape:
            loss = loss_fn(model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        return loss

    @tf.function
    def step(x):
        return strategy.run(replica_step, args=(x,))

    return step


def time_block(step, x, n: int) -> list[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        step(x)
        times.append(time.perf_counter() - start)
    return times


def run_case(name: str, build, strategy, monitor: GradientMonitor) -> float:
    with strategy.scope():
        plain_model, x, loss_a = build()
        watched_model, _, loss_b = build()
        plain_opt = keras.optimizers.Adam(1e-3)
        watched_opt = monitor.wrap(keras.optimizers.Adam(1e-3))
        plain_opt.build(plain_model.trainable_variables)
        watched_opt.build(watched_model.trainable_variables)
    plain = make_step(plain_model, loss_a, plain_opt, strategy)
    watched = make_step(watched_model, loss_b, watched_opt, strategy)
    time_block(plain, x, 5)  # trace and warm up
    time_block(watched, x, 5)
    a, b = [], []
    for _ in range(ARGS.rounds):
        a += time_block(plain, x, ARGS.steps)
        b += time_block(watched, x, ARGS.steps)
    ratio = statistics.median(b) / statistics.median(a)
    print(f"{name:<16} vars={len(watched_model.trainable_variables):<4} "
          f"median step: without {statistics.median(a) * 1e3:8.3f} ms, "
          f"with {statistics.median(b) * 1e3:8.3f} ms, ratio {ratio:.3f} "
          f"({len(a)} steps each)", flush=True)
    return ratio


def main() -> None:
    cases = {
        "demo": (demo_case, tf.distribute.get_strategy()),
        "demo-mirrored": (demo_case, tf.distribute.MirroredStrategy(
            [f"/cpu:{i}" for i in range(ARGS.replicas)])),
        "cnn": (cnn_case, tf.distribute.get_strategy()),
        "resnet50": (resnet50_case, tf.distribute.get_strategy()),
        "resnet50-mirrored": (resnet50_case, tf.distribute.MirroredStrategy(
            [f"/cpu:{i}" for i in range(ARGS.replicas)])),
    }
    print(f"tensorflow {tf.__version__}, keras {keras.__version__}, {os.cpu_count()} CPUs; "
          f"{ARGS.rounds} rounds x {ARGS.steps} steps, interleaved")
    with CollectorProcess() as collector:
        monitor = GradientMonitor(collector=collector.grpc_target, training_job="bench")
        for name in ARGS.cases.split(","):
            build, strategy = cases[name]
            run_case(name, build, strategy, monitor)
        acked = monitor.close(timeout_s=30)
        print(f"all statistics acknowledged by the collector: {acked}")


if __name__ == "__main__":
    main()

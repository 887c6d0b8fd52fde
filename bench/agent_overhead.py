"""Agent overhead: median training-step time with the agent / without, interleaved.

One model and one optimizer per case train under every variant, each its own
traced step, in one process; blocks of steps rotate between the variants (their
order rotating each round), so machine noise hits all alike:

- plain: the optimizer as is;
- gradwatch: optimizer wrapped by GradientMonitor, every variable reported every
  step to a real collector subprocess on loopback (budget: <= 1.01 x plain for steps
  of 50 ms and more, <= 1.03 for the 1 ms demo);
- check_numerics: ``tf.debugging.enable_check_numerics()`` while the step is traced
  (what users reach for today to find NaNs);
- host_norms: every variable's gradient norm pulled to the host every step and
  looked at in Python (the other thing users write);
- plain_again: a second, identical plain model: an A/A control whose ratio to plain
  is the resolution of the run (what the machine's noise alone moves a ratio by);
- unchecked: gradwatch without the finiteness check (the statistics' hot path and the
  write, no ``tf.cond``): what the check and the gradients it holds cost.

Prints one line per case and variant: median step time and ratio to plain (wall
time, and the process's CPU time per step, which a neighbour's stolen cycles do not
inflate), with the spread of the per-round ratios; then what the agent's sender thread
and the collector process (on the same cores here, on another machine in production)
used of the CPU per step while each variant ran.

    .venv/bin/python -m bench.agent_overhead [--rounds 15] [--steps 20] [--cases ...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
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
                        help="comma-separated: demo, demo-mirrored, cnn, transformer, "
                             "transformer-mirrored, recommender, recommender-mirrored, "
                             "resnet50, resnet50-mirrored")
    parser.add_argument("--jit-compile", action="store_true",
                        help="compile each step with XLA (tf.function(jit_compile=True), what "
                             "Keras 3's model.fit does where XLA applies); cases without a "
                             "strategy only")
    parser.add_argument("--variants", default="plain,gradwatch",
                        help="comma-separated: plain, gradwatch, check_numerics, host_norms, "
                             "plain_again (an A/A control), unchecked (gradwatch without "
                             "the finiteness check; with gradwatch)")
    parser.add_argument("--save", metavar="PATH",
                        help="also write every step's wall time, per case and variant, as JSON")
    return parser.parse_args()


ARGS = parse_args()

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * ARGS.replicas)

from bench.cpu import cpu_s, process_cpu_s, sender_task  # noqa: E402
from bench.models import cnn_case  # noqa: E402
from bench.spread import round_ratios  # noqa: E402
from gradwatch.agent import GradientMonitor  # noqa: E402
from gradwatch.agent.tensorflow import stats  # noqa: E402
from gradwatch.demo.training import BrokenModel, make_data  # noqa: E402
from tests.support.services import CollectorProcess  # noqa: E402


def demo_case():
    model = BrokenModel()
    model.build((None, 16))
    x, (category, price) = make_data(64)
    loss_c = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    loss_p = keras.losses.MeanSquaredError()

    def loss_fn(outputs):
        return loss_c(category, outputs[0]) + loss_p(price, outputs[1])

    return model, x, loss_fn


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


def transformer_case():
    """A 4-layer transformer encoder (d=128, 4 heads, feed-forward 512), sequences of 64
    tokens from a 10,000-word vocabulary, batch 16, mean-pooled classifier."""
    keras.utils.set_random_seed(0)
    tokens = keras.Input((64,), dtype="int32")
    h = keras.layers.Embedding(10_000, 128)(tokens)
    for _ in range(4):
        attended = keras.layers.MultiHeadAttention(num_heads=4, key_dim=32)(h, h)
        h = keras.layers.LayerNormalization()(h + attended)
        ff = keras.layers.Dense(128)(keras.layers.Dense(512, activation="gelu")(h))
        h = keras.layers.LayerNormalization()(h + ff)
    model = keras.Model(tokens, keras.layers.Dense(2)(keras.layers.GlobalAveragePooling1D()(h)))
    x = np.random.default_rng(0).integers(0, 10_000, size=(16, 64)).astype("int32")
    y = np.arange(16) % 2
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    return model, x, lambda logits: loss(y, logits)


def recommender_case():
    """Embedding-heavy: user (1M x 32) and item (200k x 32) tables, 8 sparse categorical
    features (1,000 x 16 each), an MLP on top; batch 256. Gradients of the tables are
    IndexedSlices (never densified by gradwatch)."""
    keras.utils.set_random_seed(0)
    ids = keras.Input((10,), dtype="int32")
    user = keras.layers.Embedding(1_000_000, 32)(ids[:, 0])
    item = keras.layers.Embedding(200_000, 32)(ids[:, 1])
    features = [keras.layers.Embedding(1_000, 16)(ids[:, 2 + i]) for i in range(8)]
    h = keras.layers.Concatenate()([user, item, *features])
    for width in (256, 128, 64):
        h = keras.layers.Dense(width, activation="relu")(h)
    model = keras.Model(ids, keras.layers.Dense(1)(h))
    rng = np.random.default_rng(0)
    x = np.stack([rng.integers(0, 1_000_000, 256), rng.integers(0, 200_000, 256),
                  *[rng.integers(0, 1_000, 256) for _ in range(8)]], axis=1).astype("int32")
    y = rng.random((256, 1)).astype("float32")
    loss = keras.losses.BinaryCrossentropy(from_logits=True)
    return model, x, lambda logits: loss(y, logits)


def make_step(model, loss_fn, optimizer, strategy, host_norms: bool = False):
    def replica_step(x):
        with tf.GradientTape() as tape:
            loss = loss_fn(model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        if host_norms:
            return [tf.norm(tf.convert_to_tensor(g)) if g is not None else tf.constant(0.0)
                    for g in grads]
        return loss

    @tf.function(jit_compile=ARGS.jit_compile or None)
    def step(x):
        return strategy.run(replica_step, args=(x,))

    if not host_norms:
        return step

    def step_and_look(x):  # what a user writes: norms to the host, checked in Python
        norms = strategy.experimental_local_results(step(x))
        values = [float(n) for replica in norms for n in tf.nest.flatten(replica)]
        if not all(np.isfinite(values)):
            print("non-finite gradient")

    return step_and_look


def time_block(step, x, n: int) -> tuple[list[float], float]:
    """Wall seconds of each of ``n`` steps, and the process's CPU seconds per step."""
    times = []
    cpu_start = time.process_time()
    for _ in range(n):
        start = time.perf_counter()
        step(x)
        times.append(time.perf_counter() - start)
    return times, (time.process_time() - cpu_start) / n


@contextlib.contextmanager
def unchecked_statistics(monitor: GradientMonitor):
    """Steps traced inside record the statistics' hot path only: no finiteness check, so
    no ``tf.cond`` holding every gradient until the sums are done (what the check costs;
    needs the ``gradwatch`` variant traced first, which creates the session)."""
    sessions = list(monitor._sessions.values())
    originals = [session._statistics for session in sessions]
    traced = []

    def unchecked(grads):
        traced.append(len(grads))
        return stats._unchecked_record(grads, stats._accelerators())[0]

    for session in sessions:
        session._statistics = tf.function(unchecked, autograph=False)
    try:
        yield
    finally:
        for session, original in zip(sessions, originals, strict=True):
            session._statistics = original
    if not traced:
        raise RuntimeError("the unchecked variant traced gradwatch's own statistics")


def run_case(name: str, build, strategy, monitor: GradientMonitor,
             collector_pid: int) -> dict[str, list[float]]:
    """One model and one optimizer serve every variant, each its own traced step, so
    that no variant gets a different memory layout: the plain steps are traced before
    the optimizer is wrapped, the gradwatch step after."""
    variants = ARGS.variants.split(",")
    with strategy.scope():
        model, x, loss = build()
        optimizer = keras.optimizers.Adam(1e-3)
        optimizer.build(model.trainable_variables)
        steps = {variant: make_step(model, loss, optimizer, strategy,
                                    host_norms=variant == "host_norms")
                 for variant in variants}
    order = ("gradwatch", "unchecked")  # traced last, in this order: wrapped optimizer
    for variant in sorted(variants, key=lambda v: order.index(v) + 1 if v in order else 0):
        if variant == "gradwatch":
            monitor.wrap(optimizer)
        if variant == "check_numerics":
            tf.debugging.enable_check_numerics()
        if variant == "unchecked":
            with unchecked_statistics(monitor):
                time_block(steps[variant], x, 5)
        else:
            time_block(steps[variant], x, 5)
        if variant == "check_numerics":
            tf.debugging.disable_check_numerics()
    times = {variant: [] for variant in variants}
    rounds = {variant: [] for variant in variants}  # each block's median
    cpu = {variant: [] for variant in variants}  # each block's CPU seconds per step
    # CPU seconds the sender thread and the collector process used during each variant's
    # blocks (read outside the timed steps).
    sender = sender_task()
    clocks = {"sender": lambda: cpu_s(sender), "collector": lambda: process_cpu_s(collector_pid)}
    host = {variant: dict.fromkeys(clocks, 0.0) for variant in variants}
    for r in range(ARGS.rounds):
        # The order rotates each round, so that no variant always follows the same one.
        for variant in variants[r % len(variants):] + variants[:r % len(variants)]:
            before = {part: clock() for part, clock in clocks.items()}
            block, cpu_per_step = time_block(steps[variant], x, ARGS.steps)
            for part, clock in clocks.items():
                host[variant][part] += clock() - before[part]
            times[variant] += block
            rounds[variant].append(statistics.median(block))
            cpu[variant].append(cpu_per_step)
    first = variants[0]
    base = statistics.median(times[first])
    for variant in variants:
        median = statistics.median(times[variant])
        middle, low, high = round_ratios(rounds[variant], rounds[first])
        cpu_middle, cpu_low, cpu_high = round_ratios(cpu[variant], cpu[first])
        print(f"{name:<20} {variant:<15} vars={len(model.trainable_variables):<4} median step "
              f"{median * 1e3:9.3f} ms, ratio to {first} {median / base:.3f} "
              f"({len(times[variant])} steps; per-round ratios: median {middle:.3f}, "
              f"interquartile {low:.3f}-{high:.3f}; CPU time per step "
              f"{statistics.median(cpu[variant]) * 1e3:.3f} ms, per-round ratios: median "
              f"{cpu_middle:.3f}, interquartile {cpu_low:.3f}-{cpu_high:.3f})", flush=True)
    for variant in variants:
        per_step = {part: used / len(times[variant]) * 1e3 for part, used in host[variant].items()}
        wall = sum(times[variant])
        print(f"{name:<20} {variant:<15} CPU per step outside the step: sender thread "
              f"{per_step['sender']:.3f} ms, collector process {per_step['collector']:.3f} ms "
              f"({100 * host[variant]['sender'] / wall:.1f} % and "
              f"{100 * host[variant]['collector'] / wall:.1f} % of one core)", flush=True)
    return times


def main() -> None:
    # One MirroredStrategy for every mirrored case: several in one process can mix up
    # their collectives' instance keys (a TensorFlow limitation, not the agent's).
    mirrored = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(ARGS.replicas)])
    default = tf.distribute.get_strategy()
    cases = {
        "demo": (demo_case, default),
        "demo-mirrored": (demo_case, mirrored),
        "cnn": (cnn_case, default),
        "transformer": (transformer_case, default),
        "transformer-mirrored": (transformer_case, mirrored),
        "recommender": (recommender_case, default),
        "recommender-mirrored": (recommender_case, mirrored),
        "resnet50": (resnet50_case, default),
        "resnet50-mirrored": (resnet50_case, mirrored),
    }
    print(f"tensorflow {tf.__version__}, keras {keras.__version__}, {os.cpu_count()} CPUs; "
          f"{ARGS.rounds} rounds x {ARGS.steps} steps per variant, interleaved")
    with CollectorProcess() as collector:
        monitor = GradientMonitor(collector=collector.grpc_target, training_job="bench")
        saved = {}
        for name in ARGS.cases.split(","):
            build, strategy = cases[name]
            saved[name] = run_case(name, build, strategy, monitor, collector.process.pid)
            if ARGS.save:
                with open(ARGS.save, "w") as out:
                    json.dump(saved, out)
        acked = monitor.close(timeout_s=30)
        print(f"all statistics acknowledged by the collector: {acked}")


if __name__ == "__main__":
    main()

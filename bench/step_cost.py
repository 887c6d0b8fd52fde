"""What the statistics cost a millisecond step, part by part, in one process.

The demo model's custom training step (1 ms on a CPU, where every graph op costs
microseconds) is traced five times, identical but for what runs after the gradients:

- plain: nothing;
- write_only: the ring-buffer write of a constant record;
- no_check: the statistics' hot path and the write, without the finiteness check and its
  ``tf.cond`` (that is, without exact NaN/Inf counts);
- record: what a wrapped update runs (`gradient_record`, then `StepRecorder.record`);
- record_every_10: the same under ``statistics_every=10`` (a session's step-number cond).

Blocks of steps rotate between the variants; prints each variant's median step time,
its ratio to plain and the spread of the per-round ratios. No collector, no sender
thread: this is the in-graph cost alone (`bench.agent_overhead` measures the whole agent).

    .venv/bin/python -m bench.step_cost [--rounds 300] [--steps 10]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import tensorflow as tf

from bench.spread import round_ratios
from gradwatch.agent.core.identity import Identity
from gradwatch.agent.tensorflow import stats
from gradwatch.agent.tensorflow.recorder import StepRecorder
from gradwatch.agent.tensorflow.session import TensorFlowSession
from gradwatch.demo.training import BrokenModel, make_data

VARIANTS = ("plain", "write_only", "no_check", "record", "record_every_10")


def make_step(variant: str):
    keras.utils.set_random_seed(0)
    model = BrokenModel()
    model.build((None, 16))
    x, (category, price) = make_data(64)
    loss_c = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    loss_p = keras.losses.MeanSquaredError()
    optimizer = keras.optimizers.Adam(1e-3)
    variables = model.trainable_variables
    optimizer.build(variables)
    n = len(variables)
    recorder = StepRecorder(n, 256, name=f"bench_{variant}")
    session = None
    if variant == "record_every_10":
        session = TensorFlowSession(Identity("bench", "worker", 0, "host", 0), "adam", variables,
                                    256, tf.distribute.get_strategy(), every=10)

    @tf.function(autograph=False)
    def step(x):
        with tf.GradientTape() as tape:
            outputs = model(x, training=True)
            loss = loss_c(category, outputs[0]) + loss_p(price, outputs[1])
        grads = tape.gradient(loss, variables)
        iteration = tf.convert_to_tensor(optimizer.iterations)
        if variant == "write_only":
            recorder.record(tf.zeros([3 * n]), iteration)
        elif variant == "no_check":
            recorder.record(stats._unchecked_record(grads, stats._accelerators())[0], iteration)
        elif variant == "record":
            recorder.record(stats.gradient_record(grads), iteration)
        elif session is not None:
            session.record(grads, iteration)
        optimizer.apply(grads, variables)
        return loss

    return step, tf.constant(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--steps", type=int, default=10, help="steps per block")
    args = parser.parse_args()
    steps = {variant: make_step(variant) for variant in VARIANTS}
    for step, x in steps.values():  # trace and warm up
        for _ in range(10):
            step(x)
    times = {variant: [] for variant in VARIANTS}
    rounds = {variant: [] for variant in VARIANTS}
    for _ in range(args.rounds):
        for variant, (step, x) in steps.items():
            block = []
            for _ in range(args.steps):
                start = time.perf_counter()
                step(x)
                block.append(time.perf_counter() - start)
            times[variant] += block
            rounds[variant].append(statistics.median(block))
    print(f"tensorflow {tf.__version__}, {os.cpu_count()} CPUs; {args.rounds} rounds x "
          f"{args.steps} steps per variant, interleaved")
    base = statistics.median(times["plain"])
    for variant in VARIANTS:
        median = statistics.median(times[variant])
        middle, low, high = round_ratios(rounds[variant], rounds["plain"])
        print(f"{variant:<16} median step {median * 1e6:7.1f} us (+{(median - base) * 1e6:5.1f}), "
              f"ratio {median / base:.3f}; per-round ratios median {middle:.3f}, "
              f"interquartile {low:.3f}-{high:.3f}", flush=True)


if __name__ == "__main__":
    main()

"""CPU the agent's sender thread and the collector use, by the training's step period.

What a training job pays besides its step: the sender thread reads the session's device
buffer (an eager TensorFlow op, a device round trip) and ships new steps; the collector
ingests them. A 26-variable model (the CNN of `bench.agent_overhead` on one image, so
that its step is short) steps every ``--periods`` seconds (sleeping in between), and not at all
(``idle``: a session and no steps), in phases that rotate over the periods each round.

Prints, per period, the CPU (``/proc/.../schedstat``) of the sender thread and of the
collector process per second and per step: the median over rounds and its range. On a
machine the training saturates, that CPU comes out of the step.

    .venv/bin/python -m bench.background_cpu [--periods idle,0.05,0.3,0.7,2] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import tensorflow as tf

from bench.cpu import cpu_s, process_cpu_s, sender_task
from bench.models import cnn_case
from gradwatch.agent import GradientMonitor
from tests.support.services import CollectorProcess


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--periods", default="idle,0.05,0.3,0.7,2",
                        help="comma-separated step periods in seconds, or idle (no steps)")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of a phase")
    parser.add_argument("--rounds", type=int, default=5)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    with CollectorProcess() as collector:
        monitor = GradientMonitor(collector=collector.grpc_target, training_job="background")
        model, x, _ = cnn_case()
        x = x[:1]
        optimizer = monitor.wrap(keras.optimizers.Adam(1e-3))

        @tf.function
        def step(x):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(model(x, training=True))
            optimizer.apply(tape.gradient(loss, model.trainable_variables),
                            model.trainable_variables)

        step(x)
        time.sleep(1.0)
        sender = sender_task()
        clocks = {"sender": lambda: cpu_s(sender),
                  "collector": lambda: process_cpu_s(collector.process.pid)}
        periods = args.periods.split(",")
        used = {(period, part): [] for period in periods for part in clocks}
        steps_per_s = {period: [] for period in periods}
        print(f"tensorflow {tf.__version__}, {os.cpu_count()} CPUs; {args.rounds} rounds of "
              f"{args.seconds:g} s per period, interleaved", flush=True)
        for r in range(args.rounds):
            for period in periods[r % len(periods):] + periods[:r % len(periods)]:
                before = {part: clock() for part, clock in clocks.items()}
                start, steps = time.perf_counter(), 0
                while time.perf_counter() - start < args.seconds:
                    if period == "idle":
                        time.sleep(0.05)
                        continue
                    time.sleep(float(period))
                    step(x)
                    steps += 1
                wall = time.perf_counter() - start
                for part, clock in clocks.items():
                    used[(period, part)].append((clock() - before[part]) / wall)
                steps_per_s[period].append(steps / wall)
        for period in periods:
            rate = statistics.median(steps_per_s[period])
            parts = []
            for part in clocks:
                per_s = [u * 1e3 for u in used[(period, part)]]
                per_step = f", {statistics.median(per_s) / rate:.2f} ms a step" if rate else ""
                parts.append(f"{part} {statistics.median(per_s):5.2f} ms/s "
                             f"[{min(per_s):.2f}, {max(per_s):.2f}]{per_step}")
            print(f"period {period:>5} {rate:5.1f} steps/s: " + "; ".join(parts), flush=True)
        print(f"all statistics acknowledged by the collector: {monitor.close(timeout_s=30)}")


if __name__ == "__main__":
    main()

"""What the statistics cost per optimizer update inside an XLA-compiled step, by part.

One ``tf.function(jit_compile=True)`` holds ``--updates`` updates of a 784x500 kernel
and its bias (the forwardforward shape); each variant adds one part of what the
agent does per update, and the run time per update is printed:

- plain: the update alone;
- sums: the sum of squares of each gradient (the hot path's one read);
- sums_every_10: the same inside a ``tf.cond`` taken at one update in ten;
- record: the whole `gradient_record` (sums, the rare-branch ``tf.cond``, ordering);
- branch_free: `gradient_record` as XLA on a GPU or TPU gets it: NaN and Inf counts reduced
  beside the sums, no ``tf.cond`` (exact counts, no overflow rescaling);
- record_and_write: that plus the ring-buffer write (what an update costs with gradwatch).

    .venv/bin/python -m bench.xla_statistics [--updates 20] [--repeat 10] [--rounds 5] [--no-xla]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf

from gradwatch.agent.tensorflow.recorder import StepRecorder
from gradwatch.agent.tensorflow.stats import _accelerators, _half_squares, gradient_record

VARIANTS = ("plain", "sums", "sums_every_10", "record", "branch_free", "record_and_write")


def sums(grads: list[tf.Tensor]) -> tf.Tensor:
    return tf.reduce_sum(_half_squares(grads, set(), _accelerators()))


def step_function(variant: str, updates: int, xla: bool = True):
    variables = [tf.Variable(tf.random.normal(shape)) for shape in ((784, 500), (500,))]
    recorder = StepRecorder(len(variables), 64)
    counter = tf.Variable(0, dtype=tf.int64)

    @tf.function(jit_compile=xla)
    def step():
        total = tf.constant(0.0)
        for _ in range(updates):
            grads = [v * 1.0001 + 0.001 for v in variables]  # a cheap stand-in gradient
            for variable, grad in zip(variables, grads, strict=True):
                variable.assign_sub(0.001 * grad)
            if variant == "sums":
                total += sums(grads)
            elif variant == "sums_every_10":
                counter.assign_add(1)
                total += tf.cond(tf.equal(counter % 10, 0),
                                 lambda grads=grads: sums(grads),
                                 lambda: tf.constant(0.0))
            elif variant == "record":
                total += tf.reduce_sum(gradient_record(grads))
            elif variant == "branch_free":
                total += tf.reduce_sum(gradient_record(grads, branch_free=True))
            elif variant == "record_and_write":
                recorder.record(gradient_record(grads))
        return total

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=10, help="steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-xla", action="store_true",
                        help="the same steps as plain TensorFlow graphs, for comparison")
    args = parser.parse_args()
    steps = {variant: step_function(variant, args.updates, xla=not args.no_xla)
             for variant in VARIANTS}
    for step in steps.values():
        step()
        step()  # compiled and warm
    per_update: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    for _ in range(args.rounds):  # the variants interleaved, round by round
        for variant, step in steps.items():
            start = time.perf_counter()
            for _ in range(args.repeat):
                step()
            per_update[variant].append((time.perf_counter() - start) / args.repeat / args.updates)
    print(f"tensorflow {tf.__version__}, {'XLA' if not args.no_xla else 'no XLA'}; "
          f"{args.rounds} rounds x {args.repeat} steps x {args.updates} updates")
    for variant, times in per_update.items():
        ms = sorted(t * 1e3 for t in times)
        print(f"{variant:17s} {statistics.median(ms):7.3f} ms per update "
              f"(rounds {ms[0]:.3f}-{ms[-1]:.3f})", flush=True)


if __name__ == "__main__":
    main()

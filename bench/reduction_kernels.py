"""How fast TensorFlow's CPU kernels compute a gradient's sum of squares, next to a BLAS dot.

The statistics' one read per gradient (`gradwatch.agent.tensorflow.stats`) is a sum of
squares; on a CPU its cost is the kernel's, and this asks whether another TensorFlow op
computes the same sum for less. Each trainable variable of ResNet-50 (64x64 inputs) with
more than ``--min-elements`` elements gets a random "gradient" held in a variable; one
traced function per way of reducing them all runs in interleaved rounds, and NumPy's
``vdot`` (a BLAS ``sdot``) over the same arrays is the reference for what a plain loop
over the memory costs. Prints each way's median wall time and process CPU time a call.

    .venv/bin/python -m bench.reduction_kernels [--rounds 20] [--intra-op-threads 1]
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


def _flat_row(value: tf.Tensor) -> tf.Tensor:
    return tf.reshape(value, [1, -1])


WAYS = {
    "l2_loss (gradwatch)": lambda g: 2.0 * tf.nn.l2_loss(g),
    "euclidean_norm": lambda g: tf.square(tf.math.reduce_euclidean_norm(g)),
    "reduce_sum(square)": lambda g: tf.reduce_sum(tf.square(g)),
    "matmul [1,n]x[1,n]^T": lambda g: tf.matmul(_flat_row(g), _flat_row(g),
                                                 transpose_b=True)[0, 0],
    "tensordot": lambda g: tf.tensordot(tf.reshape(g, [-1]), tf.reshape(g, [-1]), 1),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--calls", type=int, default=5, help="calls per block")
    parser.add_argument("--min-elements", type=int, default=100_000)
    parser.add_argument("--intra-op-threads", type=int, default=0,
                        help="TensorFlow's intra-op threads (0: its default, one per core)")
    args = parser.parse_args()
    if args.intra_op_threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.intra_op_threads)
    shapes = [v.shape for v in keras.applications.ResNet50(
        weights=None, input_shape=(64, 64, 3), classes=10).trainable_variables
        if v.shape.num_elements() > args.min_elements]
    grads = [tf.Variable(tf.random.normal(shape)) for shape in shapes]
    arrays = [g.numpy().ravel() for g in grads]
    functions = {name: tf.function(lambda way=way: tf.stack([way(g.read_value())
                                                              for g in grads]),
                                   autograph=False)
                 for name, way in WAYS.items()}
    functions["numpy vdot (BLAS)"] = lambda: np.array([np.vdot(a, a) for a in arrays])
    exact = np.array([np.dot(a.astype(np.float64), a) for a in arrays])
    errors = {name: float(np.max(np.abs(np.asarray(f()) - exact) / exact))
              for name, f in functions.items()}
    wall = {name: [] for name in functions}
    cpu = {name: [] for name in functions}
    for r in range(args.rounds):
        for name in (list(functions) if r % 2 else list(functions)[::-1]):
            cpu_start, start = time.process_time(), time.perf_counter()
            for _ in range(args.calls):
                np.asarray(functions[name]())
            wall[name].append((time.perf_counter() - start) / args.calls * 1e3)
            cpu[name].append((time.process_time() - cpu_start) / args.calls * 1e3)
    megabytes = sum(a.nbytes for a in arrays) / 1e6
    print(f"tensorflow {tf.__version__}, numpy {np.__version__}, {os.cpu_count()} CPUs, "
          f"intra-op threads {args.intra_op_threads or 'default'}; {len(arrays)} gradients, "
          f"{megabytes:.0f} MB; {args.rounds} rounds x {args.calls} calls, interleaved")
    for name in functions:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        print(f"{name:<22} wall {w:7.2f} ms ({megabytes / w:5.1f} GB/s)  CPU {c:7.2f} ms  "
              f"largest relative error {errors[name]:.1e}", flush=True)


if __name__ == "__main__":
    main()

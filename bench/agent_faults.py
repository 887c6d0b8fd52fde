"""Training step time while the collector is healthy, slow, absent, hung or flapping.

Identical CNNs (13 trainable layers, batch 32 of 32x32 images, a compiled step)
train side by side in one process, in rotating blocks of steps, each with its
own monitor and collector situation:

- plain: no gradwatch;
- healthy: a real collector subprocess acknowledging everything;
- slow: the same behind a link holding every byte back 250 ms each way (a
  `TcpProxy` in its own process, so that forwarding costs this one nothing);
- absent: nothing listens at the address (connection refused, backoff);
- hung: a collector process stopped with SIGSTOP (accepts TCP, never answers:
  the agent's ack and RPC timeouts fire, its buffer fills);
- flapping: a collector killed (SIGKILL) and restarted every 2 s.

Prints the median step time of each and its ratio to plain (the agent's budget
is 1.02), plus what each monitor's buffer held at the end (the healthy one: nothing).

    .venv/bin/python -m bench.agent_faults [--rounds 15] [--steps 20]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import tensorflow as tf

from bench.models import cnn_case
from gradwatch.agent import GradientMonitor
from tests.support.services import CollectorProcess, free_port

VARIANTS = ("plain", "healthy", "slow", "absent", "hung", "flapping")


def make_step(monitor: GradientMonitor | None):
    """A compiled training step of a fresh CNN, and its input batch."""
    model, images, loss_fn = cnn_case()
    optimizer = keras.optimizers.Adam(1e-3)
    if monitor is not None:
        monitor.wrap(optimizer)
    optimizer.build(model.trainable_variables)

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            loss = loss_fn(model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        return loss

    return step, images


class Flapper:
    """Kills and restarts a collector on a fixed port every ``period_s``."""

    def __init__(self, port: int, period_s: float = 2.0) -> None:
        self.port, self.period_s = port, period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with CollectorProcess("--grpc-address", f"127.0.0.1:{self.port}") as collector:
                self._stop.wait(self.period_s)
                collector.process.kill()
            self._stop.wait(self.period_s / 4)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


_SLOW_LINK = """
import sys
from tests.support.faults import TcpProxy
proxy = TcpProxy(sys.argv[1], delay_s=float(sys.argv[2]))
print(proxy.address, flush=True)
sys.stdin.read()  # until the bench ends
"""


@contextlib.contextmanager
def slow_link(target: str, delay_s: float):
    """The address of a TcpProxy to ``target`` delaying each way by ``delay_s``, run in
    a process of its own."""
    process = subprocess.Popen([sys.executable, "-c", _SLOW_LINK, target, str(delay_s)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        yield process.stdout.readline().strip()
    finally:
        process.kill()
        process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    with CollectorProcess() as healthy, CollectorProcess() as hung, \
            slow_link(healthy.grpc_target, delay_s=0.25) as slow_address:
        os.kill(hung.process.pid, signal.SIGSTOP)
        flapping_port = free_port()
        flapper = Flapper(flapping_port)
        addresses = {"healthy": healthy.grpc_target, "slow": slow_address,
                     "absent": f"127.0.0.1:{free_port()}",
                     "hung": hung.grpc_target, "flapping": f"127.0.0.1:{flapping_port}"}
        monitors = {name: GradientMonitor(collector=address, training_job=f"faults-{name}")
                    for name, address in addresses.items()}
        steps = {}
        for name in VARIANTS:
            steps[name], x = make_step(monitors.get(name))
        for step in steps.values():  # trace and warm up
            for _ in range(5):
                step(x)
        times: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for _ in range(args.rounds):
            for name, step in steps.items():
                for _ in range(args.steps):
                    start = time.perf_counter()
                    step(x)
                    times[name].append(time.perf_counter() - start)
        flapper.stop()
        for monitor in monitors.values():  # stops the sender threads (the hung ones time out)
            monitor.close(timeout_s=1.0)
        base = statistics.median(times["plain"])
        for name in VARIANTS:
            median = statistics.median(times[name])
            line = (f"{name:<9} median step {median * 1e3:8.3f} ms  ratio to plain "
                    f"{median / base:.3f}  slowest {max(times[name]) * 1e3:8.1f} ms")
            sender = getattr(monitors.get(name), "_sender", None)
            if sender is not None:
                line += f"  buffered {sender.buffered_bytes() / 1e3:8.1f} kB"
            print(line, flush=True)
        os.kill(hung.process.pid, signal.SIGCONT)


if __name__ == "__main__":
    main()

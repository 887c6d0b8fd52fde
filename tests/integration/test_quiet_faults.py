"""A collector that is away is an expected state: an agent says so in a line per change and
a summary at close, never a traceback, whatever the framework, at exit included."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support.services import free_port

pytestmark = pytest.mark.integration

SCRIPTS = {
    # A monitor that recorded nothing, left to close at exit (issue: 47 tracebacks).
    "tensorflow-idle": """
from gradwatch.agent import GradientMonitor
monitor = GradientMonitor(collector="{target}", training_job="quiet")
""",
    "tensorflow-steps": """
import keras, tensorflow as tf
from gradwatch.agent import GradientMonitor
monitor = GradientMonitor(collector="{target}", training_job="quiet", flush_interval_s=0.05)
model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
optimizer = monitor.wrap(keras.optimizers.SGD(0.1))
for _ in range(20):
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(model(tf.ones((8, 4))))
    optimizer.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
""",
    "torch-steps": """
import torch
from gradwatch.agent.torch import GradientMonitor
monitor = GradientMonitor(collector="{target}", training_job="quiet", flush_interval_s=0.05)
model = torch.nn.Linear(4, 1)
optimizer = monitor.wrap(torch.optim.SGD(model.parameters(), 0.1), model)
for _ in range(20):
    optimizer.zero_grad()
    model(torch.ones(8, 4)).mean().backward()
    optimizer.step()
""",
}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_an_absent_collector_costs_a_line_per_change_and_a_summary(name):
    target = f"127.0.0.1:{free_port()}"  # nothing listens there
    code = ("import logging, time\nlogging.basicConfig(level=logging.INFO)\n"
            + SCRIPTS[name].format(target=target) + "time.sleep(1.0)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, env={"TF_CPP_MIN_LOG_LEVEL": "3", "PATH": "/usr/bin"})
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if ":gradwatch" in line]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    warnings = [line for line in lines if line.startswith(("WARNING", "ERROR"))]
    # One line when the collector is found away, one summary at close (if steps waited).
    assert 1 <= len(warnings) <= 2, "\n".join(lines)
    if name != "tensorflow-idle":
        assert "closed with 20 steps not delivered" in warnings[-1]

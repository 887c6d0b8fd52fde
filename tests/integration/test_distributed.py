"""tf.distribute in a separate process: per-replica statistics before the all-reduce."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.metrics import parse_metrics, select

pytestmark = pytest.mark.integration


def test_mirrored_custom_loop_reports_each_replica(collector, webhook, job_name):
    script = Path(__file__).with_name("mirrored_job.py")
    result = subprocess.run([sys.executable, str(script), collector.grpc_target, job_name],
                            capture_output=True, text=True, timeout=180,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stdout + result.stderr
    reference = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(reference) == 2 and reference[0] != pytest.approx(reference[1])
    samples = parse_metrics(collector.scrape())
    for replica, expected in enumerate(reference):
        (exported,) = select(samples, "gradwatch_global_gradient_norm",
                             training_job=job_name, replica=str(replica)).values()
        assert exported == pytest.approx(expected, rel=1e-5)
    assert list(select(samples, "gradwatch_steps_total", training_job=job_name).values()) == [3]
    assert not [a for a in webhook.alerts if a["labels"]["training_job"] == job_name]


ACCUMULATING_UNDER_MIRRORED = """
import keras, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from gradwatch.agent import GradientMonitor
with tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]).scope():
    GradientMonitor(collector="127.0.0.1:9").wrap(
        keras.optimizers.Adam(gradient_accumulation_steps=2))
"""


def test_accumulation_under_a_multi_replica_strategy_is_named_as_broken_upstream():
    result = subprocess.run([sys.executable, "-c", ACCUMULATING_UNDER_MIRRORED],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 0, result.stderr
    assert "keras-team/keras#20582" in result.stderr


CENTRAL_STORAGE = """
import sys
import numpy as np, keras, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from gradwatch.agent import GradientMonitor
collector, job = sys.argv[1:]
x = np.random.default_rng(0).normal(size=(8, 4)).astype("float32")
y = x.sum(1, keepdims=True)
losses = []
for watch in (False, True):
    keras.utils.set_random_seed(0)
    strategy = tf.distribute.experimental.CentralStorageStrategy(["/cpu:0", "/cpu:1"])
    with GradientMonitor(collector=collector, training_job=job, flush_interval_s=0.05,
                         enabled=watch) as monitor, strategy.scope():
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        model.compile(optimizer=monitor.wrap(keras.optimizers.SGD(0.01)), loss="mse")
        losses.append(model.fit(x, y, batch_size=8, epochs=3, verbose=0).history["loss"])
assert np.allclose(losses[0], losses[1]), losses
"""


def test_central_storage_over_two_devices_is_said_unwatched_in_one_line(collector, job_name):
    """CentralStorageStrategy keeps one copy of each variable: the per-replica ring buffer
    was one aggregating variable, whose update raised at every trace (a 600-character error
    in a traceback each), and the session it had registered stayed, silent, until the
    collector paged WorkerSilent."""
    result = subprocess.run(
        [sys.executable, "-c", CENTRAL_STORAGE, collector.grpc_target, job_name],
        capture_output=True, text=True, timeout=180,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr
    said = [line for line in result.stderr.splitlines()
            if "gradwatch" in line and "collector 127.0.0.1" not in line]
    assert len(said) == 1 and "CentralStorageStrategy keeps one copy" in said[0], said
    assert "Traceback" not in result.stderr, result.stderr
    samples = parse_metrics(collector.scrape())
    assert not select(samples, "gradwatch_steps_total", training_job=job_name)
    assert not select(samples, "gradwatch_last_report_timestamp_seconds", training_job=job_name)


TF_KERAS_MIXED_PRECISION_UNDER_MIRRORED = """
import sys
import numpy as np, tensorflow as tf, tf_keras
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from gradwatch.agent import GradientMonitor
collector, job, when = sys.argv[1:]
tf_keras.mixed_precision.set_global_policy("mixed_float16")
# Small values: the loss times the initial scale (2**15) stays within float16, so that no
# step overflows and is skipped.
x = np.random.default_rng(0).normal(size=(8, 4)).astype("float32") / 10
y = np.arange(8, dtype="float32")[:, None] / 100  # the replicas' halves differ
tf_keras.utils.set_random_seed(0)
with GradientMonitor(collector=collector, training_job=job, flush_interval_s=0.05) as monitor:
    with tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]).scope():
        model = tf_keras.Sequential([tf_keras.layers.Dense(1, input_shape=(4,))])
        optimizer = tf_keras.optimizers.SGD(0.0)
        model.compile(optimizer=monitor.wrap(optimizer) if when == "before" else optimizer,
                      loss="mse")
        if when == "after":
            monitor.wrap(model.optimizer)
    model.fit(x, y, batch_size=8, epochs=2, verbose=0)
"""


@pytest.mark.parametrize("when", ["before", "after"])
def test_tf_keras_mixed_precision_under_mirrored(collector, job_name, when):
    """Under a ``mixed_float16`` policy tf-keras's ``compile`` wraps the optimizer in a
    ``LossScaleOptimizer``, which sums the replicas' gradients before handing them to it:
    the optimizer wrapped before ``compile`` sees them summed (one warning says so); wrapped
    after (``model.optimizer``), each replica's own."""
    pytest.importorskip("tf_keras")
    result = subprocess.run(
        [sys.executable, "-c", TF_KERAS_MIXED_PRECISION_UNDER_MIRRORED, collector.grpc_target,
         job_name, when], capture_output=True, text=True, timeout=180,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr
    samples = parse_metrics(collector.scrape())
    norms = [list(select(samples, "gradwatch_global_gradient_norm", training_job=job_name,
                         replica=str(replica)).values()) for replica in (0, 1)]
    assert list(select(samples, "gradwatch_steps_total", training_job=job_name).values()) \
        == [2.0]
    warned = "already summed across replicas" in result.stderr
    if when == "before":
        assert warned and result.stderr.count("already summed") == 1, result.stderr
        assert norms[0] == pytest.approx(norms[1])
    else:
        assert not warned, result.stderr
        assert norms[0] != pytest.approx(norms[1])


def run_workers(script: str, job_name: str, collector, **env_extra: str) -> list[str]:
    """Runs two worker processes of ``script`` under MultiWorkerMirroredStrategy (TF_CONFIG
    on loopback); returns their outputs once both finished (bounded, killed on timeout)."""
    from tests.support.services import free_port

    ports = [free_port(), free_port()]
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    workers = []
    for index in range(2):
        env = {**os.environ, "PYTHONWARNINGS": "ignore",
               "TF_CONFIG": json.dumps({"cluster": cluster,
                                        "task": {"type": "worker", "index": index}}),
               "GRADWATCH_COLLECTOR": collector.grpc_target,
               "GRADWATCH_TRAINING_JOB": job_name, **env_extra}
        workers.append(subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name(script)), "3"], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        outputs = [w.communicate(timeout=180)[0] for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
    for index, (worker, output) in enumerate(zip(workers, outputs, strict=True)):
        assert worker.returncode == 0 and f"done {index}" in output, output[-3000:]
    return outputs


def test_multi_worker_job_reports_every_task_as_one_job(collector, webhook, job_name):
    """Two real worker processes, custom loop with ``observe`` in replica context."""
    for output in run_workers("multiworker_job.py", job_name, collector):
        assert "warned" in output  # Keras 3 fit + MWMS is broken upstream; the agent says so
    samples = parse_metrics(collector.scrape())
    steps = select(samples, "gradwatch_steps_total", training_job=job_name)
    assert steps == {
        f"optimizer=observe,task_index={i},task_type=worker,training_job={job_name}": 3.0
        for i in range(2)}
    # One alert for the job; its annotation grows as the second worker reports.
    alert = webhook.wait_for(lambda a: a["labels"]["training_job"] == job_name and
                             a["annotations"]["tasks"] in ("worker/0, worker/1",
                                                           "worker/1, worker/0"), 10)
    assert alert is not None, [a for a in webhook.alerts
                               if a["labels"]["training_job"] == job_name]
    assert alert["labels"]["alertname"] == "GradientMissing"
    assert alert["annotations"]["variables"] == "sequential/unused/kernel, sequential/unused/bias"


def test_multi_worker_tf_keras_fit(collector, webhook, job_name):
    """tf-keras ``model.fit`` (TF_USE_LEGACY_KERAS=1) under MultiWorkerMirroredStrategy,
    the wrapped optimizer's ``apply_gradients`` seen on both workers."""
    run_workers("multiworker_tf_keras_fit.py", job_name, collector, TF_USE_LEGACY_KERAS="1")
    samples = parse_metrics(collector.scrape())
    steps = select(samples, "gradwatch_steps_total", training_job=job_name)
    assert sorted(steps.values()) == [3.0, 3.0], steps
    assert {k.split(",")[1] for k in steps} == {"task_index=0", "task_index=1"}
    alert = webhook.wait_for(lambda a: a["labels"]["training_job"] == job_name and
                             a["annotations"]["tasks"] in ("worker/0, worker/1",
                                                           "worker/1, worker/0"), 10)
    assert alert is not None, [a for a in webhook.alerts
                               if a["labels"]["training_job"] == job_name]
    assert alert["annotations"]["variables"] == "kernel, bias"  # the unused layer's
    assert alert["annotations"]["causes"].startswith("kernel, bias: It is never read")

"""tf.distribute in a separate process: per-replica statistics before the all-reduce."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import parse_metrics, select

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

"""``gradwatch demo`` end to end: collector, distributed training, alert, metrics."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_demo_shows_the_alert_and_metrics():
    result = subprocess.run([sys.executable, "-m", "gradwatch", "demo", "--epochs", "1"],
                            capture_output=True, text=True, timeout=240)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "GradientMissing FIRING severity=warning training_job=gradwatch-demo" in out
    assert ("variables: broken_model/price/kernel, broken_model/price/bias, "
            "broken_model/unused_projection/kernel, broken_model/unused_projection/bias") in out
    assert 'gradwatch_gradient_present{optimizer="adam",training_job="gradwatch-demo",' \
           'variable="broken_model/unused_projection/bias"} 0' in out
    for replica in ("0", "1"):  # MirroredStrategy: both replicas reported
        assert (f'gradwatch_variables_without_gradient{{optimizer="adam",replica="{replica}"'
                in out)

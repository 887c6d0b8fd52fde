"""``gradwatch demo`` end to end: collector, distributed training, alert, metrics."""

import inspect
import subprocess
import sys

import pytest

from gradwatch.demo import training

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
    # Why: the op and the line that break the chain, and the unused layer.
    floor_line = next(i for i, text in enumerate(inspect.getsource(training).splitlines(), 1)
                      if "tf.math.floor(self.price(h))" in text)
    assert (f"broken_model/price/kernel, broken_model/price/bias: The path to the loss crosses "
            f"Floor op 'broken_model_1/Floor' at {training.__file__}:{floor_line}") in out
    assert ("broken_model/unused_projection/kernel, broken_model/unused_projection/bias: It is "
            "never read") in out
    assert (f'gradwatch_gradient_missing_cause_info{{cause="broken_at_op",'
            f'op="broken_model_1/Floor",op_type="Floor",optimizer="adam",'
            f'source="{training.__file__}:{floor_line}"') in out
    for replica in ("0", "1"):  # MirroredStrategy: both replicas reported
        assert (f'gradwatch_variables_without_gradient{{optimizer="adam",replica="{replica}"'
                in out)


def test_pytorch_demo_shows_the_alert_and_metrics():
    from gradwatch.demo import torch_training

    result = subprocess.run([sys.executable, "-m", "gradwatch", "demo", "--framework", "torch",
                             "--epochs", "1"], capture_output=True, text=True, timeout=240)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "GradientMissing FIRING severity=warning training_job=gradwatch-demo optimizer=Adam" \
        in out
    assert ("variables: price.weight, price.bias, unused_projection.weight, "
            "unused_projection.bias") in out
    detach_line = next(i for i, text in
                       enumerate(inspect.getsource(torch_training).splitlines(), 1)
                       if "self.price(h).detach()" in text)
    assert (f"price.weight, price.bias: The path to the loss crosses detach() at "
            f"{torch_training.__file__}:{detach_line}") in out
    for rank in ("0", "1"):  # DDP: both processes reported
        assert (f'gradwatch_variables_without_gradient{{optimizer="Adam",replica="0",'
                f'task_index="{rank}"') in out

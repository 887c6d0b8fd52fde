"""``gradwatch doctor`` on the README's example, and on a healthy script."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "no_gradients.py"

pytestmark = pytest.mark.timeout(120)


def doctor(script: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gradwatch", "--log-level", "ERROR", "doctor",
                           str(script)], capture_output=True, text=True, timeout=100, cwd=ROOT)


def test_doctor_explains_no_gradients_provided():
    result = doctor(EXAMPLE)
    assert result.returncode == 1, result.stdout + result.stderr
    line = next(i for i, text in enumerate(EXAMPLE.read_text().splitlines(), 1)
                if "tf.round(p)" in text)
    assert "4 variables get no gradient (1 cause)" in result.stdout
    assert "dense/kernel, dense/bias, dense_1/kernel, dense_1/bias" in result.stdout
    assert f"crosses Round op 'functional_1/lambda_1/Round' at {EXAMPLE}:{line}" in result.stdout
    assert "straight-through estimator" in result.stdout
    assert "The run failed: ValueError: No gradients provided for any variable" in result.stdout
    assert f"(at {EXAMPLE}:" in result.stdout


def test_doctor_on_a_healthy_script_exits_0(tmp_path):
    healthy = tmp_path / "healthy.py"
    healthy.write_text(EXAMPLE.read_text().replace("tf.round(p)", "p"))
    result = doctor(healthy)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "every watched variable got a gradient" in result.stdout


def test_doctor_needs_an_existing_script():
    result = doctor(ROOT / "no-such-script.py")
    assert result.returncode == 2
    assert "no such file" in result.stderr


TORCH_EXAMPLE = ROOT / "examples" / "torch_no_gradients.py"


def test_doctor_explains_a_pytorch_script():
    result = doctor(TORCH_EXAMPLE)
    assert result.returncode == 1, result.stdout + result.stderr
    line = next(i for i, text in enumerate(TORCH_EXAMPLE.read_text().splitlines(), 1)
                if "argmax(1)" in text)
    assert "(torch) in diagnose-only mode" in result.stdout
    assert "4 variables get no gradient (2 causes)" in result.stdout
    assert f"1. confidence.weight, confidence.bias\n   The path to the loss crosses argmax() " \
           f"at {TORCH_EXAMPLE}:{line}" in result.stdout
    assert "2. unused_projection.weight, unused_projection.bias\n   It is never read" in \
        result.stdout


def test_framework_is_told_by_the_imports():
    from gradwatch.doctor_cli import detect_framework

    assert detect_framework("import torch\nimport numpy") == "torch"
    assert detect_framework("from torch import nn") == "torch"
    assert detect_framework("import tensorflow as tf\nimport torch") == "tensorflow"
    assert detect_framework("import keras") == "tensorflow"

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


def test_framework_is_told_by_the_imports(tmp_path):
    """By the script's imports and its own modules' (``import sys, torch`` was taken for
    TensorFlow, as was a script importing its training code from a module next to it:
    both then reported "every watched variable got a gradient"); where they name both
    frameworks or neither, both are watched."""
    from gradwatch.doctor_cli import detect_framework

    def framework(source: str, **modules: str) -> str:
        for name, text in modules.items():
            (tmp_path / f"{name}.py").write_text(text)
        script = tmp_path / "train.py"
        script.write_text(source)
        return detect_framework(script)

    assert framework("import torch\nimport numpy") == "torch"
    assert framework("from torch import nn") == "torch"
    assert framework("import sys, torch, torch.nn as nn") == "torch"
    assert framework("import lightning as L") == "torch"
    assert framework("import keras") == "tensorflow"
    assert framework("import tensorflow as tf\nimport torch") == "both"
    assert framework("from model import train\ntrain()",
                     model="from helpers import net\n", helpers="import torch.nn\n") == "torch"
    assert framework("import numpy\n") == "both"
    assert framework("this is not python(") == "both"


@pytest.mark.parametrize("ending", ["raise SystemExit(3)", "pass"])
def test_a_script_that_computes_no_gradient_says_so(tmp_path, ending):
    """A script that fails before training (argparse, a missing file) or never trains:
    doctor said "every watched variable got a gradient"; it now says nothing was checked,
    and exits 2."""
    script = tmp_path / "no_training.py"
    script.write_text(f"import torch\nmodel = torch.nn.Linear(2, 1)\n{ending}\n")
    result = doctor(script)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "no gradient was computed" in result.stdout
    assert "every watched variable" not in result.stdout

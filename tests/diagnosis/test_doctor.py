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

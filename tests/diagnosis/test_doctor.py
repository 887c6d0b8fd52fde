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


def run_doctor(script: Path, *args: str, cwd: Path = ROOT, **popen) -> subprocess.CompletedProcess:
    """The doctor as a user runs it: the default log level."""
    return subprocess.run([sys.executable, "-m", "gradwatch", "doctor", str(script), *args],
                          capture_output=True, text=True, timeout=100, cwd=cwd, **popen)


def test_each_tensorflow_verdict_is_said_once():
    """Each verdict came twice: in the report, and as a log line on stderr."""
    result = run_doctor(EXAMPLE)
    assert "4 variables get no gradient" in result.stdout
    assert "gets no gradient" not in result.stderr, result.stderr


def test_same_named_parameters_of_two_models_are_each_reported(tmp_path):
    """A DCGAN's generator and critic both have an unused ``proj``: "2 variables" were
    reported, one per name."""
    script = tmp_path / "gan.py"
    script.write_text(
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.body, self.proj = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)\n"
        "    def forward(self, x):\n"
        "        return self.body(x)\n"
        "generator, critic = Net(), Net()\n"
        "g, c = (torch.optim.SGD(m.parameters(), 0.1) for m in (generator, critic))\n"
        "for _ in range(2):\n"
        "    for model, optimizer in ((critic, c), (generator, g)):\n"
        "        optimizer.zero_grad()\n"
        "        model(torch.ones(1, 2)).sum().backward()\n"
        "        optimizer.step()\n")
    result = run_doctor(script)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "4 variables get no gradient (1 cause)" in result.stdout, result.stdout
    assert "proj.weight, proj.bias, proj.weight (2), proj.bias (2)" in result.stdout


def test_the_script_runs_as_under_python(tmp_path):
    """``__file__`` was relative (``os.chdir(os.path.dirname(__file__))`` failed), the
    script's own ``logging.basicConfig`` did nothing (gradwatch's came first), and a
    failing script's traceback and ``sys.exit("message")`` were not shown."""
    script = tmp_path / "train.py"
    script.write_text(
        "import logging, os, sys\n"
        "logging.basicConfig(level=logging.WARNING, format='MINE %(message)s')\n"
        "logging.getLogger('train').info('not shown')\n"
        "logging.getLogger('train').warning('shown')\n"
        "os.chdir(os.path.dirname(__file__))\n"
        "print('absolute', os.path.isabs(__file__), sys.path[0] == os.getcwd())\n"
        "if sys.argv[1] == 'exit':\n"
        "    sys.exit('fatal: bad config')\n"
        "def step():\n"
        "    raise RuntimeError('mat1 and mat2 shapes cannot be multiplied')\n"
        "step()\n")
    exited = run_doctor(script.relative_to(tmp_path), "exit", cwd=tmp_path)
    assert "absolute True True" in exited.stdout, exited.stdout + exited.stderr
    assert exited.stderr.splitlines()[-1] == "fatal: bad config", exited.stderr
    assert "MINE shown" in exited.stderr and "not shown" not in exited.stderr
    failed = run_doctor(script.relative_to(tmp_path), "raise", cwd=tmp_path)
    assert failed.returncode == 2
    assert 'line 11, in <module>\n    step()\n' in failed.stderr, failed.stderr
    assert "gradwatch" not in failed.stderr.split("Traceback")[1], failed.stderr
    syntax = tmp_path / "syntax.py"
    syntax.write_text("import torch\n\nif True\n    pass\n")
    broken = run_doctor(syntax)
    assert f"The run failed: SyntaxError: expected ':' (at {syntax}:3)" in broken.stdout


def test_an_interrupted_run_keeps_what_was_found(tmp_path):
    import signal
    import time

    script = tmp_path / "endless.py"
    script.write_text(
        "import torch\n"
        "model, unused = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)\n"
        "optimizer = torch.optim.SGD([*model.parameters(), *unused.parameters()], 0.1)\n"
        "print('training', flush=True)\n"
        "while True:\n"
        "    optimizer.zero_grad()\n"
        "    model(torch.ones(1, 2)).sum().backward()\n"
        "    optimizer.step()\n")
    # (SIGINT as a terminal gives it: a shell's background job, as CI may run, ignores it,
    # and Python then never raises KeyboardInterrupt)
    process = subprocess.Popen([sys.executable, "-m", "gradwatch", "doctor", str(script)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        line = "-"
        while line and "training" not in line:
            line = process.stdout.readline()
        time.sleep(2)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 1, out + err
    assert "2 variables get no gradient" in out and "interrupted" in out, out
    assert "Traceback" not in err, err


def test_a_loss_without_graph_is_explained(tmp_path):
    """PyTorch's "element 0 of tensors does not require grad": the doctor said nothing was
    checked (the monitor explained it; the doctor did not)."""
    script = tmp_path / "detached.py"
    script.write_text(
        "import torch\n"
        "model = torch.nn.Linear(2, 1)\n"
        "optimizer = torch.optim.SGD(model.parameters(), 0.1)\n"
        "prediction = model(torch.ones(4, 2)).detach()\n"
        "torch.nn.functional.mse_loss(prediction, torch.zeros(4, 1)).backward()\n")
    result = run_doctor(script)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "2 variables get no gradient" in result.stdout
    assert f"crosses detach() at {script}:4" in result.stdout
    assert "does not require grad" in result.stdout  # the run failed, said below

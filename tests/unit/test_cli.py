"""The ``gradwatch`` command's help and errors, as a user reads them."""

from __future__ import annotations

import pytest

from gradwatch import cli


def help_of(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit:
        cli.main([*argv, "--help"])
    assert exit.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", [(), ("collector",), ("demo",), ("doctor",)])
def test_help_shows_user_words_not_internals(capsys, command):
    text = help_of(capsys, *command)
    assert text.startswith("usage: gradwatch")
    assert "``" not in text  # docstring markup
    assert "setting:" not in text  # argparse destinations


def test_every_option_with_a_value_says_what_it_is(capsys):
    text = help_of(capsys, "demo")
    assert "--epochs N" in text and "epochs to train (default 2)" in text
    assert "--limits.max-jobs MAX_JOBS" in help_of(capsys, "collector")


def test_an_unknown_log_level_is_one_clear_error(capsys, monkeypatch):
    monkeypatch.setenv("GRADWATCH_LOG_LEVEL", "verbose")
    with pytest.raises(SystemExit) as exit:
        cli.main(["doctor", "train.py"])
    assert exit.value.code == 2
    error = capsys.readouterr().err
    assert "GRADWATCH_LOG_LEVEL" in error and "'verbose'" in error
    assert "Traceback" not in error


def test_an_unknown_flag_is_named_by_the_subcommand_with_the_flag_meant(capsys):
    """``gradwatch collector --grpc-adress …`` printed the top-level usage and nothing about
    the flag meant."""
    with pytest.raises(SystemExit) as exited:
        cli.main(["collector", "--grpc-adress", "127.0.0.1:8470"])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert "usage: gradwatch collector" in error
    assert "unrecognized arguments: --grpc-adress 127.0.0.1:8470 (did you mean --grpc-address?)" \
        in error


WITHOUT_THE_COLLECTORS_DEPENDENCIES = """
import sys
for module in ("yaml", "bcrypt", "prometheus_client", "aiohttp"):
    sys.modules[module] = None  # (importing it raises ModuleNotFoundError)
from gradwatch.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_an_agent_only_install_runs_the_doctor_and_names_the_extra_the_rest_need(tmp_path):
    """``pip install gradwatch[agent-torch]`` and ``gradwatch doctor``, as the README says:
    every command crashed, ``--help`` too, importing the collector's YAML parser."""
    import subprocess
    import sys

    script = tmp_path / "train.py"
    script.write_text("import torch\n"
                      "model, unused = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)\n"
                      "optimizer = torch.optim.SGD([*model.parameters(), *unused.parameters()])\n"
                      "model(torch.ones(1, 2)).sum().backward()\n"
                      "optimizer.step()\n")

    def gradwatch(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", WITHOUT_THE_COLLECTORS_DEPENDENCIES, *argv],
                              capture_output=True, text=True, timeout=120)

    assert "doctor" in gradwatch("--help").stdout
    doctor = gradwatch("doctor", str(script))
    assert doctor.returncode == 1, doctor.stderr
    assert "It is never read by the computation of the loss" in doctor.stdout
    for argv, said in [
            (["collector", "--grpc-address", "127.0.0.1:1"], "needs yaml, which is not "
             "installed: pip install 'gradwatch[collector]'"),
            (["demo"], "needs prometheus_client, which is not installed: pip install "
             "'gradwatch[collector,agent-cpu]'")]:
        result = gradwatch(*argv)
        assert result.returncode == 2
        assert result.stderr.splitlines() == [f"gradwatch {argv[0]}: {said}"]

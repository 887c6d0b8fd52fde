"""Every benchmark runs as the docs say: each `bench` module starts (``--help``) and
knows every option that a ``python -m bench.NAME ...`` command in the docs passes it.
A renamed function or option breaks a benchmark without breaking any other test."""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(p.stem for p in (ROOT / "bench").glob("*.py") if p.stem != "__init__")
LIBRARIES = {"cpu", "models"}  # imported by the benchmarks, not run
COMMAND = re.compile(r"python -m bench\.(\w+)((?:(?:[ \t]+|[ \t]*\\\n[ \t]*)[^\s`|\\]+)*)")


def documented_options() -> dict[str, set[str]]:
    """The options each benchmark is given in the docs and the README."""
    options: dict[str, set[str]] = {}
    for doc in [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]:
        for name, arguments in COMMAND.findall(doc.read_text()):
            if name != "NAME":
                options.setdefault(name, set()).update(re.findall(r"--[\w-]+", arguments))
    return options


def help_text(module: str, monkeypatch, capsys) -> str:
    monkeypatch.setattr(sys, "argv", [f"bench.{module}", "--help"])
    with pytest.raises(SystemExit) as exited:
        runpy.run_module(f"bench.{module}", run_name="__main__", alter_sys=False)
    assert exited.value.code == 0
    return capsys.readouterr().out


def test_the_docs_name_only_benchmarks_that_exist():
    assert set(documented_options()) - set(MODULES) == set()


@pytest.mark.parametrize("module", [m for m in MODULES if m not in LIBRARIES])
def test_a_benchmark_starts_and_takes_the_options_the_docs_give_it(module, monkeypatch,
                                                                   capsys):
    text = help_text(module, monkeypatch, capsys)
    assert text.startswith("usage:")
    unknown = {o for o in documented_options().get(module, set()) if o not in text}
    assert unknown == set()

"""Architecture rules of docs/design.md and the generated wire code, checked mechanically."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Blocks imports of the named top-level modules, then imports the target.
BLOCKED_IMPORT = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError(f"{{name}} is blocked for this test")
sys.meta_path.insert(0, Block())
import {target}
{extra}
print("ok")
"""


def run_blocked(target: str, blocked: set[str], extra: str = "") -> subprocess.CompletedProcess:
    code = BLOCKED_IMPORT.format(blocked=blocked, target=target, extra=extra)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)


CLI_HELP = """
import gradwatch.cli
try:
    gradwatch.cli.main(["collector", "--help"])
except SystemExit as exit:
    assert exit.code == 0
assert "tensorflow" not in sys.modules
"""


def test_collector_runs_without_tensorflow():
    result = run_blocked("gradwatch.collector.server", {"tensorflow", "keras"}, CLI_HELP)
    assert "usage: gradwatch collector" in result.stdout, result.stderr
    assert result.stdout.strip().endswith("ok"), result.stderr


def test_agent_imports_without_prometheus_client():
    result = run_blocked("gradwatch.agent", {"prometheus_client", "aiohttp"},
                         "from gradwatch.agent import GradientMonitor")
    assert result.stdout.strip().endswith("ok"), result.stderr


CORE_AT_WORK = """
import gradwatch.agent.core.monitor, gradwatch.agent.core.sender
from gradwatch.agent.core.monitor import MonitorCore
monitor = MonitorCore(collector="127.0.0.1:9", training_job="no-framework")
assert monitor.enabled and monitor.close(timeout_s=0.2) is True  # nothing to deliver
assert not {"tensorflow", "keras", "torch"} & set(sys.modules)
"""


def test_pytorch_agent_imports_without_tensorflow():
    result = run_blocked("gradwatch.agent.torch", {"tensorflow", "keras", "tf_keras"},
                         "assert 'tensorflow' not in sys.modules")
    assert result.stdout.strip().endswith("ok"), result.stderr


def test_tensorflow_agent_imports_without_torch():
    result = run_blocked("gradwatch.agent.tensorflow", {"torch"})
    assert result.stdout.strip().endswith("ok"), result.stderr


def test_agent_core_works_without_any_framework():
    """The core (settings, identity, sender, sessions) is what every front end reuses."""
    result = run_blocked("gradwatch.agent.core", {"tensorflow", "keras", "tf_keras", "torch"},
                         CORE_AT_WORK)
    assert result.stdout.strip().endswith("ok"), result.stderr


def imports_of(folder: str) -> set[str]:
    names = set()
    for path in (ROOT / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
    return names


@pytest.mark.parametrize("folder, forbidden", [
    ("collector", ("tensorflow", "keras", "gradwatch.agent")),
    ("agent", ("prometheus_client", "gradwatch.collector", "aiohttp")),
    ("agent/core", ("tensorflow", "keras", "tf_keras", "torch", "gradwatch.agent.tensorflow",
                    "gradwatch.agent.torch")),
    ("agent/tensorflow", ("torch", "gradwatch.agent.torch")),
    ("agent/torch", ("tensorflow", "keras", "tf_keras", "gradwatch.agent.tensorflow")),
    ("proto", ("tensorflow", "gradwatch.agent", "gradwatch.collector")),
])
def test_no_forbidden_imports(folder, forbidden):
    bad = {n for n in imports_of(folder) if n.split(".")[0] in forbidden or
           any(n == f or n.startswith(f + ".") for f in forbidden)}
    assert not bad, f"{folder}/ imports {sorted(bad)}"


def test_generated_proto_code_is_up_to_date():
    result = subprocess.run([sys.executable, "-m", "gradwatch.proto.generate", "--check"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_every_rejection_reason_and_limit_is_documented():
    """The ``reason`` label's values are listed in docs/metrics.md, and every collector
    limit (a config key) in docs/limits.md and the example config."""
    from dataclasses import fields

    from gradwatch.collector.ingest import Limits, Reason

    metrics = (ROOT / "docs" / "metrics.md").read_text()
    assert [r.value for r in Reason if f"`{r.value}`" not in metrics] == []
    limits = (ROOT / "docs" / "limits.md").read_text()
    example = (ROOT / "deploy" / "collector.example.yaml").read_text()
    names = [f.name for f in fields(Limits)]
    assert [n for n in names if f"`{n}`" not in limits] == []
    assert [n for n in names if f"  {n}:" not in example] == []


def test_every_package_is_in_pyproject():
    """A package folder missing from pyproject.toml's list is missing from the wheel (and
    the Docker image), though an editable install finds it."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(project["packages"])
    found = set()
    for package, folder in project["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((package, *relative)))
    assert found - listed == set()

"""The documentation names everything a user can see or set: every exported metric family,
every alert (runbook section, metrics list, example config) and every agent setting (the
collector's are checked against deploy/collector.example.yaml in tests/unit/test_config.py)."""

from __future__ import annotations

from pathlib import Path

import yaml

from gradwatch.agent.core.settings import AgentSettings
from gradwatch.collector.exporter import Exporter
from gradwatch.collector.rules import RULES
from gradwatch.collector.state import Registry
from gradwatch.collector.telemetry import Telemetry

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def test_every_exported_metric_family_is_documented():
    exporter = Exporter(Registry(), Telemetry(), list, dict)
    documented = (DOCS / "metrics.md").read_text()
    missing = [m.sample_name for m in exporter.metrics if f"`{m.sample_name}" not in documented]
    assert missing == []


def test_every_alert_has_a_runbook_section_a_row_and_example_settings():
    runbook = (DOCS / "runbook.md").read_text()
    metrics = (DOCS / "metrics.md").read_text()
    example = yaml.safe_load((ROOT / "deploy" / "collector.example.yaml").read_text())
    for rule in RULES:
        assert f"\n## {rule.name}\n" in runbook, rule.name  # the alert's runbook_url anchor
        assert f"| `{rule.name}` |" in metrics, rule.name
        assert rule.name in example["rules"], rule.name


def test_every_agent_variable_is_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    missing = [v for v in AgentSettings.environment_variables().values()
               if f"`{v}`" not in readme]
    assert missing == []

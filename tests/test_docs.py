"""The documentation names everything a user can see or set: every exported metric family,
every alert (runbook section, metrics list, example config) and every agent setting (the
collector's are checked against deploy/collector.example.yaml in tests/unit/test_config.py)."""

from __future__ import annotations

import re
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


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens, a
    repeated heading numbered."""
    anchors: set[str] = set()
    in_code = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and re.match(r"#{1,6} ", line):
            slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
            anchor, n = slug, 0
            while anchor in anchors:
                n += 1
                anchor = f"{slug}-{n}"
            anchors.add(anchor)
    return anchors


def test_every_link_between_the_docs_resolves():
    """Relative links in the README and docs/ name files that exist and headings in them."""
    broken = []
    for page in [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor and linked.suffix == ".md" and anchor not in _anchors(
                    linked.read_text()):
                broken.append(f"{page.name}: {target}")
    assert broken == []

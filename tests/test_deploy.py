"""Shipped Prometheus rules: valid, unit-tested with promtool, and the same in both forms."""

import subprocess
from pathlib import Path

import yaml

from services import require_binary

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
RULES = DEPLOY / "prometheus" / "gradwatch-rules.yml"


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([require_binary("promtool"), *args], capture_output=True, text=True,
                          timeout=60, cwd=RULES.parent)


def test_rules_pass_promtool_check():
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_pass_their_promtool_unit_tests():
    result = promtool("test", "rules", "gradwatch-rules.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_prometheusrule_has_the_same_groups():
    plain = yaml.safe_load(RULES.read_text())["groups"]
    operator = yaml.safe_load((DEPLOY / "kubernetes" / "prometheusrule.yaml").read_text())
    assert operator["kind"] == "PrometheusRule"
    assert operator["spec"]["groups"] == plain


def test_backup_alerts_use_the_collectors_names_and_labels():
    from gradwatch.collector.rules import RULE_NAMES

    alerts = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]
              if "alert" in r]
    backups = [r for r in alerts if not r["alert"].startswith("Gradwatch")]
    assert backups and all(r["alert"] in RULE_NAMES for r in backups)
    for rule in backups:  # aggregated to exactly the collector's label set
        assert "by (training_job, optimizer)" in rule["expr"]
        assert set(rule["labels"]) == {"severity"}

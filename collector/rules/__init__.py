"""Alert rules: `base` (what a rule is), one module per family of rules, and `engine`
(which runs them and owns their history). Adding a rule: docs/contributing.md."""

from gradwatch.collector.rules.base import Params, Rule
from gradwatch.collector.rules.engine import RULE_NAMES, RULES, RUNBOOK, RuleEngine, RuleSettings

__all__ = ["RULES", "RULE_NAMES", "RUNBOOK", "Params", "Rule", "RuleEngine", "RuleSettings"]

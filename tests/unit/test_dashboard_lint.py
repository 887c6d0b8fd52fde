"""Structural checks a dashboard linter would make, over the committed JSON (no Grafana, no
processes): failures must be visible (thresholds, units, no-value text), panels findable
(unique ids, collapsed detail rows, links), bar gauges one bar per series, and every
alert's runbook and dashboard links resolve to a real docs section or panel."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from gradwatch.collector.links import ALERT_PANELS, JOB_DASHBOARD_UID, dashboard_url
from gradwatch.collector.rules import RULES

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = {path.name: json.loads(path.read_text())
              for path in sorted((ROOT / "dashboards").glob("*.json"))}
#: What Grafana applies when a panel sets no thresholds: green, red from 80.
GRAFANA_DEFAULT = [{"color": "green", "value": None}, {"color": "red", "value": 80}]
PROMETHEUS_OWNED = {"Time", "__name__", "instance", "job"}


def panels(dashboard: dict) -> list[dict]:
    return [p for panel in dashboard["panels"] for p in [panel, *panel.get("panels", [])]]


def lint(dashboard: dict) -> list[str]:
    """Every structural problem of ``dashboard``, one line each."""
    problems = []
    ids = [p.get("id") for p in panels(dashboard)]
    if len(set(ids)) != len(ids) or not all(isinstance(i, int) and i > 0 for i in ids):
        problems.append(f"panel ids not unique positive integers: {ids}")
    titles = [p["title"] for p in panels(dashboard) if p["type"] != "row"]
    if len(set(titles)) != len(titles):
        problems.append(f"panel titles not unique (docs and links name panels): {titles}")
    if dashboard.get("graphTooltip", 0) < 1:
        problems.append("no shared crosshair")
    if not any(link.get("type") == "dashboards" and link.get("keepTime")
               and link.get("includeVars") for link in dashboard.get("links", [])):
        problems.append("no dashboard links by tag keeping time and variables")
    for panel in panels(dashboard):
        if panel["type"] == "row":
            continue
        title, defaults = panel["title"], panel["fieldConfig"]["defaults"]
        if not defaults.get("unit"):
            problems.append(f"{title}: no unit")
        if panel["type"] in ("stat", "gauge", "bargauge"):
            steps = defaults.get("thresholds", {}).get("steps")
            if not steps or steps == GRAFANA_DEFAULT:
                problems.append(f"{title}: no thresholds of its own")
            elif any(s["color"] == "red" for s in steps) and "noValue" not in defaults \
                    and panel["type"] == "stat":
                problems.append(f"{title}: an alarm stat without noValue")
        if panel["type"] == "bargauge":
            for target in panel["targets"]:
                if target.get("format") != "time_series":
                    problems.append(f"{title}: bar gauge query not in time series format")
            if panel["options"]["reduceOptions"].get("values") is not False:
                problems.append(f"{title}: bar gauge shows values, not one bar per series")
        if panel["type"] == "table":
            hidden = set()
            for transformation in panel.get("transformations", []):
                if transformation["id"] == "organize":
                    hidden |= {k for k, v in transformation["options"]["excludeByName"].items()
                               if v}
            if not PROMETHEUS_OWNED <= hidden:
                problems.append(f"{title}: table shows {sorted(PROMETHEUS_OWNED - hidden)}")
        custom = defaults.get("custom", {})
        if custom.get("scaleDistribution", {}).get("type") == "log" \
                and "Zero and NaN" not in panel["description"]:
            problems.append(f"{title}: log axis without saying where zero and NaN show")
    return problems


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_dashboard_passes_the_lint(name):
    assert lint(DASHBOARDS[name]) == []


def test_the_lint_finds_what_it_checks():
    """A dashboard with the review's findings put back fails on each of them."""
    broken = copy.deepcopy(DASHBOARDS["gradwatch-job.json"])
    broken["graphTooltip"] = 0
    broken["links"] = []
    broken["panels"][1]["title"] = broken["panels"][2]["title"]
    found = {p["title"]: p for p in panels(broken)}
    found["Running tasks"]["id"] = found["Dropped steps"]["id"]
    found["Firing alerts"]["fieldConfig"]["defaults"]["thresholds"]["steps"] = GRAFANA_DEFAULT
    del found["Dropped steps"]["fieldConfig"]["defaults"]["noValue"]
    found["Top 10 variables by gradient norm"]["targets"][0]["format"] = "table"
    del found["Step lag (10 furthest behind)"]["fieldConfig"]["defaults"]["unit"]
    found["Why gradients are missing"]["transformations"] = []
    found["Global gradient norm by task and replica"]["description"] = "log scale"
    problems = "\n".join(lint(broken))
    for expected in ("ids not unique", "titles not unique", "no shared crosshair",
                     "no dashboard links",
                     "Firing alerts: no thresholds", "Dropped steps: an alarm stat without",
                     "Top 10 variables by gradient norm: bar gauge query",
                     "Step lag (10 furthest behind): no unit",
                     "Why gradients are missing: table shows",
                     "Global gradient norm by task and replica: log axis"):
        assert expected in problems, expected


def test_detail_rows_are_collapsed_and_the_variables_exist():
    job = DASHBOARDS["gradwatch-job.json"]
    rows = {p["title"]: p for p in job["panels"] if p["type"] == "row"}
    assert rows["Variables"]["collapsed"] and rows["Variables"]["panels"]
    assert rows["Replicas and workers"]["collapsed"] and rows["Replicas and workers"]["panels"]
    variables = {v["name"]: v for v in job["templating"]["list"]}
    assert {"training_job", "optimizer", "task", "variable"} <= set(variables)
    # The job opens on the most recently active job, not the alphabetically first one.
    assert variables["training_job"]["sort"] == 0
    assert "sort_desc" in variables["training_job"]["query"]
    for name in ("optimizer", "task", "variable"):
        assert variables[name]["includeAll"] and variables[name]["current"]["value"] == "$__all"


def test_overview_links_each_job_to_its_dashboard_keeping_the_time_range():
    overview = DASHBOARDS["gradwatch-overview.json"]
    (jobs,) = [p for p in panels(overview) if p["title"] == "Jobs"]
    links = [link for override in jobs["fieldConfig"]["overrides"]
             for prop in override["properties"] if prop["id"] == "links"
             for link in prop["value"]]
    assert links and all(f"/d/{JOB_DASHBOARD_UID}/" in link["url"]
                         and "${__url_time_range}" in link["url"]
                         and "var-training_job=${__data.fields.training_job}" in link["url"]
                         for link in links)


def test_every_alert_links_to_a_panel_that_exists_and_a_runbook_section():
    job = DASHBOARDS["gradwatch-job.json"]
    ids = {p["id"]: p for p in panels(job) if p["type"] != "row"}
    runbook = (ROOT / "docs" / "runbook.md").read_text()
    for rule in RULES:
        assert ALERT_PANELS[rule.name] in ids, rule.name
        url = urlsplit(dashboard_url("https://grafana.example", {
            "alertname": rule.name, "training_job": "j", "optimizer": "o"}))
        assert url.path == f"/d/{job['uid']}/gradwatch-job"
        assert int(parse_qs(url.query)["viewPanel"][0]) == ALERT_PANELS[rule.name]
        assert f"\n## {rule.name}\n" in runbook, rule.name


def test_prometheus_rules_link_to_runbook_sections_that_exist():
    headings = {line[3:].strip().lower()
                for line in (ROOT / "docs" / "runbook.md").read_text().splitlines()
                if line.startswith("## ")}
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "gradwatch-rules.yml").read_text())
    anchors = [rule["annotations"]["runbook_url"] for group in rules["groups"]
               for rule in group["rules"] if "alert" in rule]
    assert anchors
    for anchor in anchors:
        assert re.fullmatch(r"docs/runbook\.md#[a-z]+", anchor), anchor
        assert anchor.partition("#")[2] in headings, anchor

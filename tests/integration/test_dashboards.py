"""The Grafana dashboards: regenerating them reproduces the committed JSON, and every
panel query and template variable returns data from a real Prometheus scraping a
collector that watches a real training run. A renamed metric or label breaks this."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from gradwatch.agent import GradientMonitor
from tests.support.models import ModelWithUnusedLayer
from tests.support.services import PrometheusProcess, require_binary

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "dashboards").glob("*.json"))


def test_regenerating_reproduces_the_committed_files():
    result = subprocess.run([sys.executable, str(ROOT / "dashboards" / "generate.py"), "--check"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def all_panels(dashboard: dict) -> list[dict]:
    """Every panel, those inside collapsed rows included."""
    return [p for panel in dashboard["panels"] for p in [panel, *panel.get("panels", [])]]


def panel_queries(dashboard: dict) -> list[tuple[str, str]]:
    """Every panel query, and the annotation queries (titled by their name)."""
    return [(panel["title"], target["expr"]) for panel in all_panels(dashboard)
            for target in panel.get("targets", [])] + [
        (f"annotation {a['name']}", a["expr"]) for a in dashboard["annotations"]["list"]]


def variable_queries(dashboard: dict) -> list[tuple[str, str]]:
    return [(v["name"], v["query"]) for v in dashboard["templating"]["list"]
            if v["type"] == "query"]


#: Queries that show only what is wrong (``> 0``, NaN/Inf norms) are empty on a healthy
#: run; each is then run in a form that keeps every series, so that its metric and label
#: names are still checked.
HEALTHY_EMPTY = ((" > 0", ""), ("< +Inf", "< -Inf"))


def unfiltered(expr: str) -> str | None:
    """``expr`` without its only-what-is-wrong filters, or None if it has none."""
    if not any(f in expr for f, _ in HEALTHY_EMPTY):
        return None
    for only_bad, everything in HEALTHY_EMPTY:
        expr = expr.replace(only_bad, everything)
    return expr


def variable_values(prometheus, definition: str, job: str) -> set[str | None]:
    """What Grafana lists for a variable: ``label_values(metric, label)``, or
    ``query_result(expr)`` filtered through the variable's regex."""
    found = re.fullmatch(r"label_values\((.+), (\w+)\)", definition)
    if found:
        metric, label = found.groups()
        return {r["metric"].get(label) for r in prometheus.query(
            f"group by ({label}) ({substitute(metric, job)})")}
    inner = re.fullmatch(r"query_result\((.+)\)", definition).group(1)
    return {r["metric"].get("training_job") for r in prometheus.query(substitute(inner, job))}


def test_dashboards_are_complete():
    """Two dashboards; every panel has a description and a unit where it shows numbers;
    the data source is a template variable everywhere."""
    assert [p.name for p in DASHBOARDS] == ["gradwatch-job.json", "gradwatch-overview.json"]
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        for panel in all_panels(dashboard):
            if panel["type"] == "row":
                continue
            assert panel["description"], panel["title"]
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["fieldConfig"]["defaults"]["unit"], panel["title"]
    job = json.loads((ROOT / "dashboards" / "gradwatch-job.json").read_text())
    assert {"training_job", "optimizer", "task_type", "task", "variable"} <= {
        name for name, _ in variable_queries(job)}


def substitute(expr: str, job: str) -> str:
    """What Grafana sends for job ``job``, "All" for the multi-value variables, a 1 s
    scrape interval and a 5 minute dashboard range."""
    for variable in ("$variable", "$optimizer", "$task_type", "$task"):
        expr = expr.replace(variable, ".*")
    return (expr.replace("$training_job", job).replace("$__rate_interval", "1m")
            .replace("$__range", "5m"))


def train_keras(collector, job: str):
    """A Keras model.fit with an unused layer; returns its still open monitor."""
    x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    y = x.sum(axis=1, keepdims=True)
    model = ModelWithUnusedLayer()
    model.build((None, 4))
    monitor = GradientMonitor(collector=collector.grpc_target, training_job=job,
                              flush_interval_s=0.05)
    model.compile(optimizer=monitor.wrap(keras.optimizers.SGD(0.01)), loss="mse")
    model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    return monitor


def train_torch(collector, job: str):
    """A PyTorch loop with an unused layer; returns its still open monitor."""
    import torch

    from gradwatch.agent.torch import GradientMonitor as TorchMonitor

    hidden, out, unused = torch.nn.Linear(4, 8), torch.nn.Linear(8, 1), torch.nn.Linear(8, 2)
    dead = torch.nn.Linear(8, 1)  # its gradient is present and exactly 0 (GradientVanishing)
    model = torch.nn.ModuleDict({"hidden": hidden, "out": out, "unused": unused, "dead": dead})
    x = torch.randn(64, 4)
    monitor = TorchMonitor(collector=collector.grpc_target, training_job=job,
                           flush_interval_s=0.05)
    optimizer = monitor.wrap(torch.optim.SGD(model.parameters(), 0.01), model)
    for batch in x.split(8):
        optimizer.zero_grad()
        h = torch.relu(hidden(batch))
        loss = (out(h) - batch.sum(1, keepdim=True)).pow(2).mean() + 0 * dead(h).sum()
        loss.backward()
        optimizer.step()
    return monitor


@pytest.mark.parametrize("train", [train_keras, train_torch], ids=["keras", "torch"])
def test_every_panel_query_and_variable_returns_data(collector, job_name, train):
    """The same dashboards serve TensorFlow and PyTorch jobs, unchanged."""
    require_binary("prometheus")
    target = collector.metrics_url.removeprefix("http://").removesuffix("/metrics")
    # The monitor stays open while Prometheus is queried: running tasks have a
    # last-report timestamp, finished ones do not.
    monitor = None
    try:
        with PrometheusProcess([target], scrape_interval="300ms") as prometheus:
            monitor = train(collector, job_name)
            prometheus.wait_for(f'count_over_time(gradwatch_steps_total{{training_job='
                                f'"{job_name}"}}[1m]) >= 3', timeout_s=30)
            prometheus.wait_for(f'gradwatch_gradient_missing_cause_info{{training_job='
                                f'"{job_name}"}}', timeout_s=15)
            empty = []
            for path in DASHBOARDS:
                dashboard = json.loads(path.read_text())
                for title, expr in panel_queries(dashboard):
                    if prometheus.query(substitute(expr, job_name)):
                        continue
                    everything = unfiltered(expr)
                    if everything is None or not prometheus.query(
                            substitute(everything, job_name)):
                        empty.append(f"{path.name}: {title}: {expr}")
                for name, definition in variable_queries(dashboard):
                    values = variable_values(prometheus, definition, job_name)
                    if not values - {None}:
                        empty.append(f"{path.name}: variable {name}: {definition}")
                    if name == "training_job":
                        assert job_name in values
            assert not empty, "queries without data:\n" + "\n".join(empty)
            if train is train_torch:  # the vanishing panel shows the dead layer's 0
                (expr,) = [e for path in DASHBOARDS for t, e in panel_queries(
                    json.loads(path.read_text())) if t == "Bottom 10 variables by gradient norm"]
                shown = {r["metric"]["variable"]: float(r["value"][1]) for r in
                         prometheus.query(substitute(expr, job_name))}
                assert shown.get("dead.weight") == 0.0 and "unused.weight" not in shown, shown
    finally:
        if monitor is not None:
            monitor.close()


def test_every_panel_is_described_in_the_docs():
    docs = (ROOT / "docs" / "dashboards.md").read_text()
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        assert f"`uid: {dashboard['uid']}`" in docs
        for panel in all_panels(dashboard):
            if panel["type"] != "row":
                assert f"**{panel['title']}**" in docs, panel["title"]

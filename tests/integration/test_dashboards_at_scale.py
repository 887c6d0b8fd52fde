"""The on-call walk-through of docs/dashboards.md, checked against a real Prometheus
scraping a real collector fed by a broken run at scale: 64 simulated tasks (raw gRPC, no
framework) x 2,000 variables, a per-variable series cap of 500. One head-layer variable
gets no gradient on any task, task 17's replica 0 goes NaN, task 42 stops stepping.
Each dashboard query must answer its question, and stay small."""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from gradwatch.proto.v1 import gradwatch_pb2 as pb
from gradwatch.proto.v1 import gradwatch_pb2_grpc as pb_grpc
from tests.support import wire
from tests.support.services import CollectorProcess, PrometheusProcess, require_binary

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TASKS, VARIABLES, CAP, STEPS = 64, 2000, 500, 12
BROKEN = 1990  # a head layer: registered late, folded first by a registration-order cap
NAN_VARIABLE, NAN_TASK, STUCK_TASK = 5, 17, 42
JOB = "bert-64"


def panels(name: str, task_type: str = ".*", task: str = ".*") -> dict[str, list[str]]:
    """Panel title → its queries, as Grafana would send them for JOB (the other variables
    "All" unless given, a 1 s scrape interval, a 5 minute range)."""
    dashboard = json.loads((ROOT / "dashboards" / name).read_text())
    values = {"$training_job": JOB, "$__rate_interval": "1m", "$__range": "5m",
              "$optimizer": ".*", "$task_type": task_type, "$task": task, "$variable": ".*"}
    found = {}
    for panel in dashboard["panels"]:
        for p in [panel, *panel.get("panels", [])]:
            exprs = [t["expr"] for t in p.get("targets", [])]
            for variable, value in values.items():  # in order: $task_type before $task
                exprs = [e.replace(variable, value) for e in exprs]
            found[p["title"]] = exprs
    return found


class Run:
    """The 64 simulated tasks: `register`, then `steps` for a range of steps (the stuck task
    takes none after the first half; the NaN task goes NaN in the second half)."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.GradientWatchStub(self.channel)
        self.names = [f"encoder/layer_{i:04d}/kernel" for i in range(VARIABLES)]
        self.present = np.ones(VARIABLES)
        self.present[BROKEN] = 0
        self.norms = np.linspace(0.01, 1.0, VARIABLES)
        self.norms[BROKEN] = 0.0
        self.sessions: list[str] = []
        self.sequence = [0] * TASKS

    def register(self) -> None:
        for task in range(TASKS):
            self.sessions.append(self.stub.Register(pb.RegisterRequest(
                training_job=JOB, task_type="worker", task_index=task, num_replicas=1,
                optimizer="adam", strategy="test", hostname=f"{JOB}-worker-{task}",
                pid=1000 + task, variables=[pb.Variable(name=n, shape=[2], dtype="float32")
                                            for n in self.names]), timeout=30).session_id)

    def steps(self, first: int, end: int) -> None:
        for task, session in enumerate(self.sessions):
            if task == STUCK_TASK and first >= STEPS // 2:
                continue
            batches = []
            for start in range(first, end, 3):
                steps = []
                for step in range(start, min(start + 3, end)):
                    nan = np.zeros(VARIABLES)
                    if task == NAN_TASK and step >= STEPS // 2:
                        nan[NAN_VARIABLE] = 4
                    steps.append(wire.step(step, self.present, norm=self.norms, nan=nan))
                self.sequence[task] += 1
                batch = wire.batch(session, self.sequence[task], *steps)
                if self.sequence[task] == 1:
                    batch.diagnoses.append(wire.diagnosis(BROKEN))
                batches.append(batch)
            acks = list(self.stub.Report(iter(batches), timeout=60))
            assert [a.sequence for a in acks][-1] == self.sequence[task]

    def close(self) -> None:
        self.channel.close()


def labels(result: list[dict], *names: str) -> set[tuple[str, ...]]:
    return {tuple(r["metric"].get(n, "") for n in names) for r in result}


def test_the_walkthrough_answers_each_alert_at_64_tasks():
    require_binary("prometheus")
    with CollectorProcess("--max-variable-series", str(CAP)) as collector:
        target = collector.metrics_url.removeprefix("http://").removesuffix("/metrics")
        with PrometheusProcess([target], scrape_interval="500ms") as prometheus:
            run = Run(collector.grpc_target)
            run.register()
            run.steps(0, STEPS // 2)
            # Counters are scraped before and after the bad steps, as at any scrape interval.
            prometheus.wait_for(f'count_over_time(gradwatch_steps_total{{training_job="{JOB}"'
                                f'}}[1m]) >= 2', 30)
            run.steps(STEPS // 2, STEPS)
            run.close()
            prometheus.wait_for(f'gradwatch_task_info{{training_job="{JOB}"}}', 30)
            prometheus.wait_for(f'gradwatch_gradient_nan_values_total{{training_job="{JOB}"'
                                f'}} > 0', 30)
            # Rules run up to batch_evaluation_interval_seconds after a batch is counted.
            prometheus.wait_for(f'gradwatch_alerts_active{{training_job="{JOB}",'
                                f'alertname="GradientNonFinite"}}', 30)
            overview, job = panels("gradwatch-overview.json"), panels("gradwatch-job.json")
            q = prometheus.query

            # Overview → which job: the job table's columns.
            jobs = {title: q(expr) for title, expr in zip(
                ["tasks", "steps", "age", "without", "nonfinite", "alerts", "folded"],
                overview["Jobs"], strict=True)}
            assert float(jobs["tasks"][0]["value"][1]) == TASKS
            assert float(jobs["without"][0]["value"][1]) == 1
            assert float(jobs["nonfinite"][0]["value"][1]) > 0
            assert float(jobs["alerts"][0]["value"][1]) >= 2  # GradientMissing, NonFinite
            assert float(jobs["folded"][0]["value"][1]) == VARIABLES - CAP
            alerts = q(overview["Firing alerts by job"][0])
            assert {("bert-64", "GradientMissing"), ("bert-64", "GradientNonFinite")} <= \
                labels(alerts, "training_job", "alertname")

            # GradientMissing → which variable and why; since when, only the broken one.
            (cause,) = q(job["Why gradients are missing"][0])
            assert cause["metric"]["variable"] == f"encoder/layer_{BROKEN:04d}/kernel"
            assert cause["metric"]["cause"] == "broken_at_op"
            now = time.time()
            lanes = prometheus.query_range(job["Gradient present"][0], now - 60, now, 1)
            assert labels(lanes, "variable") == {(f"encoder/layer_{BROKEN:04d}/kernel",)}
            share = q(job["Share of steps without gradient"][0])
            assert labels(share, "variable") == {(f"encoder/layer_{BROKEN:04d}/kernel",)}
            assert float(share[0]["value"][1]) == pytest.approx(1.0)

            # $task_type and $task narrow the job dashboard to one task.
            one = panels("gradwatch-job.json", task_type="worker", task=str(NAN_TASK))
            assert labels(q(one["Tasks"][0]), "task_type", "task_index") == {
                ("worker", str(NAN_TASK))}
            assert q(panels("gradwatch-job.json", task_type="chief")["Tasks"][0]) == []

            # GradientNonFinite → which task and replica, which variable.
            assert labels(q(job["Non-finite steps by task"][0]), "task_index") == {
                (str(NAN_TASK),)}
            assert labels(q(job["NaN and Inf values by variable"][0]), "variable") == {
                (f"encoder/layer_{NAN_VARIABLE:04d}/kernel",)}
            assert labels(q(overview["Non-finite steps by task"][0]), "task_index") == {
                (str(NAN_TASK),)}

            # WorkerSilent / a stuck task → where it runs, how far behind (once Prometheus
            # has scraped every other task's last step: until then any task may lag).
            prometheus.wait_for(f'count(gradwatch_last_step{{training_job="{JOB}"}} == '
                                f'{STEPS - 1}) >= {TASKS - 1}', 30)
            lag = q(job["Step lag (10 furthest behind)"][0])
            worst = max(lag, key=lambda r: float(r["value"][1]))
            assert worst["metric"]["task_index"] == str(STUCK_TASK)
            assert float(worst["value"][1]) == STEPS - STEPS // 2
            info = q(job["Tasks"][-1])
            assert len(info) == TASKS
            assert labels(info, "task_index", "hostname", "pod", "pid") >= {
                (str(STUCK_TASK), f"{JOB}-worker-{STUCK_TASK}", f"{JOB}-worker-{STUCK_TASK}",
                 str(1000 + STUCK_TASK))}

            # Views that survive scale: the heat map is capped and keeps the bad variables,
            # in model order; the bar gauges are 10 series each.
            cells = q(job["Gradient norm heat map (log10, model order)"][0])
            assert len(cells) == CAP
            kept = sorted(labels(cells, "position", "variable"))
            assert (f"{BROKEN:06d}", f"encoder/layer_{BROKEN:04d}/kernel") in kept
            assert (f"{NAN_VARIABLE:06d}", f"encoder/layer_{NAN_VARIABLE:04d}/kernel") in kept
            assert kept[0][0] == "000000" and kept[-1][0] == f"{VARIABLES - 1:06d}"
            assert len(q(job["Top 10 variables by gradient norm"][0])) == 10
            assert len(q(job["Bottom 10 variables by gradient norm"][0])) == 10

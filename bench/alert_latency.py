"""Alert latency: a bad training step → the alert visible in Alertmanager's API.

Two paths, measured in one run against real processes on loopback:
  (a) direct:     agent → collector rules → Alertmanager (POST /api/v2/alerts)
  (b) Prometheus: agent → collector /metrics → Prometheus scrape (1 s) and rule
                  evaluation (1 s, deploy/prometheus/gradwatch-rules.yml) → Alertmanager
Each sample: a fresh job reports a healthy step, then, 0.3-0.8 s later (any phase of
the agent's flush interval), at t0 a step in which one variable has no gradient
(``monitor.observe``); the clock stops when
``GET /api/v2/alerts`` lists GradientMissing for that job. Budget (a): p99 ≤ 1 s.

    .venv/bin/python -m bench.alert_latency [--direct 40] [--prometheus 8]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
import uuid
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf

from gradwatch.agent import GradientMonitor
from tests.support.services import AlertmanagerProcess, CollectorProcess, PrometheusProcess

RULES = Path(__file__).resolve().parents[1] / "deploy" / "prometheus" / "gradwatch-rules.yml"


def one_sample(collector: CollectorProcess, alertmanager: AlertmanagerProcess,
               timeout_s: float) -> float:
    job = f"latency-{uuid.uuid4().hex[:8]}"
    variables = [tf.Variable(tf.ones([64, 64])), tf.Variable(tf.ones([64]))]
    grads = [tf.ones([64, 64]), tf.ones([64])]
    monitor = GradientMonitor(collector=collector.grpc_target, training_job=job)
    try:
        monitor.observe(grads, variables)  # healthy: registers the session
        time.sleep(random.uniform(0.3, 0.8))  # any phase of the agent's flush interval
        started = time.perf_counter()
        monitor.observe([grads[0], None], variables)  # the bad step
        alertmanager.wait_for(bool, timeout_s, alertname="GradientMissing", training_job=job)
        return time.perf_counter() - started
    finally:
        monitor.close(timeout_s=2)


def summarize(name: str, samples: list[float]) -> None:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    print(f"{name:<12} n={len(samples):<3} p50 {statistics.median(samples) * 1e3:7.0f} ms   "
          f"p99 {p99 * 1e3:7.0f} ms   max {max(samples) * 1e3:7.0f} ms", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--direct", type=int, default=40, help="samples for path (a)")
    parser.add_argument("--prometheus", type=int, default=8, help="samples for path (b)")
    args = parser.parse_args()
    with AlertmanagerProcess() as alertmanager:
        with CollectorProcess("--alertmanager-url", alertmanager.url) as collector:
            direct = [one_sample(collector, alertmanager, 10) for _ in range(args.direct)]
        with CollectorProcess() as collector:  # no sink: only Prometheus can page
            target = collector.metrics_url.removeprefix("http://").removesuffix("/metrics")
            with PrometheusProcess([target], scrape_interval="1s", rule_files=[str(RULES)],
                                   alertmanager_url=alertmanager.url,
                                   evaluation_interval="1s"):
                time.sleep(2)
                via_prometheus = [one_sample(collector, alertmanager, 30)
                                  for _ in range(args.prometheus)]
    summarize("(a) direct", direct)
    summarize("(b) prom", via_prometheus)
    print(f"ratio of medians (b)/(a): "
          f"{statistics.median(via_prometheus) / statistics.median(direct):.1f}x")


if __name__ == "__main__":
    main()

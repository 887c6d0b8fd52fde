"""Scrape cost: time to render ``/metrics`` for a collector holding N series.

Fills a collector's state in process (the same `Registry`, `Exporter`
and text rendering that serve ``/metrics``) with jobs of 500 variables
(the default per-job cap), 4 tasks x 2 replicas each, then renders the
exposition text repeatedly. Budget (docs/design.md): 100,000 series in <= 0.5 s.

    .venv/bin/python -m bench.scrape [--series 100000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from gradwatch.collector.exporter import Exporter, render_metrics
from gradwatch.collector.ingest import Limits, decode_batch
from gradwatch.collector.state import Registry
from gradwatch.collector.telemetry import Telemetry
from gradwatch.proto.layout import COLUMN, NUM_COLUMNS, pack_step
from gradwatch.proto.v1 import gradwatch_pb2 as pb

VARIABLES, TASKS, REPLICAS = 500, 4, 2


def fill(registry: Registry, jobs: int) -> None:
    rng = np.random.default_rng(0)
    names = [f"model/block_{i // 4}/layer_{i % 4}/kernel" for i in range(VARIABLES)]
    for job in range(jobs):
        for task in range(TASKS):
            session = registry.register(f"job-{job:04d}", "adam", "worker", task, REPLICAS, names)
            stats = np.zeros((REPLICAS, VARIABLES, NUM_COLUMNS), np.float32)
            stats[..., COLUMN["present"]] = rng.random((REPLICAS, VARIABLES)) > 0.01
            stats[..., COLUMN["l2_norm"]] = rng.random((REPLICAS, VARIABLES))
            step = pack_step(1, stats, 0.0)
            batch = pb.ReportBatch(session_id=session.id, sequence=1, steps=[step])
            session.apply(1, decode_batch(batch, REPLICAS, VARIABLES, Limits()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    registry = Registry()
    exporter = Exporter(registry, Telemetry(), list, dict, max_variable_series=VARIABLES)
    jobs = 1
    fill(registry, jobs)
    per_job = render_metrics(exporter).count(b"\n") - render_metrics(
        Exporter(Registry(), Telemetry(), list, dict)).count(b"\n")
    registry = Registry()
    exporter.registry = registry
    jobs = max(1, round(args.series / per_job))
    fill(registry, jobs)
    times, body = [], b""
    for _ in range(args.repeat):
        start = time.perf_counter()
        body = render_metrics(exporter)
        times.append(time.perf_counter() - start)
    series = sum(1 for line in body.split(b"\n") if line and not line.startswith(b"#"))
    median = statistics.median(times)
    print(f"{jobs} jobs x {VARIABLES} variables x {TASKS} tasks x {REPLICAS} replicas: "
          f"{series:,} series, {len(body) / 1e6:.1f} MB of text")
    print(f"render /metrics: median {median:.3f} s (min {min(times):.3f}, max {max(times):.3f})"
          f" over {args.repeat}; {median / series * 1e6:.2f} us per series; budget 0.5 s "
          f"for 100,000 -> {median * 100_000 / series:.3f} s scaled")


if __name__ == "__main__":
    main()

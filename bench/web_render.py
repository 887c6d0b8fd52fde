"""Web UI: server-side render time of its pages with many jobs, and the history's memory.

Fills a collector's state in process (the same `Registry` and ingest path the service
uses): ``--jobs`` jobs (100) x ``--variables`` variables (1,000), each with a full
history window (128 steps) and a missing layer, then renders ``/``, a job page, its
heat map PNG and the JSON API repeatedly. Budget (docs/design.md): a page in <= 100 ms.

    .venv/bin/python -m bench.web_render [--jobs 100] [--variables 1000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import numpy as np
from aiohttp.test_utils import make_mocked_request

from gradwatch.collector.alerts import AlertTracker
from gradwatch.collector.history import STEPS
from gradwatch.collector.ingest import Limits, decode_batch
from gradwatch.collector.sinks import Dispatcher, LogSink
from gradwatch.collector.state import Registry
from gradwatch.collector.telemetry import Telemetry
from gradwatch.collector.web import WebUI
from gradwatch.proto.layout import COLUMN, NUM_COLUMNS, pack_step
from gradwatch.proto.v1 import gradwatch_pb2 as pb


def fill(jobs: int, variables: int) -> Registry:
    registry = Registry()
    rng = np.random.default_rng(0)
    names = [f"model/block_{i // 8}/layer_{i % 8}/kernel" for i in range(variables)]
    for job in range(jobs):
        session = registry.register(f"job-{job:03d}", "adam", "worker", 0, 1, names)
        for first in range(0, STEPS, 32):  # 32-step batches
            reports = []
            for step in range(first, first + 32):
                stats = np.zeros((1, variables, NUM_COLUMNS), np.float32)
                stats[..., COLUMN["present"]] = 1
                stats[0, -8:, COLUMN["present"]] = 0  # a layer without gradient
                stats[..., COLUMN["l2_norm"]] = rng.lognormal(-3, 1, variables)
                reports.append(pack_step(step, stats, 1.7e9 + step))
            batch = pb.ReportBatch(session_id=session.id, sequence=first // 32 + 1,
                                   steps=reports)
            session.apply(batch.sequence, decode_batch(batch, 1, variables, Limits(),
                                                       session.last_step))
    return registry


async def measure(ui: WebUI, path: str, handler, repeat: int, **match) -> tuple[float, int]:
    request = make_mocked_request("GET", path, match_info=match)
    times, size = [], 0
    for _ in range(repeat):
        start = time.perf_counter()
        response = await handler(request)
        times.append(time.perf_counter() - start)
        size = len(response.body)
    return statistics.median(times), size


async def main_async(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    registry = fill(args.jobs, args.variables)
    filled = time.perf_counter() - start
    history = sum(g.history.nbytes for g in registry.groups.values())
    ui = WebUI(registry, Telemetry(), AlertTracker(lambda n: None), Dispatcher([LogSink()]),
               Limits(), lambda: 0)
    print(f"{args.jobs} jobs x {args.variables} variables x {STEPS} steps of history: filled "
          f"in {filled:.1f} s; history {history / 2**20:.1f} MiB "
          f"({history / args.jobs / args.variables:.0f} B per variable)")
    job = f"job-{args.jobs // 2:03d}"
    for name, path, handler, match in (
        ("/", "/", ui.index, {}),
        ("job page", f"/jobs/{job}", ui.job, {"job": job}),
        ("heat map PNG", f"/jobs/{job}/heatmap.png?optimizer=adam", ui.heatmap_png,
         {"job": job}),
        ("/api/v1/jobs", "/api/v1/jobs", ui.api_jobs, {}),
        ("/api/v1/jobs/{job}", f"/api/v1/jobs/{job}", ui.api_job, {"job": job}),
    ):
        seconds, size = await measure(ui, path, handler, args.repeat, **match)
        print(f"{name:<20} {seconds * 1e3:7.1f} ms  {size / 1e3:8.1f} kB", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--variables", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=5)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()

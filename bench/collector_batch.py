"""The collector's CPU per batch, in one process: parse, decode, state and rules.

What one Report batch costs the collector's event loop besides gRPC (which
`bench.collector_ingest` measures with it): the batch parsed from its bytes as gRPC
hands it over, `decode_batch`, then `GradientWatchService._apply` (session state, the
heat map's history, every rule's observation; each job's rules evaluated at most every
`batch_evaluation_interval_seconds`, as in the service). Sessions of one job take turns,
like the tasks of `bench.collector_ingest`; payloads are the same (random norms, ~1 %
missing). Prints the median per batch of each stage and the statistics per CPU-second.
To compare two trees, run it in each (interleaved runs: the machines are noisy).

    .venv/bin/python -m bench.collector_batch [--tasks 4 --variables 100 --batch-steps 16]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from bench.collector_ingest import registration, step_reports
from gradwatch.collector.config import CollectorConfig
from gradwatch.collector.ingest import (
    admit_registration,
    decode_batch,
    decode_diagnoses,
    find_session,
    validate_registration,
)
from gradwatch.collector.server import Collector
from gradwatch.proto.v1 import gradwatch_pb2 as pb


async def run(args: argparse.Namespace) -> None:
    service = Collector(CollectorConfig()).service
    sessions = []
    for task in range(args.tasks):
        request = registration("bench", task, args.variables, args.replicas)
        names = validate_registration(request, service.limits)
        admit_registration(request, names, service.registry, service.limits)
        sessions.append(service.registry.register(
            request.training_job, request.optimizer, request.task_type, request.task_index,
            request.num_replicas, names, strategy=request.strategy).id)
    template = step_reports(args.batch_steps, args.variables * args.replicas, seed=1)
    stages: dict[str, list[float]] = {"decode": [], "apply": []}
    step = 0

    def one_round(sequence: int) -> None:
        nonlocal step
        for report_index, report in enumerate(template):
            report.step = step + report_index
        step += args.batch_steps
        for session_id in sessions:
            data = pb.ReportBatch(session_id=session_id, sequence=sequence,
                                  steps=template).SerializeToString()
            start = time.perf_counter()
            batch = pb.ReportBatch.FromString(data)
            session = find_session(batch, service.registry)
            decoded = decode_batch(batch, session.num_replicas, session.num_variables,
                                   service.limits, session.last_step)
            causes = decode_diagnoses(batch, session.num_variables, service.limits)
            decoded_at = time.perf_counter()
            service._apply(session, batch, decoded, causes)
            stages["decode"].append(decoded_at - start)
            stages["apply"].append(time.perf_counter() - decoded_at)

    for sequence in range(1, 21):  # warm-up: the rules' windows fill
        one_round(sequence)
        await asyncio.sleep(0)
    for values in stages.values():
        values.clear()
    cpu = time.process_time()
    for sequence in range(21, 21 + args.rounds):
        one_round(sequence)
        await asyncio.sleep(0)  # the rules' scheduled evaluations run here
    cpu = time.process_time() - cpu
    batches = args.rounds * args.tasks
    per_batch = args.batch_steps * args.variables * args.replicas
    print(f"{args.tasks} tasks x {args.variables} variables x {args.replicas} replicas, "
          f"{args.batch_steps} steps a batch, {batches} batches")
    for name, values in stages.items():
        print(f"  {name:<7} median {statistics.median(values) * 1e6:7.0f} us a batch "
              f"(interquartile {statistics.quantiles(values, n=4)[0] * 1e6:.0f}-"
              f"{statistics.quantiles(values, n=4)[2] * 1e6:.0f})")
    print(f"  CPU {cpu / batches * 1e6:.0f} us a batch, evaluations included: "
          f"{batches * per_batch / cpu / 1e6:.2f} M statistics per CPU-second")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--variables", type=int, default=100)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--batch-steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=300)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()

"""Collector ingest: variable-statistics per second per collector core, latency, memory.

A real collector subprocess; ``--agents`` simulated agents, each a separate
process with its own gRPC channel, like a real agent: one training job per
agent, ``--tasks`` sessions (tasks) of ``--variables`` variables x
``--replicas`` replicas on one ordered Report stream, batches of
``--batch-steps`` steps, at most ``--window`` unacknowledged batches per
session. Payloads are realistic (random norms, ~1% missing) and prebuilt, so
the agents spend their CPU on gRPC, not on numbers.

Reported: acknowledged variable-statistics per second (wall clock) and per
second of collector CPU time (= per core: the collector is one event loop);
collector CPU utilisation and peak RSS; and, during the load, the latency from
sending a one-step batch to seeing its step in ``/metrics`` (a probe job
polled through ``/metrics?name[]=gradwatch_last_step``).

    .venv/bin/python -m bench.collector_ingest [--agents 4 --tasks 4 --variables 1000]
    .venv/bin/python -m bench.collector_ingest --sweep   # the scaling curve
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import queue
import statistics
import threading
import time
import urllib.request

import grpc
import numpy as np

from gradwatch.proto.layout import COLUMN, NUM_COLUMNS, pack_step
from gradwatch.proto.v1 import gradwatch_pb2 as pb
from gradwatch.proto.v1 import gradwatch_pb2_grpc as pb_grpc
from tests.support.procfs import process_cpu_seconds, process_memory_mb
from tests.support.services import CollectorProcess


def registration(job: str, task: int, variables: int, replicas: int) -> pb.RegisterRequest:
    return pb.RegisterRequest(
        training_job=job, task_type="worker", task_index=task, num_replicas=replicas,
        optimizer="adam", strategy="bench",
        variables=[pb.Variable(name=f"model/block_{i // 8}/layer_{i % 8}/kernel",
                               shape=[64, 64], dtype="float32") for i in range(variables)])


def step_reports(count: int, width: int, seed: int) -> list[pb.StepReport]:
    rng = np.random.default_rng(seed)
    reports = []
    for i in range(count):
        stats = np.zeros((1, width, NUM_COLUMNS), np.float32)
        stats[0, :, COLUMN["present"]] = rng.random(width) > 0.01
        stats[0, :, COLUMN["l2_norm"]] = rng.random(width)
        reports.append(pack_step(i, stats, time.time()))
    return reports


def agent(target: str, job: str, args: argparse.Namespace, start_at: float,
          results: mp.Queue) -> None:
    """One simulated agent process: register, then stream until the deadline."""
    channel = grpc.insecure_channel(target, options=[
        ("grpc.max_send_message_length", 64 << 20)])
    stub = pb_grpc.GradientWatchStub(channel)
    width = args.variables * args.replicas
    sessions = [stub.Register(registration(job, t, args.variables, args.replicas),
                              timeout=30).session_id for t in range(args.tasks)]
    template = step_reports(args.batch_steps, width, seed=hash(job) % 1000)
    outgoing: queue.Queue = queue.Queue()
    in_flight = {s: threading.Semaphore(args.window) for s in sessions}

    def requests():
        while True:
            batch = outgoing.get()
            if batch is None:
                return
            yield batch

    call = stub.Report(requests())
    acked = {s: 0 for s in sessions}

    def read_acks():
        try:
            for ack in call:
                delta = ack.sequence - acked[ack.session_id]
                acked[ack.session_id] = ack.sequence
                for _ in range(delta):
                    in_flight[ack.session_id].release()
        except grpc.RpcError as error:  # the stream ends with the channel
            if error.code() != grpc.StatusCode.CANCELLED:
                raise

    reader = threading.Thread(target=read_acks, daemon=True)
    reader.start()
    while time.time() < start_at:
        time.sleep(0.01)
    deadline = start_at + args.seconds
    sequence = dict.fromkeys(sessions, 0)
    step = 0
    while time.time() < deadline:
        for session in sessions:
            if not in_flight[session].acquire(timeout=1.0):
                continue
            sequence[session] += 1
            for i, report in enumerate(template):
                report.step = step + i
            outgoing.put(pb.ReportBatch(session_id=session, sequence=sequence[session],
                                        steps=template))
        step += args.batch_steps
    outgoing.put(None)
    reader.join(timeout=30)
    results.put(sum(acked.values()) * args.batch_steps * width)
    channel.close()


def probe(collector: CollectorProcess, args: argparse.Namespace, until: float) -> list[float]:
    """Sends one-step batches of a small probe job; measures send -> visible in /metrics."""
    url = collector.metrics_url + "?name[]=gradwatch_last_step"
    latencies = []
    with grpc.insecure_channel(collector.grpc_target) as channel:
        stub = pb_grpc.GradientWatchStub(channel)
        session = stub.Register(registration("probe", 0, 10, 1), timeout=30).session_id
        outgoing: queue.Queue = queue.Queue()
        call = stub.Report(iter(outgoing.get, None))

        def read_acks() -> None:
            with contextlib.suppress(grpc.RpcError):  # cancelled when the channel closes
                for _ in call:
                    pass

        threading.Thread(target=read_acks, daemon=True).start()
        report = step_reports(1, 10, seed=1)[0]
        sequence = 0
        while time.time() < until - 1.0:
            sequence += 1
            report.step = sequence
            wanted = f" {float(sequence)}"
            sent = time.perf_counter()
            outgoing.put(pb.ReportBatch(session_id=session, sequence=sequence, steps=[report]))
            while time.perf_counter() - sent < 10:
                with urllib.request.urlopen(url, timeout=10) as response:
                    if any(line.startswith("gradwatch_last_step{") and line.endswith(wanted)
                           and 'training_job="probe"' in line
                           for line in response.read().decode().splitlines()):
                        latencies.append(time.perf_counter() - sent)
                        break
            time.sleep(args.probe_interval)
        outgoing.put(None)
    return latencies


def run(args: argparse.Namespace) -> dict:
    with CollectorProcess("--max-variable-series", str(args.variables)) as collector:
        pid = collector.process.pid
        results: mp.Queue = mp.Queue()
        start_at = time.time() + 3.0 + 0.2 * args.agents
        workers = [mp.Process(target=agent, args=(collector.grpc_target, f"bench-{i}", args,
                                                  start_at, results))
                   for i in range(args.agents)]
        for w in workers:
            w.start()
        while time.time() < start_at:
            time.sleep(0.01)
        cpu_before, wall_before = process_cpu_seconds(pid), time.perf_counter()
        latencies = probe(collector, args, start_at + args.seconds)
        for w in workers:
            w.join(timeout=args.seconds + 60)
        wall = time.perf_counter() - wall_before
        cpu = process_cpu_seconds(pid) - cpu_before
        statistics_total = sum(results.get(timeout=10) for _ in workers)
        memory = process_memory_mb(pid)
        rss, peak = memory["VmRSS"], memory["VmHWM"]
    latencies.sort()
    return {
        "statistics": statistics_total, "wall": wall, "cpu": cpu, "rss": rss, "peak": peak,
        "p50": statistics.median(latencies) if latencies else float("nan"),
        "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
        if latencies else float("nan"), "probes": len(latencies),
    }


def describe(args: argparse.Namespace, r: dict) -> str:
    return (f"{args.agents:>3} jobs x {args.tasks:>2} tasks x {args.variables:>6} variables x "
            f"{args.replicas} replicas: {r['statistics'] / r['wall']:>12,.0f} stats/s, "
            f"{r['statistics'] / max(r['cpu'], 1e-9):>12,.0f} stats per collector CPU-second "
            f"(CPU {100 * r['cpu'] / r['wall']:.0f}%), RSS {r['rss']:.0f} MB "
            f"(peak {r['peak']:.0f}), /metrics latency p50 {r['p50'] * 1e3:.0f} ms "
            f"p99 {r['p99'] * 1e3:.0f} ms (n={r['probes']})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=4, help="agent processes (= jobs)")
    parser.add_argument("--tasks", type=int, default=4, help="sessions per agent")
    parser.add_argument("--variables", type=int, default=1000)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--batch-steps", type=int, default=16)
    parser.add_argument("--window", type=int, default=4, help="unacked batches per session")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--probe-interval", type=float, default=0.1)
    parser.add_argument("--sweep", action="store_true",
                        help="scaling curve: tasks 1..64 at 1,000 variables, then "
                             "variables 100..10,000 at 4 tasks")
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs; collector is one process (one event loop)")
    if not args.sweep:
        print(describe(args, run(args)))
        return
    for tasks, variables in ((1, 1000), (4, 1000), (16, 1000), (64, 1000),
                             (4, 100), (4, 10_000)):
        point = argparse.Namespace(**{**vars(args), "agents": 1, "tasks": tasks,
                                      "variables": variables})
        print(describe(point, run(point)), flush=True)


if __name__ == "__main__":
    main()

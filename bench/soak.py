"""Load and soak: N concurrent agent streams for D seconds against one collector.

A real collector subprocess (`gradwatch.testing.CollectorProcess`) and simulated
agents speaking raw gRPC through the generated proto (``grpc.aio``). No
TensorFlow: 500 TensorFlow processes cannot run on a 2-core machine, and the
collector sees nothing of the agent but its messages, so each simulated agent
sends exactly what a real one sends — Register, then one ordered Report stream
of ReportBatch messages, acknowledged by sequence.

Each stream is one agent session with its own channel (own TCP connection):
stream ``i`` is task ``i % tasks_per_job`` of training job ``i // tasks_per_job``
(500 streams = 50 jobs x 10 tasks), ``--variables`` variables x 1 replica.
Every stream sends one batch of ``--steps-per-batch`` steps every ``--interval``
seconds (an agent flushing once a second at 10 steps/s), the streams' first
sends spread evenly over one interval; the last batch carries ``final``, as an
agent's ``close()`` does. Gradients are healthy (every variable present, finite,
steady norms), so the run measures the ingest path, not alerting. Messages are
pre-encoded protobuf bytes; only the sequence, step numbers and wall time
change, so the generator spends its CPU on gRPC.

Measured: the ack latency of every batch (just before ``write`` → its Ack read
by the generator; both processes share the machine's cores, so it includes
their scheduling), the collector's RSS (``VmRSS``, every second) and CPU time
(``/proc/PID/stat``), the generator's own CPU time and how late it sent
(``send lag``: if it grows, the generator, not the collector, is the
bottleneck). The collector is also scraped (full ``/metrics``) every
``--scrape-interval`` seconds, as Prometheus would.

Checked (`SoakResult.failures`): every batch sent was acknowledged with its
own sequence, no stream ended with an error, the collector's counters
(``gradwatch_collector_*``) equal what was sent and nothing was rejected or
counted duplicate, and every RSS sample after warm-up (default: the first
third of the run) lies within ±10 % of those samples' median.

    .venv/bin/python -m bench.soak [--streams 500 --duration 60 --interval 1 --variables 200]
    .venv/bin/python -m bench.soak --json soak.json    # also write the result (and timeline)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import select
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger("soak")

REPORT_METHOD = "/gradwatch.v1.GradientWatch/Report"
#: ``gradwatch_collector_*`` samples compared with what the generator sent.
COUNTERS = ("gradwatch_collector_registrations_total", "gradwatch_collector_batches_total",
            "gradwatch_collector_duplicate_batches_total",
            "gradwatch_collector_step_reports_total",
            "gradwatch_collector_variable_statistics_total",
            "gradwatch_collector_rejected_messages_total", "gradwatch_collector_sessions",
            "gradwatch_collector_training_jobs", "gradwatch_alerts_active")


@dataclass
class SoakResult:
    """What one soak run measured; `failures` lists every check that did not hold."""

    streams: int
    duration_s: float
    interval_s: float
    variables: int
    steps_per_batch: int
    tasks_per_job: int
    processes: int
    warmup_s: float
    batches_sent: int = 0
    batches_acked: int = 0
    acks_out_of_order: int = 0
    stream_errors: list[str] = field(default_factory=list)
    collector_counters: dict[str, float] = field(default_factory=dict)
    variable_statistics_per_s: float = 0.0
    ack_latency_ms: dict[str, float] = field(default_factory=dict)  # p50, p90, p99, max
    #: The same over the batches in flight during no scrape of /metrics.
    ack_latency_outside_scrapes_ms: dict[str, float] = field(default_factory=dict)
    acks_during_scrapes: int = 0
    send_lag_ms: dict[str, float] = field(default_factory=dict)  # p50, p99, max
    #: idle, start (sessions registered), min/median/max (after warm-up, under load),
    #: end (last sample under load), closed (after the streams ended), peak (VmHWM).
    rss_mb: dict[str, float] = field(default_factory=dict)
    rss_drift_pct: float = 0.0  # fitted change over the post-warm-up window / its median
    rss_max_deviation_pct: float = 0.0  # worst post-warm-up sample vs. the median
    collector_cpu_s: float = 0.0  # from the first send until every stream has ended
    collector_cpu_pct: float = 0.0
    #: Time the collector's event loop waited for a CPU while runnable, and the machine's
    #: 1-minute load average at the start and end: how much other work disturbed the run.
    collector_runqueue_wait_s: float = 0.0
    load_average: tuple[float, float] = (0.0, 0.0)
    generator_cpu_s: float = 0.0
    generator_cpu_pct: float = 0.0  # of one core, per generator process (mean)
    load_wall_s: float = 0.0
    scrapes: int = 0
    scrape_ms: dict[str, float] = field(default_factory=dict)  # median, max
    collector_warnings: list[str] = field(default_factory=list)  # its log's first 20
    #: Per second: collector RSS and CPU, p99/max ack latency of the batches sent in that
    #: second; and one entry per scrape (its duration).
    timeline: list[dict[str, float]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def lost_acks(self) -> int:
        return self.batches_sent - self.batches_acked

    def summary(self) -> str:
        """Human-readable report (the CLI prints it)."""
        lat, lag, rss = self.ack_latency_ms, self.send_lag_ms, self.rss_mb
        counters = self.collector_counters
        lines = [
            f"soak: {self.streams} streams ({-(-self.streams // self.tasks_per_job)} jobs x "
            f"{self.tasks_per_job} tasks) x {self.variables} variables x 1 replica, one batch of "
            f"{self.steps_per_batch} steps per {self.interval_s:g} s per stream, "
            f"{self.duration_s:g} s, {self.processes} generator process(es)",
            f"batches: sent {self.batches_sent:,}, acked {self.batches_acked:,}, lost "
            f"{self.lost_acks:,}, acks out of order {self.acks_out_of_order}, stream errors "
            f"{len(self.stream_errors)}",
            "collector counters: " + ", ".join(
                f"{name.removeprefix('gradwatch_collector_')} {value:,.0f}"
                for name, value in counters.items()),
            f"ingested: {self.variable_statistics_per_s:,.0f} variable-statistics/s "
            f"({self.batches_acked / max(self.load_wall_s, 1e-9):,.0f} batches/s)",
            f"ack latency: p50 {lat.get('p50', float('nan')):.1f} ms, p90 "
            f"{lat.get('p90', float('nan')):.1f} ms, p99 {lat.get('p99', float('nan')):.1f} ms, "
            f"max {lat.get('max', float('nan')):.1f} ms; without the {self.acks_during_scrapes:,} "
            f"batches in flight during a scrape: p99 "
            f"{self.ack_latency_outside_scrapes_ms.get('p99', float('nan')):.1f} ms, max "
            f"{self.ack_latency_outside_scrapes_ms.get('max', float('nan')):.1f} ms",
            f"collector RSS: idle {rss.get('idle', 0):.1f} MB, after registration "
            f"{rss.get('start', 0):.1f} MB, after warm-up ({self.warmup_s:.0f} s) min "
            f"{rss.get('min', 0):.1f} / median {rss.get('median', 0):.1f} / max "
            f"{rss.get('max', 0):.1f} MB (max deviation {self.rss_max_deviation_pct:+.1f} %, "
            f"drift {self.rss_drift_pct:+.1f} %), end of load {rss.get('end', 0):.1f} MB, "
            f"streams closed {rss.get('closed', 0):.1f} MB, peak {rss.get('peak', 0):.1f} MB",
            f"collector CPU: {self.collector_cpu_s:.1f} s in {self.load_wall_s:.1f} s "
            f"({self.collector_cpu_pct:.0f} % of one core); {self.scrapes} full scrapes of "
            f"/metrics, median {self.scrape_ms.get('median', 0):.0f} ms, max "
            f"{self.scrape_ms.get('max', 0):.0f} ms",
            f"machine: {os.cpu_count()} CPUs, load average {self.load_average[0]:.1f} at the "
            f"start, {self.load_average[1]:.1f} at the end; the collector's event loop waited "
            f"{self.collector_runqueue_wait_s:.1f} s for a CPU",
            f"generator: {self.generator_cpu_s:.1f} CPU s ({self.generator_cpu_pct:.0f} % of "
            f"one core per process), send lag p50 {lag.get('p50', 0):.1f} ms, p99 "
            f"{lag.get('p99', 0):.1f} ms, max {lag.get('max', 0):.1f} ms",
        ]
        if self.collector_warnings:
            lines.append(f"collector log: {len(self.collector_warnings)} warnings or errors, "
                         f"first: {self.collector_warnings[0]}")
        lines.append("result: OK" if self.ok else "result: FAILED\n  " + "\n  ".join(
            self.failures))
        return "\n".join(lines)


# --------------------------------------------------------------------------- wire encoding

def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


_VARINT, _FIXED64, _LENGTH_DELIMITED = 0, 1, 2  # protobuf wire types


def _tag(message: type, name: str, wire_type: int) -> bytes:
    """A field's key: its number from the generated descriptor, and its wire type."""
    from gradwatch.proto.layout import field_number

    return _varint(field_number(message, name) << 3 | wire_type)


def _length_delimited(tag: bytes, payload: bytes) -> bytes:
    return tag + _varint(len(payload)) + payload


def registration(job: str, task: int, variables: int):
    """The RegisterRequest of one simulated agent session (1 replica)."""
    from gradwatch.proto.v1 import gradwatch_pb2 as pb

    return pb.RegisterRequest(
        training_job=job, task_type="worker", task_index=task, num_replicas=1,
        optimizer="adam", strategy="MultiWorkerMirroredStrategy", hostname=f"{job}-{task}",
        pid=1000 + task, versions={"gradwatch": "soak"},
        variables=[pb.Variable(name=f"model/block_{i // 8}/layer_{i % 8}/kernel",
                               shape=[64, 64], dtype="float32") for i in range(variables)])


class BatchEncoder:
    """Builds serialized ReportBatch messages from pre-encoded parts.

    The packed statistics (one array per `gradwatch.proto.layout` statistic: healthy,
    steady values) are encoded once; per batch only the session id prefix, sequence,
    step numbers, wall time and ``final`` are written. Field numbers come from the
    generated descriptor. `check` verifies the result against the generated proto."""

    def __init__(self, variables: int, steps_per_batch: int, seed: int = 0) -> None:
        from gradwatch.proto.layout import STATISTICS, Kind
        from gradwatch.proto.v1 import gradwatch_pb2 as pb

        rng = np.random.default_rng(seed)
        values = {Kind.FLAG: np.ones(variables),
                  Kind.MAGNITUDE: np.exp(rng.normal(-3.0, 1.0, variables)),  # healthy norms
                  Kind.COUNT: np.zeros(variables)}
        self.steps_per_batch = steps_per_batch
        self.arrays = b"".join(
            _length_delimited(_tag(pb.StepReport, s.name, _LENGTH_DELIMITED),
                              values[s.kind].astype(s.wire_dtype).tobytes())
            for s in STATISTICS)
        self._session_id = _tag(pb.ReportBatch, "session_id", _LENGTH_DELIMITED)
        self._sequence = _tag(pb.ReportBatch, "sequence", _VARINT)
        self._steps = _tag(pb.ReportBatch, "steps", _LENGTH_DELIMITED)
        self._final = _tag(pb.ReportBatch, "final", _VARINT) + b"\x01"
        self._step = _tag(pb.StepReport, "step", _VARINT)
        self._wall_time = _tag(pb.StepReport, "wall_time", _FIXED64)

    def prefix(self, session_id: str) -> bytes:
        return _length_delimited(self._session_id, session_id.encode())

    def encode(self, prefix: bytes, sequence: int, first_step: int, wall_time: float,
               final: bool = False) -> bytes:
        parts = [prefix, self._sequence, _varint(sequence)]
        stamp = self._wall_time + struct.pack("<d", wall_time)
        for step in range(first_step, first_step + self.steps_per_batch):
            report = self._step + _varint(step) + stamp + self.arrays
            parts += (self._steps, _varint(len(report)), report)
        if final:
            parts.append(self._final)
        return b"".join(parts)

    def check(self) -> None:
        """Raises AssertionError unless `encode` agrees with the generated proto."""
        from gradwatch.proto.layout import COLUMNS
        from gradwatch.proto.v1 import gradwatch_pb2 as pb

        batch = pb.ReportBatch.FromString(self.encode(self.prefix("abc"), 300, 1_000_000,
                                                      1.5, final=True))
        assert (batch.session_id, batch.sequence, batch.final) == ("abc", 300, True), batch
        assert [s.step for s in batch.steps] == list(range(1_000_000, 1_000_000 +
                                                           self.steps_per_batch))
        assert all(s.wall_time == 1.5 and all(getattr(s, name) for name in COLUMNS)
                   for s in batch.steps)


# --------------------------------------------------------------------------- generator side

def _quantiles(values: list[float] | np.ndarray, scale: float = 1e3) -> dict[str, float]:
    if len(values) == 0:
        return {}
    array = np.asarray(values, np.float64) * scale
    p50, p90, p99 = np.percentile(array, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "max": float(array.max()),
            "n": int(array.size)}


class _Stream:
    """One simulated agent session: a channel, a Report call, its unacknowledged batches."""

    def __init__(self, index: int, job: str, task: int) -> None:
        self.index, self.job, self.task = index, job, task
        self.channel = None
        self.session_id = ""
        self.sent = 0
        self.acked = 0
        self.out_of_order = 0
        self.error = ""
        self.pending: deque[tuple[int, float]] = deque()  # (sequence, send time)


async def _generate(config: dict, ready) -> dict:
    """Runs this process' streams: registers, reports ``ready()``, waits for the start
    time, streams until the end, drains acks. Returns the process' results."""
    import grpc

    from gradwatch.proto.v1 import gradwatch_pb2 as pb
    from gradwatch.proto.v1 import gradwatch_pb2_grpc as pb_grpc

    loop = asyncio.get_running_loop()
    encoder = BatchEncoder(config["variables"], config["steps_per_batch"])
    encoder.check()
    tasks_per_job, total = config["tasks_per_job"], config["streams"]
    streams = [_Stream(i, f"soak-{i // tasks_per_job:03d}", i % tasks_per_job)
               for i in config["indices"]]
    registration_started = time.perf_counter()
    limit = asyncio.Semaphore(32)

    async def register(stream: _Stream) -> None:
        # Own connection per agent, as separate training processes have.
        stream.channel = grpc.aio.insecure_channel(
            config["target"], options=[("grpc.use_local_subchannel_pool", 1)])
        async with limit:
            response = await pb_grpc.GradientWatchStub(stream.channel).Register(
                registration(stream.job, stream.task, config["variables"]), timeout=60)
        stream.session_id = response.session_id
        if response.max_batch_steps < config["steps_per_batch"]:
            raise RuntimeError(f"collector accepts {response.max_batch_steps} steps per batch")

    await asyncio.gather(*(register(s) for s in streams))
    ready({"registered": len(streams),
           "registration_s": time.perf_counter() - registration_started})
    start_wall = await loop.run_in_executor(None, config["wait_for_start"])
    start = loop.time() + (start_wall - time.time())
    end = start + config["duration_s"]
    interval, steps = config["interval_s"], config["steps_per_batch"]
    latencies: list[float] = []
    sent_times: list[float] = []  # seconds after the start, parallel to latencies
    lags: list[float] = []
    cpu_before = os.times()

    async def read_acks(stream: _Stream, call) -> None:
        """Matches every Ack with the oldest unacknowledged batch, until the stream ends."""
        async for ack in call:
            now = loop.time()
            if not stream.pending:
                stream.out_of_order += 1
                continue
            sequence, sent_at = stream.pending.popleft()
            if ack.sequence != sequence or ack.session_id != stream.session_id:
                stream.out_of_order += 1
                continue
            stream.acked += 1
            latencies.append(now - sent_at)
            sent_times.append(sent_at - start)

    async def run(stream: _Stream) -> None:
        """Sends on schedule until the end, half-closes like an agent's ``close()``, and
        waits for the collector to acknowledge everything and end the stream with OK."""
        method = stream.channel.stream_stream(REPORT_METHOD, request_serializer=None,
                                              response_deserializer=pb.Ack.FromString)
        call = method()
        reader = asyncio.create_task(read_acks(stream, call))
        prefix = encoder.prefix(stream.session_id)
        due = start + interval * stream.index / total
        try:
            while due < end and not reader.done():
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                stream.sent += 1
                payload = encoder.encode(prefix, stream.sent, (stream.sent - 1) * steps,
                                         time.time(), final=due + interval >= end)
                sent_at = loop.time()
                lags.append(sent_at - due)
                stream.pending.append((stream.sent, sent_at))
                try:
                    await call.write(payload)
                except asyncio.InvalidStateError:  # the RPC ended: the reader has the status
                    stream.sent -= 1
                    stream.pending.pop()
                    break
                due += interval
            if not reader.done():
                await call.done_writing()
            await asyncio.wait_for(reader, config["drain_timeout_s"])
            code = await call.code()
            if code != grpc.StatusCode.OK:
                stream.error = f"{code.name}: {await call.details()}"
        except grpc.aio.AioRpcError as error:
            stream.error = f"{error.code().name}: {error.details()}"
        except (asyncio.TimeoutError, grpc.aio.UsageError) as error:
            stream.error = f"{type(error).__name__}: {error}".strip()
            call.cancel()
        finally:
            reader.cancel()
            await stream.channel.close()

    await asyncio.gather(*(run(s) for s in streams))
    cpu_after = os.times()
    return {
        "sent": sum(s.sent for s in streams), "acked": sum(s.acked for s in streams),
        "out_of_order": sum(s.out_of_order for s in streams),
        "errors": [f"stream {s.index} ({s.job}/{s.task}): {s.error}" for s in streams
                   if s.error],
        "latencies": latencies, "sent_times": sent_times, "lags": lags,
        "cpu_s": (cpu_after.user - cpu_before.user) + (cpu_after.system - cpu_before.system),
    }


def _worker_main(config_json: str) -> None:
    """Entry point of one generator process (``soak.py --worker CONFIG``): prints one
    ``ready`` JSON line on stdout, reads the start time (Unix seconds) from stdin,
    writes its results as JSON to ``config["result_path"]``."""
    config = json.loads(config_json)
    parent = os.getppid()

    def orphaned() -> None:  # the orchestrator died (killed test run): stop, don't linger
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(3)

    threading.Thread(target=orphaned, daemon=True).start()

    def ready(info: dict) -> None:
        print(json.dumps({"ready": info}), flush=True)

    config["wait_for_start"] = lambda: float(sys.stdin.readline())
    result = asyncio.run(_generate(config, ready))
    Path(config["result_path"]).write_text(json.dumps(result))


# --------------------------------------------------------------------------- orchestrator

def _runqueue_wait_s(pid: int) -> float:
    """Seconds the process' main thread (the collector's event loop) was runnable but
    waiting for a CPU (``/proc/PID/schedstat``): how much the machine's other work
    delayed it."""
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[1]) / 1e9


def _load_average() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def _scrape(url: str, timeout_s: float = 30.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return response.read().decode()


def _collector_counters(metrics_url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    query = "&".join(f"name[]={name}" for name in COUNTERS)
    counters = dict.fromkeys(COUNTERS, 0.0)
    for family in text_string_to_metric_families(_scrape(f"{metrics_url}?{query}")):
        for sample in family.samples:
            if sample.name in counters:  # labelled ones (rejected, alerts) are summed
                counters[sample.name] += sample.value
    return counters


def _read_ready(process: subprocess.Popen, deadline: float) -> dict:
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or process.poll() is not None:
            raise RuntimeError(f"generator process {process.pid} did not get ready "
                               f"(exit code {process.poll()})")
        readable, _, _ = select.select([process.stdout], [], [], remaining)
        if readable:
            line = process.stdout.readline()
            if not line:
                continue
            message = json.loads(line)
            if "ready" in message:
                return message["ready"]


def run_soak(streams: int = 500, duration_s: float = 60.0, interval_s: float = 1.0,
             variables: int = 200, steps_per_batch: int = 10, tasks_per_job: int = 10,
             processes: int = 1, warmup_s: float | None = None, scrape_interval_s: float = 15.0,
             rss_tolerance: float = 0.10, drain_timeout_s: float = 30.0,
             collector_args: tuple[str, ...] = ()) -> SoakResult:
    """Runs one soak against a fresh collector process and returns what it measured.

    Blocks for about ``duration_s`` plus setup (registration) and drain; every process
    it started (collector, generators) is stopped before it returns or raises. The
    warm-up (default ``duration_s / 3``) is excluded from the RSS check."""
    from tests.support.procfs import process_cpu_seconds, process_memory_mb
    from tests.support.services import CollectorProcess

    warmup_s = duration_s / 3 if warmup_s is None else warmup_s
    result = SoakResult(streams=streams, duration_s=duration_s, interval_s=interval_s,
                        variables=variables, steps_per_batch=steps_per_batch,
                        tasks_per_job=tasks_per_job, processes=processes, warmup_s=warmup_s)
    workers: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="gradwatch-soak-") as tmp, \
            CollectorProcess(*collector_args) as collector:
        pid = collector.process.pid
        idle = process_memory_mb(pid)["VmRSS"]
        try:
            for p in range(processes):
                config = {
                    "target": collector.grpc_target, "indices": list(range(p, streams, processes)),
                    "streams": streams, "tasks_per_job": tasks_per_job, "variables": variables,
                    "steps_per_batch": steps_per_batch, "interval_s": interval_s,
                    "duration_s": duration_s, "drain_timeout_s": drain_timeout_s,
                    "result_path": str(Path(tmp) / f"worker-{p}.json"),
                }
                workers.append(subprocess.Popen(
                    [sys.executable, __file__, "--worker", json.dumps(config)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
            deadline = time.monotonic() + 60 + streams * 0.05
            for worker in workers:
                info = _read_ready(worker, deadline)
                log.info("generator %d: %d sessions registered in %.1f s", worker.pid,
                         info["registered"], info["registration_s"])
            start_rss = process_memory_mb(pid)["VmRSS"]
            start_at = time.time() + 1.0
            for worker in workers:
                worker.stdin.write(f"{start_at}\n")
                worker.stdin.flush()
            while time.time() < start_at:
                time.sleep(0.005)
            cpu_start, wall_start = process_cpu_seconds(pid), time.perf_counter()
            wait_start, load_start = _runqueue_wait_s(pid), _load_average()
            next_sample, next_scrape = wall_start, wall_start + scrape_interval_s
            scrapes: list[tuple[float, float]] = []  # (begin, end) seconds after the start
            give_up = wall_start + duration_s + drain_timeout_s + 30
            while any(w.poll() is None for w in workers):
                now = time.perf_counter()
                if now > give_up:
                    raise RuntimeError("generator processes did not finish in time")
                if collector.process.poll() is not None:  # its streams fail; they finish
                    time.sleep(0.1)
                    continue
                if now >= next_sample:
                    result.timeline.append({"t": round(now - wall_start, 3),
                                            "rss_mb": process_memory_mb(pid)["VmRSS"],
                                            "cpu_s": process_cpu_seconds(pid) - cpu_start})
                    next_sample += 1.0
                if now >= next_scrape and now - wall_start < duration_s:
                    began = time.perf_counter()
                    _scrape(collector.metrics_url)
                    scrapes.append((began - wall_start, time.perf_counter() - wall_start))
                    next_scrape += scrape_interval_s
                time.sleep(0.02)
            result.load_wall_s = time.perf_counter() - wall_start
            result.load_average = (load_start, _load_average())
            result.collector_warnings = [
                line for line in collector.log().splitlines()
                if any(word in line for word in (" WARNING ", " ERROR ", " CRITICAL ",
                                                 "Traceback"))][:20]
            if collector.process.poll() is None:
                result.collector_cpu_s = process_cpu_seconds(pid) - cpu_start
                result.collector_runqueue_wait_s = _runqueue_wait_s(pid) - wait_start
                memory = process_memory_mb(pid)
                result.collector_counters = _collector_counters(collector.metrics_url)
            else:
                memory = {"VmRSS": float("nan"), "VmHWM": float("nan")}
                result.failures.append(f"collector exited with {collector.process.returncode} "
                                       "during the load")
        finally:
            for worker in workers:
                if worker.poll() is None:
                    worker.kill()
                worker.wait()
                worker.stdin.close()
                worker.stdout.close()
        latencies, sent_times, lags = [], [], []
        for p, worker in enumerate(workers):
            if worker.returncode != 0:
                result.failures.append(f"generator process {p} exited with "
                                       f"{worker.returncode}")
                continue
            part = json.loads((Path(tmp) / f"worker-{p}.json").read_text())
            result.batches_sent += part["sent"]
            result.batches_acked += part["acked"]
            result.acks_out_of_order += part["out_of_order"]
            result.stream_errors += part["errors"]
            result.generator_cpu_s += part["cpu_s"]
            latencies += part["latencies"]
            sent_times += part["sent_times"]
            lags += part["lags"]
    result.ack_latency_ms = _quantiles(latencies)
    # The scrape renders /metrics on the collector's event loop, so acks wait meanwhile:
    # the latency of the batches whose send → ack interval overlaps no scrape, separately.
    sent, waited = np.asarray(sent_times), np.asarray(latencies)
    during = np.zeros(sent.size, bool)
    for begin, end in scrapes:
        during |= (sent < end) & (sent + waited > begin)
    result.acks_during_scrapes = int(during.sum())
    second = np.floor(sent).astype(np.int64)
    for sample in result.timeline:  # the latency of the batches sent in each second
        mask = second == int(sample["t"])
        if mask.any():
            sample["ack_p99_ms"] = round(1e3 * float(np.percentile(waited[mask], 99)), 2)
            sample["ack_max_ms"] = round(1e3 * float(waited[mask].max()), 2)
    for begin, end in scrapes:
        result.timeline.append({"t": round(begin, 3), "scrape_ms": round(1e3 * (end - begin))})
    result.timeline.sort(key=lambda sample: sample["t"])
    result.ack_latency_outside_scrapes_ms = _quantiles(waited[~during])
    result.send_lag_ms = _quantiles(lags)
    result.collector_cpu_pct = 100 * result.collector_cpu_s / max(result.load_wall_s, 1e-9)
    result.generator_cpu_pct = 100 * result.generator_cpu_s / max(
        result.load_wall_s * processes, 1e-9)
    result.scrapes = len(scrapes)
    if scrapes:
        scrape_times = [end - begin for begin, end in scrapes]
        result.scrape_ms = {"median": 1e3 * float(np.median(scrape_times)),
                            "max": 1e3 * max(scrape_times)}
    statistics = result.collector_counters.get("gradwatch_collector_variable_statistics_total",
                                               0.0)
    result.variable_statistics_per_s = statistics / max(result.load_wall_s, 1e-9)
    _check(result, idle, start_rss, memory, rss_tolerance)
    return result


def _check(result: SoakResult, idle_mb: float, start_mb: float, memory: dict[str, float],
           tolerance: float) -> None:
    """Fills the RSS figures and `SoakResult.failures`."""
    fail = result.failures.append
    if result.lost_acks:
        fail(f"{result.lost_acks} of {result.batches_sent} batches were not acknowledged")
    if result.acks_out_of_order:
        fail(f"{result.acks_out_of_order} acks did not match the oldest unacknowledged batch")
    if result.stream_errors:
        fail(f"{len(result.stream_errors)} streams ended with an error, first: "
             f"{result.stream_errors[0]}")
    c = result.collector_counters
    statistics = result.batches_sent * result.steps_per_batch * result.variables
    expected = {
        "gradwatch_collector_registrations_total": result.streams,
        "gradwatch_collector_batches_total": result.batches_sent,
        "gradwatch_collector_duplicate_batches_total": 0,
        "gradwatch_collector_step_reports_total": result.batches_sent * result.steps_per_batch,
        "gradwatch_collector_variable_statistics_total": statistics,
        "gradwatch_collector_rejected_messages_total": 0,
        "gradwatch_collector_sessions": result.streams,
    }
    for name, value in expected.items() if c else ():  # none: the collector died
        if c.get(name) != value:
            fail(f"{name} is {c.get(name)}, expected {value}")
    # The load runs from t = 0 to duration_s; afterwards the streams close and their
    # connections' memory is freed, which is not what "flat under load" asks about.
    samples = [s for s in result.timeline
               if "rss_mb" in s and result.warmup_s <= s["t"] <= result.duration_s]
    rss = np.array([s["rss_mb"] for s in samples])
    result.rss_mb = {"idle": idle_mb, "start": start_mb, "closed": memory["VmRSS"],
                     "peak": memory["VmHWM"]}
    if rss.size < 3:
        fail(f"only {rss.size} RSS samples after the warm-up of {result.warmup_s:.1f} s")
        return
    median = float(np.median(rss))
    result.rss_mb.update(min=float(rss.min()), median=median, max=float(rss.max()),
                         end=float(rss[-1]))
    deviation = (rss - median) / median
    result.rss_max_deviation_pct = 100 * float(deviation[np.abs(deviation).argmax()])
    t = np.array([s["t"] for s in samples])
    slope = np.polyfit(t, rss, 1)[0]
    result.rss_drift_pct = 100 * float(slope * (t[-1] - t[0])) / median
    if np.abs(deviation).max() > tolerance:
        fail(f"collector RSS after warm-up left ±{100 * tolerance:g} % of its median "
             f"{median:.1f} MB: min {rss.min():.1f}, max {rss.max():.1f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=500, help="concurrent agent sessions")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--interval", type=float, default=1.0,
                        help="seconds between one stream's batches")
    parser.add_argument("--variables", type=int, default=200, help="variables per session")
    parser.add_argument("--steps-per-batch", type=int, default=10)
    parser.add_argument("--tasks-per-job", type=int, default=10)
    parser.add_argument("--processes", type=int, default=1, help="generator processes")
    parser.add_argument("--warmup", type=float, default=None,
                        help="seconds excluded from the RSS check (default: a third)")
    parser.add_argument("--scrape-interval", type=float, default=15.0,
                        help="seconds between full scrapes of /metrics during the load")
    parser.add_argument("--json", type=Path, help="write the result (with timeline) here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker_main(args.worker)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    result = run_soak(streams=args.streams, duration_s=args.duration,
                      interval_s=args.interval, variables=args.variables,
                      steps_per_batch=args.steps_per_batch, tasks_per_job=args.tasks_per_job,
                      processes=args.processes, warmup_s=args.warmup,
                      scrape_interval_s=args.scrape_interval)
    print(result.summary())
    if args.json:
        args.json.write_text(json.dumps({**asdict(result), "ok": result.ok,
                                         "lost_acks": result.lost_acks}, indent=1))
    sys.exit(0 if result.ok else 1)


if __name__ == "__main__":
    main()

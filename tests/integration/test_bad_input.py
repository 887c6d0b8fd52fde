"""Property-based, over real gRPC: 5,000 generated registrations and report batches, valid,
edge and malformed, hit one collector process on loopback while a healthy agent streams on
its own connection. Every message is acked or refused with a precise status; the healthy
client gets an ack for every batch; the collector's memory stays flat and it keeps serving.

The collector runs with small limits (below), so that the generated messages reach every
limit: jobs, sessions, sessions and variables per job, message size.
"""

from __future__ import annotations

import collections
import json
import queue
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradwatch.collector.ingest import Reason
from gradwatch.proto.v1 import gradwatch_pb2 as pb
from gradwatch.proto.v1 import gradwatch_pb2_grpc as pb_grpc
from tests.support import wire
from tests.support.metrics import parse_metrics
from tests.support.procfs import process_memory_mb
from tests.support.services import CollectorProcess

pytestmark = pytest.mark.integration

MESSAGES = 5_000
LIMITS = {"max_message_bytes": 16_384, "max_variables": 6, "max_sessions": 32, "max_jobs": 8,
          "max_sessions_per_job": 6, "max_variables_per_job": 8, "max_label_length": 32,
          "max_versions": 4, "max_batch_steps": 8, "max_text_length": 64}
#: What a refusal may be; anything else (UNKNOWN, INTERNAL, UNAVAILABLE...) is a bug.
REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS}
TRANSPORT_LIMIT = "Received message larger than max"  # gRPC's own, before the service
HEALTHY_JOB = "healthy-job-0"  # longer than any generated text, so never generated

_texts = st.one_of(st.sampled_from(wire.TEXTS), st.text(max_size=10))


def _mostly(valid: st.SearchStrategy, other: st.SearchStrategy) -> st.SearchStrategy:
    """``valid`` about nine times in ten (``one_of`` favours its last branches), so that
    enough registrations pass to feed the batches."""
    return st.integers(0, 99).flatmap(lambda n: other if n < 10 else valid)


_extra_names = [f"extra/{i}" for i in range(8)]
_variables = st.builds(
    pb.Variable, name=_mostly(st.sampled_from(wire.VARIABLE_NAMES + _extra_names), _texts),
    shape=st.lists(st.integers(-1, 2**40), max_size=3), dtype=st.just("float32"))
_standard_table = [pb.Variable(name=n, shape=[2], dtype="float32") for n in wire.VARIABLE_NAMES]
registrations = st.builds(
    pb.RegisterRequest,
    training_job=_mostly(st.sampled_from([f"fuzz-{i}" for i in range(12)]), _texts),
    task_type=_mostly(st.just("worker"), _texts),
    task_index=st.integers(0, 40),
    num_replicas=_mostly(st.just(wire.REPLICAS), st.integers(0, 5000)),
    strategy=_mostly(st.just("MirroredStrategy"), _texts),
    optimizer=_mostly(st.sampled_from(["adam", "sgd"]), _texts),
    versions=_mostly(st.just({"gradwatch": "0.1.0"}),
                     st.dictionaries(_texts, _texts, max_size=6)),
    variables=st.one_of(*[st.just(_standard_table)] * 3, st.lists(_variables, max_size=8)),
    hostname=_mostly(st.sampled_from(["host-a", "host-b", ""]), _texts),
    pid=st.integers(0, 3), loss_scaled=st.booleans(),
)
#: A batch's session: one the fuzzer registered (by index), or an id nobody registered.
_targets = _mostly(st.integers(0, 2**16),
                   st.sampled_from(["", "0" * 32, "not-a-session", "z" * 5000]))
messages = st.one_of(registrations, st.tuples(_targets, wire.batches),
                     st.tuples(_targets, wire.batches))


def rss_bytes(pid: int) -> int:
    return int(process_memory_mb(pid)["VmRSS"] * 1024 * 1024)


class HealthyAgent:
    """A well-behaved agent on its own channel: one batch every ``interval_s``, each
    waiting for its ack (at most 5 s)."""

    def __init__(self, target: str, interval_s: float = 0.01) -> None:
        self.interval_s = interval_s
        self._channel = grpc.insecure_channel(target)
        stub = pb_grpc.GradientWatchStub(self._channel)
        request = wire.registration(job=HEALTHY_JOB, num_variables=wire.VARIABLES,
                                    num_replicas=wire.REPLICAS)
        self.session = stub.Register(request, timeout=5).session_id
        self._requests: queue.Queue = queue.Queue()
        self._acks = stub.Report(iter(self._requests.get, None))
        self.sent = self.acked = 0
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        present = np.ones((wire.REPLICAS, wire.VARIABLES))
        try:
            while not self._stop.is_set():
                self.sent += 1
                batch = wire.batch(self.session, self.sent,
                                   wire.step(self.sent, present, norm=present * 0.5))
                started = time.monotonic()
                self._requests.put(batch)
                ack = next(self._acks)
                self.latencies.append(time.monotonic() - started)
                if ack.sequence != self.sent:
                    self.errors.append(f"ack {ack.sequence} for batch {self.sent}")
                self.acked += 1
                self._stop.wait(self.interval_s)
        except (grpc.RpcError, StopIteration) as error:
            self.errors.append(repr(error))

    def __enter__(self) -> HealthyAgent:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self._requests.put(None)
        self._channel.close()


class Fuzzer:
    """Sends each generated message on its own call (a refused batch ends its stream)
    and records the outcome. Nine batches in ten to a registered session get its next
    sequence number, so they are validated rather than dropped as duplicates."""

    def __init__(self, target: str) -> None:
        # The client must not refuse to send what is too large: the collector has to.
        self.channel = grpc.insecure_channel(target, options=[
            ("grpc.max_send_message_length", -1)])
        self.stub = pb_grpc.GradientWatchStub(self.channel)
        self.sessions: collections.deque[str] = collections.deque(maxlen=64)
        self.next_sequence: collections.Counter[str] = collections.Counter()
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.unexpected: list[str] = []

    def send(self, message) -> None:
        try:
            if isinstance(message, pb.RegisterRequest):
                self.sessions.append(self.stub.Register(message, timeout=10).session_id)
                self.outcomes["registered"] += 1
            else:
                target, batch = message
                batch.session_id = (self.sessions[target % len(self.sessions)]
                                    if isinstance(target, int) and self.sessions else str(target))
                if batch.session_id in self.sessions and batch.sequence % 10:
                    self.next_sequence[batch.session_id] += 1
                    batch.sequence = self.next_sequence[batch.session_id]
                acks = list(self.stub.Report(iter([batch]), timeout=10))
                assert len(acks) == 1 and acks[0].session_id == batch.session_id
                self.outcomes["acked"] += 1
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND and message[1].session_id in self.sessions:
                self.sessions.remove(message[1].session_id)  # replaced by a registration
            transport = TRANSPORT_LIMIT in (error.details() or "")
            self.outcomes["transport: " + error.code().name if transport
                          else error.code().name] += 1
            if error.code() not in REFUSALS or not error.details():
                self.unexpected.append(f"{error.code().name}: {error.details()}")


def rejected_by_reason(text: str) -> dict[tuple[str, str], float]:
    return {(labels["code"], labels["reason"]): value for labels, value in
            parse_metrics(text).get("gradwatch_collector_rejected_messages_total", [])}


def test_generated_bad_input_never_disturbs_a_healthy_agent(tmp_path):
    config = tmp_path / "collector.yaml"
    config.write_text(json.dumps({"limits": LIMITS}))
    with CollectorProcess("--config", str(config)) as collector, \
            HealthyAgent(collector.grpc_target) as healthy:
        pid = collector.process.pid
        fuzzer = Fuzzer(collector.grpc_target)
        rss = {"0%": rss_bytes(pid)}
        started = time.monotonic()

        @settings(max_examples=MESSAGES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(messages)
        def send(message) -> None:
            fuzzer.send(message)
            sent = sum(fuzzer.outcomes.values())
            if sent % (MESSAGES // 4) == 0 and sent <= MESSAGES:
                rss[f"{100 * sent // MESSAGES}%"] = rss_bytes(pid)

        send()
        elapsed = time.monotonic() - started
        time.sleep(0.1)  # the healthy agent's last ack

        sent = sum(fuzzer.outcomes.values())
        summary = {"messages": sent, "seconds": round(elapsed, 1),
                   "outcomes": dict(fuzzer.outcomes),
                   "rss_mib": {k: round(v / 2**20, 1) for k, v in rss.items()},
                   "healthy": {"batches": healthy.sent, "acked": healthy.acked,
                               "max_ack_ms": round(1000 * max(healthy.latencies), 1),
                               "p99_ack_ms": round(1000 * float(np.percentile(
                                   healthy.latencies, 99)), 1)}}
        text = collector.scrape()
        summary["rejected"] = {f"{c}/{r}": v for (c, r), v in rejected_by_reason(text).items()}
        print("bad input:", json.dumps(summary))

        assert sent >= MESSAGES, summary
        assert not fuzzer.unexpected, fuzzer.unexpected[:5]
        assert fuzzer.outcomes["acked"] > 100 and fuzzer.outcomes["registered"] > 50, summary
        # The healthy agent: every batch acked, in order, on the same stream.
        assert not healthy.errors, healthy.errors[:5]
        assert healthy.acked >= healthy.sent - 1 and healthy.acked > 100, summary["healthy"]
        # Every refusal the service made is counted, by code and a known reason.
        counted = rejected_by_reason(text)
        assert {reason for _, reason in counted} <= {r.value for r in Reason}
        refused = sum(n for outcome, n in fuzzer.outcomes.items() if outcome in {
            c.name for c in REFUSALS})
        assert sum(counted.values()) == refused, (counted, fuzzer.outcomes)
        # Limits hold, memory is flat over the second half, and the collector still serves.
        samples = parse_metrics(text)
        assert samples["gradwatch_collector_sessions"][0][1] <= LIMITS["max_sessions"]
        assert samples["gradwatch_collector_training_jobs"][0][1] <= LIMITS["max_jobs"]
        # (gRPC's native allocations grow by about 1 MiB per 1,000 calls over the first
        # ~12,000 calls of a process, then stay flat; Python's heap does not grow.)
        assert rss["100%"] - rss["0%"] < 32 * 2**20, summary["rss_mib"]
        health = health_pb2_grpc.HealthStub(fuzzer.channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        fuzzer.channel.close()
        assert "Traceback" not in collector.log()

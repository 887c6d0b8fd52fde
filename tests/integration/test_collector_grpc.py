"""The collector's gRPC surface, driven by hand-built messages (no TensorFlow)."""

from __future__ import annotations

import queue
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gradwatch.proto.v1 import gradwatch_pb2 as pb
from gradwatch.proto.v1 import gradwatch_pb2_grpc as pb_grpc
from tests.support import wire
from tests.support.faults import TcpProxy
from tests.support.metrics import parse_metrics, select
from tests.support.services import CollectorProcess

pytestmark = pytest.mark.integration


@pytest.fixture
def channel(collector):
    with grpc.insecure_channel(collector.grpc_target) as channel:
        yield channel


@pytest.fixture
def stub(channel):
    return pb_grpc.GradientWatchStub(channel)


class Stream:
    """A Report stream whose requests are fed from the test, acks read with a timeout."""

    def __init__(self, stub) -> None:
        self._requests: queue.Queue = queue.Queue()
        self._acks: queue.Queue = queue.Queue()
        self.error: grpc.RpcError | None = None
        self._call = stub.Report(iter(self._requests.get, None), timeout=30)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for ack in self._call:
                self._acks.put(ack)
        except grpc.RpcError as error:
            self.error = error
        self._acks.put(None)

    def send(self, batch):
        self._requests.put(batch)
        return self._acks.get(timeout=10)

    def close(self) -> None:
        self._requests.put(None)

    def finish(self) -> None:
        """Closes the stream and waits until the collector has ended it."""
        self.close()
        while self._acks.get(timeout=10) is not None:
            pass


def test_health_service_reports_serving(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "gradwatch.v1.GradientWatch"):
        response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_http_health_endpoint(collector):
    import urllib.request

    url = collector.metrics_url.replace("/metrics", "/healthz")
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200 and response.read() == b"ok\n"


def test_register_returns_a_session_and_batch_limit(stub):
    response = stub.Register(wire.registration(job="reg"), timeout=5)
    assert len(response.session_id) == 32 and response.max_batch_steps >= 1
    assert response.max_cause == max(pb.Diagnosis.Cause.values())  # every cause it knows


def test_invalid_registration_gets_a_precise_status(stub):
    request = wire.registration(job="")
    with pytest.raises(grpc.RpcError) as raised:
        stub.Register(request, timeout=5)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details() == "training_job must not be empty"


def test_duplicate_batches_are_acked_and_applied_once(stub, collector):
    session = stub.Register(wire.registration(job="dedupe"), timeout=5).session_id
    stream = Stream(stub)
    first = wire.batch(session, 1, wire.step(0, [1, 1, 1]), wire.step(1, [1, 1, 1]))
    assert stream.send(first).sequence == 1
    assert stream.send(first).sequence == 1  # replayed after a reconnect, say
    assert stream.send(wire.batch(session, 2, wire.step(2, [1, 1, 1]))).sequence == 2
    stream.close()
    samples = parse_metrics(collector.scrape())
    assert list(select(samples, "gradwatch_steps_total", training_job="dedupe").values()) == [3]
    assert select(samples, "gradwatch_collector_duplicate_batches_total")


def test_a_step_counter_set_back_is_applied_when_marked_rewound(stub, collector):
    """A checkpoint restored into the running optimizer: steps 4-7, then 4-7 again. Not
    marked, the second batch is refused, naming the step; marked, it is applied."""
    session = stub.Register(wire.registration(job="restored"), timeout=5).session_id

    def steps(rewound: bool) -> list:
        reports = [wire.step(n, [1, 1, 1]) for n in range(4, 8)]
        reports[0].rewound = rewound
        return reports

    stream = Stream(stub)
    assert stream.send(wire.batch(session, 1, *steps(False))).sequence == 1
    assert stream.send(wire.batch(session, 2, *steps(False))) is None
    assert stream.error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "steps[0].step is 4, lower than the step before it (7)" in stream.error.details()

    stream = Stream(stub)
    assert stream.send(wire.batch(session, 2, *steps(True))).sequence == 2
    stream.close()
    samples = parse_metrics(collector.scrape())
    assert list(select(samples, "gradwatch_steps_total", training_job="restored").values()) == [8]
    assert list(select(samples, "gradwatch_last_step", training_job="restored").values()) == [7]
    assert select(samples, "gradwatch_collector_rejected_messages_total",
                  code="INVALID_ARGUMENT", reason="step_order")


def test_malformed_batch_is_rejected_and_others_keep_being_served(stub, collector):
    bad_session = stub.Register(wire.registration(job="bad"), timeout=5).session_id
    good_session = stub.Register(wire.registration(job="good"), timeout=5).session_id
    good, bad = Stream(stub), Stream(stub)
    assert good.send(wire.batch(good_session, 1, wire.step(0, [1, 1, 1]))).sequence == 1

    assert bad.send(wire.batch(bad_session, 1, wire.step(0, [1, 1]))) is None  # stream ends
    assert bad.error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "steps[0].present has 2 bytes; expected 3" in bad.error.details()

    assert good.send(wire.batch(good_session, 2, wire.step(1, [1, 1, 1]))).sequence == 2
    good.close()
    samples = parse_metrics(collector.scrape())
    assert select(samples, "gradwatch_collector_rejected_messages_total",
                  code="INVALID_ARGUMENT", reason="array_length")
    assert select(samples, "gradwatch_steps_total", training_job="bad") == {
        "optimizer=sgd,task_index=0,task_type=worker,training_job=bad": 0.0}


def test_diagnoses_reach_metrics_and_a_bad_one_is_rejected_whole(stub, collector):
    session = stub.Register(wire.registration(job="diagnosed"), timeout=5).session_id
    stream = Stream(stub)
    batch = wire.batch(session, 1, wire.step(0, [1, 0, 1]))
    batch.diagnoses.append(wire.diagnosis(1))
    assert stream.send(batch).sequence == 1
    bad = wire.batch(session, 2, wire.step(1, [1, 0, 0]))
    bad.diagnoses.extend([wire.diagnosis(2, "UNUSED"), wire.diagnosis(7)])
    assert stream.send(bad) is None
    assert stream.error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "diagnoses[1].variable_id is 7" in stream.error.details()
    info = parse_metrics(collector.scrape())["gradwatch_gradient_missing_cause_info"]
    assert [(labels["variable"], labels["op_type"], labels["source"]) for labels, _ in info
            if labels["training_job"] == "diagnosed"] == [
        ("dense/v1", "Floor", "/app/train.py:42")]  # nothing of the rejected batch


def test_a_task_streaming_from_another_process_cannot_be_taken_over(stub, collector):
    def registration(hostname: str, pid: int):
        request = wire.registration(job="taken")
        request.hostname, request.pid = hostname, pid
        return request

    session = stub.Register(registration("host-a", 11), timeout=5).session_id
    stream = Stream(stub)
    assert stream.send(wire.batch(session, 1, wire.step(0, [1, 1, 1]))).sequence == 1
    with pytest.raises(grpc.RpcError) as raised:
        stub.Register(registration("host-b", 22), timeout=5)
    assert raised.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert raised.value.details() == ("task worker/0 of job 'taken' (optimizer 'sgd') is "
                                      "already reporting from host-a:11")
    # The same process may register again (it reconnected) ...
    session = stub.Register(registration("host-a", 11), timeout=5).session_id
    assert stream.send(wire.batch(session, 1, wire.step(1, [1, 1, 1]))).sequence == 1
    # ... and another one once no stream of the task is open (host-a crashed).
    stream.finish()
    stub.Register(registration("host-b", 22), timeout=5)
    samples = parse_metrics(collector.scrape())
    assert select(samples, "gradwatch_collector_rejected_messages_total",
                  code="ALREADY_EXISTS", reason="already_reporting")


def test_unknown_session_is_not_found(stub):
    stream = Stream(stub)
    assert stream.send(wire.batch("no-such-session", 1, wire.step(0, [1, 1, 1]))) is None
    assert stream.error.code() == grpc.StatusCode.NOT_FOUND
    assert "register again" in stream.error.details()


def test_collector_exits_cleanly_on_sigterm():
    from tests.support.services import CollectorProcess

    with CollectorProcess() as process:
        assert process.stop() == 0
        assert "shutting down" in process.log()



def test_the_stream_of_a_vanished_host_ends_on_keepalive_and_an_idle_one_stays(tmp_path):
    """An agent's host vanishes (no FIN, nothing gets through): the collector's keepalive
    ping goes unanswered, the connection is closed, and the session, now without an open
    stream, expires. An agent that is merely idle answers the pings and keeps its session.
    Without keepalive the vanished stream would stay open, and its session, for ever."""
    config = tmp_path / "collector.yaml"
    config.write_text("grpc_keepalive_seconds: 0.5\ngrpc_keepalive_timeout_seconds: 1\n"
                      "closed_retention_seconds: 1\n")

    def jobs_in(collector) -> set[str]:
        samples = parse_metrics(collector.scrape())
        return {labels.split("training_job=")[1] for labels in
                select(samples, "gradwatch_steps_total")}

    with CollectorProcess("--config", str(config)) as collector, \
            TcpProxy(collector.grpc_target) as network, \
            grpc.insecure_channel(network.address) as far, \
            grpc.insecure_channel(collector.grpc_target) as near:
        streams = []
        for job, channel in (("vanished", far), ("idle", near)):
            stub = pb_grpc.GradientWatchStub(channel)
            session = stub.Register(wire.registration(job=job), timeout=5).session_id
            streams.append(Stream(stub))
            assert streams[-1].send(wire.batch(session, 1, wire.step(0, [1, 1, 1]))).sequence == 1
        network.blackhole()
        vanished_at = time.monotonic()
        while "vanished" in jobs_in(collector):
            assert time.monotonic() - vanished_at < 15, "the vanished session stayed"
            time.sleep(0.1)
        gone_s = time.monotonic() - vanished_at
        time.sleep(3)
        assert jobs_in(collector) == {"idle"}, "the idle agent answered the pings"
        assert streams[1].error is None
        for stream in streams:
            stream.close()
    print(f"vanished host's session gone {gone_s:.1f} s after it vanished")

"""Graceful shutdown: SIGTERM drains report streams and flushes alert sinks."""

from __future__ import annotations

import asyncio
import json
import queue
import signal
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gradwatch.collector.config import CollectorConfig
from gradwatch.collector.server import Collector
from gradwatch.proto.v1 import gradwatch_pb2_grpc as pb_grpc
from tests.support import wire
from tests.support.services import CollectorProcess, WebhookReceiver

pytestmark = pytest.mark.integration

GRACE_S = 5.0  # Collector.stop's default, what SIGTERM gets


class ReportStream:
    """A Report stream fed from the test; acks and the final status read by a thread."""

    def __init__(self, stub: pb_grpc.GradientWatchStub) -> None:
        self._requests: queue.Queue = queue.Queue()
        self._call = stub.Report(iter(self._requests.get, None), timeout=60)
        self.acks: list[int] = []
        self.error: grpc.RpcError | None = None
        self.ended = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for ack in self._call:
                self.acks.append(ack.sequence)
        except grpc.RpcError as error:
            self.error = error
        self.ended.set()

    def send(self, batch) -> None:
        self._requests.put(batch)

    def wait_for_ack(self, sequence: int, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while sequence not in self.acks:
            assert time.monotonic() < deadline and not self.ended.is_set(), self.error
            time.sleep(0.005)

    def status(self) -> grpc.StatusCode:
        return self._call.code()

    def close(self) -> None:
        self._requests.put(None)


def test_sigterm_acks_what_agents_sent_ends_streams_with_ok_and_delivers_the_last_alert(
        tmp_path):
    config = tmp_path / "collector.yaml"
    # After a job's first batch its rules wait for a timer this slow, so the NaN reported
    # just before SIGTERM is decided by the shutdown's last rule pass or not at all.
    config.write_text(json.dumps({"batch_evaluation_interval_seconds": 60,
                                  "evaluation_interval_seconds": 60}))
    with WebhookReceiver() as webhook, CollectorProcess(
            "--config", str(config), "--webhook-url", webhook.url) as collector:
        stub = pb_grpc.GradientWatchStub(grpc.insecure_channel(collector.grpc_target))
        # One agent streams without waiting for acks, one batch every 5 ms, until its
        # stream ends ...
        busy_session = stub.Register(wire.registration(job="busy"), timeout=5).session_id
        busy = ReportStream(stub)
        sent = [0]

        def stream_until_ended() -> None:
            while not busy.ended.is_set():
                sent[0] += 1
                busy.send(wire.batch(busy_session, sent[0], wire.step(sent[0], [1, 1, 1])))
                time.sleep(0.005)

        feeder = threading.Thread(target=stream_until_ended, daemon=True)
        feeder.start()
        # ... and one reports a NaN gradient right before SIGTERM.
        nan_session = stub.Register(wire.registration(job="nan-at-sigterm"),
                                    timeout=5).session_id
        quiet = ReportStream(stub)
        quiet.send(wire.batch(nan_session, 1, wire.step(0, [1, 1, 1])))
        quiet.send(wire.batch(nan_session, 2, wire.step(1, [1, 1, 1], nan=[0, 3, 0])))
        quiet.wait_for_ack(2)
        busy.wait_for_ack(50)
        assert not webhook.alerts  # the NaN batch's evaluation waits for the 60 s timer

        sent_before = sent[0]
        signalled = time.monotonic()
        collector.process.send_signal(signal.SIGTERM)
        exit_code = collector.process.wait(2 * GRACE_S)
        shutdown_s = time.monotonic() - signalled
        feeder.join(5)
        busy.close()
        quiet.close()
        log = collector.log()

    assert exit_code == 0, log
    assert shutdown_s < GRACE_S, log
    for stream in (busy, quiet):
        assert stream.ended.wait(5)
        assert stream.error is None and stream.status() == grpc.StatusCode.OK, stream.error
    # Every batch sent before SIGTERM was acked, and acks have no gaps.
    assert busy.acks == list(range(1, len(busy.acks) + 1))
    assert len(busy.acks) >= sent_before, (len(busy.acks), sent_before)
    assert quiet.acks == [1, 2]
    (alert,) = [a for a in webhook.alerts if a["labels"]["training_job"] == "nan-at-sigterm"]
    assert alert["labels"]["alertname"] == "GradientNonFinite" and "endsAt" not in alert
    assert "draining 2 report streams" in log and "stopped in" in log
    print(f"shutdown: {shutdown_s:.2f} s; busy stream: {sent_before} batches sent before "
          f"SIGTERM, {len(busy.acks)} acked, {sent[0]} sent in all")


def test_a_draining_collector_refuses_new_calls_and_lets_open_streams_finish():
    """In-process, so the drain can be held open: a quiet stream ends ``drain_gap_s``
    after its last batch."""

    async def scenario() -> None:
        collector = Collector(CollectorConfig(grpc_address="127.0.0.1:0",
                                              metrics_address="127.0.0.1:0"))
        collector.service.drain_gap_s = 2.0
        await collector.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{collector.grpc_port}") as channel:
            stub = pb_grpc.GradientWatchStub(channel)
            session = (await stub.Register(wire.registration(job="held"),
                                           timeout=5)).session_id
            held = stub.Report()
            await held.write(wire.batch(session, 1, wire.step(0, [1, 1, 1])))
            assert (await held.read()).sequence == 1

            stopping = asyncio.create_task(collector.stop(grace_s=GRACE_S))
            await asyncio.sleep(0.1)
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", "gradwatch.v1.GradientWatch"):
                response = await health.Check(health_pb2.HealthCheckRequest(service=service),
                                              timeout=5)
                assert response.status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Register(wire.registration(job="late"), timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert refused.value.details() == "collector is shutting down"
            late = stub.Report()
            await late.write(wire.batch(session, 2, wire.step(1, [1, 1, 1])))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await late.read()
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

            # The open stream still applies what arrives, then ends with OK.
            await held.write(wire.batch(session, 2, wire.step(1, [1, 1, 1])))
            assert (await held.read()).sequence == 2
            assert await held.read() is grpc.aio.EOF
            assert await held.code() == grpc.StatusCode.OK
            await stopping
        assert collector.registry.sessions[session].steps_total == 2

    asyncio.run(scenario())

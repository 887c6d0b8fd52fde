"""TLS, mutual TLS and job-scoped bearer tokens on the collector's gRPC port, with certificates
generated here, a real collector process, real agents (TensorFlow) and hand-built messages."""

from __future__ import annotations

import os
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf

from gradwatch.agent import GradientMonitor
from gradwatch.proto.v1 import gradwatch_pb2_grpc as pb_grpc
from tests.support import wire
from tests.support.certificates import make_certificates
from tests.support.metrics import parse_metrics, select
from tests.support.services import CollectorProcess

pytestmark = pytest.mark.integration

VISION = "vision-secret-token-1111"
NLP = "nlp-secret-token-22222222"


def write_tokens(path, *entries: tuple[str, str, str]) -> None:
    lines = ["tokens:"]
    for name, token, pattern in entries:
        lines += [f"  - name: {name}", f"    token: {token}", f"    training_jobs: ['{pattern}']"]
    path.write_text("\n".join(lines) + "\n")
    stat = path.stat()
    os.utime(path, (stat.st_atime, stat.st_mtime + 1))  # visibly changed, even within 1 s


def train(monitor: GradientMonitor, steps: int = 3) -> bool:
    """A few observed steps; True if the collector acknowledged all of them."""
    v = tf.Variable(np.ones(3, np.float32), name="w")
    for _ in range(steps):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(v * v)
        monitor.observe(tape.gradient(loss, [v]), [v])
    return monitor.close(timeout_s=5)


def steps_of(collector: CollectorProcess, job: str) -> float:
    samples = parse_metrics(collector.scrape())
    return sum(select(samples, "gradwatch_steps_total", training_job=job).values())


def rejected(collector: CollectorProcess, code: str) -> float:
    samples = parse_metrics(collector.scrape())
    return sum(select(samples, "gradwatch_collector_rejected_messages_total", code=code).values())


@pytest.fixture
def certificates(tmp_path):
    return make_certificates(tmp_path)


def test_tls_agents_need_the_ca_and_plaintext_is_refused(certificates, job_name):
    with CollectorProcess("--grpc-tls-cert-file", str(certificates.server_cert),
                          "--grpc-tls-key-file", str(certificates.server_key)) as collector:
        plain = GradientMonitor(collector=collector.grpc_target, training_job=job_name + "-p")
        assert not train(plain)
        secure = GradientMonitor(collector=collector.grpc_target, training_job=job_name,
                                 tls_ca_file=str(certificates.ca))
        assert train(secure)
        assert steps_of(collector, job_name) == 3
        assert steps_of(collector, job_name + "-p") == 0


def test_a_tls_agent_told_the_collector_serves_no_tls(certificates, job_name, caplog):
    """An agent with TLS on and a collector without: gRPC's words were about a handshake
    and an SSL record (WRONG_VERSION_NUMBER); the line now says what to check."""
    with CollectorProcess() as collector:
        agent = GradientMonitor(collector=collector.grpc_target, training_job=job_name,
                                tls_ca_file=str(certificates.ca))
        assert not train(agent)
    assert "does the collector serve TLS, --grpc-tls-cert-file" in caplog.text


def test_mutual_tls_requires_a_client_certificate_from_the_ca(certificates, job_name):
    with CollectorProcess("--grpc-tls-cert-file", str(certificates.server_cert),
                          "--grpc-tls-key-file", str(certificates.server_key),
                          "--grpc-tls-client-ca-file", str(certificates.ca)) as collector:
        anonymous = GradientMonitor(collector=collector.grpc_target, training_job=job_name,
                                    tls_ca_file=str(certificates.ca))
        assert not train(anonymous)
        assert steps_of(collector, job_name) == 0
        known = GradientMonitor(collector=collector.grpc_target, training_job=job_name,
                                tls_ca_file=str(certificates.ca),
                                tls_cert_file=str(certificates.client_cert),
                                tls_key_file=str(certificates.client_key))
        assert train(known)
        assert steps_of(collector, job_name) == 3


@pytest.fixture
def token_collector(tmp_path, certificates, monkeypatch):
    tokens = tmp_path / "tokens.yaml"
    write_tokens(tokens, ("vision", VISION, "vision-*"), ("nlp", NLP, "nlp-*"))
    monkeypatch.setenv("GRADWATCH_LOG_LEVEL", "DEBUG")  # the most the collector ever logs
    with CollectorProcess("--tokens-file", str(tokens),
                          "--grpc-tls-cert-file", str(certificates.server_cert),
                          "--grpc-tls-key-file", str(certificates.server_key)) as collector:
        collector.tokens = tokens
        yield collector


@pytest.fixture
def stub(token_collector, certificates):
    credentials = grpc.ssl_channel_credentials(certificates.ca.read_bytes())
    with grpc.secure_channel(token_collector.grpc_target, credentials) as channel:
        yield pb_grpc.GradientWatchStub(channel)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def test_a_token_registers_only_its_own_jobs(stub, token_collector):
    assert stub.Register(wire.registration("vision-resnet"), metadata=bearer(VISION)).session_id
    for metadata, code in [(bearer(VISION), grpc.StatusCode.PERMISSION_DENIED),
                           ((), grpc.StatusCode.UNAUTHENTICATED),
                           (bearer("made-up-token-0000000"), grpc.StatusCode.UNAUTHENTICATED)]:
        with pytest.raises(grpc.RpcError) as error:
            stub.Register(wire.registration("nlp-bert"), metadata=metadata)
        assert error.value.code() == code
    assert "'vision' may not report training job 'nlp-bert'" in error_details(
        stub, wire.registration("nlp-bert"), bearer(VISION))
    assert rejected(token_collector, "PERMISSION_DENIED") == 2
    assert rejected(token_collector, "UNAUTHENTICATED") == 2


def error_details(stub, request, metadata) -> str:
    try:
        stub.Register(request, metadata=metadata)
    except grpc.RpcError as error:
        return error.details()
    return ""


def test_a_token_cannot_write_another_jobs_session(stub, token_collector):
    """Knowing job B's session id is not enough: the stream's token must cover job B."""
    nlp_session = stub.Register(wire.registration("nlp-bert"), metadata=bearer(NLP)).session_id
    batch = wire.batch(nlp_session, 1, wire.step(1, [1, 1, 1], norm=[1, 1, 1]))
    with pytest.raises(grpc.RpcError) as error:
        list(stub.Report(iter([batch]), metadata=bearer(VISION), timeout=10))
    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
    acks = list(stub.Report(iter([batch]), metadata=bearer(NLP), timeout=10))
    assert [a.sequence for a in acks] == [1]
    assert steps_of(token_collector, "nlp-bert") == 1


def test_tokens_rotate_without_restart_and_revocation_ends_open_streams(stub, token_collector):
    session = stub.Register(wire.registration("vision-a"), metadata=bearer(VISION)).session_id
    rotated = "vision-rotated-token-3333"
    write_tokens(token_collector.tokens, ("vision", rotated, "vision-*"))
    deadline = time.monotonic() + 5
    while True:  # the collector looks at the file at most once a second
        try:
            stub.Register(wire.registration("vision-b"), metadata=bearer(rotated))
            break
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
            assert time.monotonic() < deadline, "the rotated token was never accepted"
            time.sleep(0.2)
    batch = wire.batch(session, 1, wire.step(1, [1, 1, 1]))
    with pytest.raises(grpc.RpcError) as error:
        list(stub.Report(iter([batch]), metadata=bearer(VISION), timeout=10))
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "revoked" in error.value.details()


def test_agent_with_a_token_file_reports_and_tokens_never_reach_a_log(
        token_collector, certificates, tmp_path, caplog):
    token_file = tmp_path / "agent-token"
    token_file.write_text(VISION + "\n")
    ok = GradientMonitor(collector=token_collector.grpc_target, training_job="vision-ok",
                         tls_ca_file=str(certificates.ca), token_file=str(token_file))
    assert train(ok)
    wrong = GradientMonitor(collector=token_collector.grpc_target, training_job="nlp-stolen",
                            tls_ca_file=str(certificates.ca), token=VISION)
    assert not train(wrong)
    assert steps_of(token_collector, "vision-ok") == 3
    assert steps_of(token_collector, "nlp-stolen") == 0
    assert "PERMISSION_DENIED" in caplog.text, "the agent says why"
    caplog.clear()
    none = GradientMonitor(collector=token_collector.grpc_target, training_job="vision-none",
                           tls_ca_file=str(certificates.ca))
    assert not train(none)
    assert "UNAUTHENTICATED missing token" in caplog.text
    assert "(the agent's token: GRADWATCH_TOKEN or GRADWATCH_TOKEN_FILE)" in caplog.text
    for secret in (VISION, NLP):
        assert secret not in caplog.text
        assert secret not in token_collector.log()

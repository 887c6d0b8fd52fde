"""Faults between a training job and its collector: a collector that hangs, dies (kill -9),
comes back on another port behind the same address, loses acks, or is away so long that the
agent's buffer overflows. Training runs in this process; collectors are real processes.

The stable address in front of a moving collector is a loopback TCP proxy standing in for a
Kubernetes Service (what kube-proxy does), the one part that cannot run here for real.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import keras
import pytest
import tensorflow as tf

from gradwatch.agent import GradientMonitor
from gradwatch.agent.core.buffer import step_bytes
from tests.support.faults import TcpProxy
from tests.support.metrics import parse_metrics, select
from tests.support.services import CollectorProcess, free_port
from tests.support.trainers import Trainer, X, Y

pytestmark = pytest.mark.integration

#: A stalled agent would block a step for its ack timeout (10 s) or forever; a healthy
#: eager step of this model takes a few milliseconds.
NO_STALL_S = 2.0


def reporting_trainer(address: str, job: str, **settings) -> tuple[GradientMonitor, Trainer]:
    """A `Trainer` whose monitor reports to ``address`` every 50 ms."""
    monitor = GradientMonitor(collector=address, training_job=job, flush_interval_s=0.05,
                              **settings)
    return monitor, Trainer(monitor)


def acked_all(collector: CollectorProcess, job: str, trainer: Trainer) -> bool:
    """The collector has the latest step (optimizer iterations count from 0)."""
    return job_metrics(collector, job)["gradwatch_last_step"] == trainer.steps - 1


def job_metrics(collector: CollectorProcess, job: str) -> dict[str, float]:
    samples = parse_metrics(collector.scrape())
    return {name: sum(select(samples, name, training_job=job).values())
            for name in ("gradwatch_steps_total", "gradwatch_dropped_steps_total",
                         "gradwatch_last_step")}


def wait_until(predicate, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_collector_hung_then_killed_and_replaced_behind_the_same_address(job_name, caplog):
    """Steps sent to a hung collector that then dies (kill -9) are replayed to its
    replacement, which listens on another port behind the same address. The warnings say
    that the collector went away and, at the same level, that streaming is back (it was
    an INFO line: a log of warnings ended on the failure); the replacement not knowing the
    session is recovery, not a warning."""
    with CollectorProcess() as first, TcpProxy(first.grpc_target) as service, \
            caplog.at_level(logging.INFO, logger="gradwatch"):
        monitor, trainer = reporting_trainer(service.address, job_name)
        trainer.train(20)
        wait_until(lambda: acked_all(first, job_name, trainer))

        os.kill(first.process.pid, signal.SIGSTOP)  # hung: accepts bytes, applies nothing
        trainer.train(20)
        time.sleep(0.5)  # steps 20-39 are on the wire, unacknowledged
        first.process.kill()
        first.process.wait()
        trainer.train(20)  # no collector at all

        with CollectorProcess() as second:
            service.retarget(second.grpc_target)
            moved = time.monotonic()
            wait_until(lambda: job_metrics(second, job_name)["gradwatch_last_step"] == 59)
            replayed_s = time.monotonic() - moved
            trainer.train(20)
            assert monitor.close(timeout_s=30)
            after = job_metrics(second, job_name)
    assert after == {"gradwatch_steps_total": 60, "gradwatch_dropped_steps_total": 0,
                     "gradwatch_last_step": 79}, "steps 20-79 arrive, each once"
    assert trainer.slowest_s < NO_STALL_S
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings and "training continues" in warnings[0], warnings
    assert not [w for w in warnings if "NOT_FOUND" in w], warnings
    back = [w for w in warnings if "again after" in w]
    assert len(back) == 1 and back[-1] == warnings[-1], warnings
    assert "0 steps dropped meanwhile" in back[0], back
    print(f"40 buffered steps replayed {replayed_s:.2f} s after the new collector appeared; "
          f"slowest step {trainer.slowest_s * 1e3:.0f} ms")


def test_a_slow_collector_gets_every_step_once_and_training_does_not_wait(job_name):
    """Every byte between agent and collector held back 250 ms each way: a 500 ms round
    trip, ten flush intervals. Batches pile up in flight, the agent never waits for them,
    and every step arrives once (no ack timeout, no replay)."""
    with CollectorProcess() as collector, \
            TcpProxy(collector.grpc_target, delay_s=0.25) as slow_link:
        monitor, trainer = reporting_trainer(slow_link.address, job_name)
        started = time.monotonic()
        while time.monotonic() - started < 3:
            trainer.train(10)
        trained_s = time.monotonic() - started
        assert monitor.close(timeout_s=30)
        metrics = job_metrics(collector, job_name)
        duplicates = select(parse_metrics(collector.scrape()),
                            "gradwatch_collector_duplicate_batches_total")
    assert metrics == {"gradwatch_steps_total": trainer.steps,
                       "gradwatch_dropped_steps_total": 0,
                       "gradwatch_last_step": trainer.steps - 1}
    assert sum(duplicates.values()) == 0
    assert trainer.slowest_s < 0.5, "no step waited for a round trip"
    print(f"{trainer.steps} steps in {trained_s:.1f} s over a 500 ms round trip, all "
          f"delivered once; slowest step {trainer.slowest_s * 1e3:.0f} ms")


def test_lost_acks_are_replayed_and_counted_once(job_name, monkeypatch):
    """The network swallows the collector's acks: the agent gives up on the connection
    after its ack timeout, replays, and the collector drops what it already applied."""
    monkeypatch.setenv("GRADWATCH_ACK_TIMEOUT", "1")
    with CollectorProcess() as collector, TcpProxy(collector.grpc_target) as service:
        monitor, trainer = reporting_trainer(service.address, job_name)
        trainer.train(10)
        wait_until(lambda: acked_all(collector, job_name, trainer))
        service.blackhole_responses()
        trainer.train(10)
        wait_until(lambda: acked_all(collector, job_name, trainer))
        assert monitor.close(timeout_s=30)
        metrics = job_metrics(collector, job_name)
        samples = parse_metrics(collector.scrape())
    duplicates = select(samples, "gradwatch_collector_duplicate_batches_total")
    assert sum(duplicates.values()) >= 1, "the replay reached the collector"
    assert metrics["gradwatch_steps_total"] == 20, "and nothing was counted twice"
    assert trainer.slowest_s < NO_STALL_S
    print(f"{sum(duplicates.values()):.0f} duplicate batches dropped; slowest step "
          f"{trainer.slowest_s * 1e3:.0f} ms")


def test_overflowing_buffer_drops_the_oldest_steps_and_reports_how_many(job_name):
    port = free_port()
    # Room for 30 steps of 4 variables x 1 replica.
    monitor, trainer = reporting_trainer(f"127.0.0.1:{port}", job_name,
                                         max_buffer_bytes=30 * step_bytes(1, 4))
    trainer.train(100)
    time.sleep(0.3)  # the sender drains the device buffer into its host buffer
    with CollectorProcess("--grpc-address", f"127.0.0.1:{port}") as collector:
        assert monitor.close(timeout_s=30)
        metrics = job_metrics(collector, job_name)
    assert metrics["gradwatch_steps_total"] == 30
    assert metrics["gradwatch_dropped_steps_total"] == 70
    assert metrics["gradwatch_last_step"] == 99, "the oldest steps went, the newest stayed"


def test_a_collector_that_never_answers_leaves_the_device_buffer_emptied(job_name):
    """The sender waits on a collector that accepts and never answers (a Register, up to
    its deadline): the device ring (16 steps here) is still emptied every flush
    interval into the host buffer, which has room, so no step is dropped."""
    from tests.support.faults import Blackhole

    with Blackhole() as hole:
        monitor, trainer = reporting_trainer(hole.address, job_name, buffer_steps=16)
        for _ in range(20):
            trainer.train(10)
            time.sleep(0.05)
        time.sleep(0.2)
        buffers = monitor._sender.buffer.sessions
        held = sum(b.buffered_steps() for b in buffers)
        dropped = sum(b.dropped for b in buffers)
        monitor.close(timeout_s=0.2)
    assert (held, dropped) == (200, 0)


def test_a_batch_the_collector_refuses_is_dropped_alone(job_name, tmp_path, caplog):
    """A collector stricter than the agent (here: diagnosis texts of at most 64 characters)
    refuses the batch carrying the diagnosis of an unused layer. The agent drops that batch
    alone, counts its steps as dropped and goes on; sent again, it would be refused again,
    forever, and nothing after it would arrive."""
    config = tmp_path / "collector.yaml"
    config.write_text("limits:\n  max_text_length: 64\n")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    unused = keras.layers.Dense(2)
    unused.build((None, 4))
    variables = model.trainable_variables + unused.trainable_variables
    with CollectorProcess("--config", str(config)) as collector:
        monitor = GradientMonitor(collector=collector.grpc_target, training_job=job_name,
                                  flush_interval_s=0.05)
        for _ in range(30):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(model(X) - Y))
            monitor.observe(tape.gradient(loss, variables), variables)
            time.sleep(0.01)
        assert monitor.close(timeout_s=30)
        metrics = job_metrics(collector, job_name)
        refused = select(parse_metrics(collector.scrape()),
                         "gradwatch_collector_rejected_messages_total")
    assert refused == {"code=INVALID_ARGUMENT,reason=text_length": 1.0}, "refused once"
    assert any("refused a batch" in r.message and "the limit is 64; dropped it" in r.message
               for r in caplog.records if r.levelname == "ERROR")
    assert metrics["gradwatch_last_step"] == 29, "the steps after it arrived"
    assert metrics["gradwatch_steps_total"] + metrics["gradwatch_dropped_steps_total"] == 30
    print(f"{metrics['gradwatch_dropped_steps_total']:.0f} steps dropped with the refused "
          f"batch, {metrics['gradwatch_steps_total']:.0f} delivered")


def test_agent_flushes_when_the_process_exits_without_close(job_name):
    script = textwrap.dedent(f"""
        import numpy as np, tensorflow as tf
        from gradwatch.agent import GradientMonitor
        monitor = GradientMonitor(training_job={job_name!r}, flush_interval_s=1.0)
        v = tf.Variable(np.ones(3, np.float32))
        for _ in range(7):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(v * v)
            monitor.observe(tape.gradient(loss, [v]), [v])
        # no close(): the interpreter exits with statistics still buffered
    """)
    with CollectorProcess() as collector:
        env = {**os.environ, "GRADWATCH_COLLECTOR": collector.grpc_target}
        result = subprocess.run([sys.executable, "-c", script], env=env, timeout=120,
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        metrics = job_metrics(collector, job_name)
    # With a 1 s flush interval, only the exit hook can have sent them this soon.
    assert metrics["gradwatch_steps_total"] == 7


def observe_sessions(monitor: GradientMonitor, sessions: dict[str, tf.Variable],
                     steps: int) -> None:
    """``steps`` eager steps, each observing one gradient per session (name: variable)."""
    for _ in range(steps):
        for name, variable in sessions.items():
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(tf.matmul(X, variable) - Y))
            monitor.observe(tape.gradient(loss, [variable]), [variable], name=name)
        time.sleep(0.01)


def test_a_session_the_collector_refuses_to_register_does_not_hold_up_the_others(
        job_name, tmp_path, caplog):
    """A collector stricter than the agent (here: labels of at most 64 characters) refuses
    to register the session of a variable with a long name. That session is dropped, with
    one error line that says why; the process's other session registers and reports every
    step. Registering it again would be refused again, forever, and the others with it."""
    config = tmp_path / "collector.yaml"
    config.write_text("limits:\n  max_label_length: 64\n")
    short = tf.Variable(tf.ones([4, 1]), name="short")
    long = tf.Variable(tf.ones([4, 1]), name="a_layer_with_a_long_name_" + "x" * 60)
    with CollectorProcess("--config", str(config)) as collector:
        monitor = GradientMonitor(collector=collector.grpc_target, training_job=job_name,
                                  flush_interval_s=0.05)
        observe_sessions(monitor, {"refused": long, "healthy": short}, steps=20)
        assert monitor.close(timeout_s=30), "nothing left waiting for the refused session"
        metrics = job_metrics(collector, job_name)
        refused = select(parse_metrics(collector.scrape()),
                         "gradwatch_collector_rejected_messages_total")
    assert metrics["gradwatch_last_step"] == 19, "the healthy session reported every step"
    assert metrics["gradwatch_steps_total"] == 20
    assert refused == {"code=INVALID_ARGUMENT,reason=label_length": 1.0}, "refused once"
    errors = [r.message for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "refused to register" in errors[0], errors


def test_a_refused_session_registers_with_the_collector_that_replaces_the_one_that_refused(
        job_name, tmp_path, caplog):
    """The operator reads the refusal, raises the limit and replaces the collector behind
    the same address: the refused session registers with the new one and reports from
    then on. The collector that refused it is not asked again while its connection
    lasts, and the agent says so once."""
    config = tmp_path / "collector.yaml"
    config.write_text("limits:\n  max_label_length: 64\n")
    short = tf.Variable(tf.ones([4, 1]), name="short")
    long = tf.Variable(tf.ones([4, 1]), name="a_layer_with_a_long_name_" + "x" * 60)
    sessions = {"refused": long, "healthy": short}
    with CollectorProcess("--config", str(config)) as strict, \
            TcpProxy(strict.grpc_target) as service:
        monitor = GradientMonitor(collector=service.address, training_job=job_name,
                                  flush_interval_s=0.05)
        observe_sessions(monitor, sessions, steps=20)
        wait_until(lambda: job_metrics(strict, job_name)["gradwatch_last_step"] == 19)
        time.sleep(0.5)  # ten more flushes: the refused session is not registered again
        refused = select(parse_metrics(strict.scrape()),
                         "gradwatch_collector_rejected_messages_total")
        with CollectorProcess() as lenient:
            service.retarget(lenient.grpc_target)
            observe_sessions(monitor, sessions, steps=20)
            assert monitor.close(timeout_s=30)
            samples = parse_metrics(lenient.scrape())
    last_steps = {name: select(samples, "gradwatch_last_step", training_job=job_name,
                               optimizer=name) for name in sessions}
    assert refused == {"code=INVALID_ARGUMENT,reason=label_length": 1.0}, "asked once"
    assert [list(steps.values()) for steps in last_steps.values()] == [[39], [39]], last_steps
    errors = [r.message for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "refused to register refused" in errors[0], errors


def test_a_session_the_collector_cannot_take_yet_waits_and_the_others_report(
        job_name, tmp_path, caplog):
    """A full collector (here: one session at most) answers the second session's
    registration with RESOURCE_EXHAUSTED, which may clear. That session waits in the
    buffer and is registered again every 30 s (one warning line); the first reports
    every step meanwhile."""
    config = tmp_path / "collector.yaml"
    config.write_text("limits:\n  max_sessions: 1\n")
    first = tf.Variable(tf.ones([4, 1]), name="first")
    second = tf.Variable(tf.ones([4, 1]), name="second")
    with CollectorProcess("--config", str(config)) as collector:
        monitor = GradientMonitor(collector=collector.grpc_target, training_job=job_name,
                                  flush_interval_s=0.05)
        observe_sessions(monitor, {"healthy": first, "waiting": second}, steps=20)
        wait_until(lambda: job_metrics(collector, job_name)["gradwatch_last_step"] == 19)
        assert not monitor.close(timeout_s=1), "the waiting session's steps were not delivered"
        metrics = job_metrics(collector, job_name)
    assert metrics["gradwatch_steps_total"] == 20, "the first session reported every step"
    warnings = [r.message for r in caplog.records
                if r.levelname == "WARNING" and "cannot take" in r.message]
    assert len(warnings) == 1 and "RESOURCE_EXHAUSTED" in warnings[0], warnings


def test_a_session_with_unacknowledged_steps_that_a_new_collector_cannot_take_yet_waits(
        job_name, tmp_path, caplog, monkeypatch):
    """The collector is replaced while two sessions' last batches wait for acks (the acks
    were lost), and the new one is full (one session at most). The session it cannot take
    keeps its unacknowledged batches for later, without sending them under no session id:
    the collector would answer NOT_FOUND, the agent would drop the connection and register
    every session again, at every reconnection (15 times a second, a warning each, before
    the fix). The other session reports every step."""
    monkeypatch.setenv("GRADWATCH_ACK_TIMEOUT", "60")  # only the cut ends the connection
    config = tmp_path / "collector.yaml"
    config.write_text("limits:\n  max_sessions: 1\n")
    sessions = {"healthy": tf.Variable(tf.ones([4, 1]), name="first"),
                "waiting": tf.Variable(tf.ones([4, 1]), name="second")}
    with CollectorProcess() as old, TcpProxy(old.grpc_target) as service:
        monitor = GradientMonitor(collector=service.address, training_job=job_name,
                                  flush_interval_s=0.05)
        observe_sessions(monitor, sessions, steps=10)
        wait_until(lambda: job_metrics(old, job_name)["gradwatch_steps_total"] == 20)
        service.blackhole_responses()
        observe_sessions(monitor, sessions, steps=10)
        time.sleep(0.3)  # sent, never acknowledged
        with CollectorProcess("--config", str(config)) as full:
            service.retarget(full.grpc_target)
            observe_sessions(monitor, sessions, steps=10)
            # (the healthy session's alone: the other is not registered there)
            wait_until(lambda: job_metrics(full, job_name)["gradwatch_last_step"] == 29)
            time.sleep(1.0)  # twenty flushes
            refused = select(parse_metrics(full.scrape()),
                             "gradwatch_collector_rejected_messages_total")
            log = full.log()
            monitor.close(timeout_s=1)
        old_ids = set(re.findall(r"registered .* as (\w+)", old.log()))
    # NOT_FOUND only for the old collector's session ids (as many as the batches replayed
    # under them before the stream ends: a race), never for none; the full collector's
    # refusal once.
    unknown = re.findall(r"unknown session_id '(\w*)'", log)
    assert unknown and set(unknown) <= old_ids, (unknown, old_ids)
    assert refused["code=NOT_FOUND,reason=unknown_session"] == len(unknown), refused
    assert refused["code=RESOURCE_EXHAUSTED,reason=sessions"] == 1, refused
    assert log.count("registered ") == 1, "the healthy session registered once, and stayed"
    assert not [r for r in caplog.records if "session_id ''" in r.getMessage()]


def test_a_buffer_too_small_for_one_step_says_so_once(job_name, caplog):
    """``max_buffer_bytes`` below one step's size drops every step: one line says so."""
    import logging

    with CollectorProcess() as collector, caplog.at_level(logging.WARNING, logger="gradwatch"):
        monitor, trainer = reporting_trainer(collector.grpc_target, job_name,
                                             max_buffer_bytes=step_bytes(1, 4) - 1)
        trainer.train(20)
        monitor.close(timeout_s=5)
    lines = [r.getMessage() for r in caplog.records if "holds not one step" in r.getMessage()]
    assert len(lines) == 1 and "GRADWATCH_MAX_BUFFER_BYTES" in lines[0], caplog.text


def test_a_hung_task_registers_with_its_restarted_collector_and_pages_again(job_name,
                                                                           tmp_path):
    """A task that stepped, then hung (its sender alive, no steps to send), while WorkerSilent
    fires: its collector is restarted (SIGTERM, then again on the same address). The agent
    finds out at the reconnect that its session is unknown there and registers it again at
    once, not at exit; the new collector pages WorkerSilent for it after ``seconds`` of
    silence since then (the task is past its first step: not ``first_step_seconds``)."""
    config = tmp_path / "collector.yaml"
    config.write_text(json.dumps({
        "evaluation_interval_seconds": 0.2,
        "rules": {"WorkerSilent": {"seconds": 2.0, "first_step_seconds": 600.0}}}))
    args = ("--grpc-address", f"127.0.0.1:{free_port()}", "--config", str(config))

    def state(collector: CollectorProcess) -> tuple[int, float]:
        samples = parse_metrics(collector.scrape())
        sessions = select(samples, "gradwatch_task_info", training_job=job_name)
        silent = select(samples, "gradwatch_alerts_active", alertname="WorkerSilent",
                        training_job=job_name)
        return len(sessions), sum(silent.values())

    monitor, trainer = reporting_trainer(args[1], job_name)
    try:
        with CollectorProcess(*args) as first:
            trainer.train(20)
            wait_until(lambda: acked_all(first, job_name, trainer))
            wait_until(lambda: state(first) == (1, 1), timeout_s=10)  # hung: it pages
        with CollectorProcess(*args) as second:
            started = time.monotonic()
            wait_until(lambda: state(second)[0] == 1, timeout_s=10)  # (reconnect backoff)
            registered_s = time.monotonic() - started
            assert state(second) == (1, 0), "silent since it registered again, not before"
            wait_until(lambda: state(second) == (1, 1), timeout_s=10)
            paged_s = time.monotonic() - started
            assert second.log().count("registered ") == 1, second.log()
    finally:
        monitor.close(timeout_s=1)
    print(f"registered again {registered_s:.2f} s after the collector restarted; "
          f"WorkerSilent after {paged_s:.2f} s")


def test_grpc_runtime_stays_up_after_the_last_monitor_closes(job_name):
    """grpc.aio tears its runtime down whenever its last channel or call is freed, and waits
    there, holding a process-wide lock, for every operation still pending in gRPC's core.
    The full test suite met one that never finished (after collectors that stopped
    answering): that sender thread waited for good, and every monitor made later in the
    process blocked in its channel's constructor and delivered nothing (112 tests failed
    in CI, the same ones on this VM). gradwatch now holds the runtime from its first
    connection on: with every monitor closed, gRPC's poller thread still runs (no teardown
    to wait in), and monitors made afterwards deliver. In a process of its own: another
    test's channels would hold the runtime up as well."""
    script = textwrap.dedent(f"""
        import threading, torch
        from gradwatch.agent.torch import GradientMonitor

        def train(job):
            model = torch.nn.Linear(4, 1)
            monitor = GradientMonitor(training_job=job, flush_interval_s=0.05)
            optimizer = monitor.wrap(torch.optim.SGD(model.parameters(), 0.1), model)
            for _ in range(3):
                optimizer.zero_grad()
                model(torch.ones(2, 4)).sum().backward()
                optimizer.step()
            return monitor.close(timeout_s=10)

        for run in range(3):
            assert train({job_name!r} + str(run))
            threading.Event().wait(0.5)  # teardown, if any, runs as the sender ends
            pollers = [t for t in threading.enumerate() if "_poll_wrapper" in t.name]
            print("closed; gRPC pollers running:", len(pollers), flush=True)
    """)
    with CollectorProcess() as collector:
        env = {**os.environ, "GRADWATCH_COLLECTOR": collector.grpc_target}
        result = subprocess.run([sys.executable, "-c", script], env=env, timeout=120,
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.splitlines() == ["closed; gRPC pollers running: 1"] * 3, (
            result.stdout + result.stderr[-3000:])
        delivered = {run: job_metrics(collector, f"{job_name}{run}")["gradwatch_steps_total"]
                     for run in range(3)}
    assert delivered == {0: 3.0, 1: 3.0, 2: 3.0}

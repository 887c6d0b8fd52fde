"""Three collector replicas on loopback, scraped by a real Prometheus; training jobs pick one
each by rendezvous hashing. One replica is killed (kill -9) mid-run: its jobs move to their
second choice within seconds, their buffers replay, and Prometheus sees their steps go on.
When it comes back on the same address, they return to it (failback).
"""

from __future__ import annotations

import itertools
import time

import pytest

from gradwatch.agent import GradientMonitor
from gradwatch.agent.core.endpoints import rank, resolve
from tests.support.metrics import parse_metrics
from tests.support.services import CollectorProcess, PrometheusProcess, free_port, require_binary
from tests.support.trainers import Trainer

pytestmark = pytest.mark.integration

JOBS = [f"scale-out-{i}" for i in range(6)]


def last_steps(collector: CollectorProcess) -> dict[str, float]:
    """Latest step per training job this collector has (empty if it is down)."""
    try:
        return last_steps_of(parse_metrics(collector.scrape(timeout_s=2)))
    except OSError:
        return {}


def steps_of(collector: CollectorProcess, job: str) -> float:
    """The steps the collector counted for ``job`` (0 if none, or if it is down)."""
    try:
        samples = parse_metrics(collector.scrape(timeout_s=2))
    except OSError:
        return 0.0
    return sum(v for labels, v in samples.get("gradwatch_steps_total", [])
               if labels["training_job"] == job)


def last_steps_of(samples) -> dict[str, float]:
    return {labels["training_job"]: value
            for labels, value in samples.get("gradwatch_last_step", [])}


def owner(collectors: list[CollectorProcess], job: str, trainer: Trainer) -> int | None:
    """Index of the collector that has the job's latest step."""
    for i, collector in enumerate(collectors):
        if last_steps(collector).get(job) == trainer.steps - 1:
            return i
    return None


def test_replicas_share_jobs_and_take_over_a_killed_ones(monkeypatch):
    require_binary("prometheus")
    monkeypatch.setenv("GRADWATCH_FAILBACK_INTERVAL", "1")
    ports = [(free_port(), free_port()) for _ in range(3)]

    def start(i: int) -> CollectorProcess:
        grpc_port, metrics_port = ports[i]
        return CollectorProcess("--grpc-address", f"127.0.0.1:{grpc_port}",
                                "--metrics-address", f"127.0.0.1:{metrics_port}").__enter__()

    collectors = [start(i) for i in range(3)]
    targets = ",".join(c.grpc_target for c in collectors)

    def ranking(job: str) -> list[int]:
        return [[c.grpc_target for c in collectors].index(e.address)
                for e in rank(resolve(targets.split(",")), job)]

    # Five fixed jobs and one whose first choice differs from the first job's: with
    # random ports, six jobs all land on one replica once in 243 runs.
    extra = next(f"scale-out-{i}" for i in itertools.count(len(JOBS))
                 if ranking(f"scale-out-{i}")[0] != ranking(JOBS[0])[0])
    jobs = [*JOBS[:-1], extra]
    preferred = {job: ranking(job) for job in jobs}
    victim = preferred[jobs[0]][0]
    moved = [job for job in jobs if preferred[job][0] == victim]
    stayed = [job for job in jobs if preferred[job][0] != victim]
    assert stayed, "the jobs spread over more than one replica"
    monitors = {job: GradientMonitor(collector=targets, training_job=job,
                                     flush_interval_s=0.05) for job in jobs}
    trainers = {job: Trainer(monitors[job]) for job in jobs}

    def train(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for trainer in trainers.values():
                trainer.train(1)
            time.sleep(0.02)

    def wait_for_owners(expected: dict[str, int], timeout_s: float = 15.0) -> float:
        start_time = time.monotonic()
        while True:
            train(0.2)
            if all(owner(collectors, job, trainers[job]) == i for job, i in expected.items()):
                return time.monotonic() - start_time
            assert time.monotonic() - start_time < timeout_s, {
                job: owner(collectors, job, trainers[job]) for job in expected}

    targets_http = [c.metrics_url.removeprefix("http://").removesuffix("/metrics")
                    for c in collectors]
    try:
        with PrometheusProcess(targets_http, scrape_interval="250ms") as prometheus:
            # Prometheus applies its targets up to 5 s after it starts: measure from its
            # first scrapes, or the kill below may fall before any data.
            prometheus.wait_for(f"count(up == 1) == {len(collectors)}")
            started = time.time()
            wait_for_owners({job: preferred[job][0] for job in jobs})

            collectors[victim].process.kill()  # kill -9
            collectors[victim].process.wait()
            killed = time.time()
            move_s = wait_for_owners({job: preferred[job][1] for job in moved}
                                     | {job: preferred[job][0] for job in stayed})
            train(2)

            collectors[victim] = start(victim)  # back on the same address
            back_s = wait_for_owners({job: preferred[job][0] for job in jobs})
            train(1)
            for monitor in monitors.values():
                assert monitor.close(timeout_s=30)
            final = {job: trainers[job].steps - 1 for job in jobs}
            for job in jobs:  # scraped since
                prometheus.wait_for(f'max(gradwatch_last_step{{training_job="{job}"}}) '
                                    f'== {final[job]}', 10)
            # The range's points lie on a 0.25 s grid from `started`: its last one must
            # come after the scrapes that saw the last steps.
            seen = time.time() + 0.25
            series = {job: prometheus.query_range(
                f'max by (training_job) (gradwatch_last_step{{training_job="{job}"}})',
                started, seen, step=0.25) for job in jobs}
            dropped = prometheus.query("sum(gradwatch_dropped_steps_total)")
    finally:
        for collector in collectors:
            collector.__exit__(None, None, None)

    print(f"killed replica's {len(moved)} jobs moved in {move_s:.2f} s, "
          f"returned in {back_s:.2f} s after it restarted")
    assert move_s < 10 and back_s < 10
    assert float(dropped[0]["value"][1]) == 0
    for job, result in series.items():
        points = [(float(t), float(v)) for t, v in result[0]["values"]]
        times = [t for t, _ in points]
        steps = [v for _, v in points]
        assert steps == sorted(steps), f"{job}: the step never goes back"
        assert steps[-1] == final[job], f"{job}: Prometheus has the last step"
        largest_gap = max(b - a for a, b in itertools.pairwise(times))
        # Prometheus marks the dead replica's series stale at its first failed scrape;
        # the survivor's are there by its next scrape: a gap of at most a scrape or two.
        assert largest_gap <= 1.0, f"{job}: no data for {largest_gap:.2f} s after {killed}"


def test_a_draining_replica_hands_its_jobs_to_the_next_without_losing_steps():
    """SIGTERM: the replica acks what is on its way and ends the streams; the agents move on
    at once and the next replica gets every later step, each once."""
    job = JOBS[0]
    with CollectorProcess() as first, CollectorProcess() as second:
        targets = f"{first.grpc_target},{second.grpc_target}"
        order = [e.address for e in rank(resolve(targets.split(",")), job)]
        preferred, fallback = ((first, second) if order[0] == first.grpc_target
                               else (second, first))
        monitor = GradientMonitor(collector=targets, training_job=job, flush_interval_s=0.05)
        trainer = Trainer(monitor)
        trainer.train(20)
        deadline = time.monotonic() + 15
        while last_steps(preferred).get(job) != 19:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert preferred.stop(timeout_s=10) == 0  # SIGTERM, graceful
        trainer.train(20)
        assert monitor.close(timeout_s=30)
        samples = parse_metrics(fallback.scrape())
    steps = {labels["training_job"]: value
             for labels, value in samples["gradwatch_steps_total"]}
    assert steps[job] == 20 and last_steps_of(samples)[job] == 39
    assert trainer.slowest_s < 2.0


def test_a_fast_job_moves_back_to_its_preferred_replica(monkeypatch):
    """A job stepping without pause moves back once its preferred replica serves again:
    everything sent to the fallback is acknowledged there first, so no step counts twice.
    The fallback then forgets the job at once: kept as a finished task's for an hour, its
    alerts kept firing there beside the preferred replica's resolutions."""
    monkeypatch.setenv("GRADWATCH_FAILBACK_INTERVAL", "0.5")
    job = JOBS[1]
    port = free_port()
    with CollectorProcess() as other:
        preferred = CollectorProcess("--grpc-address", f"127.0.0.1:{port}").__enter__()
        try:
            targets = [preferred.grpc_target, other.grpc_target]
            if rank(resolve(targets), job)[0].address != preferred.grpc_target:
                targets.reverse()  # name the replicas so that the job prefers `preferred`
                job = next(j for j in (f"fast-{i}" for i in range(100))
                           if rank(resolve(targets), j)[0].address == preferred.grpc_target)
            monitor = GradientMonitor(collector=",".join(targets), training_job=job,
                                      flush_interval_s=0.05)
            trainer = Trainer(monitor)
            trainer.train(50)
            preferred.process.kill()
            preferred.process.wait()
            trainer.train(100)
            preferred = CollectorProcess("--grpc-address", f"127.0.0.1:{port}").__enter__()
            deadline = time.monotonic() + 20
            while job not in last_steps(preferred):  # no pause between steps
                assert time.monotonic() < deadline, "the job never moved back"
                trainer.train(5)
            trainer.train(50)
            assert monitor.close(timeout_s=30)
            back = last_steps(preferred)[job]
            # (the fallback serves this job alone: what it applied, kept after it forgot it)
            ((_, away_steps),) = parse_metrics(other.scrape())[
                "gradwatch_collector_step_reports_total"]
            total = away_steps + steps_of(preferred, job)
            deadline = time.monotonic() + 10
            while job in last_steps(other):  # it said it moved: forgotten there
                assert time.monotonic() < deadline, "the fallback kept the job"
                time.sleep(0.1)
        finally:
            preferred.__exit__(None, None, None)
    assert back == trainer.steps - 1 and 0 < away_steps < trainer.steps
    # The killed replica took what it had acked of the first 50 steps with it; nothing else
    # was lost, and nothing counted on both.
    assert trainer.steps - 50 <= total <= trainer.steps

"""DDP and FSDP2 jobs of two real processes under torchrun (gloo, CPU) reporting to one
collector: each rank measured before the all-reduce, unused parameters named before DDP
complains, shards combined into one norm per parameter."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.support.metrics import parse_metrics, select
from tests.support.services import free_port

pytestmark = pytest.mark.integration

JOB_SCRIPT = Path(__file__).with_name("distributed_job.py")


def torchrun(collector, mode: str) -> tuple[str, subprocess.CompletedProcess]:
    """Runs the job to the end (bounded); returns its name (torchrun's run id) and result."""
    job = f"torch-{mode}-{uuid.uuid4().hex[:6]}"
    env = {**os.environ, "GRADWATCH_COLLECTOR": collector.grpc_target,
           "OMP_NUM_THREADS": "1", "GRADWATCH_TRAINING_JOB": ""}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
         "--rdzv-id", job, str(JOB_SCRIPT), mode],
        env=env, capture_output=True, text=True, timeout=180)
    return job, result


def scrape(collector, name: str, job: str, **labels: str) -> dict[str, float]:
    deadline = time.monotonic() + 5
    while True:
        found = select(parse_metrics(collector.scrape()), name, training_job=job, **labels)
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode", ["unused", "unused-found"])
def test_unused_parameters_are_named_from_the_first_step(collector, webhook, mode):
    job, result = torchrun(collector, mode)
    assert "did not deliver" not in result.stdout
    if mode == "unused":
        assert "DDP raised: Expected to have finished reduction" in result.stdout, result.stderr
    else:
        assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    present = scrape(collector, "gradwatch_gradient_present", job)
    assert present == {"hidden.weight": 1, "hidden.bias": 1, "out.weight": 1, "out.bias": 1,
                       "unused.weight": 0, "unused.bias": 0}, result.stderr[-3000:]
    steps = scrape(collector, "gradwatch_steps_total", job)
    assert sorted(steps.values()) == ([1.0, 1.0] if mode == "unused" else [3.0, 3.0])
    alert = webhook.wait_for(lambda a: a["labels"].get("training_job") == job
                             and a["labels"]["alertname"] == "GradientMissing"
                             and sorted(a["annotations"]["tasks"].split(", "))
                             == ["worker/0", "worker/1"], 10)
    assert alert is not None, [a for a in webhook.alerts if a["labels"]["training_job"] == job]
    assert alert["annotations"]["variables"] == "unused.weight, unused.bias"
    assert "never read" in alert["annotations"]["causes"]


@pytest.mark.timeout(240)
def test_ranks_started_by_mp_spawn_report_as_their_rank(collector, job_name):
    """PyTorch's DDP tutorial starts ranks with ``mp.spawn``: no ``RANK`` in their
    environment (once, every rank reported as worker 0 and the collector refused all
    but one). The task index is the process group's rank."""
    env = {**os.environ, "GRADWATCH_COLLECTOR": collector.grpc_target,
           "GRADWATCH_TRAINING_JOB": job_name, "OMP_NUM_THREADS": "1"}
    for variable in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "GRADWATCH_TASK_INDEX"):
        env.pop(variable, None)
    result = subprocess.run([sys.executable, str(JOB_SCRIPT.with_name("spawned_job.py")),
                             str(free_port())], env=env, capture_output=True, text=True,
                            timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    steps = scrape(collector, "gradwatch_steps_total", job_name)
    assert {k.split("task_index=")[1].split(",")[0]: v for k, v in steps.items()} == {
        "0": 3.0, "1": 3.0}, result.stderr[-3000:]
    norms = scrape(collector, "gradwatch_global_gradient_norm", job_name)
    assert len(set(norms.values())) == 2  # each rank's own, before the all-reduce
    assert "ALREADY_EXISTS" not in result.stderr


@pytest.mark.timeout(240)
def test_pytorch_lightning_ddp_script_reports_every_rank(collector, job_name):
    """``python train.py`` with ``Trainer(strategy="ddp", devices=2)``: Lightning starts
    the second rank itself (its environment has no ``RANK``), the monitor is made in
    ``configure_optimizers``. Each rank reports as its rank, and the layer never called is
    named at once with its cause; given the DDP module, each rank's own gradients."""
    pytest.importorskip("pytorch_lightning")
    env = {**os.environ, "GRADWATCH_COLLECTOR": collector.grpc_target,
           "GRADWATCH_TRAINING_JOB": job_name, "OMP_NUM_THREADS": "1"}
    for variable in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "GRADWATCH_TASK_INDEX"):
        env.pop(variable, None)
    result = subprocess.run([sys.executable, str(JOB_SCRIPT.with_name("lightning_ddp_job.py"))],
                            env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    steps = scrape(collector, "gradwatch_steps_total", job_name)
    assert {k.split("task_index=")[1].split(",")[0]: v for k, v in steps.items()} == {
        "0": 4.0, "1": 4.0}, result.stderr[-3000:]
    present = scrape(collector, "gradwatch_gradient_present", job_name)
    assert {name for name, value in present.items() if not value} == {
        "unused.weight", "unused.bias"}
    causes = parse_metrics(collector.scrape())["gradwatch_gradient_missing_cause_info"]
    assert {labels["cause"] for labels, _ in causes
            if labels["training_job"] == job_name} == {"unused"}
    norms = scrape(collector, "gradwatch_global_gradient_norm", job_name)
    assert len(set(norms.values())) == 2  # each rank's own, before the all-reduce


@pytest.mark.timeout(240)
def test_gradients_accumulated_under_no_sync_are_each_ranks_own(collector):
    """DDP's ``no_sync()`` for gradient accumulation: the all-reduce runs once, after the
    last micro-batch, and each rank reports the gradients it accumulated, before it."""
    job, result = torchrun(collector, "no-sync")
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    # The ranks' lines can run together in torchrun's output.
    local = {rank: float(norm) for rank, norm in
             re.findall(r"LOCAL (\d+) (\d+\.\d+(?:e-?\d+)?)", result.stdout)}
    norms = scrape(collector, "gradwatch_global_gradient_norm", job)
    by_rank = {k.split("task_index=")[1].split(",")[0]: v for k, v in norms.items()}
    assert by_rank == pytest.approx(local, rel=1e-5) and len(local) == 2, result.stdout
    assert sorted(scrape(collector, "gradwatch_steps_total", job).values()) == [1.0, 1.0]


@pytest.mark.timeout(240)
def test_gradients_accumulated_without_no_sync_are_the_applied_ones(collector):
    """Accumulation without ``no_sync()``: DDP all-reduces every micro-batch, so a rank's
    own sum exists nowhere. The hook measured each micro-batch's bucket and kept the last:
    the ranks' average of the first three plus the rank's fourth, neither gradient. Both
    ranks now report what the step applies."""
    job, result = torchrun(collector, "synced-accumulation")
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    applied = {rank: float(norm) for rank, norm in
               re.findall(r"APPLIED (\d+) (\d+\.\d+(?:e-?\d+)?)", result.stdout)}
    assert len(applied) == 2 and applied["0"] == pytest.approx(applied["1"]), result.stdout
    norms = scrape(collector, "gradwatch_global_gradient_norm", job)
    by_rank = {k.split("task_index=")[1].split(",")[0]: v for k, v in norms.items()}
    assert by_rank == pytest.approx(applied, rel=1e-5)


def test_two_optimizers_sharing_a_ddp_bucket_report_each_ranks_own(collector):
    """Two optimizers over disjoint layers of one DDP model, whose gradients share a bucket:
    the bucket was measured for the optimizer of its first parameter and thrown away, so
    both reported the all-reduced average (the same on both ranks). A batch dropped after
    its backward pass (``zero_grad()``, then the next batch) left its buckets' measures for
    the next step, which then read the all-reduced gradients."""
    job, result = torchrun(collector, "two-optimizers")
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    local = [json.loads(line) for line in re.findall(r"LOCAL (\{[^}]*\})", result.stdout)]
    assert len(local) == 2, result.stdout
    norms = scrape(collector, "gradwatch_global_gradient_norm", job)
    reported = {(k.split("optimizer=")[1].split(",")[0], int(k.split("task_index=")[1].split(
        ",")[0])): v for k, v in norms.items()}
    truth = {(name, line["rank"]): line[name] for line in local for name in ("SGD", "Adam")}
    assert reported == pytest.approx(truth, rel=1e-5)
    assert reported[("SGD", 0)] != pytest.approx(reported[("SGD", 1)])


@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode", ["join", "join-zero"])
def test_what_a_joined_rank_does_for_the_others_is_not_training(collector, webhook, mode):
    """Uneven inputs under ``Join`` (PyTorch's Join tutorial): once rank 0 runs out of
    batches, its join hooks shadow rank 1's steps: DDP's all-reduces of zero buckets ran
    the measuring hook, and its measures were taken at rank 0's next step (the next
    epoch's first), which then reported the ranks' average; ``ZeroRedundancyOptimizer``'s
    join hook steps the optimizer, which was reported as steps without any gradient and
    paged GradientMissing (critical, "step() called twice") and ReplicaDivergence."""
    job, result = torchrun(collector, mode)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    steps = scrape(collector, "gradwatch_steps_total", job)
    assert {k.split("task_index=")[1].split(",")[0]: v for k, v in steps.items()} == {
        "0": 2.0, "1": 6.0}, steps
    present = scrape(collector, "gradwatch_gradient_present", job)
    assert {name for name, value in present.items() if not value} == {
        "unused.weight", "unused.bias"}, present  # (this job's model has a layer never called)
    causes = scrape(collector, "gradwatch_gradient_missing_cause_info", job)
    assert set(causes) == set(scrape(collector, "gradwatch_gradient_missing_cause_info", job,
                                     cause="unused")) == {"unused.weight", "unused.bias"}
    time.sleep(1)  # rules run per batch: any alert is out by now
    assert {a["labels"]["alertname"] for a in webhook.alerts
            if a["labels"].get("training_job") == job} == {"GradientMissing"}
    if mode == "join":  # (each rank's at its last step: rank 0's the epoch's first)
        local = {rank: float(norm) for rank, norm in re.findall(r"LOCAL (\d) (\S+)",
                                                                 result.stdout)}
        norms = scrape(collector, "gradwatch_global_gradient_norm", job)
        assert {k.split("task_index=")[1].split(",")[0]: v for k, v in norms.items()} \
            == pytest.approx(local, rel=1e-5)


@pytest.mark.timeout(240)
def test_a_nan_on_one_rank_is_that_ranks(collector):
    job, result = torchrun(collector, "nan")
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    nonfinite = scrape(collector, "gradwatch_nonfinite_steps_total", job)
    by_rank = {k.split("task_index=")[1].split(",")[0]: v for k, v in nonfinite.items()}
    # Rank 1's own gradients went NaN at step 1, before the all-reduce; rank 0's only at
    # step 2, when the averaged update had made the weights NaN everywhere.
    assert by_rank == {"0": 1.0, "1": 2.0}, by_rank


@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode", ["fsdp1", "tensor-parallel"])
def test_other_shardings_combine_into_each_parameters_norm(collector, mode):
    """FSDP1 (``use_orig_params=True``) leaves the .grad of a parameter none of whose
    elements a rank holds None there: healthy parameters read missing, paged as "never
    read" and as diverging replicas. Tensor parallelism replicates ``out.bias`` on both
    ranks: counted once per rank, its norm read √2 too large. FSDP1 fills a flat
    gradient, so its unused layer reads present with norm 0. FSDP1's own ``clip_grad_norm_``
    clips in place without ``torch.nn.utils``: its norms read clipped."""
    job, result = torchrun(collector, mode)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    whole = json.loads(next(line for line in result.stdout.splitlines()
                            if line.startswith("NORMS "))[6:])
    reported = scrape(collector, "gradwatch_gradient_norm", job)
    present = scrape(collector, "gradwatch_gradient_present", job)
    for name, norm in whole.items():
        assert reported[name] == pytest.approx(norm, rel=1e-5), name
        assert present[name] == 1, name
    unused = {"unused.weight", "unused.bias"}
    assert set(reported) == set(whole) | unused
    if mode == "tensor-parallel":
        assert not unused & set(whole)
        assert {name for name, value in present.items() if not value} == unused
    else:
        assert set(present.values()) == {1}


@pytest.mark.timeout(240)
def test_fsdp2_shards_combine_into_each_parameters_norm(collector):
    job, result = torchrun(collector, "fsdp2")
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    full = json.loads(next(line for line in result.stdout.splitlines()
                           if line.startswith("NORMS "))[6:])
    reported = scrape(collector, "gradwatch_gradient_norm", job)
    assert set(reported) == set(full) | {"unused.weight", "unused.bias"}
    for name, norm in full.items():
        assert reported[name] == pytest.approx(norm, rel=1e-5), name
    # The loss reads unsharded copies of the parameters, never the optimizer's shards: an
    # unused layer shaped like one that trains must not be taken for a model built twice
    # ("another parameter of its shape, which no optimizer updates"), as it was in a
    # helper's mp.spawn script; this job did not show it before the fix, and guards it.
    assert set(scrape(collector, "gradwatch_gradient_missing_cause_info", job,
                      cause="unused")) == {"unused.weight", "unused.bias"}

"""The PyTorch data-loading tutorial's shape with worker processes, for
tests/torch/test_training.py. First a child forked before the parent monitors anything
makes a monitor of its own and streams (PyTorch's Hogwild example shares a model with
forked trainers; job ``<GRADWATCH_TRAINING_JOB>-child``, 3 steps). Then a ``DataLoader``
with ``num_workers=2`` forks its workers at every epoch, while the monitor streams to a
collector; the process forks a child that steps the wrapped optimizer itself and exits
normally; then children that make a monitor of their own, which cannot stream once the
parent has: while its monitor streams, and after it is closed.

    python forked_workers_job.py EPOCHS   (GRADWATCH_COLLECTOR, GRADWATCH_TRAINING_JOB set)

Prints ``steps N`` and ``child exited C`` per child; exits 0 if the parent's monitor
delivered everything.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

import torch

from gradwatch.agent.torch import GradientMonitor


class Squares(torch.utils.data.Dataset):
    """Its items are computed with torch in the worker (a recorder inherited from the
    parent would see these calls)."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.full((8,), float(index) / 64)
        return x, (x * x).sum(dim=0, keepdim=True)


def in_child(run: Callable[[], int]) -> None:
    """Forks a child that exits with ``run()``'s code (4 on an exception); prints it."""
    child = os.fork()
    if child == 0:
        try:
            code = run()
        except BaseException:
            code = 4
        sys.stdout.flush()
        os._exit(code)
    _, status = os.waitpid(child, 0)
    print("child exited", os.waitstatus_to_exitcode(status), flush=True)


def hogwild(model: torch.nn.Module, *, delivered: bool) -> Callable[[], int]:
    """A trainer as in Hogwild: its own monitor and optimizer over the shared model."""
    def run() -> int:
        monitor = GradientMonitor(flush_interval_s=0.02, training_job=os.environ[
            "GRADWATCH_TRAINING_JOB"] + "-child")
        optimizer = monitor.wrap(torch.optim.SGD(model.parameters(), 0.01), model)
        for _ in range(3):
            optimizer.zero_grad()
            model(torch.ones(4, 8)).sum().backward()
            optimizer.step()
        started = time.monotonic()
        closed = monitor.close(timeout_s=10)
        fast = time.monotonic() - started < 2
        return 0 if (closed and monitor.enabled and fast if delivered
                     else closed and not monitor.enabled and fast) else 5
    return run


def main(epochs: int) -> int:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 1))
    in_child(hogwild(model, delivered=True))  # gradwatch has not streamed here yet
    monitor = GradientMonitor(flush_interval_s=0.02)
    optimizer = monitor.wrap(torch.optim.SGD(model.parameters(), 0.01), model)
    steps = 0
    for _ in range(epochs):
        loader = torch.utils.data.DataLoader(Squares(), batch_size=16, num_workers=2,
                                             multiprocessing_context="fork")
        for x, y in loader:
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
            steps += 1
    print("steps", steps, flush=True)

    def step_inherited() -> int:  # the monitor came along switched off: steps go nowhere
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(torch.ones(4, 8)), torch.ones(4, 1)).backward()
        optimizer.step()
        return 0 if monitor.close() and not monitor.enabled else 3

    in_child(step_inherited)
    in_child(hogwild(model, delivered=False))  # the parent streams: disabled, one line
    delivered = monitor.close(timeout_s=10)
    in_child(hogwild(model, delivered=False))  # streamed before: gRPC's runtime is still up
    return 0 if delivered else 1


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1])))

"""The PyTorch data-loading tutorial's shape with worker processes, for
tests/torch/test_training.py: a ``DataLoader`` with ``num_workers=2`` forks its workers
at every epoch, while the monitor streams to a collector. Then the process forks a child
that steps the wrapped optimizer itself (PyTorch's Hogwild example shares a model with
forked trainers) and exits normally.

    python forked_workers_job.py EPOCHS   (GRADWATCH_COLLECTOR, GRADWATCH_TRAINING_JOB set)

Prints ``steps N`` and ``child exited C``; exits 0 if the parent's monitor delivered
everything.
"""

from __future__ import annotations

import os
import sys

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


def main(epochs: int) -> int:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 1))
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
    child = os.fork()
    if child == 0:  # the monitor came along switched off: its steps go nowhere, quickly
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(torch.ones(4, 8)), torch.ones(4, 1)).backward()
        optimizer.step()
        sys.exit(0 if monitor.close() and not monitor.enabled else 3)
    _, status = os.waitpid(child, 0)
    print("child exited", os.waitstatus_to_exitcode(status), flush=True)
    return 0 if monitor.close(timeout_s=10) else 1


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1])))

"""PyTorch's "Getting Started with Distributed Data Parallel" shape, for
tests/torch/test_distributed.py: ``mp.spawn`` starts the ranks, which set up the process
group themselves (``MASTER_ADDR``/``MASTER_PORT``; no ``RANK`` in the environment).
Each rank makes its monitor before the process group exists and trains 3 steps on its
own data.

    python spawned_job.py PORT
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gradwatch.agent.torch import GradientMonitor

WORLD_SIZE = 2


class ToyModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net1 = torch.nn.Linear(10, 10)
        self.relu = torch.nn.ReLU()
        self.net2 = torch.nn.Linear(10, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net2(self.relu(self.net1(x)))


def demo_basic(rank: int, world_size: int) -> None:
    monitor = GradientMonitor(flush_interval_s=0.05)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.manual_seed(0)
    ddp_model = torch.nn.parallel.DistributedDataParallel(ToyModel())
    optimizer = monitor.wrap(torch.optim.SGD(ddp_model.parameters(), lr=0.001), ddp_model)
    data = torch.Generator().manual_seed(rank)
    for _ in range(3):
        optimizer.zero_grad()
        outputs = ddp_model(torch.randn(20, 10, generator=data))
        torch.nn.MSELoss()(outputs, torch.randn(20, 5, generator=data)).backward()
        optimizer.step()
    assert monitor.close(timeout_s=10)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = sys.argv[1]
    mp.spawn(demo_basic, args=(WORLD_SIZE,), nprocs=WORLD_SIZE, join=True)
